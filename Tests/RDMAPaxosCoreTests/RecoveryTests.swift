import Foundation
import Testing
@testable import RDMAPaxosCore

/// Replicas whose durable state may be lost (memory and async durability) must not vote on
/// restart until they have recovered (docs/design/consensus.md, "Recovery from lost state").
@Suite struct RecoveryTests {
    /// Runs script commands on a cluster, failing the test on a bad command.
    static func script(_ c: inout ScenarioCluster, _ commands: [String]) throws {
        for cmd in commands { try run(cmd, on: &c, file: "RecoveryTests", line: 0) }
    }

    /// Every running replica's committed prefix agrees with `e` at index 2.
    static func committedAtTwo(_ c: ScenarioCluster) -> [NodeID: String] {
        var out: [NodeID: String] = [:]
        for id in c.ids {
            guard let r = c.nodes[id]!.replica, r.commitIndex >= 2, let e = r.entry(at: 2) else { continue }
            out[id] = e.kind == .command ? String(decoding: e.payload, as: UTF8.self) : "\(e.kind)"
        }
        return out
    }

    /// The sequence: e is committed on leader L (1) and C (3); C restarts with nothing;
    /// L dies; B (2), which lacks e, campaigns. Returns the cluster after B had every chance.
    /// `restart`: how C comes back ("restart 3 amnesia" recovers; "... intact" is the behaviour
    /// before recovery existed).
    static func lostStateSequence(restart: String = "restart 3 amnesia") throws -> ScenarioCluster {
        var c = ScenarioCluster()
        try script(&c, ["add-nodes 3", "campaign 1", "stabilize", "propose 1 e", "drop to=2", "deliver to=3",
                        "persist 1", "persist 3", "deliver to=1"])
        #expect(c.nodes[1]!.replica!.commitIndex == 2, "e must be committed on L and C before C restarts")
        try script(&c, ["drop", "crash 3", restart, "crash 1", "tick-stabilize n=60"])
        return c
    }

    /// The checks below can fail: a replica told its lost state is intact elects B and loses e.
    @Test func withoutRecoveryTheSequenceLosesTheCommittedEntry() throws {
        let c = try Self.lostStateSequence(restart: "restart 3 amnesia intact")
        #expect(c.nodes[2]!.replica!.role == .leader)
        #expect(Self.committedAtTwo(c) == [2: "noop", 3: "noop"])
    }

    @Test func replicaThatLostItsStateDoesNotElectALeaderLackingACommittedEntry() throws {
        var c = try Self.lostStateSequence()
        // Nobody may commit anything but e at index 2, and B must not lead.
        #expect(Self.committedAtTwo(c).values.allSatisfy { $0 == "e" }, "\(Self.committedAtTwo(c))")
        #expect(c.nodes[2]!.replica!.role != .leader)
        #expect(c.nodes[3]!.replica!.isRecovering)
        // L comes back with its disk: a leader is elected, e commits everywhere and C recovers.
        try Self.script(&c, ["restart 1", "tick-stabilize n=60"])
        #expect(Self.committedAtTwo(c) == [1: "e", 2: "e", 3: "e"], "\(Self.committedAtTwo(c))")
        #expect(!c.nodes[3]!.replica!.isRecovering)
    }
}

/// Why a recovering replica counts only after a barrier commits without it (five members): a
/// candidate still holds the promise the replica forgot, and must not be able to win once the
/// replica's acknowledgements helped commit something.
@Suite struct ForgottenPromiseTests {
    /// Commits seen so far on any replica, by index; a second, different entry at an index is a
    /// violation.
    struct CommitLedger {
        var committed: [LogIndex: LogEntry] = [:]
        var violations: [String] = []

        mutating func record(_ c: ScenarioCluster) {
            for id in c.ids {
                guard let r = c.nodes[id]!.replica, r.commitIndex >= r.firstIndex else { continue }
                for i in r.firstIndex...r.commitIndex {
                    guard let e = r.entry(at: i) else { continue }
                    if let seen = committed[i], seen != e {
                        violations.append("index \(i) committed as \(seen.index)@\(seen.ballot) and as \(e.index)@\(e.ballot) on \(id)")
                    } else {
                        committed[i] = e
                    }
                }
            }
        }
    }

    @Test func candidateHoldingAForgottenPromiseCannotOverwriteWhatTheRecoveringReplicaHelpedCommit() throws {
        var c = ScenarioCluster()
        var ledger = CommitLedger()
        func step(_ commands: [String]) throws {
            for cmd in commands {
                try run(cmd, on: &c, file: "ForgottenPromiseTests", line: 0)
                ledger.record(c)
            }
        }
        try step(["add-nodes 5", "campaign 1", "stabilize"])
        #expect(c.nodes[1]!.replica!.role == .leader)
        // 2, 3 and 5 lose the leader; 2 campaigns. Its prepare reaches 3, which promises; the one
        // to 5 stays on the wire.
        try step(["partition 1 4", "tick 3 n=10", "tick 5 n=10", "campaign 2",
                  "deliver to=3", "deliver to=5", "deliver to=2", "persist 2", "deliver to=3", "persist 3",
                  "deliver to=2"])
        #expect(c.nodes[2]!.replica!.role == .candidate && c.nodes[3]!.replica!.promised == c.nodes[2]!.replica!.promised)
        // 3 forgets its promise (memory mode) and comes back beside leader 1, which knows nothing of
        // 2's candidacy; 2 and 5 cannot reach 1.
        try step(["drop from=1", "crash 3", "restart 3 amnesia", "heal", "partition 2 5",
                  "propose 1 x", "deliver from=1", "persist 3", "persist 4", "deliver to=1",
                  "deliver from=1", "persist 3", "persist 4", "deliver to=1", "persist 1", "deliver from=1"])
        // The prepare to 5 arrives at last: with 3's stale promise, 2 would have a quorum.
        try step(["heal", "deliver to=5", "persist 5", "deliver to=2", "stabilize", "tick-stabilize n=30"])
        #expect(c.nodes[1]!.replica!.entry(at: 2).map { String(decoding: $0.payload, as: UTF8.self) } == "x" || c.nodes[2]!.replica!.role == .leader)
        #expect(ledger.violations.isEmpty, "\(ledger.violations)")
        if ProcessInfo.processInfo.environment["SHOW_SCENARIO"] != nil { print(c.output.joined(separator: "\n")) }
    }
}
