import Foundation
import PloverCheck
@testable import PloverTesting
import RDMAPaxos
import Synchronization
import Testing

typealias KVOperation = RegisterOperation<String, String>

/// Concurrent clients on a small set of registers through `NodeClient`: puts (which return the
/// value they replaced, so each is recorded as a swap) and linearizable reads. Every operation is
/// recorded with its invocation and completion time; a call that fails after the request may
/// have been sent has an unknown outcome. Besides the registers, each client now and then writes
/// a fresh key once, so that losing any acknowledged write shows up directly.
final class RegisterWorkload: @unchecked Sendable {
    // @unchecked Sendable: `history` and `acked` are only touched under `lock`; `running` is atomic.
    let endpoints: [NodeID: String]
    let clients: Int
    let keys: [String]
    let start = ContinuousClock.now
    let running = Atomic<Bool>(false)
    let lock = NSLock()
    private var history: [KVOperation] = []
    private var acked: [String: String] = [:]
    private var threads: [Thread] = []
    private let done = DispatchGroup()

    init(endpoints: [NodeID: String], clients: Int, keys: Int) {
        self.endpoints = endpoints
        self.clients = clients
        self.keys = (0..<keys).map { "reg-\($0)" }
    }

    /// Nanoseconds since the workload was created (one clock for every client).
    func now() -> UInt64 {
        let d = ContinuousClock.now - start
        return UInt64(d.wholeNanoseconds)
    }

    func begin(seed: UInt64) {
        running.store(true, ordering: .relaxed)
        for t in 0..<clients {
            done.enter()
            let th = Thread { [self] in
                var rng = SeededRandom(seed: seed &+ UInt64(t) &* 0x9E37_79B9_7F4A_7C15)
                let c = NodeClient(endpoints: endpoints, timeout: .seconds(1))
                var i = 0
                while running.load(ordering: .relaxed) {
                    let roll = rng.below(100)
                    if roll < 8 {
                        uniqueWrite(c, client: t, i: i)
                    } else {
                        let key = keys[rng.below(keys.count)]
                        if roll < 54 { put(c, client: t, key: key, value: "c\(t)-\(i)") } else { get(c, client: t, key: key) }
                    }
                    i += 1
                }
                done.leave()
            }
            th.name = "register-client-\(t)"
            threads.append(th)
            th.start()
        }
    }

    func end() {
        running.store(false, ordering: .relaxed)
        done.wait()
    }

    func put(_ c: NodeClient, client: Int, key: String, value: String) {
        let t0 = now()
        let command = KeyValueStateMachine.Command.put(key: Array(key.utf8), value: Array(value.utf8)).encoded()
        do {
            let previous = try c.propose(command).decodedValue
            record(KVOperation(process: client, key: key, kind: .swap(value, previous: previous), invoked: t0, completed: now()))
        } catch {
            record(KVOperation(process: client, key: key, kind: .write(value), invoked: t0, completed: nil))
        }
    }

    func get(_ c: NodeClient, client: Int, key: String) {
        let t0 = now()
        do {
            let value = try c.read(Array(key.utf8)).decodedValue
            record(KVOperation(process: client, key: key, kind: .read(value), invoked: t0, completed: now()))
        } catch {
            record(KVOperation(process: client, key: key, kind: .read(nil), invoked: t0, completed: nil))
        }
    }

    func uniqueWrite(_ c: NodeClient, client: Int, i: Int) {
        let key = "once-\(client)-\(i)", value = "v\(i)"
        if (try? c.propose(KeyValueStateMachine.Command.put(key: Array(key.utf8), value: Array(value.utf8)).encoded())) != nil {
            lock.withLock { acked[key] = value }
        }
    }

    func record(_ op: KVOperation) { lock.withLock { history.append(op) } }

    /// After the faults: one more read of every register by a fresh client, part of the history.
    func finalReads() {
        let c = NodeClient(endpoints: endpoints, timeout: .seconds(2))
        for key in keys { get(c, client: clients, key: key) }
    }

    var operations: [KVOperation] { lock.withLock { history } }
    var acknowledgedUniqueWrites: [String: String] { lock.withLock { acked } }
}

extension [UInt8] {
    /// A key-value result as a string: nil when the key was absent.
    var decodedValue: String? { KeyValueStateMachine.decodeResult(self).map { String(decoding: $0, as: UTF8.self) } }
}

