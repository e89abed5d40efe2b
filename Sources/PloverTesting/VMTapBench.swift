import ArgumentParser
import Foundation
import RDMAPaxos
import Synchronization
import VMReplica

/// `plover bench vm-tap` (benchmarks/vm-tap/README.md): Debian's redis-server in the test guest,
/// reached over the tap attachment from a client namespace on a bridge (TapLab). In one run:
/// 1. redis-benchmark SET and GET with each client count against the guest unreplicated (one
///    QEMU on the tap, no log, no output guard);
/// 2. the same against the replicated VM (`plover vm` primary, backup, witness, `network = "tap"`),
///    once with every frame released by a checkpoint (`release_on_match = false`) and once with
///    release on match, with the primary's release counters (match rate, mismatch causes) per run;
/// 3. failover, with release on match: one connection writing SETs, the primary killed (kill -9 of its replica and QEMU)
///    `--kills` times (restarted and re-protected in between); kill → the new primary's first
///    released frame (its failover timeline) and kill → the next reply on that connection.
package struct VMTapBench: ParsableCommand {
    package static let configuration = CommandConfiguration(commandName: "vm-tap", abstract: "Benchmark redis-server in a replicated VM over a tap (needs root).")

    @Option(help: "redis-benchmark requests per client for each test.") var requests = 40
    @Option(help: "Client counts, comma-separated.") var clients = "1,16"
    @Option(help: "kill -9s of the primary for the failover times.") var kills = 5
    @Option(help: "Scratch directory (deleted afterwards unless --keep).") var dir = "benchmarks/vm-tap/out"
    @Flag(help: "Keep the scratch directory (replica logs, checkpoints.log).") var keep = false
    @Option(help: "Write the markdown results here as well as to stdout.") var out: String?

    var clientList: [Int] { clients.split(separator: ",").compactMap { Int($0) }.filter { $0 > 0 } }
    var absoluteDir: String { (dir as NSString).isAbsolutePath ? dir : FileManager.default.currentDirectoryPath + "/" + dir }

    package init() {}

    /// One redis-benchmark test's summary (its --csv line).
    struct Row {
        var config: String
        var test: String
        var clients: Int
        var requests: Int
        var rps: Double
        var p50: Double
        var p99: Double
        var max: Double
    }

    /// What the primary's output guard did during one redis-benchmark run (differences of its
    /// `status` counters).
    struct Release {
        var config: String
        var clients: Int
        var byMatch = 0
        var byCheckpoint = 0
        var mismatches = 0
        var checkpoints = 0
        var seconds = 0.0
        var causes: [String: Int] = [:]
        var matchWaits = 0
        var matchWaitTotal = 0.0
        /// Frames matched only with their connection's offset, and offsets learnt (log entries).
        var byOffset = 0
        var offsetsLearnt = 0
        /// Cores used during the run by the QEMUs and by the replica processes (witness included).
        var qemuCores = 0.0
        var replicaCores = 0.0

        /// `mismatch_causes=cause:count,…` ("none" when there is none) as a table.
        static func causes(_ s: [String: String]) -> [String: Int] {
            var causes: [String: Int] = [:]
            for pair in (s["mismatch_causes"] ?? "none").split(separator: ",") where pair != "none" {
                let kv = pair.split(separator: ":")
                if kv.count == 2, let n = Int(kv[1]) { causes[String(kv[0])] = n }
            }
            return causes
        }

        init(config: String, clients: Int, before: [String: String], after: [String: String], seconds: Double) {
            self.config = config
            self.clients = clients
            self.seconds = seconds
            // How far a counter of the status moved over the run (0 where it is missing).
            func moved(_ key: String) -> Double { (Double(after[key] ?? "") ?? 0) - (Double(before[key] ?? "") ?? 0) }
            byMatch = Int(moved("released_by_match"))
            byCheckpoint = Int(moved("released_by_checkpoint"))
            mismatches = Int(moved("output_mismatches"))
            checkpoints = Int(moved("checkpoints_completed"))
            let cz0 = Self.causes(before)
            for (k, v) in Self.causes(after) { let d = v - (cz0[k] ?? 0); if d > 0 { causes[k] = d } }
            matchWaits = Int(moved("match_waits"))
            matchWaitTotal = moved("match_wait_total_ms")
            byOffset = Int(moved("matched_by_offset"))
            offsetsLearnt = Int(moved("offsets_learnt"))
        }
    }

    /// The two replicated configurations, side by side.
    static let modes = [("replicated, checkpoint release", "release_on_match = false"), ("replicated, release on match", "release_on_match = true")]

    package func run() throws {
        guard getuid() == 0 else { throw CLIError("plover bench vm-tap makes a bridge, taps and a network namespace: run it as root") }
        guard !clientList.isEmpty else { throw CLIError("--clients \(clients): give client counts, comma-separated") }
        try TapLab.benchmark(workDir: absoluteDir, keep: keep) { guest, machineLine, lab in
            try measure(guest: guest, machineLine: machineLine, lab: lab)
        }
    }

    /// The unreplicated guest, both replicated configurations and the failovers, then the report.
    func measure(guest: String, machineLine: String, lab: TapLab) throws {
        var rows: [Row] = []
        var releases: [Release] = []
        var stages: [String] = []

        say("unreplicated guest on tap \(lab.taps[1]!)")
        let plain = try startPlainQEMU(guest: guest, tap: lab.taps[1]!)
        do {
            _ = try RedisConnection(connect: lab.clientConnect, host: "10.99.0.2", port: 6379, timeout: .seconds(120))
            for n in clientList {
                let cpu0 = cpuSeconds(of: absoluteDir + "/plain")
                let t = ContinuousClock.now
                rows += try benchmark(lab, config: "unreplicated", clients: n)
                let seconds = (ContinuousClock.now - t).inMilliseconds / 1000
                var r = Release(config: "unreplicated", clients: n, before: [:], after: [:], seconds: seconds)
                r.qemuCores = (cpuSeconds(of: absoluteDir + "/plain").qemu - cpu0.qemu) / seconds
                releases.append(r)
            }
        } catch {
            plain.terminate()
            throw error
        }
        kill(plain.processIdentifier, SIGKILL)
        plain.waitUntilExit()

        var cluster: VMCluster!
        var probe: RedisConnection!
        defer { cluster?.stopAll() }
        for (n, (name, key)) in Self.modes.enumerated() {
            say("\(name) (primary, backup, witness; \(key)) on taps \(lab.taps[1]!), \(lab.taps[2]!)")
            cluster?.stopAll()
            cluster = try VMCluster(root: absoluteDir + "/cluster-\(n)", kernel: guest + "/vmlinuz", initrd: guest + "/initrd.gz",
                                    vmExtra: key, taps: lab.taps)
            let c = cluster!
            let leftovers = [1, 2].map { (c.runDir(NodeID($0)), c.ramFile(NodeID($0))) }
            ChildProcesses.killOnInterrupt { VMCluster.killQEMUs(leftovers) }
            // Both replicas write the per-frame stage trace (VMTapStages) for the breakdown.
            for id: NodeID in [1, 2, 3] { try c.start(id, environment: ["PLOVER_VM_TRACE": "1"]) }
            probe = try RedisConnection(connect: lab.clientConnect, host: "10.99.0.2", port: 6379, timeout: .seconds(120))
            _ = try probe.command(["PING"], timeout: .seconds(60))
            guard waitFor(.seconds(60), { log(c, 2).contains("vm: protected:") }) else { throw CLIError("the backup was never protected; see \(absoluteDir)") }
            for k in clientList {
                let before = vmStatus(runDir: c.runDir(1))
                let cpu0 = cpuSeconds(of: c.root)
                let t = ContinuousClock.now
                let from = VMTapStages.now
                rows += try benchmark(lab, config: name, clients: k)
                if key.hasSuffix("true") {
                    let split = VMTapStages(primaryLog: c.runDir(1) + "/stages.log", backupLog: c.runDir(2) + "/stages.log", from: from, to: VMTapStages.now)
                    stages.append(split.table(title: "\(k) client\(k == 1 ? "" : "s")"))
                }
                let seconds = (ContinuousClock.now - t).inMilliseconds / 1000
                let cpu1 = cpuSeconds(of: c.root)
                var r = Release(config: name, clients: k, before: before, after: vmStatus(runDir: c.runDir(1)), seconds: seconds)
                r.qemuCores = (cpu1.qemu - cpu0.qemu) / seconds
                r.replicaCores = (cpu1.replicas - cpu0.replicas) / seconds
                releases.append(r)
            }
        }
        say("failover: \(kills) kill -9s of the primary with one connection writing")
        let failovers = try failover(cluster, probe)
        let report = Self.report(rows, releases: releases, stages: stages, failovers: failovers, kills: kills, machine: machineLine,
                                 command: "plover bench vm-tap --requests \(requests) --clients \(clients) --kills \(kills)")
        print(report)
        if let out { try report.write(toFile: out, atomically: true, encoding: .utf8) }
    }

    /// QEMU with the guest's NIC on `tap` itself (vnet_hdr off, as the replicas' taps).
    func startPlainQEMU(guest: String, tap: String) throws -> Process {
        let run = absoluteDir + "/plain"
        try FileManager.default.createDirectory(atPath: run, withIntermediateDirectories: true)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/qemu-system-x86_64")
        p.arguments = ["-machine", "q35,accel=tcg", "-m", "128", "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none",
                       "-serial", "file:\(run)/serial.log", "-kernel", guest + "/vmlinuz", "-initrd", guest + "/initrd.gz",
                       "-append", "console=ttyS0 quiet panic=-1",
                       "-netdev", "tap,id=n0,ifname=\(tap),script=no,downscript=no,vnet_hdr=off",
                       "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56"]
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle(forWritingAtPath: "/dev/null")
        try p.run()
        return p
    }

    /// redis-benchmark SET and GET with `n` clients from the client namespace.
    func benchmark(_ lab: TapLab, config: String, clients n: Int) throws -> [Row] {
        say("  \(config): redis-benchmark -t set,get -c \(n) -n \(requests * n)")
        let (rows, _) = try lab.redisBenchmark(["-t", "set,get", "-c", "\(n)", "-n", "\(requests * n)", "-r", "100000"],
                                               what: "against the \(config) guest")
        // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
        return rows.compactMap { f in
            guard f.count >= 8, let rps = Double(f[1]), let p50 = Double(f[4]), let p99 = Double(f[6]), let mx = Double(f[7]) else { return nil }
            return Row(config: config, test: f[0], clients: n, requests: requests * n, rps: rps, p50: p50, p99: p99, max: mx)
        }
    }

    /// kill → first frame released by the new primary and kill → next reply on `redis`, per kill
    /// (ms), with the new primary's failover timeline (each step in ms after the kill).
    func failover(_ cluster: VMCluster, _ redis: RedisConnection) throws -> [(released: Double?, reply: Double, steps: [String: Double])] {
        let acks = Mutex<(times: [Double], stop: Bool, error: String?)>(([], false, nil))
        let done = DispatchSemaphore(value: 0)
        let writer = Thread {
            defer { done.signal() }
            var i = 0
            while !acks.withLock({ $0.stop }) {
                i += 1
                do {
                    guard try redis.command(["SET", "f_\(i)", "\(i)"], timeout: .seconds(60)) == "+OK" else { throw CLIError("SET f_\(i) refused") }
                    acks.withLock { $0.times.append(unixMillis()) }
                } catch {
                    acks.withLock { $0.error = "\(error)" }
                    return
                }
            }
        }
        writer.start()
        defer {
            acks.withLock { $0.stop = true }
            done.wait()
        }
        var primary: NodeID = 1
        var out: [(Double?, Double, [String: Double])] = []
        for k in 0..<kills {
            let count = acks.withLock { $0.times.count }
            guard waitFor(.seconds(60), { acks.withLock { $0.times.count } >= count + 10 }) else {
                throw CLIError("kill \(k + 1): writes stopped before the kill (\(acks.withLock { $0.error ?? "no error" }))")
            }
            let survivor: NodeID = primary == 1 ? 2 : 1
            let offset = log(cluster, survivor).utf8.count
            let t = unixMillis()
            cluster.kill(primary)
            guard waitFor(.seconds(60), { acks.withLock { $0.times.contains { $0 > t } } }) else {
                throw CLIError("kill \(k + 1): no reply within 60 s (\(acks.withLock { $0.error ?? "no error" }))")
            }
            let reply = acks.withLock { $0.times.first { $0 > t }! } - t
            _ = waitFor(.seconds(5)) { log(cluster, survivor, from: offset).contains("first_answer=") }
            let line = log(cluster, survivor, from: offset).split(separator: "\n").first { $0.contains("failover timeline") }
            let steps = line.map { VMFailoverBench.timeline(in: $0, killedAt: t) } ?? [:]
            let released = steps["first_answer"]
            out.append((released, reply, steps))
            say(String(format: "  kill %d of node %d: first frame released %@ ms, next reply %.0f ms", k + 1, primary, released.map { String(format: "%.0f", $0) } ?? "-", reply))
            let restartOffset = log(cluster, primary).utf8.count
            try cluster.restart(primary)
            let killed = primary
            guard waitFor(.seconds(90), { log(cluster, killed, from: restartOffset).contains("vm: protected:") }) else {
                throw CLIError("kill \(k + 1): node \(killed) was not re-protected after its restart")
            }
            primary = survivor
        }
        return out
    }

    func log(_ cluster: VMCluster, _ id: NodeID, from offset: Int = 0) -> String {
        let text = (try? String(contentsOfFile: cluster.logPath(id), encoding: .utf8)) ?? ""
        return String(text.utf8.dropFirst(offset)) ?? ""
    }

    func waitFor(_ timeout: Duration, _ condition: () -> Bool) -> Bool {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if condition() { return true }
            Thread.sleep(forTimeInterval: 0.02)
        }
        return condition()
    }

    static func report(_ rows: [Row], releases: [Release], stages: [String] = [], failovers: [(released: Double?, reply: Double, steps: [String: Double])], kills: Int, machine: String, command: String) -> String {
        func f(_ x: Double) -> String { String(format: "%.2f", x) }
        var s = "# redis-server in a replicated VM over a tap\n\n" + machine
        s += "`\(command)`; 128 MiB guest under TCG, Debian's redis-server 7 in it (no persistence), redis-benchmark in a client "
        s += "network namespace on the same bridge as the replicas' taps; the client's route has `rto_min \(TapLab.rtoMin)`.\n\n"
        s += "## redis-benchmark\n\n| test | clients | configuration | requests | requests/s | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|---|---|---|\n"
        for r in rows.sorted(by: { ($0.test, $0.clients, $0.config) < ($1.test, $1.clients, $1.config) }) {
            s += "| \(r.test) | \(r.clients) | \(r.config) | \(r.requests) | \(f(r.rps)) | \(f(r.p50)) | \(f(r.p99)) | \(f(r.max)) |\n"
        }
        s += "\n## Against the unreplicated guest (goals: p50 ≤ 5×, requests/s ≥ 0.5×)\n\n"
        s += "| test | clients | configuration | p50 ratio | requests/s ratio |\n|---|---|---|---|---|\n"
        for r in rows.sorted(by: { ($0.test, $0.clients, $0.config) < ($1.test, $1.clients, $1.config) }) where r.config != "unreplicated" {
            guard let u = rows.first(where: { $0.config == "unreplicated" && $0.test == r.test && $0.clients == r.clients }), u.p50 > 0, u.rps > 0 else { continue }
            s += "| \(r.test) | \(r.clients) | \(r.config) | \(String(format: "%.1f×", r.p50 / u.p50)) | \(String(format: "%.2f×", r.rps / u.rps)) |\n"
        }
        s += "\n## What released the guest's frames (primary's counters over each redis-benchmark run, SET and GET)\n\n"
        s += "\"Of them by offset\": frames matched only with their connection's offset (another initial sequence number, or a "
        s += "backup TCP timestamp below one a client saw), each offset learnt once per connection and checkpoint and logged as an entry.\n\n"
        s += "| configuration | clients | by match | of them by offset | offsets learnt | by checkpoint | match rate | mean wait for the match ms | mismatches | causes | checkpoints | checkpoints/s |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n"
        for r in releases where r.config != "unreplicated" {
            let total = r.byMatch + r.byCheckpoint
            let rate = total > 0 ? String(format: "%.1f%%", 100 * Double(r.byMatch) / Double(total)) : "-"
            let causes = r.causes.isEmpty ? "-" : r.causes.sorted { $0.value > $1.value }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")
            let wait = r.matchWaits > 0 ? String(format: "%.2f", r.matchWaitTotal / Double(r.matchWaits)) : "-"
            s += "| \(r.config) | \(r.clients) | \(r.byMatch) | \(r.byOffset) | \(r.offsetsLearnt) | \(r.byCheckpoint) | \(rate) | \(wait) | \(r.mismatches) | \(causes) | \(r.checkpoints) | "
            s += String(format: "%.1f", r.seconds > 0 ? Double(r.checkpoints) / r.seconds : 0) + " |\n"
        }
        if !stages.isEmpty {
            s += "\n## Where a matched frame waited (release on match; both replicas' stage traces, CLOCK_MONOTONIC)\n\n"
            s += "Per frame a match released: the input the primary wrote into its QEMU last before the answer, followed through "
            s += "both replicas. \"Committed\" is when the replica's state machine got the entry from its node.\n"
            s += stages.joined()
        }
        s += "\n## CPU during each redis-benchmark run (cores, of 2; from /proc/PID/stat)\n\n"
        s += "| configuration | clients | QEMUs | replica processes (3) | seconds |\n|---|---|---|---|---|\n"
        for r in releases {
            s += "| \(r.config) | \(r.clients) | " + String(format: "%.2f | %.2f | %.1f", r.qemuCores, r.replicaCores, r.seconds) + " |\n"
        }
        s += "\n## Failover (release on match; kill -9 of the primary's replica and QEMU, one connection writing SETs)\n\n"
        s += "| kill | kill → first frame released by the new primary (ms) | kill → next reply on the same connection (ms) |\n|---|---|---|\n"
        for (i, r) in failovers.enumerated() {
            s += "| \(i + 1) | \(r.released.map { String(format: "%.0f", $0) } ?? "-") | \(String(format: "%.0f", r.reply)) |\n"
        }
        s += "\nWhere the time went, from the new primary's failover timeline (ms after the kill; - where a step was not logged; "
        s += "the steps are those of `plover bench vm-failover`):\n\n"
        s += "| kill | " + VMFailoverBench.stepNames.joined(separator: " | ") + " |\n|" + String(repeating: "---|", count: VMFailoverBench.stepNames.count + 1) + "\n"
        for (i, r) in failovers.enumerated() {
            s += "| \(i + 1) | " + VMFailoverBench.stepNames.map { r.steps[$0].map { String(format: "%.0f", $0) } ?? "-" }.joined(separator: " | ") + " |\n"
        }
        let replies = failovers.map(\.reply).sorted()
        if !replies.isEmpty {
            s += "\nNext reply: median \(String(format: "%.0f", replies[replies.count / 2])) ms, max \(String(format: "%.0f", replies.last!)) ms; "
            s += "\(replies.filter { $0 <= 1000 }.count) of \(replies.count) within 1 s. The connection was the same one throughout.\n"
        }
        return s
    }
}

