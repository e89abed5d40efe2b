import Foundation
import Testing
@testable import PloverTesting
import RDMAPaxos

extension EndToEnd.InterposeRedisTests {
    /// A BGSAVE child is a copy of the server, descriptors included, among them the shim's ends of
    /// the replay connections. A follower ends a replay connection by closing its end; if the child
    /// still held a copy, the server would see no end until the child exits, and replay (which waits
    /// for the server to close its end) would stall for the whole save. Here the save takes ~10 s
    /// (rdb-key-save-delay) and a client closes while it runs: the next write must reach every
    /// replica within 4 s.
    @Test func bgsaveChildDoesNotHoldReplayConnectionsOpen() async throws {
        try await Self.withRedis("redis-bgsave-close") { r, checks in
            let (_, c) = try r.connectToLeader()
            for i in 0..<100 { _ = try c.call("SET", "save-\(i)", "v\(i)") }
            checks.expect(try c.call("CONFIG", "SET", "rdb-key-save-delay", "100000") == .simple("OK"), "CONFIG SET rdb-key-save-delay")
            var a: RespClient? = try r.connectToLeader().1
            checks.expect(try a?.call("SET", "from-a", "1") == .simple("OK"), "SET through the second client")
            checks.expect(try c.call("BGSAVE") == .simple("Background saving started"), "BGSAVE through the leader")
            Thread.sleep(forTimeInterval: 0.5)
            a = nil // closes the second client while every replica's save runs
            _ = a
            checks.expect(try c.call("SET", "after-close", "x") == .simple("OK"), "SET after the close")
            let everywhere = InterposeHarness.waitUntil(.seconds(4)) {
                r.cluster.ids.allSatisfy { id in (try? RespClient(unixPath: r.socketPath(id)).call("GET", "after-close")) == .bulk("x") }
            }
            checks.expect(everywhere, "a write after a client closed during BGSAVE did not reach every replica within 4 s:\n" + r.logTails())
            _ = try? c.call("CONFIG", "SET", "rdb-key-save-delay", "0")
        }
    }

    /// Delivery is bounded: when a follower's server does not drain its queue (Redis busy in
    /// `DEBUG SLEEP` over its unix socket), the shim's queue stops at INTERPOSE_QUEUE_BYTES and the
    /// replica thread waits, instead of copying every committed entry into memory. The follower's
    /// resident memory must grow by much less than the 40 MB written meanwhile; afterwards it
    /// catches up.
    @Test func aStalledFollowerServerDoesNotQueueEverythingInMemory() async throws {
        try await Self.withRedis("redis-backpressure", environment: ["INTERPOSE_QUEUE_BYTES": String(2 << 20), "INTERPOSE_READ_BYTES": String(128 << 10)]) { r, checks in
            let (leader, c) = try r.connectToLeader()
            let follower = r.cluster.ids.first { $0 != leader }!
            guard let pid = r.processes[follower]?.processIdentifier else { checks.record("no follower process"); return }
            func rss() -> Int {
                let text = (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? ""
                let line = text.split(separator: "\n").first { $0.hasPrefix("VmRSS:") } ?? ""
                return (Int(line.split(separator: " ").dropFirst().first ?? "") ?? 0) * 1024
            }
            _ = try c.call("SET", "warm-up", String(repeating: "w", count: 1 << 20))
            checks.expect(r.converged(), "no agreement before the stall:\n" + r.logTails())
            let sleeper = try RespClient(unixPath: r.socketPath(follower))
            try sleeper.send([["DEBUG", "SLEEP", "15"]])
            Thread.sleep(forTimeInterval: 0.3)
            let before = rss()
            var peak = before
            let value = String(repeating: "v", count: 1 << 20)
            let start = ContinuousClock.now
            for i in 0..<40 {
                checks.expect(try c.call("SET", "big-\(i)", value) == .simple("OK"), "SET big-\(i)")
                peak = max(peak, rss())
            }
            let took = ContinuousClock.now - start
            for _ in 0..<10 { Thread.sleep(forTimeInterval: 0.2); peak = max(peak, rss()) }
            let grown = (peak - before) >> 20
            checks.expect(took < .seconds(14), "writing took \(took), longer than the follower's stall: nothing was measured")
            checks.expect(grown < 24, "the stalled follower's memory grew by \(grown) MiB while 40 MiB were written (queue bound 2 MiB)")
            checks.expect(r.converged(timeout: .seconds(60)), "the follower did not catch up after its stall:\n" + r.logTails())
            print("back-pressure: follower RSS grew by \(grown) MiB while 40 MiB were written in \(took)")
        }
    }
}
