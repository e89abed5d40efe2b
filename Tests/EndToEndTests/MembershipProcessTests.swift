import Foundation
import PloverCheck
@testable import PloverTesting
import RDMAPaxos
import Testing

extension EndToEnd {
    /// Membership changes on real `plover node` processes under client load: a dead replica (and
    /// a dead witness) replaced by a new machine that joins with `plover node --join`, with the
    /// register history checked for linearizability and every acknowledged write on every member.
    @Suite(.serialized, .timeLimit(.minutes(3))) struct MembershipProcessTests {
        static let clients = 3
        /// Compacting often makes the leader send the newcomer a snapshot before the log.
        static let limits = "[limits]\ncompact_every_entries = 300\n"

        /// One change through the leader, as `plover member` makes it; retried while the guard
        /// says the learner is still catching up.
        static func change(_ c: DemoCluster, _ change: MembershipChange, retryingFor: Duration = .seconds(20)) throws -> [MembershipAnswer] {
            let deadline = ContinuousClock.now + retryingFor
            while true {
                do {
                    return try NodeClient(endpoints: c.endpoints, timeout: .seconds(2)).changeMembership(change)
                } catch let e as NodeClient.Failure where e.description.contains("wait until it has caught up") && ContinuousClock.now < deadline {
                    Thread.sleep(forTimeInterval: 0.1)
                }
            }
        }

        static func members(_ c: DemoCluster, at id: NodeID) -> String { c.status(id)["members"] ?? "" }

        @Test func deadReplicaIsReplacedUnderLoadWithoutLosingAcknowledgedWrites() async throws {
            try await EndToEnd.onCluster("member-replace", extraConfig: Self.limits) { c, checks -> Void in
                let leader = try c.waitForLeader(excluding: nil)
                let dead: NodeID = leader == 3 ? 2 : 3
                let load = RegisterWorkload(endpoints: c.endpoints, clients: Self.clients, keys: 5)
                load.begin(seed: 24)
                Thread.sleep(forTimeInterval: 1.5)
                c.kill(dead)
                // The leader counts a member reachable until it misses a check-quorum period or two.
                Thread.sleep(forTimeInterval: 1.0)

                // Adding a voter now would need 3 of 4 voters with only 2 reachable: refused.
                let newcomer = try c.prepareJoiner(4)
                var asVoter = newcomer
                asVoter.role = .voter
                do {
                    _ = try NodeClient(endpoints: c.endpoints).changeMembership(.add(asVoter))
                    checks.record("adding a voter while a voter is dead was not refused")
                } catch let e as NodeClient.Failure {
                    checks.expect(e.description.contains("refusing to change node 4") && e.description.contains("heard from recently"), "\(e)")
                }

                // An unknown id is refused at join time.
                let unknown = Process()
                unknown.executableURL = URL(fileURLWithPath: c.executable)
                unknown.arguments = ["node", "--config", c.configPath(4), "--id", "9", "--join", c.endpoints[leader]!]
                let err = Pipe()
                unknown.standardError = err
                unknown.standardOutput = FileHandle.nullDevice
                try unknown.run()
                unknown.waitUntilExit()
                let said = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
                checks.expect(unknown.terminationStatus != 0 && said.contains("node 9 is not a member of that cluster"), "join of an unknown id: \(said)")

                let added = try Self.change(c, .add(newcomer))
                checks.expect(added.last?.membership.member(4)?.role == .learner, "\(added)")
                // Not started yet: promoting it would count a voter that holds nothing.
                do {
                    _ = try NodeClient(endpoints: c.endpoints).changeMembership(.promote(4))
                    checks.record("promoting a learner that holds nothing was not refused")
                } catch let e as NodeClient.Failure {
                    checks.expect(e.description.contains("cannot promote node 4") && e.description.contains("wait until it has caught up"), "\(e)")
                }
                // The leader compacted its log: the newcomer can only start from a snapshot.
                let leaderFirst = UInt64(c.status(leader)["first_index"] ?? "0") ?? 0
                checks.expect(leaderFirst > 1, "the leader still holds entry 1 (first_index \(leaderFirst)): no snapshot would be sent")
                try c.startJoining(4, via: leader)
                let promoted = try Self.change(c, .promote(4))
                checks.expect(promoted.last?.membership.member(4)?.role == .voter, "\(promoted)")
                let removed = try Self.change(c, .remove(dead))
                checks.expect(removed.last?.membership.contains(dead) == false, "\(removed)")
                c.forget(dead)
                Thread.sleep(forTimeInterval: 1)
                load.end()

                checks.expect(Self.members(c, at: 4).contains("4:voter"), "node 4 sees \(Self.members(c, at: 4))")
                let first = UInt64(c.status(4)["first_index"] ?? "0") ?? 0
                print("membership: node 4 joined, first_index \(first); answers: \(added + promoted + removed)")
                try load.verifyAfterFaults(on: c, clients: Self.clients, seed: 24, faults: "node \(dead) killed and replaced by node 4", checks)
            }
        }

        @Test func removedReplicaLearnsItAndStopsAndTheLeaderHandsOverBeforeItsOwnRemoval() async throws {
            try await EndToEnd.onCluster("member-remove", replicas: 3) { c, checks -> Void in
                let leader = try c.waitForLeader(excluding: nil)
                // A leader elected a moment ago has not heard from every member yet: the quorum
                // guard would (rightly) count them unreachable. Start from a settled cluster.
                try c.waitConverged()
                Thread.sleep(forTimeInterval: 0.3)
                let follower: NodeID = leader == 1 ? 2 : 1
                _ = try Self.change(c, .remove(follower))
                // The removed replica hears it from the leader, logs it and exits.
                let deadline = ContinuousClock.now + .seconds(10)
                while c.processes[follower]?.isRunning == true && ContinuousClock.now < deadline { Thread.sleep(forTimeInterval: 0.05) }
                checks.expect(c.processes[follower]?.isRunning == false, "node \(follower) still runs after its removal")
                let log = (try? String(contentsOfFile: c.logPath(follower), encoding: .utf8)) ?? ""
                checks.expect(log.contains("node \(follower) was removed from the cluster by the configuration at index"), "log of node \(follower):\n\(log.suffix(600))")
                c.processes[follower] = nil
                c.forget(follower)

                // Removing the leader of the two left: it hands over first, then goes.
                let answers = try Self.change(c, .remove(leader))
                checks.expect(answers.count == 2 && answers[0].handedOverTo != nil && answers[1].index != nil, "\(answers)")
                let rest = c.ids.first { $0 != leader }!
                checks.expect(Self.members(c, at: rest) == "\(rest):voter:1", "node \(rest) sees \(Self.members(c, at: rest))")
                // A single voter left commits alone.
                c.forget(leader)
                let put = try NodeClient(endpoints: c.endpoints).propose(KeyValueStateMachine.Command.put(key: Array("k".utf8), value: Array("v".utf8)).encoded())
                checks.expect(put.decodedValue == nil, "put on the one voter left")
            }
        }

        @Test func deadWitnessIsReplacedUnderLoad() async throws {
            try await EndToEnd.onCluster("member-witness", witness: true, extraConfig: Self.limits) { c, checks -> Void in
                let leader = try c.waitForLeader(excluding: nil)
                let load = RegisterWorkload(endpoints: c.endpoints, clients: Self.clients, keys: 5)
                load.begin(seed: 25)
                Thread.sleep(forTimeInterval: 1.5)
                c.kill(3)
                Thread.sleep(forTimeInterval: 1.0)
                let newcomer = try c.prepareJoiner(4, role: .witness)
                // With the witness dead, a fourth voting member would need 3 of 4: refused; the
                // dead witness goes first, then the new one comes.
                do {
                    _ = try NodeClient(endpoints: c.endpoints).changeMembership(.add(newcomer))
                    checks.record("adding a witness while the old one is dead was not refused")
                } catch let e as NodeClient.Failure {
                    checks.expect(e.description.contains("refusing to change node 4"), "\(e)")
                }
                _ = try Self.change(c, .remove(3))
                c.forget(3)
                let added = try Self.change(c, .add(newcomer))
                checks.expect(added.last?.membership.member(4)?.role == .witness, "\(added)")
                try c.startJoining(4, via: leader)
                Thread.sleep(forTimeInterval: 1.5)
                // The new witness is a voting member: with node 2 paused, 1 and 4 still commit.
                let other: NodeID = leader == 1 ? 2 : 1
                c.pause(other, true)
                let put = try? NodeClient(endpoints: [leader: c.endpoints[leader]!], timeout: .seconds(3))
                    .propose(KeyValueStateMachine.Command.put(key: Array("w".utf8), value: Array("4".utf8)).encoded(), attempts: 3)
                c.pause(other, false)
                checks.expect(put != nil, "no commit with the new witness and the leader only")
                load.end()
                try load.verifyAfterFaults(on: c, clients: Self.clients, seed: 25, faults: "witness 3 killed and replaced by witness 4", checks,
                                           holders: [1, 2])
            }
        }
    }
}

