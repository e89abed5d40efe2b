import Foundation

/// The machine a benchmark ran on, for the results file.
struct MachineDescription {
    var cores: String
    var cpu: String
    var kernel: String
    var dataFilesystem: String
    var date: String
    /// Share of all cores busy (from /proc/stat) in the second before the benchmark started:
    /// other work on a shared machine skews every number.
    var busyBefore: Double?

    /// "Machine: …" for a results file, ending with a blank line.
    func markdownLine(dataDirs: String) -> String {
        var s = "Machine: \(cores) cores, \(cpu), kernel \(kernel), \(dataDirs) on \(dataFilesystem), \(date)"
        s += busyBefore.map { String(format: "; %.0f%% of the cores were busy with other work in the second before the run", $0 * 100) } ?? ""
        return s + ".\n\n"
    }

    static func current(dataDir: String) -> MachineDescription {
        MachineDescription(
            cores: shell("nproc"),
            cpu: shell("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'"),
            kernel: shell("uname -r"),
            dataFilesystem: shell("df -T '\(dataDir)' | awk 'NR==2 {print $2}'"),
            date: shell("date -u '+%Y-%m-%d %H:%M UTC'"),
            busyBefore: busyFraction(over: 1))
    }

    /// 1 − idle share of all cores over `seconds`, from the first line of /proc/stat.
    static func busyFraction(over seconds: Double) -> Double? {
        func sample() -> (idle: Double, total: Double)? {
            guard let text = try? String(contentsOfFile: "/proc/stat", encoding: .utf8),
                  let cpu = text.split(separator: "\n").first, cpu.hasPrefix("cpu ") else { return nil }
            let v = cpu.split(separator: " ").dropFirst().compactMap { Double($0) }
            guard v.count >= 5 else { return nil }
            return (v[3] + v[4], v.reduce(0, +))  // idle + iowait
        }
        guard let a = sample() else { return nil }
        Thread.sleep(forTimeInterval: seconds)
        guard let b = sample(), b.total > a.total else { return nil }
        return 1 - (b.idle - a.idle) / (b.total - a.total)
    }

    /// The first line of `qemu-system-x86_64 --version` ("" without QEMU), for the VM benchmarks'
    /// reports; asked once per process.
    static let qemuVersion = shell("qemu-system-x86_64 --version | head -1")

    /// stdout of `sh -c command`, trimmed ("" if it cannot run).
    static func shell(_ command: String) -> String {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/sh")
        p.arguments = ["-c", command]
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = FileHandle.nullDevice
        guard (try? p.run()) != nil else { return "" }
        let out = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return String(decoding: out, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
    }
}

/// Tables, ratios against the goals, and the plot of one `plover bench consensus` run.
struct ConsensusReport {
    var rows: [ConsensusRow]
    /// Two-process loopback round trip (the floor of every hop).
    var roundTrip: LatencySummary
    /// The same between two threads of one process (for reference).
    var roundTripThreads: LatencySummary
    /// 64 B append + fdatasync with three concurrent writers in the data directory.
    var fdatasync: LatencySummary
    var probes: PloverProbes?
    var machine: MachineDescription
    var etcdVersion: String
    var timing: DemoCluster.Timing
    var seconds: Double
    var warmup: Double
    var command: String
    var ploverClient: PloverClientKind

    var valueSizes: [Int] { Array(Set(rows.map(\.valueBytes))).sorted() }
    var clientCounts: [Int] { Array(Set(rows.map(\.clients))).sorted() }
    var systems: [BenchSystem] { BenchSystem.allCases.filter { s in rows.contains { $0.system == s } } }

    func row(_ s: BenchSystem, _ value: Int, _ clients: Int) -> ConsensusRow? {
        rows.first { $0.system == s && $0.valueBytes == value && $0.clients == clients }
    }

    static func size(_ bytes: Int) -> String { bytes >= 1024 && bytes % 1024 == 0 ? "\(bytes / 1024) KiB" : "\(bytes) B" }
    static func x(_ v: Double) -> String { String(format: "%.2f×", v) }

