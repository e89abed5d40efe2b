import Foundation
import RDMAPaxos
import Synchronization

/// Writers that record exactly which writes were acknowledged.
package final class DemoLoad: @unchecked Sendable {
    // @unchecked Sendable: mutable state is behind `lock`; `running` is atomic.
    let endpoints: [NodeID: String]
    let clients: Int
    let running = Atomic<Bool>(false)
    let lock = NSLock()
    var acked: [String: String] = [:]
    var ackTimes: [ContinuousClock.Instant] = []
    package var failures = 0
    var threads: [Thread] = []
    let done = DispatchGroup()

    package init(endpoints: [NodeID: String], clients: Int) {
        self.endpoints = endpoints
        self.clients = clients
    }

    package func start() {
        running.store(true, ordering: .relaxed)
        for t in 0..<clients {
            done.enter()
            let th = Thread(named: "demo-load-\(t)") { [self] in
                let c = NodeClient(endpoints: endpoints, timeout: .seconds(2))
                var i = 0
                while running.load(ordering: .relaxed) {
                    let k = "w\(t)-\(i)", v = "v\(i)"
                    do {
                        _ = try c.propose(KeyValueStateMachine.Command.put(key: Array(k.utf8), value: Array(v.utf8)).encoded(), attempts: 100)
                        lock.withLock {
                            acked[k] = v
                            ackTimes.append(.now)
                        }
                        i += 1
                    } catch {
                        lock.withLock { failures += 1 }
                    }
                }
                done.leave()
            }
            threads.append(th)
            th.start()
        }
    }

    package func stop() {
        running.store(false, ordering: .relaxed)
        done.wait()
    }

    package var acknowledged: Int { lock.withLock { acked.count } }
    /// When each write acknowledged after `t` was acknowledged, in order.
    package func ackTimes(after t: ContinuousClock.Instant) -> [ContinuousClock.Instant] {
        lock.withLock { ackTimes.filter { $0 > t } }
    }
    package var ackedWrites: [String: String] { lock.withLock { acked } }

    package func waitForWrite(after t: ContinuousClock.Instant, timeout: Duration) -> ContinuousClock.Instant? {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if let first = lock.withLock({ ackTimes.last(where: { $0 > t }).map { _ in ackTimes.first { $0 > t }! } }) { return first }
            Thread.sleep(forTimeInterval: 0.005)
        }
        return nil
    }
}
