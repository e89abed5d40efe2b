import Foundation
import PloverCheck
import Testing
@testable import PloverTesting
import RDMAPaxos

extension EndToEnd {
    /// Replicas in network namespaces of their own (`NetworkLab`): partitions are links taken
    /// down, so a cut-off replica keeps running, keeps its timers and keeps trying to reach its
    /// peers — unlike a paused or killed process.
    ///
    /// `PARTITION_ROUNDS` (default 8) sets how many partitions the campaign makes; longer runs:
    ///
    ///     PARTITION_ROUNDS=100 swift test --filter NetworkPartitionTests
    @Suite(.serialized, .timeLimit(.minutes(3 + PartitionSettings.rounds / 10))) struct NetworkPartitionTests {
        /// Starts `replicas` replicas, one per namespace, and runs `body` on its own thread.
        static func onPartitionedCluster<T: Sendable>(_ name: String, replicas: Int = 3, extraConfig: String = "",
                                                      _ body: @escaping @Sendable (DemoCluster, NetworkLab, Checks) throws -> T) async throws -> T {
            let checks = Checks()
            defer { checks.recordIssues() }
            return try await onOwnThread {
                let ids = (1...replicas).map { NodeID($0) }
                let lab = try NetworkLab(ids: ids)
                defer { lab.tearDown() }
                let root = ClusterProcessTests.scratch(name)
                let c = try DemoCluster(root: root, durability: "fsync", replicas: replicas, executable: try ClusterProcessTests.ploverExecutable(),
                                        extraConfig: extraConfig, hosts: Dictionary(uniqueKeysWithValues: ids.map { ($0, lab.address($0)) }),
                                        launchPrefix: lab.launchPrefix)
                defer { c.stopAll() }
                try c.startAll()
                let result = try body(c, lab, checks)
                c.stopAll()
                try? FileManager.default.removeItem(atPath: root)
                return result
            }
        }

        @Test func isolatedFollowerKeepsRunningThenReturnsAndCatchesUp() async throws {
            try await Self.onPartitionedCluster("netns-follower") { c, lab, checks -> Void in
                let leader = try c.waitForLeader(excluding: nil)
                let follower = c.ids.first { $0 != leader }!
                try lab.isolate(follower, true)
                let load = DemoLoad(endpoints: c.endpoints.filter { $0.key != follower }, clients: 2)
                load.start()
                Thread.sleep(forTimeInterval: 2)
                // Cut off, it campaigns in vain (pre-vote keeps its ballot down) but stays up.
                checks.expect(c.processes[follower]?.isRunning == true, "the isolated replica exited")
                checks.expect(try c.waitForLeader(excluding: follower) == leader, "the majority kept its leader")
                try lab.isolate(follower, false)
                Thread.sleep(forTimeInterval: 0.5)
                load.stop()
                let acked = load.ackedWrites
                checks.expect(acked.count >= 10, "too few writes to prove anything: \(acked.count)")
                try c.waitConverged()
                try ClusterProcessTests.expectEveryWrite(acked, on: c.ids, in: c, checks)
            }
        }

        @Test func partitionsLoseNoAcknowledgedWriteAndTheHistoryIsLinearizable() async throws {
            let seed = NemesisSettings.environment["NEMESIS_SEED"].flatMap { UInt64($0) } ?? UInt64.random(in: 1...UInt64(UInt32.max))
            try await Self.onPartitionedCluster("netns-nemesis") { c, lab, checks -> Void in
                _ = try c.waitForLeader(excluding: nil)
                let load = RegisterWorkload(endpoints: c.endpoints, clients: 4, keys: 5)
                load.begin(seed: seed)
                var rng = SeededRandom(seed: seed)
                var leaderCuts = 0, otherCuts = 0
                for _ in 0..<PartitionSettings.rounds {
                    let leader = try c.waitForLeader(excluding: nil)
                    // The leader half of the time, else any replica (possibly the leader again).
                    let victim = rng.below(2) == 0 ? leader : c.ids[rng.below(c.ids.count)]
                    if victim == leader { leaderCuts += 1 } else { otherCuts += 1 }
                    try lab.isolate(victim, true)
                    Thread.sleep(forTimeInterval: 0.5 + Double(rng.below(1000)) / 1000)
                    if victim == leader { _ = try c.waitForLeader(excluding: victim) }
                    try lab.isolate(victim, false)
                    Thread.sleep(forTimeInterval: 0.2 + Double(rng.below(300)) / 1000)
                }
                Thread.sleep(forTimeInterval: 0.3)
                load.end()
                try load.verifyAfterFaults(on: c, clients: 4, seed: seed,
                                           faults: "\(leaderCuts) leader partitions, \(otherCuts) other partitions", checks)
                checks.expect(leaderCuts > 0, "the campaign never cut off a leader (seed \(seed))")
            }
        }
    }
}

enum PartitionSettings {
    static let rounds = NemesisSettings.environment["PARTITION_ROUNDS"].flatMap { Int($0) } ?? 8
}