    func markdown() -> String {
        var s = "# Consensus benchmark results\n\n"
        s += "Command: `make bench-consensus` (release build, then `\(command)`).\n\n"
        s += machine.markdownLine(dataDirs: "disk-backed data dirs")
        s += "- **plover**: 3 `plover node` replicas on 127.0.0.1 (TCP fabric, Berkeley DB log), tick "
        s += "\(timing.tickMilliseconds) ms, heartbeat \(timing.heartbeatTicks) ticks, election timeout \(timing.electionTimeoutTicks) ticks; "
        s += ploverClient == .pipelined
            ? "N client tasks share one `PipelinedNodeClient` (one connection to the leader, each task's put in flight beside the others'; the tasks run on the client's executor, the thread that reads the connection).\n"
            : "clients use `NodeClient` (one connection per thread, leader only).\n"
        s += "- **etcd \(etcdVersion)** (Debian etcd-server): 3 members on 127.0.0.1, default settings (fsync on every "
        s += "raft batch; 3.4 has no `--unsafe-no-fsync`); puts are `POST /v3/kv/put` to the leader's v3 HTTP/JSON gateway "
        s += "over one keep-alive HTTP/1.1 connection per thread. *etcd (tmpfs)* puts its data dirs on tmpfs, so its "
        s += "fsyncs cost next to nothing: the closest 3.4 gets to plover's memory mode.\n"
        s += "- Load, the same for both: N closed-loop clients (threads, or tasks for the pipelined plover client), each putting a new key with a fixed-size value, waiting for the "
        s += "acknowledgement, then putting the next (closed loop). Each point runs \(String(format: "%g", warmup)) s unmeasured, then "
        s += "\(String(format: "%g", seconds)) s measured; latency is put call → acknowledgement at the client.\n"
        s += "- Everything (3 servers, the load threads) shares the \(machine.cores) cores.\n\n"
        s += String(format: "Floors, same run: loopback TCP round trip, 64 B ping-pong between two processes "
                    + "(blocking sockets, TCP_NODELAY): **p50 %.1f µs**, p99 %.1f µs (%d round trips); between two threads "
                    + "of one process p50 %.1f µs. 64 B append + fdatasync, three writers in the data directory at once: "
                    + "**p50 %.1f µs**, p99 %.1f µs (%d syncs).\n\n", roundTrip.p50Micros, roundTrip.p99Micros, roundTrip.count,
                    roundTripThreads.p50Micros, fdatasync.p50Micros, fdatasync.p99Micros, fdatasync.count)

        s += "## All points\n\n"
        s += "*Compacted*: how many of plover's replicas finished a compaction during the point, warm-up included "
        s += "(the first index of their log moved; one still encoding its snapshot when the point ends is not counted). "
        s += "A compaction encodes and writes the replica's whole state (one new key per put here) and removes the "
        s += "log segments it replaced; ? when a replica's status could not be read.\n\n"
        s += "| system | value | clients | puts/s | p50 µs | p99 µs | puts measured | errors | compacted |\n"
        s += "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        for value in valueSizes {
            for n in clientCounts {
                for sys in systems {
                    guard let r = row(sys, value, n) else { continue }
                    let l = r.result.latency
                    s += "| \(sys.label) | \(Self.size(value)) | \(n) | \(Int(r.result.putsPerSecond.rounded())) | "
                    s += String(format: "%.0f | %.0f", l.p50Micros, l.p99Micros) + " | \(l.count) | \(r.result.errors) | "
                    s += (!r.system.isEtcd ? r.replicasCompacted.map { "\($0.0) of \($0.of)" } ?? "?" : "—") + " |\n"
                }
            }
        }
        for r in rows where r.result.errors > 0 {
            s += "\nErrors at \(r.system.label), \(Self.size(r.valueBytes)), \(r.clients) clients (first): `\(r.result.firstError ?? "?")`\n"
        }
        s += goals()
        return s
    }

