#!/usr/bin/env bash
# benchmarks/interpose: redis-benchmark SET/GET against Redis replicated by libinterpose.so
# (3 replicas on loopback, LD_PRELOAD) and against plain Redis, in one run. See README.md.
#
#   ./benchmarks/interpose/run.sh [OUT]      (make bench-interpose; OUT defaults to results.md here)
#
# Needs a release libinterpose.so (.build/release; `make bench-interpose` builds it), redis-server
# and redis-benchmark (scripts/install-deps.sh). Environment: REQUESTS (per test, default 100000),
# CLIENTS (default 50).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${1:-$here/results.md}
lib=$root/.build/release/libinterpose.so
requests=${REQUESTS:-100000}
clients=${CLIENTS:-50}
[ -f "$lib" ] || { echo "missing $lib: run swift build -c release --product interpose" >&2; exit 1; }
command -v redis-server >/dev/null && command -v redis-benchmark >/dev/null || { echo "redis-server/redis-benchmark missing: scripts/install-deps.sh" >&2; exit 1; }

work=$(mktemp -d /tmp/interpose-bench.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

free_ports() { python3 -c 'import socket,sys
s=[socket.socket() for _ in range(int(sys.argv[1]))]
[x.bind(("127.0.0.1",0)) for x in s]
print(" ".join(str(x.getsockname()[1]) for x in s))' "$1"; }

# Three replica configs (and a cluster key) in $1 with durability $2.
write_configs() {
  local d=$1 durability=$2 ports
  mkdir -p "$d"
  head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$d/cluster.key"; echo >> "$d/cluster.key"; chmod 600 "$d/cluster.key"
  read -r -a ports <<< "$(free_ports 6)"
  for i in 1 2 3; do
    printf 'id = %d\ndata_dir = "data/%d"\ndurability = "%s"\nfabric = "tcp"\ncluster_key_file = "cluster.key"\n[timing]\ntick_ms = 10\nelection_timeout_ticks = 50\nheartbeat_ticks = 2\n' "$i" "$i" "$durability" > "$d/node-$i.toml"
    for m in 1 2 3; do
      printf '\n[[members]]\nid = %d\naddress = "127.0.0.1:%d"\nclient_address = "127.0.0.1:%d"\n' "$m" "${ports[$((m-1))]}" "${ports[$((m+2))]}" >> "$d/node-$i.toml"
    done
  done
}

# redis-server on port $2 with dir $1; extra environment in the remaining arguments.
start_redis() {
  local d=$1 port=$2; shift 2
  mkdir -p "$d"
  env "$@" redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --daemonize no \
    --unixsocket "$d/redis.sock" --unixsocketperm 700 --enable-debug-command local --dir "$d" > "$d/redis.log" 2>&1 &
  pids+=($!)
}

# Prints the port among $@ that answers PING (the leader: followers close client connections).
wait_leader_port() {
  for _ in $(seq 1 600); do
    for p in "$@"; do
      if [ "$(redis-cli -p "$p" ping 2>/dev/null)" = PONG ]; then echo "$p"; return 0; fi
    done
    sleep 0.1
  done
  echo "no leader answered" >&2; return 1
}

rows=()
# bench LABEL PORT PIPELINE: appends "label|P|test|rps|p50|p99" rows.
bench() {
  local label=$1 port=$2 pipeline=$3
  redis-benchmark -p "$port" -n "$requests" -c "$clients" -P "$pipeline" -t set,get -r 100000 --csv 2>/dev/null \
    | tail -n +2 | tr -d '"' | while IFS=, read -r test rps _avg _min p50 _p95 p99 _max; do
        echo "$label|$pipeline|$test|$rps|$p50|$p99"
      done
}

results=$work/rows.txt
: > "$results"
busy=$(awk '{print $1}' /proc/loadavg)

# 1. Plain Redis, and Redis with the library preloaded but not replicating (hook pass-through cost).
read -r -a p <<< "$(free_ports 2)"
start_redis "$work/plain" "${p[0]}"
start_redis "$work/passthrough" "${p[1]}" LD_PRELOAD="$lib"
wait_leader_port "${p[0]}" >/dev/null; wait_leader_port "${p[1]}" >/dev/null
for P in 1 16; do
  bench "Redis, unreplicated" "${p[0]}" $P >> "$results"
  bench "Redis + libinterpose.so, not replicating" "${p[1]}" $P >> "$results"
done

# 2. Three replicas under the shim, with each durability mode.
digests=""
for durability in fsync memory; do
  d=$work/$durability
  write_configs "$d" "$durability"
  read -r -a rp <<< "$(free_ports 3)"
  for i in 1 2 3; do
    start_redis "$d/r$i" "${rp[$((i-1))]}" LD_PRELOAD="$lib" INTERPOSE_CONFIG="$d/node-$i.toml" INTERPOSE_PORT="${rp[$((i-1))]}"
  done
  leader=$(wait_leader_port "${rp[@]}")
  for P in 1 16; do bench "replicated ×3, $durability" "$leader" $P >> "$results"; done
  # The replicas must agree (followers replay asynchronously: wait for them).
  for _ in $(seq 1 600); do
    set -- $(for i in 1 2 3; do redis-cli -s "$d/r$i/redis.sock" debug digest; done | sort -u)
    [ $# -eq 1 ] && break; sleep 0.1
  done
  digests+="$durability: $(for i in 1 2 3; do redis-cli -s "$d/r$i/redis.sock" debug digest | cut -c1-12; done | tr '\n' ' ')"$'\n'
  for q in "${pids[@]}"; do kill -9 "$q" 2>/dev/null || true; done; pids=()
done

{
  echo "# Interpose benchmark results"
  echo
  echo "Command: \`make bench-interpose\` (release \`libinterpose.so\`, then \`benchmarks/interpose/run.sh\`)."
  echo
  echo "Machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r),"
  echo "$(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM, Redis $(redis-server --version | awk '{print $3}' | tr -d 'v='), logs on $(df -T "$work" | awk 'NR==2 {print $2}'), $(date -u '+%Y-%m-%d %H:%M UTC');"
  echo "load average $busy when the run started (other work shared the machine: numbers move by ±20% between runs)."
  echo
  echo "redis-benchmark: $requests requests per test, $clients clients, random keys (\`-r 100000\`), SET then GET;"
  echo "\`-P\` is the pipeline depth. Every server, replica and the client share the machine's cores on loopback."
  echo "Replicated: 3 redis-server processes, each with \`LD_PRELOAD=libinterpose.so\` and its own replica"
  echo "(Berkeley DB log, TCP fabric); the benchmark talks to the leader's Redis."
  echo
  echo "| server | -P | test | requests/s | p50 ms | p99 ms | vs unreplicated |"
  echo "|---|---:|---|---:|---:|---:|---:|"
  while IFS='|' read -r label P test rps p50 p99; do
    base=$(awk -F'|' -v P="$P" -v t="$test" '$1=="Redis, unreplicated" && $2==P && $3==t {print $4}' "$results")
    ratio=$(awk -v a="$rps" -v b="$base" 'BEGIN { if (b > 0) printf "%.2f×", a / b; else print "-" }')
    echo "| $label | $P | $test | $(printf '%.0f' "$rps") | $p50 | $p99 | $ratio |"
  done < "$results"
  echo
  echo "Replicas' \`DEBUG DIGEST\` after each replicated run (first 12 hex digits, replicas 1 2 3):"
  echo
  echo '```'
  printf '%s' "$digests"
  echo '```'
} > "$out"
cat "$out"
