import Foundation
import Testing
@testable import PloverTesting
import RDMAPaxos

extension EndToEnd {
    /// A follower that missed entries the leader compacted away catches up by a snapshot several
    /// times larger than one ring record: it must travel in chunks (docs/design/consensus.md,
    /// "Catch-up by snapshot").
    @Suite(.serialized, .timeLimit(.minutes(3))) struct SnapshotTransferTests {
        @Test func snapshotLargerThanARingRecordReachesARestartedFollower() async throws {
            let limits = """
                [limits]
                compact_every_entries = 8

                """
            try await EndToEnd.onCluster("bigsnapshot", extraConfig: limits) { c, checks -> Void in
                let leader = try c.waitForLeader(excluding: nil)
                let follower = c.ids.first { $0 != leader }!
                c.kill(follower)
                // 48 values of 64 KiB: a 3 MiB state, six times the ring's largest record (512 KiB).
                let client = NodeClient(endpoints: c.endpoints.filter { $0.key != follower })
                var written: [String: [UInt8]] = [:]
                for i in 0..<48 {
                    let value = (0..<(64 << 10)).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ i) }
                    _ = try client.propose(KeyValueStateMachine.Command.put(key: Array("k\(i)".utf8), value: value).encoded())
                    written["k\(i)"] = value
                }
                let leaderFirst = Int(c.status(leader)["first_index"] ?? "") ?? 0
                checks.expect(leaderFirst > 1, "the leader compacted its log (first index \(leaderFirst))")
                try c.start(follower)
                try c.waitConverged(timeout: .seconds(60))
                let s = c.status(follower)
                // Its log starts after a snapshot: it caught up by one, not by entries.
                checks.expect((Int(s["first_index"] ?? "") ?? 0) > 1, "follower status: \(s)")
                let reader = NodeClient(endpoints: c.endpoints)
                var wrong = 0
                for (k, v) in written where KeyValueStateMachine.decodeResult(try reader.localRead(Array(k.utf8), at: follower)) != v {
                    wrong += 1
                }
                checks.expect(wrong == 0, "the restarted follower lacks \(wrong) of \(written.count) values")
            }
        }
    }
}
