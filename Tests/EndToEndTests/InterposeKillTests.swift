import Foundation
import Synchronization
import PloverCheck
import Testing
@testable import PloverTesting
import RDMAPaxos

extension EndToEnd.InterposeRedisTests {
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
