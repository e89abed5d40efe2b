import Foundation
import Synchronization
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

    /// A command can close another client whose committed bytes the server has not read yet: a
    /// `CLIENT KILL` earlier in the same round, executed first. The leader drops those bytes, and
    /// so must every follower (its Redis closed that connection at the same place of the log), or
    /// a follower's round waits for ever on an item no one will read. Writers, each its own ACL
    /// user, pipeline INCRs and RPUSHes and reconnect when killed; a killer runs `CLIENT KILL USER`
    /// (the same connections on every replica, unlike ids or addresses) in a loop.
    @Test func clientsKilledBeforeReadingTheirCommittedBytesAreDroppedAlikeOnEveryReplica() async throws {
        try await Self.withRedis("redis-killed") { r, checks in
            let (leader, admin) = try r.connectToLeader()
            let port = r.ports[leader]!
            let writers = 6
            for w in 0..<writers {
                checks.expect(try admin.call("ACL", "SETUSER", "w\(w)", "on", "nopass", "+@all", "~*") == .simple("OK"), "ACL SETUSER w\(w)")
            }
            let state = LoadState()
            let done = DispatchGroup()
            for w in 0..<writers {
                done.enter()
                Thread {
                    defer { done.leave() }
                    var i = 0
                    while !state.stopped {
                        guard let c = try? RespClient(port: port), (try? c.call("AUTH", "w\(w)", "x")) == .simple("OK") else {
                            Thread.sleep(forTimeInterval: 0.01); continue
                        }
                        state.update { $0.connections += 1 }
                        while !state.stopped {
                            i += 1
                            let commands = (0..<4).flatMap { j in [["INCR", "count-\(w)"], ["RPUSH", "log-\(w % 2)", "w\(w)-\(i)-\(j)"]] }
                            guard let replies = try? c.pipeline(commands), replies.count == commands.count else { break }
                        }
                    }
                }.start()
            }
            done.enter()
            Thread {
                defer { done.leave() }
                guard let k = try? RespClient(port: port) else { checks.record("the killer cannot connect"); return }
                var n = 0
                while !state.stopped {
                    n += 1
                    guard case let .integer(killed)? = try? k.call("CLIENT", "KILL", "USER", "w\(n % writers)") else {
                        checks.record("CLIENT KILL failed on the leader"); return
                    }
                    state.update { $0.kills += Int(killed) }
                    Thread.sleep(forTimeInterval: 0.002 * Double(n % 5))
                }
            }.start()
            // Load for at least 6 s, and until the leader has dropped a killed client's committed
            // bytes (the case this test is for), for at most 30 s.
            let logPath = r.root + "/redis-\(leader).log"
            let dropLine = "the server closed a client before reading its committed input"
            func dropped() -> Bool { ((try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "").contains(dropLine) }
            let start = ContinuousClock.now
            while ContinuousClock.now < start + .seconds(30) && (ContinuousClock.now < start + .seconds(6) || !dropped()) {
                Thread.sleep(forTimeInterval: 0.2)
            }
            state.update { $0.stop = true }
            if done.wait(timeout: .now() + 60) == .timedOut { checks.record("the writers or the killer did not stop within 60 s") }
            checks.expect(state.kills > 50, "too few clients were killed (\(state.kills)) to prove anything")
            let same = r.converged(timeout: .seconds(30))
            let counts = r.cluster.ids.map { id -> String in
                guard let local = try? RespClient(unixPath: r.socketPath(id)) else { return "\(id): unreachable" }
                return "\(id): " + (0..<writers).map { w in
                    if case let .bulk(v?)? = try? local.call("GET", "count-\(w)") { v } else { "?" }
                }.joined(separator: ",")
            }
            checks.expect(same, "the replicas' Redis digests differ (leader \(leader); count-0… per replica):\n"
                          + counts.joined(separator: "\n") + "\n" + r.logTails())
            // The case this test is for happened: the leader dropped committed input of a closed client.
            checks.expect(dropped(), "no client was killed with committed bytes unread (\(state.kills) kills, \(state.connections) connections):\n" + r.logTails())
        }
    }
}

/// The kill test's shared counters.
private final class LoadState: Sendable {
    private let m = Mutex((stop: false, kills: 0, connections: 0))
    func update(_ f: (inout (stop: Bool, kills: Int, connections: Int)) -> Void) { m.withLock { f(&$0) } }
    var stopped: Bool { m.withLock { $0.stop } }
    var kills: Int { m.withLock { $0.kills } }
    var connections: Int { m.withLock { $0.connections } }
}
