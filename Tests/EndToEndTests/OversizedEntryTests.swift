import Foundation
import Testing
@testable import PloverTesting
import RDMAPaxos

extension EndToEnd {
    /// Entries and batches near the fabric's record limit. A ring record carries at most about
    /// half a ring (ring_bytes 1 MiB: about 512 KiB). Accept batches are bounded by
    /// `batch_bytes_max` (at most 256 KiB, framing included) and a larger command is refused by
    /// the leader, so no accept message can exceed a record (docs/reliability.md, "Defects found").
    @Suite(.serialized, .timeLimit(.minutes(3))) struct OversizedEntryTests {
        static func put(_ c: NodeClient, _ k: String, _ bytes: Int, attempts: Int = 20) throws {
            let v = [UInt8](repeating: UInt8(ascii: "x"), count: bytes)
            _ = try c.propose(KeyValueStateMachine.Command.put(key: Array(k.utf8), value: v).encoded(), attempts: attempts)
        }

        @Test func aValueLargerThanARingRecordDoesNotStopLaterWrites() async throws {
            let laterWrite = try await EndToEnd.onCluster("oversized") { c, _ -> String? in
                _ = try c.waitForLeader(excluding: nil)
                let client = NodeClient(endpoints: c.endpoints, timeout: .seconds(1))
                try Self.put(client, "small", 10)
                try Self.put(client, "below-limit", 200_000)
                // 600 KB: accepted by the client protocol and the store, larger than a ring record.
                _ = try? Self.put(client, "above-limit", 600_000, attempts: 1)
                do {
                    try Self.put(NodeClient(endpoints: c.endpoints, timeout: .seconds(1)), "small", 10, attempts: 2)
                    return nil
                } catch {
                    return "\(error)"
                }
            }
            #expect(laterWrite == nil, "a small write after the large one failed: \(laterWrite ?? "")")
        }

        @Test func aFollowerThatMissedMoreThanARingRecordCatchesUp() async throws {
            let converged = try await EndToEnd.onCluster("lagging") { c, _ -> Bool in
                let leader = try c.waitForLeader(excluding: nil)
                let follower = c.ids.first { $0 != leader }!
                c.kill(follower)
                let client = NodeClient(endpoints: c.endpoints, timeout: .seconds(5))
                // 1.2 MB in 20 KB values: catch-up must come in batches that each fit a record.
                for i in 0..<60 { try Self.put(client, "k\(i)", 20_000) }
                try c.start(follower)
                return (try? c.waitConverged(timeout: .seconds(4))) != nil
            }
            #expect(converged, "the restarted follower did not catch up")
        }
    }
}
