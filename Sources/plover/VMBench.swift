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
struct VMBench: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "vm", abstract: "Benchmark VM replication with QEMU under TCG.")

    @Option(help: "Sequential requests per configuration.") var requests = 100
    @Option(help: "Scratch directory (deleted afterwards).") var dir = "benchmarks/vm/out"
    @Option(help: "Write the markdown results here as well as to stdout.") var out: String?
    @Option(help: "checkpoint_min_gap_ms values to run the replicated VM with, comma-separated.") var gaps = "0,1000"

    var gapList: [Int] { gaps.split(separator: ",").compactMap { Int($0) } }

    /// The two request kinds: a counter increment (a few pages touched) and a 256 KiB write
    /// into the service's store (a key-value SET of a large value: many pages, written the
    /// same way on both replicas).
    static let workloads: [(name: String, op: String, extra: String)] = [("INC (counter)", "INC", ""), ("PUT 256 KiB", "PUT", " 256")]

    func run() throws {
        let guest = try buildGuest()
        let kernel = guest + "/vmlinuz", initrd = guest + "/initrd.gz"
        try? FileManager.default.removeItem(atPath: dir)
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }

        say("unreplicated guest: \(requests) requests per workload")
        let plain = try unreplicated(kernel: kernel, initrd: initrd)
        var results: [WorkloadResult] = []
        var first: [String: String]?
        for gap in gapList {
            say("replicated VM (primary, backup, witness), checkpoint_min_gap_ms = \(gap): \(requests) requests per workload")
            let base = (dir as NSString).isAbsolutePath ? dir : FileManager.default.currentDirectoryPath + "/" + dir
            let cluster = try VMCluster(root: base + "/cluster-gap-\(gap)", kernel: kernel, initrd: initrd,
                                        vmExtra: "checkpoint_min_gap_ms = \(gap)")
            defer { cluster.stopAll() }
            let leftovers = [1, 2].map { (cluster.runDir(NodeID($0)), cluster.ramFile(NodeID($0))) }
            ChildProcesses.killOnInterrupt { VMCluster.killQEMUs(leftovers) }
            try cluster.startAll()
            let client = CounterClient(name: "bench", fronts: [cluster.fronts[1]!])
            _ = try client.request(timeout: .seconds(120))  // boots both guests, first full sync
            if first == nil { first = cluster.checkpoints(1).first { $0["ok"] == "true" } }
            for (i, w) in Self.workloads.enumerated() {
                client.retries = 0
                let before = cluster.checkpoints(1).count
                var lat: [Double] = []
                for _ in 0..<requests {
                    let t = ContinuousClock.now
                    _ = try client.request(w.op, extra: w.extra, timeout: .seconds(60))
                    lat.append(millis(ContinuousClock.now - t))
                }
                let cps = cluster.checkpoints(1).dropFirst(before).filter { $0["ok"] == "true" }
                results.append(WorkloadResult(name: w.name, gap: gap, plain: plain[i], replicated: lat, retries: client.retries, checkpoints: Array(cps)))
            }
            cluster.stopAll()
        }
        let report = Self.report(results, requests: requests, first: first)
        print(report)
        if let out { try report.write(toFile: out, atomically: true, encoding: .utf8) }
    }

    struct WorkloadResult {
        var name: String
        var gap: Int
        var plain: [Double]
        var replicated: [Double]
        var retries: Int
        var checkpoints: [[String: String]]
    }

    func buildGuest() throws -> String {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/bash")
        p.arguments = ["scripts/build-vm-guest.sh"]
        let pipe = Pipe()
        p.standardOutput = pipe
        try p.run()
        let text = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        guard p.terminationStatus == 0 else { throw CLIError("scripts/build-vm-guest.sh failed; run from the repository root") }
        return text.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// One QEMU, no consensus and no output guard: request frames in, answers out.
    func unreplicated(kernel: String, initrd: String) throws -> [[Double]] {
        let run = FileManager.default.currentDirectoryPath + "/" + dir + "/plain"
        try FileManager.default.createDirectory(atPath: run, withIntermediateDirectories: true)
        var s = QEMUSettings(kernel: kernel, initrd: initrd, ramFile: "/dev/shm/plover-bench-\(getpid()).ram")
        s.memoryMiB = 128
        defer { unlink(s.ramFile) }
        let listener = try NICStream.listen(path: run + "/nic.sock")
        defer { close(listener) }
        let q = try QEMUInstance.launch(s, name: "plain", runDir: run, nicListener: listener, nicSocket: run + "/nic.sock", incoming: false)
        defer { q.kill() }
        let link = GuestLink()
        let answers = AnswerQueue()
        let reader = Thread {
            while let f = q.nic.readFrame() { if let p = link.answerPayload(f) { answers.put(p) } }
            answers.put(nil)
        }
        reader.start()
        func ask(_ seq: Int, _ op: String = "INC", _ extra: String = "", wait: Duration) -> Bool {
            q.nic.write(frame: link.requestFrame(payload: Array("\(op) plain \(seq)\(extra)\n".utf8)))
            let deadline = ContinuousClock.now + wait
            while let a = answers.take(until: deadline) {
                if String(decoding: a, as: UTF8.self).hasPrefix("plain \(seq) ") { return true }
            }
            return false
        }
        var seq = 1
        let bootDeadline = ContinuousClock.now + .seconds(120)
        while !ask(seq, wait: .milliseconds(500)) {
            guard ContinuousClock.now < bootDeadline else { throw CLIError("the unreplicated guest never answered; see \(run)") }
        }
        return try Self.workloads.map { w in
            var lat: [Double] = []
            for _ in 0..<requests {
                seq += 1
                let t = ContinuousClock.now
                guard ask(seq, w.op, w.extra, wait: .seconds(10)) else { throw CLIError("the unreplicated guest did not answer request \(seq)") }
                lat.append(millis(ContinuousClock.now - t))
            }
            return lat
        }
    }

    static func report(_ results: [WorkloadResult], requests: Int, first: [String: String]?) -> String {
        func pct(_ v: [Double], _ p: Double) -> Double {
            let s = v.sorted()
            return s.isEmpty ? .nan : s[min(s.count - 1, max(0, Int((Double(s.count) * p).rounded(.up)) - 1))]
        }
        func f(_ x: Double) -> String { String(format: "%.2f", x) }
        let num = { (c: [String: String], k: String) in Double(c[k] ?? "") ?? 0 }
        let mean = { (v: [Double]) in v.isEmpty ? Double.nan : v.reduce(0, +) / Double(v.count) }
        var s = "# VM replication benchmark\n\n"
        s += "\(ProcessInfo.processInfo.activeProcessorCount) cores shared by both QEMUs (TCG), three replica processes and the client; "
        s += "128 MiB guest; `plover bench vm --requests \(requests)`; sequential requests, one client.\n\n"
        s += "## Client request latency (ms)\n\n| workload | configuration | requests | p50 | p90 | p99 | max |\n|---|---|---|---|---|---|---|\n"
        for r in results {
            for (name, v) in (r.gap == gapsFirst(results) ? [("unreplicated guest", r.plain)] : []) + [("replicated, min gap \(r.gap) ms", r.replicated)] {
                s += "| \(r.name) | \(name) | \(v.count) | \(f(pct(v, 0.5))) | \(f(pct(v, 0.9))) | \(f(pct(v, 0.99))) | \(f(v.max() ?? .nan)) |\n"
            }
        }
        s += "\nClient resends in the replicated runs: " + results.map { "\($0.name), gap \($0.gap) ms: \($0.retries)" }.joined(separator: ", ") + ".\n\n"
        s += "## Bytes per syncvm\n\nSteady-state checkpoints (the first one, which compares every page, is reported below). "
        s += "VMReplica sends divergent pages plus control frames; a Remus/COLO-style checkpoint sends every page the primary dirtied.\n\n"
        s += "| workload | min gap (ms) | checkpoints | dirty union (pages, mean) | divergent (pages, mean) | VMReplica bytes (mean) | all-dirty bytes (mean) | all-dirty / VMReplica |\n|---|---|---|---|---|---|---|---|\n"
        for r in results {
            let c = r.checkpoints
            let sent = c.map { num($0, "page_bytes") + num($0, "control_bytes") }, dirty = c.map { num($0, "all_dirty_bytes") }
            s += "| \(r.name) | \(r.gap) | \(c.count) | \(f(mean(c.map { num($0, "union") }))) | \(f(mean(c.map { num($0, "divergent") }))) | "
            s += "\(Int(mean(sent))) | \(Int(mean(dirty))) | **\(f(dirty.reduce(0, +) / max(1, sent.reduce(0, +))))×** |\n"
        }
        s += "\n## Pause per checkpoint (ms: primary stopped → primary resumed)\n\n"
        s += "| workload | min gap (ms) | p50 | p99 | max | scan p50 (hash-diff of all RAM) | migrate p50 (device state) |\n|---|---|---|---|---|---|---|\n"
        for r in results {
            let p = r.checkpoints.map { num($0, "pause_ms") }
            s += "| \(r.name) | \(r.gap) | \(f(pct(p, 0.5))) | \(f(pct(p, 0.99))) | \(f(p.max() ?? .nan)) | "
            s += "\(f(pct(r.checkpoints.map { num($0, "scan_ms") }, 0.5))) | \(f(pct(r.checkpoints.map { num($0, "migrate_ms") }, 0.5))) |\n"
        }
        if let first {
            s += "\nFirst checkpoint (all \(first["union"] ?? "?") pages compared): pause \(first["pause_ms"] ?? "?") ms, "
            s += "\(first["divergent"] ?? "?") divergent pages, \(first["page_bytes"] ?? "?") page bytes.\n"
        }
        return s
    }
}

/// The first gap of a run: the unreplicated rows are printed once, beside it.
func gapsFirst(_ r: [VMBench.WorkloadResult]) -> Int { r.first?.gap ?? 0 }

func millis(_ d: Duration) -> Double { Double(d.components.seconds) * 1000 + Double(d.components.attoseconds) / 1e15 }

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
                _ = cond.wait(until: Date(timeIntervalSinceNow: Double(left.components.seconds) + Double(left.components.attoseconds) / 1e18))
            }
            return items.isEmpty ? nil : items.removeFirst()
        }
    }
}