    /// The goals (benchmarks/consensus/README.md): fsync, 1 client p50 ≤ 1.5× (round trip +
    /// fdatasync), 16 and 64 clients ≥ 3× etcd's puts/s at ≤ 0.5× its p50; memory, 1 client p50
    /// ≤ 4× the round trip, 64 clients ≥ 5× etcd-on-tmpfs puts/s.
    func goals() -> String {
        var s = ""
        var met = 0, total = 0
        func mark(_ ok: Bool) -> String {
            total += 1
            if ok { met += 1 }
            return ok ? "yes" : "no"
        }
        if systems.contains(.ploverFsync) {
            let floor = roundTrip.p50Micros + fdatasync.p50Micros
            s += "\n## Goal 1: plover fsync\n\n"
            s += String(format: "1 client: p50 ≤ 1.5× (round trip + fdatasync) = 1.5 × (%.1f + %.1f) µs = %.0f µs. 16 and 64 clients: "
                        + "puts/s ≥ 3× etcd (disk) and p50 ≤ 0.5× etcd's, at the same value size (1 and 4 clients against etcd "
                        + "for reference).\n\n", roundTrip.p50Micros, fdatasync.p50Micros, 1.5 * floor)
            s += "| value | clients | p50 µs | × floor (goal ≤ 1.5) | puts/s vs etcd (goal ≥ 3) | p50 vs etcd (goal ≤ 0.5) | met |\n"
            s += "|---:|---:|---:|---:|---:|---:|---|\n"
            for value in valueSizes {
                for n in clientCounts {
                    guard let p = row(.ploverFsync, value, n) else { continue }
                    let k = p.result.latency.p50Micros / max(floor, 1e-9)
                    var t: Double?, l: Double?
                    if let e = row(.etcdFsync, value, n) {
                        t = p.result.putsPerSecond / max(e.result.putsPerSecond, 1e-9)
                        l = p.result.latency.p50Micros / max(e.result.latency.p50Micros, 1e-9)
                    }
                    let verdict: String
                    if n == 1 { verdict = mark(k <= 1.5) }
                    else if n >= 16, let t, let l { verdict = mark(t >= 3 && l <= 0.5) }
                    else { verdict = "(n/a)" }
                    s += "| \(Self.size(value)) | \(n) | " + String(format: "%.0f", p.result.latency.p50Micros)
                    s += " | \(Self.x(k)) | \(t.map(Self.x) ?? "–") | \(l.map(Self.x) ?? "–") | \(verdict) |\n"
                }
            }
        }
        if systems.contains(.ploverMemory) {
            s += "\n## Goal 2: plover memory mode\n\n"
            s += String(format: "1 client: p50 ≤ 4× the two-process round trip = %.0f µs (the floor is two round trips: client ↔ leader, "
                        + "leader ↔ followers). 64 clients: puts/s ≥ 5× etcd (tmpfs). Other points for reference.\n\n", 4 * roundTrip.p50Micros)
            s += "| value | clients | p50 µs | × round trip (goal ≤ 4) | puts/s vs etcd (tmpfs) (goal ≥ 5) | p50 vs etcd (tmpfs) | met |\n"
            s += "|---:|---:|---:|---:|---:|---:|---|\n"
            for value in valueSizes {
                for n in clientCounts {
                    guard let m = row(.ploverMemory, value, n) else { continue }
                    let k = m.result.latency.p50Micros / max(roundTrip.p50Micros, 1e-9)
                    var t: Double?, l: Double?
                    if let e = row(.etcdTmpfs, value, n) {
                        t = m.result.putsPerSecond / max(e.result.putsPerSecond, 1e-9)
                        l = m.result.latency.p50Micros / max(e.result.latency.p50Micros, 1e-9)
                    }
                    let verdict: String
                    if n == 1 { verdict = mark(k <= 4) }
                    else if n == 64, let t { verdict = mark(t >= 5) }
                    else { verdict = "(n/a)" }
                    s += "| \(Self.size(value)) | \(n) | " + String(format: "%.0f", m.result.latency.p50Micros)
                    s += " | \(Self.x(k)) | \(t.map(Self.x) ?? "–") | \(l.map(Self.x) ?? "–") | \(verdict) |\n"
                }
            }
            if let p = probes {
                s += "\nWhere an unloaded request's time goes (plover memory cluster, 1 client, same run; p50):\n\n"
                s += "| request | path | p50 µs | p99 µs |\n|---|---|---:|---:|\n"
                s += String(format: "| loopback round trip | two processes, blocking sockets | %.0f | %.0f |\n", roundTrip.p50Micros, roundTrip.p99Micros)
                s += String(format: "| `status` | client → leader's event loop → client | %.0f | %.0f |\n", p.status.p50Micros, p.status.p99Micros)
                s += String(format: "| local read | + node thread and back to the event loop | %.0f | %.0f |\n", p.localRead.p50Micros, p.localRead.p99Micros)
                if let m = row(.ploverMemory, valueSizes.first ?? 64, 1) {
                    s += "| put (\(Self.size(m.valueBytes))) | + replication to a follower and back, commit, apply | "
                    s += String(format: "%.0f | %.0f |\n", m.result.latency.p50Micros, m.result.latency.p99Micros)
                }
            }
        }
        if total > 0 { s += "\nGoals met at \(met) of \(total) points.\n" }
        return s
    }
}
