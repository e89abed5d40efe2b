import Foundation
import PloverCheck
import Testing
@testable import PloverTesting
import RDMAPaxos

extension EndToEnd {
    /// Jepsen-style runs against real replica processes: clients read and write registers while a
    /// nemesis kills (SIGKILL) and pauses (SIGSTOP) replicas, then the recorded history is checked
    /// for linearizability and every acknowledged write is looked up on every replica.
    ///
    /// CI runs a short campaign (20 leader kills). Longer ones (docs/reliability.md):
    ///
    ///     NEMESIS_KILLS=500 swift test --filter NemesisTests
    ///
    /// `NEMESIS_REPLICAS` (default 3; 5 kills two at once), `NEMESIS_CLIENTS` (4) and
    /// `NEMESIS_SEED` (fault schedule and workload mix; random by default, printed) change the run.
    @Suite(.serialized, .timeLimit(.minutes(NemesisSettings.minutesAllowed))) struct NemesisTests {
        static let environment = NemesisSettings.environment
        static let leaderKills = NemesisSettings.leaderKills
        static let replicas = NemesisSettings.replicas
        static let clients = NemesisSettings.clients

        @Test func killsAndPausesLoseNoAcknowledgedWriteAndTheHistoryIsLinearizable() async throws {
            let seed = Self.environment["NEMESIS_SEED"].flatMap { UInt64($0) } ?? UInt64.random(in: 1...UInt64(UInt32.max))
            try await EndToEnd.onCluster("nemesis", replicas: Self.replicas) { c, checks -> Void in
                _ = try c.waitForLeader(excluding: nil)
                let load = RegisterWorkload(endpoints: c.endpoints, clients: Self.clients, keys: 5)
                load.begin(seed: seed)
                var nemesis = Nemesis(seed: seed)
                try nemesis.run(on: c, leaderKillsWanted: Self.leaderKills) { print($0) }
                Thread.sleep(forTimeInterval: 0.3)
                load.end()
                try load.verifyAfterFaults(on: c, clients: Self.clients, seed: seed, faults: nemesis.summary, checks)
                checks.expect(nemesis.leaderKills >= Self.leaderKills)
            }
        }
    }
}

/// The campaign's size, from the environment.
enum NemesisSettings {
    static let environment = ProcessInfo.processInfo.environment
    static let leaderKills = environment["NEMESIS_KILLS"].flatMap { Int($0) } ?? 20
    static let replicas = environment["NEMESIS_REPLICAS"].flatMap { Int($0) } ?? 3
    static let clients = environment["NEMESIS_CLIENTS"].flatMap { Int($0) } ?? 4
    /// About 1.5 s per leader kill, doubled, plus set-up.
    static let minutesAllowed = 3 + leaderKills / 20
}