extension EndToEnd.MembershipProcessTests {
    /// Runs `plover ARGS` to completion: exit status and both outputs.
    static func plover(_ c: DemoCluster, _ args: [String]) throws -> (Int32, String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: c.executable)
        p.arguments = args
        let out = Pipe()
        p.standardOutput = out
        p.standardError = out
        try p.run()
        let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        return (p.terminationStatus, text)
    }

    @Test func backupRestoresIntoANewClusterOfOneThatGrowsByJoining() async throws {
        try await EndToEnd.onCluster("member-backup") { c, checks -> Void in
            _ = try c.waitForLeader(excluding: nil)
            let client = NodeClient(endpoints: c.endpoints)
            for i in 0..<50 {
                _ = try client.propose(KeyValueStateMachine.Command.put(key: Array("k\(i)".utf8), value: Array("v\(i)".utf8)).encoded())
            }
            let file = c.root + "/backup.bin"
            let list = try Self.plover(c, ["member", "list", "--endpoints", "1=\(c.endpoints[1]!)"])
            checks.expect(list.0 == 0 && list.1.contains("(leader)") && list.1.contains(c.peers[2]!), list.1)
            let saved = try Self.plover(c, ["snapshot", "save", "--endpoints", "1=\(c.endpoints[1]!)", file])
            checks.expect(saved.0 == 0 && saved.1.contains("saved node"), saved.1)

            // A new cluster of one member from the backup (as after losing a majority for good).
            let root = c.root + "/new"
            let fresh = try DemoCluster(root: root, durability: "fsync", replicas: 1, executable: c.executable)
            defer { fresh.stopAll() }
            let restored = try Self.plover(c, ["snapshot", "restore", "--config", fresh.configPath(1), file])
            checks.expect(restored.0 == 0, restored.1)
            let again = try Self.plover(c, ["snapshot", "restore", "--config", fresh.configPath(1), file])
            checks.expect(again.0 != 0 && again.1.contains("is not empty"), "restoring twice: \(again.1)")
            try fresh.startAll()
            _ = try fresh.waitForLeader(excluding: nil)
            let newClient = NodeClient(endpoints: fresh.endpoints)
            checks.expect(try newClient.read(Array("k49".utf8)).decodedValue == "v49")
            checks.expect(Self.members(fresh, at: 1) == "1:voter:1", Self.members(fresh, at: 1))

            // It grows by joining: a learner from the restored state, promoted.
            let two = try fresh.prepareJoiner(2)
            _ = try Self.change(fresh, .add(two))
            try fresh.startJoining(2, via: 1)
            _ = try Self.change(fresh, .promote(2))
            _ = try newClient.propose(KeyValueStateMachine.Command.put(key: Array("after".utf8), value: Array("restore".utf8)).encoded())
            try fresh.waitConverged()
            let both = NodeClient(endpoints: fresh.endpoints)
            checks.expect(try both.localRead(Array("k0".utf8), at: 2).decodedValue == "v0")
            checks.expect(try both.localRead(Array("after".utf8), at: 2).decodedValue == "restore")
        }
    }

    @Test func sigtermOnTheLeaderHandsLeadershipOverBeforeStopping() async throws {
        try await EndToEnd.onCluster("member-sigterm") { c, checks -> Void in
            let leader = try c.waitForLeader(excluding: nil)
            let load = DemoLoad(endpoints: c.endpoints, clients: 2)
            load.start()
            Thread.sleep(forTimeInterval: 0.5)
            c.stop(leader)
            let next = try c.waitForLeader(excluding: leader)
            Thread.sleep(forTimeInterval: 0.3)
            load.stop()
            let log = (try? String(contentsOfFile: c.logPath(leader), encoding: .utf8)) ?? ""
            checks.expect(log.contains("handed leadership to node \(next) before stopping"), "log of node \(leader):\n\(log.suffix(800))")
            checks.expect(load.acknowledged > 20, "the load made too little progress")
            try Self.expectEveryWrite(load.ackedWrites, on: c.ids.filter { $0 != leader }, in: c, checks)
        }
    }

    static func expectEveryWrite(_ acked: [String: String], on ids: [NodeID], in c: DemoCluster, _ checks: Checks) throws {
        try c.waitConverged()
        let client = NodeClient(endpoints: c.endpoints)
        for id in ids {
            let missing = try acked.filter { try client.localRead(Array($0.key.utf8), at: id).decodedValue != $0.value }.count
            checks.expect(missing == 0, "\(missing) acknowledged writes missing on node \(id)")
        }
    }
}
