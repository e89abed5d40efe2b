import Foundation
import Testing
@testable import PloverTesting
import RDMAPaxos

extension EndToEnd.InterposeRedisTests {
    /// A follower holds two descriptors per connection of the leader (the shim's end of the replay
    /// connection and the server's), so with the same fd limit everywhere a leader that takes as many
    /// clients as its own limit allows exhausts the followers' descriptors, and a follower that stops
    /// on that stops again at the same entry on every restart. Here every Redis runs with 256
    /// descriptors (soft and hard): the leader must refuse clients beyond what a follower can hold,
    /// every replica must stay up and agree, a restarted follower must catch up, and a follower
    /// restarted with too few descriptors must wait and say why instead of exiting.
    @Test func manyIdleClientsWithFewDescriptorsNeverStopAFollower() async throws {
        try await Self.withRedis("redis-fds", fdLimit: 256) { r, checks in
            let (leader, first) = try r.connectToLeader()
            var held: [RespClient] = [first]
            var refused = 0
            for _ in 0..<200 {
                guard let c = try? RespClient(port: r.ports[leader]!) else { refused += 1; continue }
                if (try? c.call("PING")) == .simple("PONG") { held.append(c) } else { refused += 1 }
            }
            checks.expect(held.count >= 20, "only \(held.count) clients were served")
            checks.expect(refused > 0, "all \(held.count) clients were taken: a follower cannot hold two descriptors for each")
            for i in 1...20 { _ = try? held[i % held.count].call("SET", "fd-key-\(i)", "v\(i)") }
            Thread.sleep(forTimeInterval: 2)
            for (id, p) in r.processes { checks.expect(p.isRunning, "replica \(id)'s Redis stopped (\(held.count) clients held):\n" + r.logTails()) }
            checks.expect(r.converged(timeout: .seconds(30)), "the replicas' digests differ with \(held.count) clients:\n" + r.logTails())

            // A restarted follower replays every OPEN of the held clients and catches up.
            let follower = r.cluster.ids.first { $0 != leader }!
            r.kill(follower)
            try r.start(follower, fdLimit: 256)
            Thread.sleep(forTimeInterval: 1)
            _ = try? held[0].call("SET", "after-restart", "x")
            checks.expect(r.converged(timeout: .seconds(40)), "the restarted follower did not catch up:\n" + r.logTails())
            checks.expect(r.processes[follower]?.isRunning ?? false, "the restarted follower stopped:\n" + r.logTails())

            // With too few descriptors for the log's connections it waits and says so.
            r.kill(follower)
            let logPath = r.root + "/redis-\(follower).log"
            let before = (try? String(contentsOfFile: logPath, encoding: .utf8))?.utf8.count ?? 0
            try r.start(follower, fdLimit: 96)
            // A restarted follower learns what is committed from the next entry (an idle leader
            // sends it nothing new), so write once more.
            Thread.sleep(forTimeInterval: 1)
            _ = try? held[0].call("SET", "with-96", "x")
            Thread.sleep(forTimeInterval: 4)
            checks.expect(r.processes[follower]?.isRunning ?? false, "a follower with 96 descriptors exited instead of waiting:\n" + r.logTails())
            let text = String(((try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "").utf8.dropFirst(before)) ?? ""
            checks.expect(text.contains("waits") && text.contains("descriptor"), "the follower with 96 descriptors did not say why its replay waits:\n" + text.suffix(1500))
            r.kill(follower)
            try r.start(follower, fdLimit: 256)
            Thread.sleep(forTimeInterval: 1)
            _ = try? held[0].call("SET", "with-256", "x")
            checks.expect(r.converged(timeout: .seconds(40)), "the follower did not catch up once it had descriptors again:\n" + r.logTails())
            held.removeAll()
        }
    }
}
