import Foundation
import PloverCheck
import Testing
@testable import PloverTesting
import RDMAPaxos

extension EndToEnd {
    /// Real `plover node` replicas (durability `fsync`) whose data directories each sit on a
    /// disk that loses unsynced writes at a power cut (`PowerCutFS`), under the register workload
    /// of the nemesis campaigns. Power cuts of one member at a time, and of the whole cluster at
    /// once, must lose no acknowledged write and leave a linearizable history; the same checks
    /// must fail when the disk acknowledges log flushes it never did.
    ///
    ///     POWERCUT_ROUNDS=100 NEMESIS_SEED=N swift test --filter PowerCutNodeTests
    ///     POWERCUT_FSYNC_LIES=1 swift test --filter powerCutsOfOneMember   # the broken disk: must fail
    ///     POWERCUT_DEBUG=1 …   # keeps the data directories and logs, lists every write lost
    @Suite(.serialized, .timeLimit(.minutes(4))) struct PowerCutNodeTests {
        static let environment = ProcessInfo.processInfo.environment
        static let rounds = environment["POWERCUT_ROUNDS"].flatMap { Int($0) } ?? 8
        static let lyingDisks = environment["POWERCUT_FSYNC_LIES"] == "1"

        /// A 3-replica cluster with each data directory on a powercutfs of its own.
        final class PoweredCluster {
            let root: String
            let cluster: DemoCluster
            var disks: [NodeID: PowerCutFS] = [:]

            init(_ name: String, durability: String = "fsync", extraConfig: String = "", fsyncLies: Bool) throws {
                root = ClusterProcessTests.scratch(name)
                cluster = try DemoCluster(root: root, durability: durability, executable: try ClusterProcessTests.ploverExecutable(),
                                          extraConfig: extraConfig)
                for id in cluster.ids {
                    try FileManager.default.createDirectory(atPath: cluster.dataDir(id), withIntermediateDirectories: true)
                    disks[id] = try PowerCutFS(backing: root + "/disk-\(id)", mountPoint: cluster.dataDir(id),
                                               log: root + "/powercutfs-\(id).log", fsyncLies: fsyncLies)
                }
                try cluster.startAll()
            }

            /// Cuts the power of `ids` at once: their disks drop what was not synced, their
            /// processes die.
            func cut(_ ids: [NodeID]) {
                for id in ids { if let p = disks[id]?.process { kill(p.processIdentifier, SIGKILL) } }
                for id in ids { cluster.kill(id) }
                for id in ids { disks[id]?.cut() }
            }

            /// The power returns: the disk shows what it held, and the replica starts on it.
            func restore(_ id: NodeID) throws {
                try disks[id]?.mount()
                try cluster.start(id)
            }

            /// After the whole cluster restarted: one write committed through the new leader.
            /// Until then every replica reports the same applied index (none has applied
            /// anything yet), which `waitConverged` would take for convergence.
            func barrier() throws {
                let client = NodeClient(endpoints: cluster.endpoints, timeout: .seconds(2))
                let put = KeyValueStateMachine.Command.put(key: Array("barrier".utf8), value: [1]).encoded()
                for _ in 0..<30 {
                    if (try? client.propose(put)) != nil { return }
                    Thread.sleep(forTimeInterval: 0.2)
                }
                throw CLIError("no write committed after the power came back")
            }

            func remove(keepingLogs: Bool) {
                cluster.stopAll()
                for (_, d) in disks { d.cut() }
                if !keepingLogs { try? FileManager.default.removeItem(atPath: root) }
            }
        }

        /// Runs `body` on a powered cluster off the shared threads; failures go to `checks`.
        static func onPoweredCluster(_ name: String, durability: String = "fsync", extraConfig: String = "", fsyncLies: Bool,
                                     checks: Checks, _ body: @escaping @Sendable (PoweredCluster) throws -> Void) async throws {
            try await onOwnThread {
                let p = try PoweredCluster(name, durability: durability, extraConfig: extraConfig, fsyncLies: fsyncLies)
                do {
                    try body(p)
                } catch {
                    checks.record("\(error)\n" + p.cluster.logTails())
                }
                p.remove(keepingLogs: ProcessInfo.processInfo.environment["POWERCUT_DEBUG"] != nil)
            }
        }

        @Test func powerCutsOfOneMemberUnderLoadLoseNoAcknowledgedWriteAndTheHistoryIsLinearizable() async throws {
            let seed = NemesisSettings.environment["NEMESIS_SEED"].flatMap { UInt64($0) } ?? UInt64.random(in: 1...UInt64(UInt32.max))
            let checks = Checks()
            defer { checks.recordIssues() }
            try await Self.onPoweredCluster("powercut-member", fsyncLies: Self.lyingDisks, checks: checks) { p in
                let c = p.cluster
                _ = try c.waitForLeader(excluding: nil)
                let load = RegisterWorkload(endpoints: c.endpoints, clients: 4, keys: 5)
                load.begin(seed: seed)
                var rng = SeededRandom(seed: seed)
                var leaderCuts = 0
                for _ in 0..<Self.rounds {
                    let leader = try c.waitForLeader(excluding: nil)
                    let victim = rng.below(100) < 60 ? leader : c.ids[rng.below(c.ids.count)]
                    if victim == leader { leaderCuts += 1 }
                    p.cut([victim])
                    _ = try c.waitForLeader(excluding: victim)
                    Thread.sleep(forTimeInterval: Double(rng.below(200)) / 1000)
                    try p.restore(victim)
                    Thread.sleep(forTimeInterval: 0.3 + Double(rng.below(300)) / 1000)
                }
                load.end()
                try load.verifyAfterFaults(on: c, clients: 4, seed: seed,
                                           faults: "\(Self.rounds) power cuts (\(leaderCuts) of the leader)" + (Self.lyingDisks ? ", disks ignoring log flushes" : ""),
                                           checks)
            }
        }

        /// Every replica loses power at once under load, then all come back.
        static func wholeClusterCut(_ name: String, durability: String = "fsync", extraConfig: String = "", fsyncLies: Bool = false,
                                    checks: Checks) async throws {
            let seed = UInt64.random(in: 1...UInt64(UInt32.max))
            try await onPoweredCluster(name, durability: durability, extraConfig: extraConfig, fsyncLies: fsyncLies, checks: checks) { p in
                let c = p.cluster
                _ = try c.waitForLeader(excluding: nil)
                let load = RegisterWorkload(endpoints: c.endpoints, clients: 4, keys: 5)
                load.begin(seed: seed)
                Thread.sleep(forTimeInterval: 3)
                p.cut(c.ids)
                load.end()
                for id in c.ids { try p.restore(id) }
                _ = try c.waitForLeader(excluding: nil)
                try p.barrier()
                try load.verifyAfterFaults(on: c, clients: 4, seed: seed, faults: "one power cut of the whole \(durability) cluster"
                                           + (fsyncLies ? " on disks ignoring log flushes" : ""), checks)
            }
        }

        @Test func aPowerCutOfTheWholeClusterLosesNoAcknowledgedWrite() async throws {
            let checks = Checks()
            defer { checks.recordIssues() }
            try await Self.wholeClusterCut("powercut-all", fsyncLies: false, checks: checks)
        }

        /// The check above where writes are acknowledged before they are on disk: `async`
        /// durability without its periodic flush (`async_flush_ms = 0`), whose replicas (on a
        /// host that did not reboot) trust their state after the cut as if it were `fsync`.
        /// Everything since the store was created is gone, and the check must say so.
        @Test func theWholeClusterCheckCatchesWritesAcknowledgedBeforeTheyAreDurable() async throws {
            let checks = Checks()
            try await Self.wholeClusterCut("powercut-all-async", durability: "async", extraConfig: "[limits]\nasync_flush_ms = 0\n",
                                           checks: checks)
            #expect(checks.hasFailures, "an async cluster lost nothing it acknowledged in a power cut of every replica")
            print("as expected, the check failed on the async cluster: \(checks.summary)")
        }

        /// The same on disks that acknowledge log flushes they never did (`POWERCUT_FSYNC_LIES=1`
        /// runs it; the stores do not survive, so the cluster cannot even restart).
        @Test(.enabled(if: lyingDisks)) func theWholeClusterCheckCatchesDisksThatIgnoreLogFlushes() async throws {
            let checks = Checks()
            try await Self.wholeClusterCut("powercut-all-lies", fsyncLies: true, checks: checks)
            #expect(checks.hasFailures, "a whole cluster on disks ignoring log flushes lost nothing after a power cut")
            print("as expected, the check failed on disks ignoring log flushes: \(checks.summary)")
        }
    }
}
