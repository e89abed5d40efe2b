import ArgumentParser
import Foundation
import RDMAPaxos
import VMReplica

/// `plover bench vm`: the VM replication benchmark (benchmarks/vm/README.md). In one run, with
/// the same guest and the same sequential counter workload:
/// 1. an unreplicated guest (one QEMU, requests written straight into its NIC);
/// 2. the replicated VM (`plover vm` primary, backup, witness) through the front;
/// then from the replicas' checkpoint logs: bytes per syncvm (divergent pages) vs every page the
/// primary dirtied (what Remus/COLO-style checkpointing sends), and pause times.
package struct VMBench: ParsableCommand {
    package static let configuration = CommandConfiguration(commandName: "vm", abstract: "Benchmark VM replication with QEMU under TCG.")

    @Option(help: "Requests per client per configuration (each client sends its next request once the previous one is answered).") var requests = 100
    @Option(help: "Numbers of concurrent clients to run each workload with, comma-separated.") var clients = "1,16"
    @Option(help: "Scratch directory (deleted afterwards unless --keep).") var dir = "benchmarks/vm/out"
    @Flag(help: "Keep the scratch directory (replica logs, checkpoints.log) after the run.") var keep = false
    @Flag(help: "The backup lists the pages each sync rewrote in its checkpoints.log (log_divergent_pages).") var logDivergentPages = false
    @Option(help: "Write the markdown results here as well as to stdout.") var out: String?
    @Option(help: "checkpoint_min_gap_ms values to run the replicated VM with, comma-separated.") var gaps = "0,1000"
    @Option(help: "Give every VM a disk of this many MiB and add the DISK 256 KiB workload (0: no disk).") var diskMb = 0

    /// `--dir`, relative to the current directory unless absolute.
    var absoluteDir: String { (dir as NSString).isAbsolutePath ? dir : FileManager.default.currentDirectoryPath + "/" + dir }
    var gapList: [Int] { gaps.split(separator: ",").compactMap { Int($0) } }
    var clientList: [Int] { clients.split(separator: ",").compactMap { Int($0) }.filter { $0 > 0 } }

    /// The two request kinds: a counter increment (a few pages touched) and a 256 KiB write
    /// into the service's store (a key-value SET of a large value: many pages, written the
    /// same way on both replicas).
    static let workloads: [(name: String, op: String, extra: String)] = [("INC (counter)", "INC", ""), ("PUT 256 KiB", "PUT", " 256")]
    /// With a disk, a third: 256 KiB written to a file of the guest's disk and fsynced, the same
    /// bytes on both replicas (the guest adds a block of its own every 100 ms).
    var workloadList: [(name: String, op: String, extra: String)] {
        Self.workloads + (diskMb > 0 ? [("DISK 256 KiB", "DISK", " 256")] : [])
    }

    package init() {}

    package func run() throws {
        let guest = try buildGuest()
        let kernel = guest + "/vmlinuz", initrd = guest + "/initrd.gz"
        try? FileManager.default.removeItem(atPath: dir)
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { if !keep { try? FileManager.default.removeItem(atPath: dir) } }

        guard !clientList.isEmpty, clientList.allSatisfy({ $0 <= 32 }) else { throw CLIError("--clients \(clients): give numbers from 1 to 32, comma-separated") }
        say("unreplicated guest: \(requests) requests per client per workload, clients \(clientList)")
        let machine = MachineDescription.current(dataDir: absoluteDir)
        let qemu = MachineDescription.qemuVersion
        let plain = try unreplicated(kernel: kernel, initrd: initrd)
        var results: [WorkloadResult] = []
        var first: [String: String]?
        for gap in gapList {
            say("replicated VM (primary, backup, witness), checkpoint_min_gap_ms = \(gap): \(requests) requests per workload")
            let cluster = try VMCluster(root: absoluteDir + "/cluster-gap-\(gap)", kernel: kernel, initrd: initrd,
                                        vmExtra: "checkpoint_min_gap_ms = \(gap)\nrelease_on_match = false" + (logDivergentPages ? "\nlog_divergent_pages = true" : "")
                                            + (diskMb > 0 ? "\ndisk_image = \"disk-{id}.img\"\ndisk_size_mb = \(diskMb)" : ""))
            defer { cluster.stopAll() }
            let leftovers = [1, 2].map { (cluster.runDir(NodeID($0)), cluster.ramFile(NodeID($0))) }
            ChildProcesses.killOnInterrupt { VMCluster.killQEMUs(leftovers) }
            try cluster.startAll()
            let pool = (0..<clientList.max()!).map { CounterClient(name: "bench\($0)", fronts: [cluster.fronts[1]!]) }
            _ = try pool[0].request(timeout: .seconds(120))  // boots both guests, first full sync
            // The primary logs a checkpoint after releasing its answers: wait for the line, so
            // the first (all pages compared) is not counted with the first workload.
            let logged = ContinuousClock.now + .seconds(10)
            let firstOK = { cluster.checkpoints(1).first { $0["ok"] == "true" } }
            while firstOK() == nil, ContinuousClock.now < logged { usleep(20_000) }
            if first == nil { first = firstOK() }
            for n in clientList {
                for (i, w) in workloadList.enumerated() {
                    for c in pool { c.retries = 0 }
                    let before = cluster.checkpoints(1).count
                    let lat = try Self.concurrently(n) { k in
                        try (0..<requests).map { _ in
                            let t = ContinuousClock.now
                            _ = try pool[k].request(w.op, extra: w.extra, timeout: .seconds(60))
                            return millis(ContinuousClock.now - t)
                        }
                    }
                    let cps = cluster.checkpoints(1).dropFirst(before)
                    results.append(WorkloadResult(name: w.name, gap: gap, clients: n, plain: plain[n]![i], replicated: lat,
                                                  retries: pool.reduce(0) { $0 + $1.retries },
                                                  checkpoints: cps.filter { $0["ok"] == "true" }, failed: cps.filter { $0["ok"] != "true" }))
                }
            }
            cluster.stopAll()
        }
        var report = Self.report(results, requests: requests, first: first, machine: machine, qemu: qemu)
        if diskMb > 0 { report += Self.diskReport(results, diskMb: diskMb) }
        print(report)
        if let out { try report.write(toFile: out, atomically: true, encoding: .utf8) }
    }

    struct WorkloadResult {
        var name: String
        var gap: Int
        var clients: Int
        var plain: [Double]
        var replicated: [Double]
        var retries: Int
        /// The primary's completed checkpoints during the workload.
        var checkpoints: [[String: String]]
        /// The primary's checkpoints that failed during the workload, with their errors.
        var failed: [[String: String]]
    }

    func buildGuest() throws -> String { try buildVMGuest() }

    /// One QEMU, no consensus and no output guard: request frames in, answers out. For each
    /// client count, each workload's latencies (all clients together).
    func unreplicated(kernel: String, initrd: String) throws -> [Int: [[Double]]] {
        let run = absoluteDir + "/plain"
        try FileManager.default.createDirectory(atPath: run, withIntermediateDirectories: true)
        var s = QEMUSettings(kernel: kernel, initrd: initrd, ramFile: "/dev/shm/plover-bench-\(getpid()).ram")
        s.memoryMiB = 128
        defer { unlink(s.ramFile) }
        if diskMb > 0 {
            s.diskImage = run + "/disk.img"
            guard FileManager.default.createFile(atPath: run + "/disk.img", contents: nil), truncate(run + "/disk.img", off_t(diskMb << 20)) == 0 else {
                throw CLIError("cannot create the unreplicated guest's disk image \(run)/disk.img")
            }
        }
        let listener = try NICStream.listen(path: run + "/nic.sock")
        defer { close(listener) }
        let q = try QEMUInstance.launch(s, name: "plain", runDir: run, nicListener: listener, nicSocket: run + "/nic.sock", incoming: false)
        defer { q.kill() }
        let link = GuestLink()
        let width = clientList.max()!
        // Answers start with the client's name: "plainK SEQ VALUE".
        let queues = (0..<width).map { _ in AnswerQueue() }
        let reader = Thread {
            while let f = q.nic.readFrame() {
                guard let p = link.answerPayload(f), let space = p.firstIndex(of: 32),
                      let k = Int(String(decoding: p[..<space].dropFirst(5), as: UTF8.self)), queues.indices.contains(k) else { continue }
                queues[k].put(p)
            }
            for a in queues { a.put(nil) }
        }
        reader.start()
        let writeLock = NSLock()
        func ask(_ k: Int, _ seq: Int, _ op: String = "INC", _ extra: String = "", wait: Duration) throws -> Bool {
            let frame = link.requestFrame(payload: Array("\(op) plain\(k) \(seq)\(extra)\n".utf8))
            guard writeLock.withLock({ q.nic.write(frame: frame) }) else { throw CLIError("the unreplicated guest's NIC is closed (its QEMU exited?); see \(run)") }
            let deadline = ContinuousClock.now + wait
            while let a = queues[k].take(until: deadline) {
                if String(decoding: a, as: UTF8.self).hasPrefix("plain\(k) \(seq) ") { return true }
            }
            return false
        }
        let bootDeadline = ContinuousClock.now + .seconds(120)
        var boot = 0
        while try !ask(0, boot, wait: .milliseconds(500)) {
            guard ContinuousClock.now < bootDeadline else { throw CLIError("the unreplicated guest never answered; see \(run)") }
            boot += 1
        }
        var seqs = [Int](repeating: boot + 1, count: width)
        let seqLock = NSLock()
        var out: [Int: [[Double]]] = [:]
        for n in clientList {
            out[n] = try workloadList.map { w in
                try Self.concurrently(n) { k in
                    try (0..<requests).map { _ in
                        let seq = seqLock.withLock { () -> Int in seqs[k] += 1; return seqs[k] }
                        let t = ContinuousClock.now
                        guard try ask(k, seq, w.op, w.extra, wait: .seconds(10)) else { throw CLIError("the unreplicated guest did not answer request \(seq) of client \(k)") }
                        return millis(ContinuousClock.now - t)
                    }
                }
            }
        }
        return out
    }

    /// Runs `body(0..<n)` on `n` threads at once; returns all their values, or the first error.
    static func concurrently(_ n: Int, _ body: @escaping (Int) throws -> [Double]) throws -> [Double] {
        final class Results: @unchecked Sendable {
            // @unchecked Sendable: touched only under `lock`.
            let lock = NSLock()
            var values: [Double] = []
            var error: (any Error)?
        }
        /// @unchecked Sendable: each thread calls `body` with its own index; what the callers'
        /// closures share (clients, sequence numbers) is theirs per index or under their lock.
        struct Body: @unchecked Sendable { let call: (Int) throws -> [Double] }
        let r = Results(), f = Body(call: body)
        let group = DispatchGroup()
        for k in 0..<n {
            group.enter()
            Thread {
                defer { group.leave() }
                do {
                    let v = try f.call(k)
                    r.lock.withLock { r.values += v }
                } catch {
                    r.lock.withLock { if r.error == nil { r.error = error } }
                }
            }.start()
        }
        group.wait()
        if let e = r.error { throw e }
        return r.values
    }

    static func report(_ results: [WorkloadResult], requests: Int, first: [String: String]?,
                       machine: MachineDescription, qemu: String) -> String {
        func pct(_ v: [Double], _ p: Double) -> Double {
            let s = v.sorted()
            return s.isEmpty ? .nan : s[min(s.count - 1, max(0, Int((Double(s.count) * p).rounded(.up)) - 1))]
        }
        func f(_ x: Double) -> String { String(format: "%.2f", x) }
        let num = { (c: [String: String], k: String) in Double(c[k] ?? "") ?? 0 }
        let mean = { (v: [Double]) in v.isEmpty ? Double.nan : v.reduce(0, +) / Double(v.count) }
        var s = "# VM replication benchmark\n\n"
        s += vmMachineLine(machine, qemu: qemu)
        s += "\(ProcessInfo.processInfo.activeProcessorCount) cores shared by both QEMUs (TCG), three replica processes and the client; "
        s += "128 MiB guest; `plover bench vm --requests \(requests) --clients \(clientCounts(results))`; each client sends its next request when the previous one is answered; every answer waits for a checkpoint (`release_on_match = false`: `plover bench vm-tap` measures release on match).\n\n"
        s += "## Client request latency (ms)\n\n| workload | clients | configuration | requests | p50 | p90 | p99 | max |\n|---|---|---|---|---|---|---|---|\n"
        for r in results {
            for (name, v) in (r.gap == gapsFirst(results) ? [("unreplicated guest", r.plain)] : []) + [("replicated, min gap \(r.gap) ms", r.replicated)] {
                s += "| \(r.name) | \(r.clients) | \(name) | \(v.count) | \(f(pct(v, 0.5))) | \(f(pct(v, 0.9))) | \(f(pct(v, 0.99))) | \(f(v.max() ?? .nan)) |\n"
            }
        }
        s += "\nClient resends in the replicated runs (a client resends after 3 s without an answer): "
        s += results.map { "\($0.name), \($0.clients) clients, gap \($0.gap) ms: \($0.retries)" }.joined(separator: ", ") + ".\n\n"
        let failures = results.filter { !$0.failed.isEmpty }
        s += "Failed checkpoints (output stays held until a later one completes): "
        s += failures.isEmpty ? "none.\n\n" : failures.map { r in
            "\(r.name), \(r.clients) clients, gap \(r.gap) ms: \(r.failed.count) (" + r.failed.map { $0["error"] ?? "?" }.joined(separator: "; ") + ")"
        }.joined(separator: ", ") + ".\n\n"
        s += "## Bytes per syncvm\n\nSteady-state checkpoints (the first one, which compares every page, is reported below). "
        s += "VMReplica sends divergent pages plus control frames; a Remus/COLO-style checkpoint sends every page the primary dirtied.\n\n"
        s += "| workload | clients | min gap (ms) | checkpoints | dirty union (pages, mean) | divergent (pages, mean) | VMReplica bytes (mean) | all-dirty bytes (mean) | all-dirty / VMReplica |\n|---|---|---|---|---|---|---|---|---|\n"
        for r in results {
            let c = r.checkpoints
            let sent = c.map { num($0, "page_bytes") + num($0, "control_bytes") }, dirty = c.map { num($0, "all_dirty_bytes") }
            s += "| \(r.name) | \(r.clients) | \(r.gap) | \(c.count) | \(f(mean(c.map { num($0, "union") }))) | \(f(mean(c.map { num($0, "divergent") }))) | "
            s += "\(wholeNumber(mean(sent))) | \(wholeNumber(mean(dirty))) | **\(f(dirty.reduce(0, +) / max(1, sent.reduce(0, +))))×** |\n"
        }
        s += "\n## Pause per checkpoint (ms: primary stopped → primary resumed)\n\n"
        s += "| workload | clients | min gap (ms) | p50 | p99 | max | scan p50 (hash-diff of all RAM) | migrate p50 (device state) |\n|---|---|---|---|---|---|---|---|\n"
        for r in results {
            let p = r.checkpoints.map { num($0, "pause_ms") }
            s += "| \(r.name) | \(r.clients) | \(r.gap) | \(f(pct(p, 0.5))) | \(f(pct(p, 0.99))) | \(f(p.max() ?? .nan)) | "
            s += "\(f(pct(r.checkpoints.map { num($0, "scan_ms") }, 0.5))) | \(f(pct(r.checkpoints.map { num($0, "migrate_ms") }, 0.5))) |\n"
        }
        if let first {
            s += "\nFirst checkpoint (all \(first["union"] ?? "?") pages compared): pause \(first["pause_ms"] ?? "?") ms, "
            s += "\(first["divergent"] ?? "?") divergent pages, \(first["page_bytes"] ?? "?") page bytes.\n"
        }
        return s
    }
}

