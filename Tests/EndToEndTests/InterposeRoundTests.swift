import Foundation
import PloverCheck
import Testing
@testable import PloverTesting
import RDMAPaxos

extension EndToEnd.InterposeRedisTests {
    /// A follower hands its Redis a leader's read-ahead round in one turn of Redis's loop, as the
    /// leader's Redis took it. Turns matter: Redis runs the rest of a pipeline behind a BLPOP that
    /// a push served only in `beforeSleep`, after every other event of that turn. Here B blocks in
    /// `BLPOP q 0` with `SET k b` pipelined behind it; while the leader's Redis is busy in a Lua
    /// loop, A pushes to q and C sets k, so both arrive in one round: on the leader k ends "b"
    /// (C's SET, then B's). A follower that replayed A and C in separate turns ran B's SET
    /// between them and ended with "c".
    @Test func aRoundIsReplayedInOneLoopTurnAsOnTheLeader() async throws {
        try await Self.withRedis("redis-round") { r, checks in
            let (leader, _) = try r.connectToLeader()
            let port = r.ports[leader]!
            let local = try RespClient(unixPath: r.socketPath(leader))
            let busy = "local i = 0 while i < 3000000 do i = i + 1 end return i"
            let rounds = 12
            for i in 0..<rounds {
                let a = try RespClient(port: port), b = try RespClient(port: port)
                let c = try RespClient(port: port), d = try RespClient(port: port)
                try b.send([["BLPOP", "q-\(i)", "0"], ["SET", "k-\(i)", "b"]])
                let blocked = InterposeHarness.waitUntil(.seconds(10)) {
                    guard case let .bulk(info?)? = try? local.call("INFO", "clients") else { return false }
                    return info.contains("blocked_clients:1\r")
                }
                checks.expect(blocked, "round \(i): the BLPOP client never blocked on the leader")
                try d.send([["EVAL", busy, "0"]])
                Thread.sleep(forTimeInterval: 0.03) // the leader's Redis is in the Lua loop now
                try a.send([["RPUSH", "q-\(i)", "x"]])
                try c.send([["SET", "k-\(i)", "c"]])
                checks.expect(try d.reply() == .integer(3_000_000), "round \(i): the Lua loop's reply")
                checks.expect(try a.reply() == .integer(1), "round \(i): RPUSH")
                checks.expect(try c.reply() == .simple("OK"), "round \(i): C's SET")
                _ = try b.reply()
                checks.expect(try b.reply() == .simple("OK"), "round \(i): B's SET")
            }
            let same = r.converged(timeout: .seconds(30))
            let values = r.cluster.ids.map { id -> String in
                guard let c = try? RespClient(unixPath: r.socketPath(id)) else { return "\(id): unreachable" }
                return "\(id): " + (0..<rounds).map { i in
                    if case let .bulk(v?)? = try? c.call("GET", "k-\(i)") { v } else { "?" }
                }.joined()
            }
            checks.expect(same, "the replicas' Redis digests differ (leader \(leader); k-0… per replica):\n"
                          + values.joined(separator: "\n") + "\n" + r.logTails())
        }
    }
}
