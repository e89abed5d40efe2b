import Foundation
import Metrics
import PloverCheck
import Testing
import RDMAPaxos

/// The runtime over in-process transports and memory logs, with real timers.
@Suite(.timeLimit(.minutes(1))) struct ReplicaNodeTests {
    final class Cluster: @unchecked Sendable {
        // @unchecked Sendable: mutated only from the test's own task.
        let hub = LocalHub()
        var nodes: [NodeID: ReplicaNode] = [:]
        var machines: [NodeID: KeyValueStateMachine] = [:]
        var storage: [NodeID: MemoryLog.Storage] = [:]
        var logs: [NodeID: MemoryLog] = [:]
        var snapshots: [NodeID: MemorySnapshotStore] = [:]
        let membership: Membership
        let metricsFactory: (any MetricsFactory)?

        init(_ members: [Member], metricsFactory: (any MetricsFactory)? = nil) throws {
            membership = Membership(members)
            self.metricsFactory = metricsFactory
            for m in members {
                storage[m.id] = MemoryLog.Storage()
                snapshots[m.id] = MemorySnapshotStore()
                try start(m.id)
            }
        }

        /// `intact`: what the node is told about its stable log (false: it recovers before voting).
        func start(_ id: NodeID, intact: Bool = true) throws {
            var cfg = ReplicaConfig(id: id)
            cfg.electionTimeoutTicks = 10
            cfg.heartbeatTicks = 2
            var o = NodeOptions(replica: cfg, bootstrap: membership, seed: UInt64(id) * 7919 &+ UInt64(nodes.count))
            o.stateIntact = intact
            o.compactEveryEntries = 50
            o.metricsFactory = metricsFactory
            let sm = KeyValueStateMachine()
            let log = try MemoryLog(storage: storage[id]!)
            let node = ReplicaNode(options: o, stateMachine: sm, log: log,
                                   snapshots: snapshots[id]!, transport: hub.transport(for: id),
                                   ticks: TimerTickSource(interval: .milliseconds(5)))
            try node.start()
            nodes[id] = node
            logs[id] = log
            machines[id] = sm
            hub.reconnect(id)
        }

        func crash(_ id: NodeID) {
            hub.isolate(id)
            nodes[id]!.stop()
            nodes[id] = nil
        }

        func leader(excluding: Set<NodeID> = []) async throws -> ReplicaNode {
            for _ in 0..<400 {
                if let l = nodes.values.first(where: { $0.status.role == .leader && !excluding.contains($0.options.replica.id) }) { return l }
                try await Task.sleep(for: .milliseconds(10))
            }
            throw NodeError.notLeader(leader: nil)
        }

        func put(_ key: String, _ value: String, via node: ReplicaNode) async throws {
            _ = try await node.propose(KeyValueStateMachine.Command.put(key: Array(key.utf8), value: Array(value.utf8)).encoded())
        }

        /// Waits until every running node applied everything the leader committed.
        func waitConverged() async throws {
            for _ in 0..<400 {
                let l = nodes.values.first { $0.status.role == .leader }?.status
                if let l, l.commitIndex == l.lastIndex,
                   nodes.values.allSatisfy({ $0.status.appliedIndex == l.commitIndex || $0.status.isWitness && $0.status.lastIndex == l.lastIndex }) { return }
                try await Task.sleep(for: .milliseconds(10))
            }
            Issue.record("replicas did not converge: \(nodes.values.map { "\($0.status.id):\($0.status.appliedIndex)" })")
        }

        func stopAll() { nodes.values.forEach { $0.stop() } }
    }

    static let three = [Member(id: 1, role: .voter), Member(id: 2, role: .voter), Member(id: 3, role: .voter)]

    @Test func proposalsCommitAndApplyOnEveryReplica() async throws {
        let c = try Cluster(Self.three)
        defer { c.stopAll() }
        let l = try await c.leader()
        try await withThrowingTaskGroup(of: Void.self) { g in
            for i in 0..<100 { g.addTask { try await c.put("k\(i)", "v\(i)", via: l) } }
            try await g.waitForAll()
        }
        try await c.waitConverged()
        for (id, sm) in c.machines { #expect(sm.map.count == 100, "node \(id): \(c.nodes[id]!.status)") }
        #expect(c.machines[1]!.map == c.machines[2]!.map && c.machines[2]!.map == c.machines[3]!.map)
    }

    @Test func leadershipMovesToTheNamedVoterAndFollowersAndBadTargetsAreRefused() async throws {
        let c = try Cluster(Self.three)
        defer { c.stopAll() }
        let l = try await c.leader()
        try await c.put("a", "1", via: l)
        let me = l.options.replica.id
        let target = c.nodes.keys.sorted().first { $0 != me }!
        await #expect(throws: NodeError.refused(.invalidTransferTarget(me))) { try await l.transferLeadership(to: me) }
        await #expect(throws: NodeError.refused(.invalidTransferTarget(9))) { try await l.transferLeadership(to: 9) }
        let follower = c.nodes[target]!
        await #expect(throws: NodeError.notLeader(leader: me)) { try await follower.transferLeadership(to: me) }
        try await l.transferLeadership(to: target)
        let next = try await c.leader(excluding: [me])
        #expect(next.options.replica.id == target)
        try await c.put("b", "2", via: next)
        try await c.waitConverged()
        for (id, sm) in c.machines { #expect(sm.map.count == 2, "node \(id)") }
    }

    @Test func proposalsDuringATransferAreHeldNotRefused() async throws {
        let c = try Cluster(Self.three)
        defer { c.stopAll() }
        let l = try await c.leader()
        let me = l.options.replica.id
        let target = c.nodes.keys.sorted().first { $0 != me }!
        // The target is cut off, so the transfer cannot complete and times out after an election
        // timeout. Proposals made meanwhile either commit or are told who leads now (which
        // clients follow); none is refused.
        c.hub.isolate(target)
        try await l.transferLeadership(to: target)
        let outcomes = await withTaskGroup(of: String.self) { g in
            for i in 0..<20 {
                g.addTask {
                    do {
                        try await c.put("during-\(i)", "x", via: l)
                        return "ok"
                    } catch NodeError.notLeader {
                        return "notLeader"
                    } catch {
                        return "\(error)"
                    }
                }
            }
            return await g.reduce(into: [String]()) { $0.append($1) }
        }
        #expect(outcomes.allSatisfy { $0 == "ok" || $0 == "notLeader" }, "\(outcomes)")
    }

    @Test func followersRefuseProposalsAndNameTheLeader() async throws {
        let c = try Cluster(Self.three)
        defer { c.stopAll() }
        let l = try await c.leader()
        try await c.put("a", "1", via: l)
        let follower = c.nodes.values.first { $0.status.role == .follower }!
        await #expect(throws: NodeError.notLeader(leader: l.options.replica.id)) {
            _ = try await follower.propose([1])
        }
    }

    @Test func leaderCrashLosesNoAcknowledgedWriteAndRestartCatchesUp() async throws {
        let c = try Cluster(Self.three)
        defer { c.stopAll() }
        let first = try await c.leader()
        for i in 0..<120 { try await c.put("k\(i)", "v\(i)", via: first) }
        let old = first.options.replica.id
        c.crash(old)
        let second = try await c.leader(excluding: [old])
        for i in 120..<150 { try await c.put("k\(i)", "v\(i)", via: second) }
        try c.start(old) // same stable log: restarts from what was durable, catches up (by snapshot: compaction is every 50)
        try await c.waitConverged()
        for (id, sm) in c.machines { #expect(sm.map.count == 150, "node \(id)") }
    }

    /// Memory mode after a restart: the node is told its state may be lost. It saves that before
    /// taking part, shows it in its status, recovers from the leader and catches up.
    @Test func replicaRestartedWithLostStateRecoversBeforeItVotes() async throws {
        let c = try Cluster(Self.three)
        defer { c.stopAll() }
        let l = try await c.leader()
        for i in 0..<30 { try await c.put("k\(i)", "v\(i)", via: l) }
        let victim = c.nodes.keys.sorted().first { $0 != l.options.replica.id }!
        c.crash(victim)
        c.storage[victim] = MemoryLog.Storage()
        c.snapshots[victim] = MemorySnapshotStore()
        try c.start(victim, intact: false)
        let early = c.nodes[victim]!.status
        #expect(early.recovery != nil && early.text.contains("role=recovering") && early.text.contains("recovery="), "\(early.text)")
        #expect(try c.logs[victim]!.loadHardState().recovering, "saved before the node took part")
        for i in 30..<40 { try await c.put("k\(i)", "v\(i)", via: l) }
        for _ in 0..<400 where c.nodes[victim]!.status.recovery != nil { try await Task.sleep(for: .milliseconds(10)) }
        #expect(c.nodes[victim]!.status.recovery == nil, "\(c.nodes[victim]!.status.text)")
        try await c.waitConverged()
        #expect(c.machines[victim]!.map.count == 40)
        for _ in 0..<100 where (try? c.logs[victim]!.loadHardState().recovering) != false { try await Task.sleep(for: .milliseconds(10)) }
        #expect(try !c.logs[victim]!.loadHardState().recovering)
    }

    @Test func linearizableReadSeesAcknowledgedWrite() async throws {
        let c = try Cluster(Self.three)
        defer { c.stopAll() }
        let l = try await c.leader()
        try await c.put("x", "42", via: l)
        let v = try await l.read(Array("x".utf8))
        #expect(KeyValueStateMachine.decodeResult(v) == Array("42".utf8))
    }

    /// The witness compacts (every 50 entries here) through what both voters hold, with empty
    /// snapshots; with a voter stopped it keeps what that voter lacks.
    @Test func witnessCompactsOnlyWhatEveryVoterHolds() async throws {
        let c = try Cluster([Member(id: 1, role: .voter, priority: 2), Member(id: 2, role: .voter), Member(id: 3, role: .witness, priority: 0)])
        defer { c.stopAll() }
        let l = try await c.leader()
        for i in 0..<120 { try await c.put("k\(i)", "v\(i)", via: l) }
        try await c.waitConverged()
        for _ in 0..<200 where c.nodes[3]!.status.firstIndex <= 50 { try await Task.sleep(for: .milliseconds(10)) }
        #expect(c.nodes[3]!.status.firstIndex > 50, "\(c.nodes[3]!.status.text)")
        #expect(try c.snapshots[3]!.load().map { $0.data.isEmpty && $0.index == c.nodes[3]!.status.firstIndex - 1 } == true)
        // Voter 2 stops: the witness keeps every entry 2 may lack, however many commit.
        let held = c.nodes[2]!.status.durableIndex
        c.crash(2)
        for i in 120..<240 { try await c.put("k\(i)", "v\(i)", via: l) }
        try await Task.sleep(for: .milliseconds(50))
        #expect(c.nodes[3]!.status.firstIndex <= held + 1, "witness compacted past what voter 2 holds (\(held)): \(c.nodes[3]!.status.text)")
        #expect(c.nodes[3]!.status.lastIndex >= 240)
    }

    @Test func witnessPersistsButNeverLeadsOrApplies() async throws {
        let c = try Cluster([Member(id: 1, role: .voter, priority: 2), Member(id: 2, role: .voter), Member(id: 3, role: .witness, priority: 0)])
        defer { c.stopAll() }
        let l = try await c.leader()
        try await c.put("a", "1", via: l)
        #expect(c.nodes[3]!.status.role != .leader)
        #expect(c.machines[3]!.map.isEmpty)
        try await Task.sleep(for: .milliseconds(50))
        #expect(c.nodes[3]!.status.lastIndex >= l.status.commitIndex - 1)
        // With the primary gone, the backup leads; the witness still does not.
        c.crash(l.options.replica.id)
        let next = try await c.leader(excluding: [l.options.replica.id])
        #expect(next.options.replica.id != 3)
        try await c.put("b", "2", via: next)
    }

    // MARK: Answers to proposals

    /// A transport for node 1 whose peers the test plays: it records what the node sends and
    /// delivers what the test says, so elections happen exactly when the test wants them.
    final class ScriptedPeers: MessageTransport, @unchecked Sendable {
        // @unchecked Sendable: `sent` and `receive` are only touched under `lock`.
        let lock = NSLock()
        var sent: [Message] = []
        var receive: (@Sendable (Message) -> Void)?
        func start(onReceive: @escaping @Sendable (Message) -> Void) throws { lock.withLock { receive = onReceive } }
        func send(_ message: Message) { lock.withLock { sent.append(message) } }
        func stop() { lock.withLock { receive = nil } }
        func deliver(_ m: Message) { lock.withLock { receive }?(m) }

        /// Ticks the node until it asks for promises above `ballot`; returns its ballot.
        func campaign(_ ticks: ManualTickSource, above ballot: Ballot) async throws -> Ballot {
            for _ in 0..<400 {
                let asked = lock.withLock {
                    sent.compactMap { m -> Ballot? in
                        guard case .prepare = m.body else { return nil }
                        return m.ballot
                    }.max()
                }
                if let b = asked, b > ballot { return b }
                ticks.fire()
                try await Task.sleep(for: .milliseconds(5))
            }
            throw CommandError("node 1 did not campaign above \(ballot)")
        }
    }

    /// Results of proposals made with a completion, by name.
    final class Answers: @unchecked Sendable {
        // @unchecked Sendable: `results` is only touched under `lock`.
        private let lock = NSLock()
        private var results: [String: Result<[UInt8], any Error>] = [:]
        func set(_ name: String, _ r: Result<[UInt8], any Error>) { lock.withLock { results[name] = r } }
        var names: [String] { lock.withLock { results.keys.sorted() } }
        func error(_ name: String) -> NodeError? {
            guard case let .failure(e)? = lock.withLock({ results[name] }) else { return nil }
            return e as? NodeError
        }
        func succeeded(_ name: String) -> Bool {
            if case .success? = lock.withLock({ results[name] }) { return true }
            return false
        }
    }

    static func put(_ key: String) -> [UInt8] { KeyValueStateMachine.Command.put(key: Array(key.utf8), value: [1]).encoded() }

    /// Node 1 leads, proposes A and B, is deposed before they commit (the new leader overwrites
    /// its log), and is elected again: its no-op and the new proposal C take the indexes A and B
    /// held. A and B must be answered `superseded`, not dropped when C takes B's index.
    @Test func aReelectedLeaderAnswersItsEarlierProposalsBeforeReusingTheirIndexes() async throws {
        let peers = ScriptedPeers()
        let ticks = ManualTickSource()
        var cfg = ReplicaConfig(id: 1)
        cfg.preVote = false
        cfg.checkQuorum = false
        let node = ReplicaNode(options: NodeOptions(replica: cfg, bootstrap: Membership(Self.three)), stateMachine: KeyValueStateMachine(),
                               log: try MemoryLog(), snapshots: MemorySnapshotStore(), transport: peers, ticks: ticks)
        try node.start()
        defer { node.stop() }
        let answers = Answers()

        // Node 1 leads with node 2's promise; A and B go to indexes 2 and 3, accepted by nobody.
        let b1 = try await peers.campaign(ticks, above: .zero)
        peers.deliver(Message(from: 2, to: 1, ballot: b1, body: .promise(granted: true, suffixPrevBallot: .zero, suffix: [])))
        try #require(await eventually { node.status.role == .leader })
        node.propose(Self.put("a")) { answers.set("A", $0) }
        node.propose(Self.put("b")) { answers.set("B", $0) }
        try #require(await eventually { node.status.lastIndex == 3 })

        // Node 2 leads at a higher ballot and overwrites node 1's log from index 1 on.
        let b2 = Ballot(term: b1.term + 1, node: 2)
        peers.deliver(Message(from: 2, to: 1, ballot: b2, body: .accept(
            prevIndex: 0, prevBallot: .zero, entries: [LogEntry(index: 1, ballot: b2, kind: .noop, payload: [])], commit: 0)))
        try #require(await eventually { node.status.leader == 2 && node.status.lastIndex == 1 })

        // Node 1 leads again with node 3's promise: its no-op takes index 2, C index 3.
        let b3 = try await peers.campaign(ticks, above: b2)
        peers.deliver(Message(from: 3, to: 1, ballot: b3, body: .promise(granted: true, suffixPrevBallot: .zero, suffix: [])))
        try #require(await eventually { node.status.role == .leader && node.status.lastIndex == 2 })
        node.propose(Self.put("c")) { answers.set("C", $0) }
        try #require(await eventually { node.status.lastIndex == 3 })

        // Node 3 accepts through 3: the no-op and C commit.
        peers.deliver(Message(from: 3, to: 1, ballot: b3, body: .accepted(success: true, index: 3)))
        #expect(await eventually { answers.names == ["A", "B", "C"] }, "answered: \(answers.names)")
        #expect(answers.error("A") == .superseded)
        #expect(answers.error("B") == .superseded)
        #expect(answers.succeeded("C"))
    }

    /// The leader's log fails under a proposal that other replicas may already hold: the client
    /// must hear "outcome unknown", not a failure it could take as "not applied" and re-send.
    @Test func aProposalCutOffByAStorageFailureHasAnUnknownOutcomeAtTheClient() async throws {
        let c = try Cluster([Member(id: 1, role: .voter)])
        defer { c.stopAll() }
        let l = try await c.leader()
        let server = try ClientServer.start(node: l, host: "127.0.0.1", port: 0)
        defer { server.stop() }
        try await c.put("a", "1", via: l)
        c.logs[1]!.fail(with: .diskFull(path: "memory-log"))
        let port = server.boundPort
        let failure = try await onOwnThread { () -> NodeClient.Failure? in
            let client = NodeClient(endpoints: [1: "127.0.0.1:\(port)"], timeout: .seconds(5))
            do {
                _ = try client.propose(Self.put("b"), attempts: 1)
                return nil
            } catch {
                return error as? NodeClient.Failure
            }
        }
        let f = try #require(failure, "the proposal succeeded on a failed log")
        #expect(f.outcomeUnknown, "\(f)")
        #expect(f.description.contains("storage failed"), "\(f)")
    }

    @Test func errorCodesSayWhetherAProposalMayStillTakeEffect() {
        let unknownCodes: [ClientErrorCode] = [.timedOut, .stopped, .storage, .other]
        let definiteCodes: [ClientErrorCode] = [.notLeader, .superseded, .refused, .badRequest]
        let unknownErrors: [NodeError] = [.timedOut, .outcomeUnknown, .stopped, .storage("disk full")]
        let definiteErrors: [NodeError] = [.notLeader(leader: nil), .superseded, .refused(.emptyProposal)]
        for code in unknownCodes { #expect(code.leavesProposalOutcomeUnknown, "\(code)") }
        for code in definiteCodes { #expect(!code.leavesProposalOutcomeUnknown, "\(code)") }
        for error in unknownErrors { #expect(error.leavesProposalOutcomeUnknown, "\(error)") }
        for error in definiteErrors { #expect(!error.leavesProposalOutcomeUnknown, "\(error)") }
    }
}