/// The client counts of a run, as given to `--clients`.
func clientCounts(_ r: [VMBench.WorkloadResult]) -> String {
    var seen: [Int] = []
    for x in r where !seen.contains(x.clients) { seen.append(x.clients) }
    return seen.map(String.init).joined(separator: ",")
}

/// The first gap of a run: the unreplicated rows are printed once, beside it.
func gapsFirst(_ r: [VMBench.WorkloadResult]) -> Int { r.first?.gap ?? 0 }

func millis(_ d: Duration) -> Double { d.inMilliseconds }

/// `v` as a whole number for a report's table; "-" for the mean of nothing (a run without
/// steady-state checkpoints).
func wholeNumber(_ v: Double) -> String { v.isFinite ? "\(Int(v))" : "-" }

/// Answers from the guest, handed from the reader thread to the benchmark thread.
final class AnswerQueue: @unchecked Sendable {
    // @unchecked Sendable: `items` and `closed` are only touched under `cond`.
    private let cond = NSCondition()
    private var items: [[UInt8]] = []
    private var closed = false

    func put(_ a: [UInt8]?) {
        cond.withLock {
            if let a { items.append(a) } else { closed = true }
            cond.broadcast()
        }
    }

    func take(until deadline: ContinuousClock.Instant) -> [UInt8]? {
        cond.withLock {
            while items.isEmpty && !closed {
                let left = deadline - ContinuousClock.now
                guard left > .zero else { return nil }
                _ = cond.wait(until: Date(timeIntervalSinceNow: left.inSeconds))
            }
            return items.isEmpty ? nil : items.removeFirst()
        }
    }
}