/// Wall-clock milliseconds since 1970 (the replicas' failover timelines use the same clock).
func unixMillis() -> Double { Date().timeIntervalSince1970 * 1000 }

/// The `key=value` words of a VM replica's `status` answer on its control socket
/// (`run_dir/control.sock`), the first value of each key; empty when it does not answer within
/// three tries.
func vmStatus(runDir: String) -> [String: String] {
    for _ in 0..<3 {
        let words = vmStatusOnce(runDir: runDir)
        if !words.isEmpty { return words }
        usleep(100_000)
    }
    return [:]
}

private func vmStatusOnce(runDir: String) -> [String: String] {
    guard let s = try? SocketDescriptor.connect(unixPath: runDir + "/control.sock") else { return [:] }
    defer { s.close() }
    guard (try? s.send(Array("status\n".utf8))) != nil else { return [:] }
    var bytes: [UInt8] = []
    while let chunk = try? s.receive(upTo: 4096), !chunk.isEmpty { bytes += chunk }
    var out: [String: String] = [:]
    for word in String(decoding: bytes, as: UTF8.self).split(whereSeparator: { $0 == " " || $0 == "\n" }) {
        // The first value of a key is the live one: `last_checkpoint=` at the end repeats the
        // output counters as they were at that checkpoint.
        if let eq = word.firstIndex(of: "="), out[String(word[..<eq])] == nil { out[String(word[..<eq])] = String(word[word.index(after: eq)...]) }
    }
    return out
}

/// CPU seconds (user + system) used so far by the QEMUs and by the other processes whose command
/// line names `root` (a cluster's or the plain QEMU's directory); QEMUs that exited and were
/// reaped by a replica count through the replica's children times.
func cpuSeconds(of root: String) -> (qemu: Double, replicas: Double) {
    var qemu = 0.0, replicas = 0.0
    let ticks = Double(sysconf(Int32(_SC_CLK_TCK)))
    for pid in (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? [] where Int(pid) != nil {
        guard let cmd = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline"),
              String(decoding: cmd, as: UTF8.self).contains(root),
              let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { continue }
        // Fields after "pid (comm)": state is field 3; utime and stime are fields 14 and 15.
        let f = stat[stat.index(after: close)...].split(separator: " ")
        guard f.count > 14, let u = Double(f[11]), let s = Double(f[12]), let cu = Double(f[13]), let cs = Double(f[14]) else { continue }
        // A replica's reaped children are the QEMUs it replaced (cutime, cstime: fields 16 and 17).
        if String(decoding: cmd, as: UTF8.self).contains("qemu-system") { qemu += (u + s) / ticks } else {
            replicas += (u + s) / ticks
            qemu += (cu + cs) / ticks
        }
    }
    return (qemu, replicas)
}
