import Foundation

/// A bounded completion queue: the fabric pushes, the owner polls or waits.
///
/// Like a verbs CQ it has a fixed capacity (`capacityEntries`); a push into a full queue is
/// dropped and counted in `overrunCount` (a verbs CQ overrun is fatal, but every consumer here
/// treats completions as hints it re-derives from memory, so losing one costs only latency).
///
/// `@unchecked Sendable`: all state is guarded by `condition`'s lock.
public final class CompletionQueue: @unchecked Sendable {
    /// Most completions held at once; pushes beyond are dropped.
    public let capacityEntries: Int
    private let condition = NSCondition()
    private var entries: [Completion] = []
    private var head = 0
    private var interrupted = false
    private var overruns = 0
    private var doorbell: (@Sendable () -> Void)?

    /// An empty queue holding at most `capacityEntries` (positive) completions.
    public init(capacityEntries: Int = 1 << 16) {
        precondition(capacityEntries > 0, "a completion queue needs room for one entry")
        self.capacityEntries = capacityEntries
    }

    /// Completions dropped because the queue was full.
    public var overrunCount: Int { condition.lock(); defer { condition.unlock() }; return overruns }

    func push(_ c: Completion) {
        condition.lock()
        if c.kind == .writeImmediateReceived, let ring = doorbell {
            // The doorbell's owner reads the rings itself and needs nothing from the completion:
            // queueing it would also wake the thread waiting here, a second wake-up per landing.
            condition.unlock()
            ring()
            return
        }
        if entries.count - head >= capacityEntries {
            overruns += 1
            condition.unlock()
            return
        }
        entries.append(c)
        condition.signal()
        condition.unlock()
    }

    /// Called, in place of queueing it, by the thread that pushes each `writeImmediateReceived`
    /// completion (outside the queue's lock): lets the thread that reads the rings wake at once,
    /// without a second thread between (`RingTransport.startPolled`). While a doorbell is set,
    /// those completions are not queued and wake no waiter. Nil: no doorbell.
    public func setDoorbell(_ ring: (@Sendable () -> Void)?) {
        condition.lock()
        doorbell = ring
        condition.unlock()
    }

    /// Takes up to `max` completions without waiting (`ibv_poll_cq`).
    public func poll(max: Int = .max) -> [Completion] {
        condition.lock()
        defer { condition.unlock() }
        return takeLocked(max)
    }

    /// Waits until a completion arrives, `interrupt()` is called, or `timeout` passes, then
    /// takes up to `max` completions (possibly none).
    public func wait(max: Int = .max, timeout: Duration) -> [Completion] {
        condition.lock()
        defer { condition.unlock() }
        if entries.count == head && !interrupted {
            let (s, atto) = timeout.components
            let seconds = Double(s) + Double(atto) / 1e18
            _ = condition.wait(until: Date(timeIntervalSinceNow: Swift.max(0, seconds)))
        }
        interrupted = false
        return takeLocked(max)
    }

    /// Wakes a thread blocked in `wait` (used to stop consumers promptly).
    public func interrupt() {
        condition.lock()
        interrupted = true
        condition.broadcast()
        condition.unlock()
    }

    private func takeLocked(_ max: Int) -> [Completion] {
        let n = Swift.min(max, entries.count - head)
        guard n > 0 else { return [] }
        let out = Array(entries[head..<head + n])
        head += n
        // Compact once the consumed prefix dominates, keeping pushes amortised O(1).
        if head > 1024 && head * 2 > entries.count {
            entries.removeFirst(head)
            head = 0
        }
        return out
    }
}