extension VMBench {
    /// The disk's bytes per checkpoint (with `--disk-mb`): what the disk step sent against a
    /// Remus-style transfer of every block the primary wrote, from the primary's checkpoint log.
    static func diskReport(_ results: [WorkloadResult], diskMb: Int) -> String {
        func f(_ x: Double) -> String { String(format: "%.2f", x) }
        let num = { (c: [String: String], k: String) in Double(c[k] ?? "") ?? 0 }
        let mean = { (v: [Double]) in v.isEmpty ? Double.nan : v.reduce(0, +) / Double(v.count) }
        func p50(_ v: [Double]) -> Double { let s = v.sorted(); return s.isEmpty ? .nan : s[(s.count - 1) / 2] }
        var s = "\n## Disk bytes per checkpoint (\(diskMb) MiB image per VM, 4 KiB blocks)\n\n"
        s += "VMReplica's disk step sends the divergent blocks of the union of both sides' dirty blocks (block frames) plus its control frames "
        s += "(bitmaps, hashes, commit); a Remus-style checkpoint sends every block the primary wrote. Steady-state checkpoints only "
        s += "(one that compared every block is left out).\n\n"
        s += "| workload | clients | min gap (ms) | checkpoints | primary dirty (blocks, mean) | backup dirty | union | divergent | VMReplica disk bytes (mean) | all-dirty bytes (mean) | all-dirty / VMReplica | bitmap read p50 (ms) | disk step p50 (ms) |\n"
        s += "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
        for r in results {
            let c = r.checkpoints.filter { $0["disk_union"] != nil && $0["disk_all_blocks"] == nil }
            let sent = c.map { num($0, "disk_bytes") + num($0, "disk_control_bytes") }, dirty = c.map { num($0, "disk_all_dirty_bytes") }
            s += "| \(r.name) | \(r.clients) | \(r.gap) | \(c.count) | \(f(mean(c.map { num($0, "disk_primary_dirty") }))) | \(f(mean(c.map { num($0, "disk_backup_dirty") }))) | "
            s += "\(f(mean(c.map { num($0, "disk_union") }))) | \(f(mean(c.map { num($0, "disk_divergent") }))) | \(wholeNumber(mean(sent))) | \(wholeNumber(mean(dirty))) | "
            s += "**\(f(dirty.reduce(0, +) / max(1, sent.reduce(0, +))))×** | \(f(p50(c.map { num($0, "disk_collect_ms") }))) | \(f(p50(c.map { num($0, "disk_ms") }))) |\n"
        }
        return s
    }
}
