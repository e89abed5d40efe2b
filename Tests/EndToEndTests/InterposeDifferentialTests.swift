import Foundation
import Testing
@testable import PloverTesting
import RDMAPaxos

extension EndToEnd.InterposeRedisTests {
    /// The differential test of APUS mode: seeded clients send random pipelines of Redis commands
    /// (lists, blocking pops with timeout 0, transactions, Lua, large and small values, random
    /// disconnects) while the leader is killed with `kill -9` twice and restarted; afterwards
    /// every replica's `DEBUG DIGEST` is equal and every acknowledged SET is on every replica.
    /// Commands whose effect depends on time or randomness (expiry, SPOP, RANDOMKEY, blocking
    /// timeouts) are not sent: replicated input cannot make them agree (docs/design/interpose.md).
    /// `PLOVER_INTERPOSE_SEED` picks the seed; a failure prints it.
    @Test func randomPipelinesWithLeaderKillsLeaveEveryReplicaEqual() async throws {
        let seed = UInt64(ProcessInfo.processInfo.environment["PLOVER_INTERPOSE_SEED"] ?? "") ?? 1
        try await Self.withRedis("redis-differential") { r, checks in
            _ = try r.connectToLeader()
            let acked = AckedWrites()
            let stop = ManagedAtomicFlag()
            let group = DispatchGroup()
            let (ports, endpoints) = (r.ports, r.cluster.endpoints)
            for client in 0..<6 {
                group.enter()
                Thread {
                    defer { group.leave() }
                    var random = SeededRandom(seed: seed &* 1_000_003 &+ UInt64(client))
                    RandomRedisClient(id: client, ports: ports, endpoints: endpoints, acked: acked).run(&random, until: stop)
                }.start()
            }
            // Two leader kills, each followed by a restart of the killed replica.
            for round in 0..<2 {
                Thread.sleep(forTimeInterval: 1.5)
                guard let victim = InterposeHarness.leader(r.cluster.endpoints, among: r.processes.keys.sorted()) else {
                    checks.record("seed \(seed): no leader before kill \(round + 1)"); continue
                }
                r.kill(victim)
                Thread.sleep(forTimeInterval: 1.0)
                try r.start(victim)
            }
            Thread.sleep(forTimeInterval: 1.5)
            stop.set()
            group.wait()
            let writes = acked.all
            checks.expect(writes.count > 20, "seed \(seed): only \(writes.count) SETs were acknowledged: too few to prove anything")
            checks.expect(r.converged(timeout: .seconds(60)), "seed \(seed): the replicas' Redis digests differ:\n" + r.logTails())
            for id in r.cluster.ids {
                guard let local = try? RespClient(unixPath: r.socketPath(id)) else { checks.record("seed \(seed): Redis \(id) is unreachable"); continue }
                var missing: [String] = []
                for (k, v) in writes where (try? local.call("GET", k)) != .bulk(v) { missing.append(k) }
                checks.expect(missing.isEmpty, "seed \(seed): Redis \(id) lacks \(missing.count) of \(writes.count) acknowledged writes, e.g. \(missing.prefix(3))")
            }
        }
    }
}

/// SETs whose OK reached a client, by key.
final class AckedWrites: @unchecked Sendable {
    // @unchecked Sendable: `writes` is only touched under `lock`.
    private let lock = NSLock()
    private var writes: [String: String] = [:]
    func add(_ key: String, _ value: String) { lock.withLock { writes[key] = value } }
    var all: [String: String] { lock.withLock { writes } }
}

/// A flag set once, read by many threads.
final class ManagedAtomicFlag: @unchecked Sendable {
    // @unchecked Sendable: `value` is only touched under `lock`.
    private let lock = NSLock()
    private var value = false
    func set() { lock.withLock { value = true } }
    var isSet: Bool { lock.withLock { value } }
}

/// One seeded client of the differential test: random pipelines against whichever Redis leads.
struct RandomRedisClient {
    let id: Int
    let ports: [NodeID: Int]
    let endpoints: [NodeID: String]
    let acked: AckedWrites

    func run(_ random: inout SeededRandom, until stop: ManagedAtomicFlag) {
        var connection: RespClient?
        var serial = 0
        while !stop.isSet {
            if connection == nil {
                guard let l = InterposeHarness.leader(endpoints, among: ports.keys.sorted()),
                      let c = try? RespClient(port: ports[l]!) else { Thread.sleep(forTimeInterval: 0.05); continue }
                connection = c
            }
            guard let c = connection else { continue }
            switch random.below(20) {
            case 0:
                connection = nil // a random disconnect
            case 1:
                // A blocking pop with timeout 0 that this client abandons: its end of stream
                // unblocks it on every replica at the same place of the log.
                try? c.send([["BLPOP", "list-\(random.below(3))", "0"]])
                Thread.sleep(forTimeInterval: Double(random.below(50)) / 1000)
                connection = nil
            default:
                var commands: [[String]] = []
                var sets: [Int: (String, String)] = [:]
                for _ in 0..<(1 + random.below(4)) {
                    let list = "list-\(random.below(3))"
                    switch random.below(7) {
                    case 0, 1:
                        serial += 1
                        let key = "k-\(id)-\(serial)"
                        let size = random.below(4) == 0 ? 33_000 + random.below(40_000) : 1 + random.below(64)
                        let value = String(repeating: Character(UnicodeScalar(UInt8(97 + random.below(26)))), count: size)
                        sets[commands.count] = (key, value)
                        commands.append(["SET", key, value])
                    case 2: commands.append(["RPUSH", list, "c\(id)-\(serial)-\(random.below(1000))"])
                    case 3: commands.append(["LPOP", list])
                    case 4:
                        commands += [["MULTI"], ["INCR", "counter"], ["RPUSH", list, "m\(id)-\(serial)"], ["LMOVE", list, "list-\(random.below(3))", "LEFT", "RIGHT"], ["EXEC"]]
                    case 5:
                        commands.append(["EVAL", "redis.call('RPUSH', KEYS[1], ARGV[1]); return redis.call('LLEN', KEYS[1])", "1", list, "e\(id)-\(serial)"])
                    default: commands.append(["INCRBY", "counter-\(random.below(4))", "\(random.below(100))"])
                    }
                }
                guard let replies = try? c.pipeline(commands) else { connection = nil; continue }
                for (i, (key, value)) in sets where replies[i] == .simple("OK") { acked.add(key, value) }
            }
        }
    }
}