extension RegisterWorkload {
    /// After a fault campaign: waits for the replicas to converge, reads every register once more,
    /// then checks that every acknowledged fresh-key write is on every replica, that the replicas
    /// agree on every register, and that the history is linearizable.
    /// `holders`: the replicas that hold the state (all of `c.ids` by default; a witness holds none).
    func verifyAfterFaults(on c: DemoCluster, clients: Int, seed: UInt64, faults: String, _ checks: Checks, holders: [NodeID]? = nil) throws {
        let holders = holders ?? c.ids
        try c.waitConverged()
        finalReads()

        // Every acknowledged write to a fresh key is on every replica.
        let acked = acknowledgedUniqueWrites
        let client = NodeClient(endpoints: c.endpoints)
        var lost = 0
        for id in holders {
            lost += try acked.filter { try client.localRead(Array($0.key.utf8), at: id).decodedValue != $0.value }.count
        }
        // Every replica holds the same registers, and they are what the final reads returned.
        let history = operations
        for key in keys {
            let values = try holders.map { try client.localRead(Array(key.utf8), at: $0).decodedValue }
            checks.expect(Set(values).count == 1, "replicas disagree on \(key): \(values)")
            let final = history.last { $0.key == key && $0.process == clients }
            checks.expect(final.map { $0.kind == .read(values[0]) && $0.isComplete } == true, "final read of \(key): \(String(describing: final))")
        }

        let report = LinearizabilityChecker<String, String>().check(history)
        let unknown = history.filter { !$0.isComplete }.count
        print("""
            nemesis seed \(seed): \(faults); \(history.count) register operations \
            (\(unknown) with unknown outcome), \(report.operationsChecked) checked in \(report.steps) search steps; \
            \(acked.count) acknowledged fresh-key writes, \(lost) missing on some replica
            """)
        checks.expect(acked.count > 20, "the clients made too little progress to prove anything")
        checks.expect(history.count - unknown > 200, "the clients made too little progress to prove anything")
        checks.expect(lost == 0, "\(lost) acknowledged writes missing (seed \(seed))")
        checks.expect(report.undecided.isEmpty, "the checker gave up on \(report.undecided) (seed \(seed))")
        for v in report.violations { checks.record("not linearizable (seed \(seed)): \(v)") }
    }
}

/// Faults against real replica processes: SIGKILL of the leader or of a random replica followed
/// by a restart, and SIGSTOP/SIGCONT pauses. At most a minority is ever down or paused, and every
/// fault is undone before the next, so the cluster always can make progress.
struct Nemesis {
    var leaderKills = 0
    var randomKills = 0
    var pauses = 0
    var rng: SeededRandom

    init(seed: UInt64) { rng = SeededRandom(seed: seed) }

    /// Runs faults until `leaderKillsWanted` leader kills happened.
    mutating func run(on c: DemoCluster, leaderKillsWanted: Int, log: (String) -> Void) throws {
        while leaderKills < leaderKillsWanted {
            let leader = try c.waitForLeader(excluding: nil)
            let roll = rng.below(100)
            if roll < 70 {
                try killAndRestart([leader], in: c)
                leaderKills += 1
            } else if roll < 85 {
                let victims = pick(c.ids, count: minority(c))
                try killAndRestart(victims, in: c)
                if victims.contains(leader) { leaderKills += 1 }
                randomKills += victims.count
            } else {
                let victim = rng.below(2) == 0 ? leader : c.ids[rng.below(c.ids.count)]
                c.pause(victim, true)
                Thread.sleep(forTimeInterval: 0.2 + Double(rng.below(400)) / 1000)
                c.pause(victim, false)
                pauses += 1
            }
            if (leaderKills + randomKills + pauses) % 10 == 0 { log("nemesis: \(summary)") }
            Thread.sleep(forTimeInterval: 0.15 + Double(rng.below(250)) / 1000)
        }
    }

    func minority(_ c: DemoCluster) -> Int { max(1, (c.ids.count - 1) / 2) }

    mutating func pick(_ ids: [NodeID], count: Int) -> [NodeID] {
        var pool = ids, out: [NodeID] = []
        for _ in 0..<count { out.append(pool.remove(at: rng.below(pool.count))) }
        return out
    }

    /// SIGKILL, wait for a leader among the rest, restart the victims.
    mutating func killAndRestart(_ victims: [NodeID], in c: DemoCluster) throws {
        for v in victims { c.kill(v) }
        _ = try c.waitForLeader(excluding: nil)
        Thread.sleep(forTimeInterval: Double(rng.below(200)) / 1000)
        for v in victims { try c.start(v) }
    }

    var summary: String { "\(leaderKills) leader kills, \(randomKills) other kills, \(pauses) pauses" }
}
