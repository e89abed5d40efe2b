import ArgumentParser
import Foundation
import RDMAPaxos
import VMReplica

/// `plover bench vm-failover` (benchmarks/vm-failover/README.md): how long clients go without an
/// answer when the VM primary's host dies under load. Closed-loop clients write throughout
/// (each resends after `--resend-ms` of silence and moves to the other front on an error or a
/// hang-up); checkpoints run back to back. Each round waits until the backup is protected, lets
/// the load run a random 1–3 s, then kill -9s the primary's replica process and its QEMUs, times
/// kill → first answer, and restarts the killed replica, which joins as the new backup.
package struct VMFailoverBench: ParsableCommand {
    package static let configuration = CommandConfiguration(commandName: "vm-failover", abstract: "Benchmark VM failover under load (kill -9 of the primary).")

    @Option(help: "Kills of the primary.") var kills = 10
    @Option(help: "Concurrent closed-loop clients (at most 64).") var clients = 16
    @Option(help: "A client resends its request after this many milliseconds without an answer.") var resendMs = 100
    @Option(help: "Seed of the random wait before each kill.") var seed: UInt64 = 1
    @Option(help: "Scratch directory (deleted afterwards unless --keep).") var dir = "benchmarks/vm-failover/out"
    @Flag(help: "Keep the scratch directory (replica logs, checkpoints.log) after the run.") var keep = false
    @Option(help: "Write the markdown results here as well as to stdout.") var out: String?

    @Option(help: "Seconds of load after the last killed replica rejoined, counting leadership changes.") var settleSeconds = 60

    /// The quiet period after the last rejoin.
    struct Settle {
        var seconds: Int
        var leaderships: Int
        var answers: Int
    }

    struct Round {
        var killed: NodeID
        var failover: Duration
        var reprotected: Duration?
        /// The new primary's failover timeline, in milliseconds after the kill, by step name.
        var steps: [String: Double] = [:]
    }

    /// The steps of the replicator's "failover timeline" line (FailoverTimeline.swift), in order.
    static let stepNames = ["link_down", "probe_refused", "campaign", "leading", "takeover_proposed", "takeover_applied", "serving", "first_answer"]

    /// The last failover timeline in `text`, each step in milliseconds after `killedAt` (unix ms).
    static func timeline(in text: Substring, killedAt: Double) -> [String: Double] {
        guard let r = text.range(of: "failover timeline (unix ms): ", options: .backwards) else { return [:] }
        let line = text[r.upperBound...].prefix { $0 != "\n" }
        var steps: [String: Double] = [:]
        for pair in line.split(separator: " ") {
            let kv = pair.split(separator: "=")
            if kv.count == 2, let v = Double(kv[1]) { steps[String(kv[0])] = v - killedAt }
        }
        return steps
    }

    package init() {}

    package func run() throws {
        guard (1...64).contains(clients), kills >= 1, resendMs >= 1 else { throw CLIError("--clients 1...64, --kills ≥ 1 and --resend-ms ≥ 1") }
        let guest = try buildVMGuest()
        let absolute = (dir as NSString).isAbsolutePath ? dir : FileManager.default.currentDirectoryPath + "/" + dir
        try? FileManager.default.removeItem(atPath: absolute)
        defer { if !keep { try? FileManager.default.removeItem(atPath: absolute) } }
        let machine = MachineDescription.current(dataDir: FileManager.default.currentDirectoryPath)
        let qemu = MachineDescription.qemuVersion
        let cluster = try VMCluster(root: absolute, kernel: guest + "/vmlinuz", initrd: guest + "/initrd.gz")
        defer { cluster.stopAll() }
        let leftovers = [1, 2].map { (cluster.runDir(NodeID($0)), cluster.ramFile(NodeID($0))) }
        ChildProcesses.killOnInterrupt { VMCluster.killQEMUs(leftovers) }
        try cluster.startAll()
        let load = CounterLoad(clients: clients, fronts: [cluster.fronts[1]!, cluster.fronts[2]!], resendAfter: .milliseconds(resendMs), names: "b")
        load.start()
        var stopped = false
        defer { if !stopped { load.stop() } }
        guard load.waitForAnswers(2 * clients, timeout: .seconds(180)) else { throw CLIError("the clients got \(load.count) answers within 180 s of the start") }
        func leaderships() -> Int {
            [NodeID(1), 2, 3].map { id in
                ((try? String(contentsOfFile: cluster.logPath(id), encoding: .utf8)) ?? "").components(separatedBy: "became leader at").count - 1
            }.reduce(0, +)
        }
        var leadershipsBeforeKills: Int?
        var rng = SeededRandom(seed: seed)
        var rounds: [Round] = []
        var primary: NodeID = 1
        var backupStart = 0
        var restartedAt: ContinuousClock.Instant?
        for k in 1...kills {
            let backup: NodeID = primary == 1 ? 2 : 1
            guard waitForLog(cluster, backup, "vm: protected:", after: backupStart, timeout: .seconds(120)) else {
                throw CLIError("round \(k): node \(backup) was not protected within 120 s")
            }
            if let r = restartedAt, !rounds.isEmpty { rounds[rounds.count - 1].reprotected = .now - r }
            Thread.sleep(forTimeInterval: 1 + Double(rng.next() % 2000) / 1000)
            backupStart = logSize(cluster, primary)
            if leadershipsBeforeKills == nil { leadershipsBeforeKills = leaderships() }
            let backupLogFrom = logSize(cluster, backup)
            // The clock starts at the SIGKILL (the first thing `kill` does), not when it returns:
            // it then waits for Foundation to notice the exit, which can take tens of ms.
            let killedAt = Date().timeIntervalSince1970 * 1000
            let killed = ContinuousClock.now
            cluster.kill(primary)
            guard let answered = load.firstAnswer(after: killed, timeout: .seconds(120)) else {
                throw CLIError("round \(k): no answer within 120 s after node \(primary) was killed")
            }
            // The new primary logs its timeline with its first answer.
            _ = waitForLog(cluster, backup, "failover timeline", after: backupLogFrom, timeout: .seconds(5))
            let log = (try? Data(contentsOf: URL(fileURLWithPath: cluster.logPath(backup)))) ?? Data()
            let text = String(decoding: log.dropFirst(backupLogFrom), as: UTF8.self)
            rounds.append(Round(killed: primary, failover: answered - killed, steps: Self.timeline(in: text[...], killedAt: killedAt)))
            say("kill \(k) of node \(primary): first answer after \(answered - killed)")
            try cluster.restart(primary)
            restartedAt = .now
            primary = backup
        }
        // The last killed replica rejoins: once it is protected, a minute of load must pass with
        // no leadership changing hands (no ping-pong between the two VM replicas).
        let backup: NodeID = primary == 1 ? 2 : 1
        guard waitForLog(cluster, backup, "vm: protected:", after: backupStart, timeout: .seconds(120)) else {
            throw CLIError("node \(backup) was not protected within 120 s of its restart")
        }
        if let r = restartedAt { rounds[rounds.count - 1].reprotected = .now - r }
        let settledFrom = leaderships(), answersFrom = load.count
        say("\(settleSeconds) s of load after node \(backup) rejoined")
        Thread.sleep(forTimeInterval: Double(settleSeconds))
        let settle = Settle(seconds: settleSeconds, leaderships: leaderships() - settledFrom, answers: load.count - answersFrom)
        load.stop()
        stopped = true
        let report = Self.report(rounds, load: load, leaderships: leaderships() - (leadershipsBeforeKills ?? 0) - settle.leaderships,
                                 settle: settle, machine: machine, qemu: qemu, command: commandLine)
        print(report)
        if let out { try report.write(toFile: out, atomically: true, encoding: .utf8) }
    }

    var commandLine: String { "plover bench vm-failover --kills \(kills) --clients \(clients) --resend-ms \(resendMs) --seed \(seed) --settle-seconds \(settleSeconds)" }

    func waitForLog(_ cluster: VMCluster, _ id: NodeID, _ text: String, after offset: Int, timeout: Duration) -> Bool {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            let log = (try? Data(contentsOf: URL(fileURLWithPath: cluster.logPath(id)))) ?? Data()
            if log.count > offset, String(decoding: log.dropFirst(offset), as: UTF8.self).contains(text) { return true }
            Thread.sleep(forTimeInterval: 0.05)
        }
        return false
    }

    func logSize(_ cluster: VMCluster, _ id: NodeID) -> Int {
        ((try? FileManager.default.attributesOfItem(atPath: cluster.logPath(id)))?[.size] as? Int) ?? 0
    }

    static func report(_ rounds: [Round], load: CounterLoad, leaderships: Int, settle: Settle, machine: MachineDescription, qemu: String, command: String) -> String {
        func ms(_ d: Duration) -> Double { millis(d) }
        func f(_ x: Double) -> String { String(format: "%.0f", x) }
        let times = rounds.map { ms($0.failover) }.sorted()
        var s = "# VM failover under load\n\n"
        s += vmMachineLine(machine, qemu: qemu)
        s += "`\(command)`: \(load.clients) closed-loop clients through both fronts, checkpoints back to back, 128 MiB guest under TCG; "
        s += "each round kill -9s the primary's replica process and its QEMUs 1–3 s after the backup is protected, then restarts the killed replica.\n\n"
        s += "| kill | node killed | kill → first answer (ms) | restart → re-protected (s) |\n|---|---|---|---|\n"
        for (i, r) in rounds.enumerated() {
            s += "| \(i + 1) | \(r.killed) | \(f(ms(r.failover))) | \(r.reprotected.map { String(format: "%.1f", ms($0) / 1000) } ?? "-") |\n"
        }
        s += "\nWhere the time went, from the new primary's failover timeline (ms after the kill; - where a step was not logged): "
        s += "the syncvm link seen down, the probe finding nothing listening at the primary's address, the forced election asked for, "
        s += "this replica seen leading, the take-over proposed and applied, its primary endpoint open (output goes out), its first answer to a client.\n\n"
        s += "| kill | " + stepNames.joined(separator: " | ") + " |\n|" + String(repeating: "---|", count: stepNames.count + 1) + "\n"
        for (i, r) in rounds.enumerated() {
            s += "| \(i + 1) | " + stepNames.map { r.steps[$0].map { f($0) } ?? "-" }.joined(separator: " | ") + " |\n"
        }
        let p50 = times.isEmpty ? .nan : times[(times.count - 1) / 2]
        s += "\nKill → first answer over \(times.count) kills: p50 \(f(p50)) ms, max \(f(times.last ?? .nan)) ms; "
        s += "\(times.filter { $0 <= 1000 }.count) of \(times.count) within 1 s.\n\n"
        let v = load.violations()
        s += "Answers: \(load.count); requests abandoned after 10 s without an answer: \(load.timedOut.count); "
        s += "exactly-once violations (a counter value answered twice, or a client's values not increasing): \(v.count).\n\n"
        s += "Leaderships taken from the first kill on (\"became leader\" in the three logs): \(leaderships) for \(rounds.count) kills (one per kill is the least possible; more means leadership moved between the VM replicas).\n\n"
        s += "After the last killed replica rejoined and was protected: \(settle.seconds) s of load, \(settle.answers) answers, \(settle.leaderships) leadership changes.\n"
        return s
    }
}

/// Builds (or finds cached) the test guest with `root`/scripts/build-vm-guest.sh (into `cache`, or
/// the script's default); returns its directory.
func buildVMGuest(root: String = ".", cache: String? = nil) throws -> String {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/bin/bash")
    p.arguments = [root + "/scripts/build-vm-guest.sh"] + (cache.map { [$0] } ?? [])
    let pipe = Pipe()
    p.standardOutput = pipe
    try p.run()
    let text = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
    p.waitUntilExit()
    guard p.terminationStatus == 0 else { throw CLIError("scripts/build-vm-guest.sh failed (status \(p.terminationStatus)); run from the repository root") }
    return text.trimmingCharacters(in: .whitespacesAndNewlines)
}

/// "Machine: ..." of a VM benchmark's results, ending with a blank line.
func vmMachineLine(_ machine: MachineDescription, qemu: String) -> String {
    var s = "Machine: \(machine.cores) cores, \(machine.cpu), kernel \(machine.kernel), \(qemu), \(machine.date)"
    s += machine.busyBefore.map { String(format: "; %.0f%% of the cores were busy with other work in the second before the run.\n\n", $0 * 100) } ?? ".\n\n"
    return s
}
