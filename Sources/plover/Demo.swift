import ArgumentParser
import Foundation
import RDMAPaxos
import PloverTesting

/// `plover demo`: a live three-replica cluster on loopback with Berkeley DB logs. Writes under
/// load, kills the leader with SIGKILL, shows the failover, restarts the old leader, and checks
/// that every acknowledged write is on every replica.
struct Demo: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Run a live 3-replica cluster on loopback and kill its leader.")

    @Option(help: "Where to put configs, logs and data (default: a new temporary directory).") var dir: String?
    @Option(help: "Concurrent writers.") var clients: Int = 4
    @Option(help: "Seconds of writes before the leader is killed, and after.") var seconds: Double = 2
    @Option(help: "Durability: fsync, async or memory.") var durability: String = "fsync"
    @Flag(help: "PLOVER's shape: node 1 primary, node 2 backup, node 3 a witness that never leads or applies.") var witness = false

    func validate() throws {
        guard (1...64).contains(clients) else { throw ValidationError("--clients must be 1...64 (got \(clients))") }
        guard seconds > 0 && seconds <= 600 else { throw ValidationError("--seconds must be in (0, 600] (got \(seconds))") }
        guard Durability(rawValue: durability) != nil else { throw ValidationError("--durability must be fsync, async or memory (got \(durability))") }
    }

    func run() throws {
        let root = dir ?? FileManager.default.temporaryDirectory.appendingPathComponent("plover-demo-\(getpid())").path
        let cluster = try DemoCluster(root: root, durability: durability, witness: witness)
        defer { cluster.stopAll() }
        say("1. Starting 3 replicas on loopback (Berkeley DB logs, durability \(durability)) in \(root)")
        try cluster.startAll()
        let leader1 = try cluster.waitForLeader(excluding: nil)
        say("   node \(leader1) is the leader")

        say("2. Writing with \(clients) clients for \(seconds) s")
        let load = DemoLoad(endpoints: cluster.endpoints, clients: clients)
        load.start()
        Thread.sleep(forTimeInterval: seconds)
        let before = load.acknowledged
        say("   \(before) writes acknowledged so far")

        say("3. kill -9 the leader (node \(leader1)) while the clients keep writing")
        let killedAt = ContinuousClock.now
        cluster.kill(leader1)
        let leader2 = try cluster.waitForLeader(excluding: leader1)
        if witness && leader2 == 3 { throw CLIError("the witness (node 3) became leader: this must never happen") }
        let firstWrite = load.waitForWrite(after: killedAt, timeout: .seconds(20))
        say("   node \(leader2) took over; first acknowledged write \(firstWrite.map { ms($0 - killedAt) } ?? "never") after the kill")
        Thread.sleep(forTimeInterval: seconds)

        say("4. Restarting node \(leader1): it recovers its Berkeley DB log and catches up")
        try cluster.start(leader1)
        Thread.sleep(forTimeInterval: seconds / 2)
        load.stop()
        let acked = load.ackedWrites
        say("   \(acked.count) writes acknowledged in all (\(load.failures) client-visible retries/errors)")
        try cluster.waitConverged()
        let status = try NodeClient(endpoints: cluster.endpoints).status(of: leader1)
        say("   node \(leader1) caught up: " + status.split(separator: "\n").filter { $0.hasPrefix("role=") || $0.hasPrefix("commit_index=") || $0.hasPrefix("applied_index=") }.joined(separator: " "))

        say("5. Checking every acknowledged write on every replica (local reads)")
        var missing = 0
        for id in cluster.endpoints.keys.sorted() {
            if witness && id == 3 {
                let s = cluster.status(3)
                say("   node 3 (witness): holds the log through \(s["last_index"] ?? "?"), applies nothing, role \(s["role"] ?? "?")")
                continue
            }
            let c = NodeClient(endpoints: cluster.endpoints)
            var bad = 0
            for (k, v) in acked {
                let r = try c.localRead(Array(k.utf8), at: id)
                if KeyValueStateMachine.decodeResult(r) != Array(v.utf8) { bad += 1 }
            }
            say("   node \(id): \(acked.count - bad)/\(acked.count) acknowledged writes present")
            missing += bad
        }
        cluster.stopAll()
        say("")
        say(missing == 0 ? "OK: no acknowledged write was lost." : "FAILED: \(missing) acknowledged writes missing.")
        say("Inspect the logs:  swift run paxos-log stat \(root)/data/1")
        say("                   swift run paxos-log dump \(root)/data/1 --from 1 --to 5")
        say("                   swift run paxos-log verify \(root)/data/2")
        say("Node output:       \(root)/node-N.log")
        if missing > 0 { throw ExitCode(1) }
    }
}
