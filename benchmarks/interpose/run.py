#!/usr/bin/env python3
"""benchmarks/interpose: redis-benchmark against Redis replicated by libinterpose.so (3 replicas on
loopback, LD_PRELOAD) and against plain Redis, in one run, with the CPU each process used per
request and the machine's CPU ceiling for replicated Redis. See README.md.

    ./benchmarks/interpose/run.py [OUT]     (make bench-interpose; OUT defaults to results.md here)

Needs a release libinterpose.so (.build/release; `make bench-interpose` builds it), redis-server
and redis-benchmark (scripts/install-deps.sh). Environment: REQUESTS (per test at 50 clients,
default 100000), CLIENTS (default 50), SINGLE_REQUESTS (per test at 1 client, default 10000).
"""
import os
import resource
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "results.md")
LIB = os.path.join(ROOT, ".build", "release", "libinterpose.so")
REQUESTS = int(os.environ.get("REQUESTS", "100000"))
CLIENTS = int(os.environ.get("CLIENTS", "50"))
SINGLE = int(os.environ.get("SINGLE_REQUESTS", "10000"))
TICK = os.sysconf("SC_CLK_TCK")
CORES = os.cpu_count()

# (label, redis-benchmark test, clients, pipeline, extra arguments, requests)
CASES = [(t.upper(), t, CLIENTS, p, [], REQUESTS) for p in (1, 16) for t in ("set", "get", "incr", "lpush")]
CASES += [("SET 4 KiB", "set", CLIENTS, 1, ["-d", "4096"], REQUESTS // 2)]
CASES += [(t.upper(), t, 1, 1, [], SINGLE) for t in ("set", "get")]


def fail(why):
    sys.exit(f"bench-interpose: {why}")


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def cpu_seconds(pid):
    """User plus system CPU of a process so far, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def thread_cpu(pid):
    """CPU seconds so far of each thread name of a process ("NIO-ELT-0-#0" style names grouped)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                text = f.read()
        except OSError:
            continue
        name = text[text.index("(") + 1:text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        group = name.split("-#")[0].rstrip("0123456789-") or name
        out[group] = out.get(group, 0) + (int(fields[11]) + int(fields[12])) / TICK
    return out


class Servers:
    def __init__(self, work):
        self.work, self.procs = work, []

    def redis(self, name, port, env=None):
        d = os.path.join(self.work, name)
        os.makedirs(d, exist_ok=True)
        log = open(os.path.join(d, "redis.log"), "w")
        p = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                              "--daemonize", "no", "--unixsocket", os.path.join(d, "redis.sock"), "--unixsocketperm", "700",
                              "--enable-debug-command", "local", "--dir", d],
                             env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def stop(self):
        for p in self.procs:
            p.kill()
            p.wait()
        self.procs = []


def cli(*args):
    r = subprocess.run(["redis-cli", *args], capture_output=True, text=True, timeout=10)
    return r.stdout.strip()


def wait_leader(ports):
    """The port among `ports` that answers PING (followers close client connections)."""
    for _ in range(600):
        for p in ports:
            try:
                if cli("-p", str(p), "ping") == "PONG":
                    return p
            except subprocess.TimeoutExpired:
                pass
        time.sleep(0.1)
    fail(f"no Redis answered PING on ports {ports}")


def run_benchmark(port, case):
    """One redis-benchmark test: (requests/s, p50 ms, p99 ms, its own CPU seconds)."""
    _label, test, clients, pipeline, extra, requests = case
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run(["redis-benchmark", "-p", str(port), "-n", str(requests), "-c", str(clients), "-P", str(pipeline),
                        "-t", test, "-r", "100000", "--csv", *extra], capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    rows = [line.replace('"', "").split(",") for line in r.stdout.strip().splitlines()[1:]]
    if r.returncode != 0 or not rows:
        fail(f"redis-benchmark -t {test} on port {port} failed: {r.stderr.strip() or r.stdout.strip()}")
    row = rows[0]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return float(row[1]), float(row[4]), float(row[6]), cpu


def measure(label, ports, pids, case, threads=None):
    """Runs `case` against the first port, recording every server's CPU per request."""
    before = [cpu_seconds(p) for p in pids]
    tbefore = [thread_cpu(p) for p in threads or []]
    rps, p50, p99, bench_cpu = run_benchmark(ports[0], case)
    after = [cpu_seconds(p) for p in pids]
    n = case[5]
    row = {"server": label, "case": case, "rps": rps, "p50": p50, "p99": p99,
           "bench_us": bench_cpu / n * 1e6, "server_us": [(a - b) / n * 1e6 for a, b in zip(after, before)]}
    if threads:
        row["threads"] = []
        for pid, tb in zip(threads, tbefore):
            ta = thread_cpu(pid)
            row["threads"].append({k: (v - tb.get(k, 0)) / n * 1e6 for k, v in ta.items() if v - tb.get(k, 0) > 0})
    return row


def write_configs(d, durability):
    os.makedirs(d, exist_ok=True)
    key = os.path.join(d, "cluster.key")
    with open(key, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    os.chmod(key, 0o600)
    ports = free_ports(6)
    for i in (1, 2, 3):
        text = (f'id = {i}\ndata_dir = "data/{i}"\ndurability = "{durability}"\nfabric = "tcp"\n'
                'cluster_key_file = "cluster.key"\n[timing]\ntick_ms = 10\nelection_timeout_ticks = 50\nheartbeat_ticks = 2\n')
        for m in (1, 2, 3):
            text += f'\n[[members]]\nid = {m}\naddress = "127.0.0.1:{ports[m - 1]}"\nclient_address = "127.0.0.1:{ports[m + 2]}"\n'
        with open(os.path.join(d, f"node-{i}.toml"), "w") as f:
            f.write(text)


def digests(d):
    return [cli("-s", os.path.join(d, f"r{i}", "redis.sock"), "debug", "digest") for i in (1, 2, 3)]


def main():
    if not os.path.exists(LIB):
        fail(f"missing {LIB}: run swift build -c release --product interpose")
    for tool in ("redis-server", "redis-benchmark", "redis-cli"):
        if not shutil.which(tool):
            fail(f"{tool} missing: scripts/install-deps.sh")
    load = open("/proc/loadavg").read().split()[0]
    work = tempfile.mkdtemp(prefix="interpose-bench.")
    servers = Servers(work)
    rows, agreed = [], {}
    try:
        plain_port, pass_port = free_ports(2)
        plain = servers.redis("plain", plain_port)
        passthrough = servers.redis("passthrough", pass_port, {"LD_PRELOAD": LIB})
        wait_leader([plain_port]), wait_leader([pass_port])
        for case in CASES:
            rows.append(measure("Redis, unreplicated", [plain_port], [plain.pid], case))
            if case[0] in ("SET", "GET") and case[2] == CLIENTS:
                rows.append(measure("Redis + libinterpose.so, not replicating", [pass_port], [passthrough.pid], case))
        servers.stop()
        for durability in ("fsync", "memory"):
            d = os.path.join(work, durability)
            write_configs(d, durability)
            ports = free_ports(3)
            procs = [servers.redis(os.path.join(durability, f"r{i}"), ports[i - 1],
                                   {"LD_PRELOAD": LIB, "INTERPOSE_CONFIG": os.path.join(d, f"node-{i}.toml"),
                                    "INTERPOSE_PORT": str(ports[i - 1])}) for i in (1, 2, 3)]
            leader = wait_leader(ports)
            li = ports.index(leader)
            order = [li] + [i for i in range(3) if i != li]  # leader first
            for case in CASES:
                profile = [procs[order[0]].pid, procs[order[1]].pid] if case[0] == "SET" and case[3] == 1 and case[2] == CLIENTS else None
                rows.append(measure(f"replicated ×3, {durability}", [leader], [procs[i].pid for i in order], case, profile))
            # The replicas must agree (followers replay asynchronously: wait for them).
            for _ in range(600):
                got = digests(d)
                if len(set(got)) == 1:
                    break
                time.sleep(0.1)
            agreed[durability] = digests(d)
            servers.stop()
    finally:
        servers.stop()
        shutil.rmtree(work, ignore_errors=True)
    report(rows, agreed, load)


def report(rows, agreed, load):
    base = {(r["case"][0], r["case"][2], r["case"][3]): r for r in rows if r["server"] == "Redis, unreplicated"}
    lines = ["# Interpose benchmark results", "",
             "Command: `make bench-interpose` (release `libinterpose.so`, then `benchmarks/interpose/run.py`).", "",
             f"Machine: {CORES} cores, {cpu_model()}, kernel {os.uname().release}, {mem_gib()} GiB RAM, "
             f"Redis {redis_version()}, logs on {fs_type()}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC;",
             f"load average {load} when the run started (other work shared the machine: compare ratios within this run).", "",
             f"redis-benchmark with random keys (`-r 100000`): {REQUESTS} requests per test at {CLIENTS} clients "
             f"({REQUESTS // 2} for 4 KiB values), {SINGLE} at 1 client. Replicated: 3 redis-server processes, each with "
             "`LD_PRELOAD=libinterpose.so` and its own replica (Berkeley DB log, TCP fabric), on loopback; the benchmark "
             "talks to the leader's Redis.", "",
             f"**Ceiling**: the machine's {CORES} cores can run at most {CORES}/(3R+B) replicated requests per second, "
             "where R is the CPU one request costs unreplicated Redis and B the CPU it costs redis-benchmark, both "
             "measured from /proc in the unreplicated row of the same test (every replica executes every command). "
             "\"vs ceiling\" is the replicated rate over it.", "",
             "| server | clients | -P | test | requests/s | p50 ms | p99 ms | vs unreplicated | vs ceiling | CPU µs/request: servers (leader first) + benchmark |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        label, _t, clients, pipeline, _e, _n = r["case"]
        b = base[(label, clients, pipeline)]
        ceiling = CORES / (3 * b["server_us"][0] * 1e-6 + b["bench_us"] * 1e-6) if b["server_us"][0] + b["bench_us"] > 0 else 0
        vs_ceiling = f"{r['rps'] / ceiling:.2f}× of {ceiling / 1000:.0f}k" if r["server"].startswith("replicated") and ceiling else "-"
        cpu = " + ".join(f"{u:.1f}" for u in r["server_us"]) + f" + {r['bench_us']:.1f}"
        lines.append(f"| {r['server']} | {clients} | {pipeline} | {label} | {r['rps']:.0f} | {r['p50']:.3f} | {r['p99']:.3f} | "
                     f"{r['rps'] / b['rps']:.2f}× | {vs_ceiling} | {cpu} |")
    lines += ["", f"Where the replicated processes' CPU goes (SET, {CLIENTS} clients, `-P 1`; µs per request by thread "
              "name; the replica's loop is the NIO event-loop thread):", ""]
    for r in rows:
        if "threads" not in r:
            continue
        for who, t in zip(("leader", "a follower"), r["threads"]):
            parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(t.items(), key=lambda kv: -kv[1]) if v >= 0.5)
            lines.append(f"- {r['server']}, {who}: {parts}")
    lines += ["", "Replicas' `DEBUG DIGEST` after each replicated run (first 12 hex digits, replicas 1 2 3):", "", "```"]
    for durability, ds in agreed.items():
        lines.append(f"{durability}: " + " ".join(x[:12] for x in ds))
    lines += ["```", ""]
    text = "\n".join(lines)
    with open(OUT, "w") as f:
        f.write(text)
    print(text)


def cpu_model():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def mem_gib():
    for line in open("/proc/meminfo"):
        if line.startswith("MemTotal"):
            return round(int(line.split()[1]) / 1048576)
    return 0


def redis_version():
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
    return next((w[2:] for w in out.split() if w.startswith("v=")), "?")


def fs_type():
    out = subprocess.run(["df", "-T", tempfile.gettempdir()], capture_output=True, text=True).stdout.splitlines()
    return out[1].split()[1] if len(out) > 1 else "?"


if __name__ == "__main__":
    main()
