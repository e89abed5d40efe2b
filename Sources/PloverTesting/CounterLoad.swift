import Foundation
import RDMAPaxos

/// Closed-loop clients of the VM's counter service, each on a thread of its own: every client
/// sends `INC`, waits for its own answer (resending the same request on silence, switching
/// fronts on an error or a hang-up) and goes on until stopped. Used by the VM kill tests and
/// `plover bench vm-failover`.
final class CounterLoad: @unchecked Sendable {
    // @unchecked Sendable: `answers`, `timeouts` and `stopped` are only touched under `lock`.
    struct Answer {
        var client: Int
        var value: UInt64
        var at: ContinuousClock.Instant
    }

    let fronts: [String]
    let clients: Int
    let resendAfter: Duration
    let names: String
    /// The request each client sends, and what follows its sequence number ("INC", "").
    let op: String
    let extra: String
    private let lock = NSLock()
    private var answers: [Answer] = []
    private var timeouts: [String] = []
    private var stopped = false
    private let finished = DispatchGroup()

    /// `clients` clients named `NAMES0`, `NAMES1`, ... through `fronts`, each sending `op` requests
    /// (`DISK` with `extra` " 16" also writes the guest's disk).
    init(clients: Int, fronts: [String], resendAfter: Duration, names: String = "load", op: String = "INC", extra: String = "") {
        self.op = op
        self.extra = extra
        self.clients = clients
        self.fronts = fronts
        self.resendAfter = resendAfter
        self.names = names
    }

    func start() {
        for i in 0..<clients {
            finished.enter()
            let t = Thread(named: "counter-load-\(i)") { [self] in
                defer { finished.leave() }
                let c = CounterClient(name: "\(names)\(i)", fronts: fronts)
                c.current = i % fronts.count
                while !lock.withLock({ stopped }) {
                    do {
                        let v = try c.request(op, extra: extra, timeout: .seconds(10), resendAfter: resendAfter)
                        lock.withLock { answers.append(Answer(client: i, value: v, at: .now)) }
                    } catch {
                        lock.withLock { timeouts.append("\(error)") }
                    }
                }
            }
            t.start()
        }
    }

    /// Stops every client after its request in flight and waits for them.
    func stop() {
        lock.withLock { stopped = true }
        finished.wait()
    }

    var count: Int { lock.withLock { answers.count } }
    var all: [Answer] { lock.withLock { answers } }
    /// Requests that got no answer within 10 s (each was abandoned and a new one sent).
    var timedOut: [String] { lock.withLock { timeouts } }

    /// Waits until `n` answers arrived in all; false when `timeout` passed first.
    func waitForAnswers(_ n: Int, timeout: Duration) -> Bool {
        let deadline = ContinuousClock.now + timeout
        while count < n {
            guard ContinuousClock.now < deadline else { return false }
            Thread.sleep(forTimeInterval: 0.02)
        }
        return true
    }

    /// The first answer that arrived after `instant`, waiting up to `timeout` for one.
    func firstAnswer(after instant: ContinuousClock.Instant, timeout: Duration) -> ContinuousClock.Instant? {
        let deadline = ContinuousClock.now + timeout
        while true {
            if let a = lock.withLock({ answers.first { $0.at > instant }?.at }) { return a }
            guard ContinuousClock.now < deadline else { return nil }
            Thread.sleep(forTimeInterval: 0.005)
        }
    }

    /// What contradicts exactly-once: a counter value answered twice (an acknowledged increment
    /// was lost, so a later one got its value again) or a client's values not increasing.
    func violations() -> [String] {
        let a = all
        var out: [String] = []
        var seen: [UInt64: Int] = [:]
        for x in a {
            if let other = seen[x.value] { out.append("value \(x.value) answered to \(names)\(other) and to \(names)\(x.client)") }
            seen[x.value] = x.client
        }
        for c in 0..<clients {
            let values = a.filter { $0.client == c }.map(\.value)
            for (p, n) in zip(values, values.dropFirst()) where n <= p {
                out.append("\(names)\(c) got \(n) after \(p)")
            }
        }
        return out
    }
}
