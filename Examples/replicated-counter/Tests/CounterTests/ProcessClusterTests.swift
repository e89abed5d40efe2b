import Counter
import Foundation
import PloverTesting
import RDMAPaxos
import Testing

/// Three `counter-server` processes on loopback, started by PloverTesting's `DemoCluster` with
/// durable (fsync) Berkeley DB logs: the service as it runs in production, driven through
/// `NodeClient` over TCP.
@Suite(.serialized, .timeLimit(.minutes(2))) struct ProcessClusterTests {
    @Test func addsSurviveAKilledLeaderAndSIGTERMHandsLeadershipOver() throws {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("counter-processes-\(getpid())").path
        try? FileManager.default.removeItem(atPath: root)
        let cluster = try DemoCluster(root: root, durability: "fsync", executable: try DemoCluster.builtExecutable("counter-server"))
        defer { cluster.stopAll() }
        try cluster.startAll()
        let first = try cluster.waitForLeader(excluding: nil)
        var client = NodeClient(endpoints: cluster.endpoints)
        for _ in 0..<10 { _ = try client.propose(CounterCommand.add(2).encoded()) }

        // A crash: the survivors elect a leader and keep counting from 20.
        cluster.kill(first)
        let second = try cluster.waitForLeader(excluding: first)
        for _ in 0..<10 { _ = try client.propose(CounterCommand.add(1).encoded()) }
        #expect(CounterCommand.decodeTotal(try client.read([])) == 30)

        // The killed replica restarts from its log and catches up.
        try cluster.start(first)
        try cluster.waitConverged()
        #expect(CounterCommand.decodeTotal(try client.localRead([], at: first)) == 30)

        // A fourth replica joins: added as a learner, started with --join, then promoted.
        let newcomer = try cluster.prepareJoiner(4)
        _ = try client.changeMembership(.add(newcomer))
        try cluster.startJoining(4, via: second)
        try cluster.waitConverged()
        client = NodeClient(endpoints: cluster.endpoints)
        _ = try client.changeMembership(.promote(4))
        #expect(CounterCommand.decodeTotal(try client.localRead([], at: 4)) == 30)

        // SIGTERM: the service group shuts the replica down gracefully, and as leader it hands
        // leadership to another replica before it exits.
        let leader = try cluster.waitForLeader(excluding: nil)
        cluster.stop(leader)
        let log = try String(contentsOfFile: cluster.logPath(leader), encoding: .utf8)
        #expect(log.contains("shutting down gracefully"), "\(log.suffix(2000))")
        #expect(log.contains("handed leadership to node"), "\(log.suffix(2000))")
        #expect(CounterCommand.decodeTotal(try client.read([])) == 30)
    }
}
