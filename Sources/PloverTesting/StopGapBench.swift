import ArgumentParser
import Foundation
import RDMAPaxos

/// `plover bench stop-gap`: the write gap clients see when the leader of a 3-replica cluster is
/// stopped under load, with `kill -TERM` (a graceful stop: the leader hands leadership over
/// first) and, for comparison, `kill -9` (the others elect a new leader after a timeout).
package struct StopGapBench: ParsableCommand {
    package static let configuration = CommandConfiguration(
        commandName: "stop-gap",
        abstract: "Write gap when the leader is stopped under load: SIGTERM (hand-over) vs SIGKILL (benchmarks/stop-gap).")

    @Option(help: "Leader stops per signal.") var rounds: Int = 5
    @Option(help: "Client threads writing all the time.") var clients: Int = 4
    @Option(help: "Directory for the data dirs (default: a new temporary directory; deleted afterwards).") var dir: String?
    @Option(help: "Write the markdown results here as well as to stdout.") var out: String?

    package func validate() throws {
        guard rounds >= 1, clients >= 1 else { throw ValidationError("--rounds and --clients must be positive") }
    }

    struct Round {
        var signal: String
        /// Longest stretch without any acknowledged write, around the stop (ms).
        var gapMs: Double
        /// Median time between two acknowledgements before the stop (ms), and the commit latency
        /// a client saw then (median, ms).
        var typicalGapMs: Double
    }

    package init() {}

    package func run() throws {
        let root = dir ?? NSTemporaryDirectory() + "plover-stop-gap-\(getpid())"
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
        defer { if dir == nil { try? FileManager.default.removeItem(atPath: root) } }
        let machine = MachineDescription.current(dataDir: root)
        let timing = DemoCluster.Timing()
        let cluster = try DemoCluster(root: root, durability: "fsync", timing: timing)
        defer { cluster.stopAll() }
        try cluster.startAll()
        _ = try cluster.waitForLeader(excluding: nil)
        let load = DemoLoad(endpoints: cluster.endpoints, clients: clients)
        load.start()
        defer { load.stop() }
        Thread.sleep(forTimeInterval: 1)
        var results: [Round] = []
        var latencies: [Double] = []
        for signal in ["TERM", "KILL"] {
            for r in 0..<rounds {
                let leader = try cluster.waitForLeader(excluding: nil)
                Thread.sleep(forTimeInterval: 0.5)
                let before = ContinuousClock.now
                if signal == "TERM" { cluster.stop(leader) } else { cluster.kill(leader) }
                // The gap is over once writes flow again; give them a second to show it.
                _ = try cluster.waitForLeader(excluding: leader)
                Thread.sleep(forTimeInterval: 1)
                let window = load.ackTimes(after: before - .milliseconds(500))
                guard window.count > 1 else { throw CLIError("no write was acknowledged around the stop of node \(leader)") }
                let pairs = Array(zip(window, window[1...]))
                let gaps = pairs.map { millis($0.1 - $0.0) }
                let ahead = pairs.filter { $0.1 <= before }.map { millis($0.1 - $0.0) }.sorted()
                let round = Round(signal: signal, gapMs: gaps.max() ?? .infinity, typicalGapMs: ahead.isEmpty ? 0 : ahead[ahead.count / 2])
                results.append(round)
                print(String(format: "  SIG%@ round %d: leader %d stopped, longest gap %.1f ms (usually %.2f ms between acks)",
                             signal, r + 1, leader, round.gapMs, round.typicalGapMs))
                try cluster.start(leader)
                try cluster.waitConverged()
            }
        }
        latencies = Self.commitLatencies(cluster: cluster, clients: clients)
        let text = report(results, machine: machine, timing: timing, latencies: latencies)
        print(text)
        if let out { try text.write(toFile: out, atomically: true, encoding: .utf8) }
    }

    /// Commit latencies (ms) of one client's puts in a steady cluster, for scale.
    static func commitLatencies(cluster: DemoCluster, clients: Int) -> [Double] {
        let c = NodeClient(endpoints: cluster.endpoints)
        var out: [Double] = []
        for i in 0..<300 {
            let t = ContinuousClock.now
            if (try? c.propose(KeyValueStateMachine.Command.put(key: Array("lat-\(i)".utf8), value: [1]).encoded())) != nil {
                out.append(millis(ContinuousClock.now - t))
            }
        }
        return out.sorted()
    }

    func report(_ rs: [Round], machine: MachineDescription, timing: DemoCluster.Timing, latencies: [Double]) -> String {
        func median(_ xs: [Double]) -> Double { xs.isEmpty ? 0 : xs.sorted()[xs.count / 2] }
        let p50 = latencies.isEmpty ? 0 : latencies[latencies.count / 2]
        let p99 = latencies.isEmpty ? 0 : latencies[min(latencies.count - 1, latencies.count * 99 / 100)]
        var s = """
            # Write gap when the leader stops

            `\(CommandLine.arguments.dropFirst().joined(separator: " "))` — 3 replicas (fsync, TCP on loopback), \(clients) clients \
            writing all the time; tick \(timing.tickMilliseconds) ms, election timeout \(timing.electionTimeoutTicks) ticks, \
            heartbeat \(timing.heartbeatTicks) ticks. Each round stops the leader, waits for writes to flow again, restarts it and \
            waits for the replicas to converge. The gap is the longest stretch with no acknowledged write around the stop.

            \(machine.markdownLine(dataDirs: "temporary directory"))

            Commit latency of one client in a steady cluster: p50 \(String(format: "%.2f", p50)) ms, p99 \(String(format: "%.2f", p99)) ms.

            | signal | rounds | gap median (ms) | gap max (ms) | usual time between acks (ms) |
            |---|---|---|---|---|

            """
        for sig in ["TERM", "KILL"] {
            let g = rs.filter { $0.signal == sig }
            s += String(format: "| SIG%@ | %d | %.1f | %.1f | %.2f |\n", sig, g.count, median(g.map(\.gapMs)), g.map(\.gapMs).max() ?? 0,
                        median(g.map(\.typicalGapMs)))
        }
        s += "\nRounds: " + rs.map { String(format: "SIG%@ %.1f", $0.signal, $0.gapMs) }.joined(separator: ", ") + " (ms)\n"
        return s
    }
}
