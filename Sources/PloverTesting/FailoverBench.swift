import ArgumentParser
import Foundation
import RDMAPaxos
import Synchronization

/// `plover bench failover`: how long a 3-replica cluster under a closed-loop write load stops
/// acknowledging writes when its leader is killed with SIGKILL, whether any acknowledged write is
/// lost, and how many elections happen with no fault at all, for the default timing and a fast
/// timing profile side by side.
package struct FailoverBench: ParsableCommand {
    package static let configuration = CommandConfiguration(
        commandName: "failover",
        abstract: "Leader kill -9 under load: unavailability window, lost writes, spurious elections (benchmarks/failover).")

    @Option(help: "Leader kills per timing profile (0: no kill phase).") var kills: Int = 20
    @Option(help: "Client threads writing all the time during the kills.") var clients: Int = 8
    @Option(help: "Seconds of the run with no fault, counting elections.") var quietSeconds: Int = 300
    @Option(help: "Client threads during the run with no fault.") var quietClients: Int = 64
    @Option(help: "Directory for the data dirs (default: a new temporary directory; deleted afterwards).") var dir: String?
    @Option(help: "Write the markdown results here as well as to stdout.") var out: String?
    @Option(help: "Run only this timing profile (default or fast; default: both).") var profile: String?

    package init() {}

    package func validate() throws {
        guard kills >= 0, clients >= 1, quietSeconds >= 0, quietClients >= 1 else {
            throw ValidationError("--clients and --quiet-clients must be positive, --kills and --quiet-seconds not negative")
        }
        if let profile, !Self.profiles.contains(where: { $0.name == profile }) {
            throw ValidationError("--profile \(profile): no such timing profile (known: \(Self.profiles.map(\.name).joined(separator: ", ")))")
        }
    }

    /// The profiles compared: a node's defaults and the documented fast one.
    static let profiles: [(name: String, timing: DemoCluster.Timing)] = [
        ("default", DemoCluster.Timing(tickMilliseconds: 10, electionTimeoutTicks: 20, heartbeatTicks: 2, diskStallTicks: NodeConfig.defaultDiskStallTicks)),
        ("fast", DemoCluster.Timing(tickMilliseconds: 5, electionTimeoutTicks: 8, heartbeatTicks: 1, diskStallTicks: 600)),
    ]

    struct Outcome {
        var name: String
        var timing: DemoCluster.Timing
        /// Longest stretch without an acknowledged write around each kill (ms).
        var windows: [Double] = []
        var acknowledged = 0
        var lost = 0
        /// Leader ballots seen in the run with no fault, beyond the first.
        var spuriousElections = 0
        var quietPuts = 0
    }

    package func run() throws {
        let root = dir ?? NSTemporaryDirectory() + "plover-failover-\(getpid())"
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
        defer { if dir == nil { try? FileManager.default.removeItem(atPath: root) } }
        let machine = MachineDescription.current(dataDir: root)
        var outcomes: [Outcome] = []
        for p in Self.profiles where profile == nil || profile == p.name {
            print("profile \(p.name): tick \(p.timing.tickMilliseconds) ms, election \(p.timing.electionTimeoutTicks) ticks")
            var o = Outcome(name: p.name, timing: p.timing)
            try kills(root: root + "/\(p.name)-kills", into: &o)
            try quiet(root: root + "/\(p.name)-quiet", into: &o)
            outcomes.append(o)
        }
        let text = report(outcomes, machine: machine)
        print(text)
        if let out { try text.write(toFile: out, atomically: true, encoding: .utf8) }
    }

    /// Kills the leader `kills` times under load; then checks every acknowledged write.
    func kills(root: String, into o: inout Outcome) throws {
        guard kills > 0 else { return }
        let cluster = try DemoCluster(root: root, durability: "fsync", timing: o.timing)
        defer { cluster.stopAll() }
        try cluster.startAll()
        _ = try cluster.waitForLeader(excluding: nil)
        let load = DemoLoad(endpoints: cluster.endpoints, clients: clients)
        load.start()
        Thread.sleep(forTimeInterval: 1)
        for k in 0..<kills {
            let leader = try cluster.waitForLeader(excluding: nil)
            Thread.sleep(forTimeInterval: 0.5)
            let killedAt = ContinuousClock.now
            cluster.kill(leader)
            guard load.waitForWrite(after: killedAt + .milliseconds(1), timeout: .seconds(20)) != nil else {
                load.stop()
                throw CLIError("no write was acknowledged within 20 s of killing leader \(leader)\n" + cluster.logTails())
            }
            Thread.sleep(forTimeInterval: 0.3)
            let times = load.ackTimes(after: killedAt - .milliseconds(300))
            let gaps = zip(times, times.dropFirst()).map { millis($0.1 - $0.0) }
            o.windows.append(gaps.max() ?? 0)
            print(String(format: "  kill %d: leader %d, no acknowledged write for %.1f ms", k + 1, leader, o.windows.last!))
            try cluster.start(leader)
            try cluster.waitConverged()
        }
        load.stop()
        let acked = load.ackedWrites
        o.acknowledged = acked.count
        o.lost = Self.missing(acked, cluster: cluster)
        // The read-back must be able to see a loss: a write never made counts as missing.
        guard Self.missing(["failover-control-never-written": "x"], cluster: cluster) == 1 else {
            throw CLIError("the read-back check did not see a write that was never made")
        }
    }

    /// Reads every acknowledged key back through the leader (linearizable reads, 8 readers).
    static func missing(_ acked: [String: String], cluster: DemoCluster) -> Int {
        let items = Array(acked)
        let endpoints = cluster.endpoints
        let lost = Mutex(0)
        DispatchQueue.concurrentPerform(iterations: 8) { part in
            let c = NodeClient(endpoints: endpoints, timeout: .seconds(5))
            for (k, v) in items[(items.count * part / 8)..<(items.count * (part + 1) / 8)] {
                let got = (try? c.read(Array(k.utf8))).flatMap(KeyValueStateMachine.decodeResult)
                if got != Array(v.utf8) { lost.withLock { $0 += 1 } }
            }
        }
        return lost.withLock { $0 }
    }

    /// `quietSeconds` of load with no fault, polling the replicas for the leader's ballot.
    func quiet(root: String, into o: inout Outcome) throws {
        guard quietSeconds > 0 else { return }
        let cluster = try DemoCluster(root: root, durability: "fsync", timing: o.timing)
        defer { cluster.stopAll() }
        try cluster.startAll()
        _ = try cluster.waitForLeader(excluding: nil)
        let load = DemoLoad(endpoints: cluster.endpoints, clients: quietClients)
        load.start()
        var ballots: [String] = []
        let end = ContinuousClock.now + .seconds(quietSeconds)
        while ContinuousClock.now < end {
            for id in cluster.ids {
                let s = cluster.status(id)
                if s["role"] == "leader", let b = s["ballot"], ballots.last != b { ballots.append(b) }
            }
            Thread.sleep(forTimeInterval: 0.2)
        }
        load.stop()
        o.spuriousElections = max(0, ballots.count - 1)
        o.quietPuts = load.acknowledged
    }

    func report(_ os: [Outcome], machine: MachineDescription) -> String {
        func pct(_ xs: [Double], _ p: Int) -> Double { xs.isEmpty ? 0 : xs.sorted()[min(xs.count - 1, xs.count * p / 100)] }
        var s = """
            # Leader failover under load

            `\(CommandLine.arguments.dropFirst().joined(separator: " "))` — 3 replicas (fsync, TCP on loopback), \(clients) \
            closed-loop clients writing fresh keys during \(kills) leader `kill -9`s per profile (each: wait 0.5 s, kill, \
            wait for writes, restart the killed replica, wait until the replicas converge). The window is the longest \
            stretch with no acknowledged write around the kill. Then every acknowledged write is read back. A second \
            cluster per profile runs \(quietSeconds) s with \(quietClients) clients and no fault; every leader ballot \
            after the first is a spurious election. (Each read-back also reads a key never written, which must
            count as missing: the check can fail.)

            \(machine.markdownLine(dataDirs: "temporary directory"))

            | profile | tick ms | election ticks | heartbeat ticks | window p50 (ms) | p90 | max | acknowledged | lost | spurious elections | puts in the quiet run |
            |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|

            """
        for o in os {
            s += String(format: "| %@ | %d | %d | %d | %.1f | %.1f | %.1f | %d | %d | %d | %d |\n", o.name,
                        o.timing.tickMilliseconds, o.timing.electionTimeoutTicks, o.timing.heartbeatTicks,
                        pct(o.windows, 50), pct(o.windows, 90), o.windows.max() ?? 0, o.acknowledged, o.lost,
                        o.spuriousElections, o.quietPuts)
        }
        for o in os {
            s += "\nWindows, \(o.name) (ms): " + o.windows.map { String(format: "%.1f", $0) }.joined(separator: ", ") + "\n"
        }
        return s
    }
}
