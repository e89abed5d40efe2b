import Foundation
import Synchronization
import Testing
@testable import RDMAPaxos

/// A leader whose node thread is starved (here: held in the state machine) while its clock keeps
/// ticking must not step down for its own stall: it sent no heartbeats meanwhile, so its
/// followers had nothing to answer (docs/design/runtime.md, "Ticks on a starved node").
@Suite(.timeLimit(.minutes(1))) struct LateTicksTests {
    /// A clock the test fires by hand that says whether its ticks stand for real time.
    final class BurstTicks: TickSource, Sendable {
        private let onTick = Mutex<(@Sendable () -> Void)?>(nil)
        let dropsLateTicks: Bool
        init(dropsLateTicks: Bool) { self.dropsLateTicks = dropsLateTicks }
        func start(_ f: @escaping @Sendable () -> Void) { onTick.withLock { $0 = f } }
        func stop() { onTick.withLock { $0 = nil } }
        func fire(_ times: Int) {
            let f = onTick.withLock { $0 }
            for _ in 0..<times { f?() }
        }
    }

    /// A key-value machine whose `apply` of the key "hold" waits until the test releases it,
    /// holding the node thread.
    final class HoldingMachine: StateMachine, @unchecked Sendable {
        // @unchecked Sendable: `inner` is used only on the node thread; the semaphores are thread-safe.
        let inner = KeyValueStateMachine()
        let entered = DispatchSemaphore(value: 0)
        let release = DispatchSemaphore(value: 0)
        func apply(_ command: [UInt8], index: LogIndex) -> [UInt8] {
            if command == ReplicaNodeTests.put("hold") {
                entered.signal()
                release.wait()
            }
            return inner.apply(command, index: index)
        }
        func query(_ query: [UInt8]) -> [UInt8] { inner.query(query) }
        func snapshot() -> [UInt8] { inner.snapshot() }
        func restore(_ snapshot: [UInt8], index: LogIndex) throws { try inner.restore(snapshot, index: index) }
    }

    static let electionTimeoutTicks = 10

    /// Node 1 of three (pre-vote off, check-quorum on) over scripted peers, started.
    static func start(dropsLateTicks: Bool) throws
        -> (ReplicaNodeTests.ScriptedPeers, BurstTicks, HoldingMachine, ReplicaNode) {
        let peers = ReplicaNodeTests.ScriptedPeers()
        let ticks = BurstTicks(dropsLateTicks: dropsLateTicks)
        let machine = HoldingMachine()
        var cfg = ReplicaConfig(id: 1)
        cfg.preVote = false
        cfg.checkQuorum = true
        cfg.electionTimeoutTicks = electionTimeoutTicks
        let node = ReplicaNode(options: NodeOptions(replica: cfg, bootstrap: Membership(ReplicaNodeTests.three)),
                               stateMachine: machine, log: try MemoryLog(), snapshots: MemorySnapshotStore(),
                               transport: peers, ticks: ticks)
        try node.start()
        return (peers, ticks, machine, node)
    }

    /// With a real-time clock the leader stays; a clock whose every tick counts (the old
    /// behaviour for real time) makes check-quorum depose it — the test can tell the two apart.
    @Test(arguments: [true, false])
    func aLeaderStarvedForSeveralElectionTimeoutsKeepsLeading(dropsLateTicks: Bool) async throws {
        let (peers, ticks, machine, node) = try Self.start(dropsLateTicks: dropsLateTicks)
        // Released before stopping, whatever failed: a held node thread never stops.
        defer {
            machine.release.signal()
            node.stop()
        }

        // Node 1 leads with node 2's promise and commits its no-op with node 2's acceptance.
        var ballot: Ballot?
        for _ in 0..<400 where ballot == nil {
            ticks.fire(1)
            try await Task.sleep(for: .milliseconds(5))
            ballot = peers.lock.withLock { peers.sent.compactMap { m -> Ballot? in
                if case .prepare = m.body { return m.ballot }
                return nil
            }.max() }
        }
        let b = try #require(ballot)
        peers.deliver(Message(from: 2, to: 1, ballot: b, body: .promise(granted: true, suffixPrevBallot: .zero, suffix: [])))
        try #require(await eventually { node.status.role == .leader })
        peers.deliver(Message(from: 2, to: 1, ballot: b, body: .accepted(success: true, index: 1)))
        try #require(await eventually { node.status.commitIndex == 1 })

        // The "hold" command commits; applying it holds the node thread.
        node.propose(ReplicaNodeTests.put("hold")) { _ in }
        try #require(await eventually { node.status.lastIndex == 2 })
        peers.deliver(Message(from: 2, to: 1, ballot: b, body: .accepted(success: true, index: 2)))
        try #require(machine.entered.wait(timeout: .now() + 10) == .success)

        // Five election timeouts of ticks pile up while the thread is held, then node 2's
        // answer to the last heartbeat sent before the stall.
        ticks.fire(5 * Self.electionTimeoutTicks)
        peers.deliver(Message(from: 2, to: 1, ballot: b, body: .accepted(success: true, index: 2)))
        machine.release.signal()
        try #require(await eventually { node.status.appliedIndex == 2 })
        // Let the loop finish what was queued.
        ticks.fire(1)
        try await Task.sleep(for: .milliseconds(50))

        if dropsLateTicks {
            #expect(node.status.role == .leader && node.status.ballot == b, "\(node.status.role) at \(node.status.ballot)")
        } else {
            #expect(node.status.role != .leader, "a clock counting every late tick should have let check-quorum depose the leader")
        }
    }

    /// A follower held on its node thread while five election timeouts of ticks pile up: if the
    /// leader's heartbeat landed meanwhile, the late ticks count as one and it stays a follower;
    /// if nothing came from the leader, every tick counts and it campaigns (a dead leader is
    /// still detected on time by a busy follower).
    @Test(arguments: [true, false])
    func aStarvedFollowerCampaignsOnlyWhenTheLeaderWasSilent(leaderHeard: Bool) async throws {
        let (peers, ticks, machine, node) = try Self.start(dropsLateTicks: true)
        // Released before stopping, whatever failed: a held node thread never stops.
        defer {
            machine.release.signal()
            node.stop()
        }

        // Node 2 leads and replicates the "hold" command, committed: applying it holds node 1's thread.
        let b = Ballot(term: 1, node: 2)
        let hold = LogEntry(index: 1, ballot: b, kind: .command, payload: ReplicaNodeTests.put("hold"))
        peers.deliver(Message(from: 2, to: 1, ballot: b, body: .accept(prevIndex: 0, prevBallot: .zero, entries: [hold], commit: 1)))
        try #require(machine.entered.wait(timeout: .now() + 10) == .success)

        ticks.fire(5 * Self.electionTimeoutTicks)
        if leaderHeard { peers.deliver(Message(from: 2, to: 1, ballot: b, body: .heartbeat(commit: 1, readRound: 0, votersDurable: 0))) }
        machine.release.signal()
        try #require(await eventually { node.status.appliedIndex == 1 })
        try await Task.sleep(for: .milliseconds(50))

        let campaigned = peers.lock.withLock { peers.sent.contains { if case .prepare = $0.body { return true } else { return false } } }
        if leaderHeard {
            #expect(!campaigned && node.status.leader == 2, "a follower that heard the leader during its stall campaigned")
        } else {
            #expect(campaigned, "a follower whose leader was silent for five election timeouts did not campaign")
        }
    }

    /// The leader's heartbeat landed before the follower's thread stalled but was handled at the
    /// end of the stalled pass, after the entry whose apply stalled it; the ticks of the stall
    /// then arrive in the next batch, with no message from the leader. They are older than that
    /// heartbeat, so they count as one: no campaign (a 150 s run of `plover bench failover` saw a
    /// follower campaign three times this way after a 1.1 s apply).
    @Test func ticksOlderThanALeaderMessageHandledInTheStalledPassCountAsOne() async throws {
        let (peers, ticks, machine, node) = try Self.start(dropsLateTicks: true)
        defer {
            machine.release.signal()
            machine.release.signal()
            node.stop()
        }
        let b = Ballot(term: 1, node: 2)
        func entry(_ i: LogIndex) -> LogEntry { LogEntry(index: i, ballot: b, kind: .command, payload: ReplicaNodeTests.put("hold")) }
        // The first hold keeps the thread busy while the next accept and a heartbeat queue up
        // behind it, so that both are handled in one later pass, in that order.
        peers.deliver(Message(from: 2, to: 1, ballot: b, body: .accept(prevIndex: 0, prevBallot: .zero, entries: [entry(1)], commit: 1)))
        try #require(machine.entered.wait(timeout: .now() + 10) == .success)
        peers.deliver(Message(from: 2, to: 1, ballot: b, body: .accept(prevIndex: 1, prevBallot: b, entries: [entry(2)], commit: 2)))
        peers.deliver(Message(from: 2, to: 1, ballot: b, body: .heartbeat(commit: 2, readRound: 0, votersDurable: 0)))
        machine.release.signal()
        // The second hold: the pass that handles accept 2 stalls before it handles the heartbeat.
        try #require(machine.entered.wait(timeout: .now() + 10) == .success)
        ticks.fire(5 * Self.electionTimeoutTicks)
        machine.release.signal()
        try #require(await eventually { node.status.appliedIndex == 2 })
        try await Task.sleep(for: .milliseconds(50))
        let campaigned = peers.lock.withLock { peers.sent.contains { if case .prepare = $0.body { return true } else { return false } } }
        #expect(!campaigned && node.status.leader == 2, "a follower campaigned for ticks older than its leader's last message")
    }
}
