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

    func run() throws {
        let guest = try buildGuest()
        let kernel = guest + "/vmlinuz", initrd = guest + "/initrd.gz"
        try? FileManager.default.removeItem(atPath: dir)
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }

        say("unreplicated guest: \(requests) requests")
        let plain = try unreplicated(kernel: kernel, initrd: initrd)
        say("replicated VM (primary, backup, witness): \(requests) requests")
        let root = (dir as NSString).isAbsolutePath ? dir + "/cluster" : FileManager.default.currentDirectoryPath + "/" + dir + "/cluster"
        let cluster = try VMCluster(root: root, kernel: kernel, initrd: initrd)
        defer { cluster.stopAll() }
        let leftovers = [1, 2].map { (cluster.runDir(NodeID($0)), cluster.ramFile(NodeID($0))) }
        ChildProcesses.killOnInterrupt { VMCluster.killQEMUs(leftovers) }
        try cluster.startAll()
        let client = CounterClient(name: "bench", fronts: [cluster.fronts[1]!])
        _ = try client.request(timeout: .seconds(120))  // boots both guests, first full sync
        client.retries = 0
        var replicated: [Double] = []
        for _ in 0..<requests {
            let t = ContinuousClock.now
            _ = try client.request(timeout: .seconds(60))
            replicated.append(millis(ContinuousClock.now - t))
        }
        let checkpoints = cluster.checkpoints(1).filter { $0["ok"] == "true" }
        let report = Self.report(plain: plain, replicated: replicated, retries: client.retries, checkpoints: checkpoints)
        print(report)
        if let out { try report.write(toFile: out, atomically: true, encoding: .utf8) }
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
    func unreplicated(kernel: String, initrd: String) throws -> [Double] {
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
        func ask(_ seq: Int, wait: Duration) -> Bool {
            q.nic.write(frame: link.requestFrame(payload: Array("INC plain \(seq)\n".utf8)))
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
        var lat: [Double] = []
        for _ in 0..<requests {
            seq += 1
            let t = ContinuousClock.now
            guard ask(seq, wait: .seconds(10)) else { throw CLIError("the unreplicated guest did not answer request \(seq)") }
            lat.append(millis(ContinuousClock.now - t))
        }
        return lat
    }

    static func report(plain: [Double], replicated: [Double], retries: Int, checkpoints: [[String: String]]) -> String {
        func pct(_ v: [Double], _ p: Double) -> Double {
            let s = v.sorted()
            return s.isEmpty ? .nan : s[min(s.count - 1, Int((Double(s.count) * p).rounded(.up)) - 1)]
        }
        func f(_ x: Double) -> String { String(format: "%.2f", x) }
        // The first checkpoint compares every page (nothing says which are equal yet); it is
        // reported apart from the steady state.
        let steady = checkpoints.dropFirst()
        let num = { (c: [String: String], k: String) in Double(c[k] ?? "") ?? 0 }
        let sent = steady.map { num($0, "page_bytes") + num($0, "control_bytes") }
        let allDirty = steady.map { num($0, "all_dirty_bytes") }
        let pauses = steady.map { num($0, "pause_ms") }
        let divergent = steady.map { num($0, "divergent") }, union = steady.map { num($0, "union") }
        let mean = { (v: [Double]) in v.isEmpty ? Double.nan : v.reduce(0, +) / Double(v.count) }
        var s = "# VM replication benchmark\n\n"
        s += "Machine: \(ProcessInfo.processInfo.activeProcessorCount) cores, QEMU under TCG, 128 MiB guest, `plover bench vm --requests \(replicated.count)`.\n\n"
        s += "## Client request latency (sequential INC requests, ms)\n\n| configuration | requests | p50 | p90 | p99 | max |\n|---|---|---|---|---|---|\n"
        for (name, v) in [("unreplicated guest", plain), ("replicated (primary + backup + witness)", replicated)] {
            s += "| \(name) | \(v.count) | \(f(pct(v, 0.5))) | \(f(pct(v, 0.9))) | \(f(pct(v, 0.99))) | \(f(v.max() ?? .nan)) |\n"
        }
        s += "\nClient resends in the replicated run: \(retries).\n\n"
        s += "## Bytes per syncvm (steady state: \(steady.count) checkpoints after the first)\n\n"
        s += "| | mean per checkpoint | total |\n|---|---|---|\n"
        s += "| VMReplica: divergent pages + control frames | \(Int(mean(sent))) B | \(Int(sent.reduce(0, +))) B |\n"
        s += "| every page the primary dirtied (Remus/COLO-style) | \(Int(mean(allDirty))) B | \(Int(allDirty.reduce(0, +))) B |\n"
        let ratio = allDirty.reduce(0, +) / max(1, sent.reduce(0, +))
        s += "\nRatio all-dirty / VMReplica: **\(String(format: "%.2f", ratio))×** (goal ≥ 9×). "
        s += "Mean dirty union \(f(mean(union))) pages, of which divergent \(f(mean(divergent))) pages.\n\n"
        s += "## Pause per checkpoint (ms, both VMs stopped → primary resumed)\n\n| p50 | p99 | max | checkpoints |\n|---|---|---|---|\n"
        s += "| \(f(pct(pauses, 0.5))) | \(f(pct(pauses, 0.99))) | \(f(pauses.max() ?? .nan)) | \(pauses.count) |\n"
        if let first = checkpoints.first {
            s += "\nFirst checkpoint (all \(first["union"] ?? "?") pages compared): pause \(first["pause_ms"] ?? "?") ms, "
            s += "\(first["divergent"] ?? "?") divergent pages, \(first["page_bytes"] ?? "?") page bytes.\n"
        }
        return s
    }
}

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
