import Foundation
import Testing
@testable import PloverTesting
import RDMAPaxos
import Synchronization

/// `async` replicas on disks that lose unsynced writes (`PowerCutFS`), all losing power at once:
/// what the cluster may lose is what it acknowledged in the last `async_flush_ms`.
extension EndToEnd.PowerCutNodeTests {
    /// Fresh keys written by a few client threads, each with when it was acknowledged
    /// (CLOCK_MONOTONIC ns). @unchecked Sendable: `acked` is only touched under `lock`.
    final class TimedWrites: @unchecked Sendable {
        let lock = NSLock()
        var acked: [(key: String, at: UInt64)] = []
        let running = Atomic<Bool>(true)
        let done = DispatchGroup()

        init(endpoints: [NodeID: String], clients: Int) {
            for t in 0..<clients {
                done.enter()
                Thread { [self] in
                    let c = NodeClient(endpoints: endpoints, timeout: .seconds(1))
                    var i = 0
                    while running.load(ordering: .relaxed) {
                        let key = "t\(t)-\(i)"
                        i += 1
                        let put = KeyValueStateMachine.Command.put(key: Array(key.utf8), value: Array(key.utf8)).encoded()
                        if (try? c.propose(put)) != nil {
                            let at = monotonicNanoseconds()
                            lock.withLock { acked.append((key, at)) }
                        }
                    }
                    done.leave()
                }.start()
            }
        }

        func stop() -> [(key: String, at: UInt64)] {
            running.store(false, ordering: .relaxed)
            done.wait()
            return lock.withLock { acked }
        }
    }

    /// An `async` cluster loses power as a whole under load: what it may lose is what it
    /// acknowledged in the last `async_flush_ms` (100 ms, plus one flush; the test allows
    /// `PowerCutLogTests.asyncBoundNanoseconds`). Returns the age at the cut of the oldest
    /// acknowledged write lost (0 if none).
    static func asyncClusterCut(_ name: String, flushMilliseconds: Int, checks: Checks) async throws -> UInt64 {
        let result = Atomic<UInt64>(0)
        try await onPoweredCluster(name, durability: "async", extraConfig: "[limits]\nasync_flush_ms = \(flushMilliseconds)\n",
                                   fsyncLies: false, checks: checks) { p in
            let c = p.cluster
            _ = try c.waitForLeader(excluding: nil)
            let writes = TimedWrites(endpoints: c.endpoints, clients: 4)
            Thread.sleep(forTimeInterval: 3)
            let cutAt = monotonicNanoseconds()
            p.cut(c.ids)
            let acked = writes.stop()
            for id in c.ids { try p.restore(id) }
            _ = try c.waitForLeader(excluding: nil)
            try p.barrier()
            try c.waitConverged()
            let client = NodeClient(endpoints: c.endpoints)
            var lost: [UInt64] = []
            for w in acked where try client.localRead(Array(w.key.utf8), at: c.ids[0]).decodedValue != w.key {
                lost.append(cutAt > w.at ? cutAt - w.at : 0)
                if ProcessInfo.processInfo.environment["POWERCUT_DEBUG"] != nil { print("lost \(w.key) \(Double(cutAt > w.at ? cutAt - w.at : 0) / 1e6) ms") }
            }
            let oldest = lost.max() ?? 0
            print("async power cut (\(name), async_flush_ms = \(flushMilliseconds)): \(acked.count) writes acknowledged, \(lost.count) lost"
                  + (lost.isEmpty ? "" : String(format: ", the oldest acknowledged %.0f ms before the cut", Double(oldest) / 1e6)))
            checks.expect(acked.count > 100, "only \(acked.count) writes were acknowledged")
            result.store(oldest, ordering: .relaxed)
        }
        return result.load(ordering: .relaxed)
    }

    @Test func anAsyncClusterLosesOnlyWhatItAcknowledgedInTheLastFlushInterval() async throws {
        let checks = Checks()
        defer { checks.recordIssues() }
        let oldest = try await Self.asyncClusterCut("powercut-async-bound", flushMilliseconds: 100, checks: checks)
        #expect(oldest < EndToEnd.PowerCutLogTests.asyncBoundNanoseconds,
                "lost a write acknowledged \(oldest / 1_000_000) ms before the cut (bound \(EndToEnd.PowerCutLogTests.asyncBoundNanoseconds / 1_000_000) ms)")
    }

    /// The bound above without the flush: writes acknowledged seconds before the cut are lost.
    @Test func theAsyncClusterBoundCatchesReplicasThatNeverFlush() async throws {
        let checks = Checks()
        defer { checks.recordIssues() }
        let oldest = try await Self.asyncClusterCut("powercut-async-noflush", flushMilliseconds: 0, checks: checks)
        #expect(oldest >= EndToEnd.PowerCutLogTests.asyncBoundNanoseconds,
                "without the flush the oldest write lost was acknowledged only \(oldest / 1_000_000) ms before the cut")
    }
}
