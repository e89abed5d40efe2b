import Foundation
import Testing
@testable import PloverTesting
import RDMAPaxos

extension EndToEnd.InterposeRedisTests {
    /// Connection ids start with the accepting process's random 64-bit incarnation. Here every
    /// replica draws the same one (`interpose-c/first_random_fixed.c` fixes the first random
    /// bytes libinterpose asks for): a follower then sees the leader's connections under its own
    /// incarnation before it made an id of its own, and must draw again rather than take them
    /// for its own (whose bytes its read path already handed over) and skip them. Then the
    /// leader is killed and restarted, so the new leader's ids and the restarted process's draw
    /// meet the old leader's entries too; every replica stays equal.
    @Test func replicasThatDrawTheSameIncarnationStillReplayEachOthersConnections() async throws {
        let scratch = EndToEnd.ClusterProcessTests.scratch("fixed-random-lib")
        try FileManager.default.createDirectory(atPath: scratch, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: scratch) }
        let fixed = try InterposeHarness.compileC("first_random_fixed", into: scratch, linkLibrary: false,
                                                  flags: ["-shared", "-fPIC"])
        let library = try InterposeHarness.library()
        try await Self.withRedis("redis-incarnation", environment: ["LD_PRELOAD": fixed + " " + library]) { r, checks in
            var acked: [String: String] = [:]
            func write(_ prefix: String, _ count: Int) throws {
                let (_, c) = try r.connectToLeader()
                for i in 0..<count where (try? c.call("SET", "\(prefix)-\(i)", "v\(i)")) == .simple("OK") { acked["\(prefix)-\(i)"] = "v\(i)" }
            }
            let first = try r.leader()
            try write("a", 50)
            checks.expect(r.converged(timeout: .seconds(30)), "digests differ with one incarnation on every replica:\n" + r.logTails())
            for id in r.cluster.ids where id != first {
                checks.expect(r.logText(id).contains("another process used this process's random incarnation; drew a new one"),
                              "follower \(id) did not notice the leader's ids carry its own incarnation:\n" + r.logTails())
            }
            r.kill(first)
            try write("b", 50)
            try r.start(first)
            try write("c", 20)
            checks.expect(r.converged(timeout: .seconds(30)), "digests differ after the leader's kill and restart:\n" + r.logTails())
            checks.expect(acked.count == 120, "only \(acked.count) of 120 SETs were acknowledged")
            for id in r.cluster.ids {
                guard let local = try? RespClient(unixPath: r.socketPath(id)) else { checks.record("Redis \(id) is unreachable"); continue }
                let missing = acked.filter { (try? local.call("GET", $0.key)) != .bulk($0.value) }.count
                checks.expect(missing == 0, "Redis \(id) lacks \(missing) of \(acked.count) acknowledged writes")
            }
        }
    }
}
