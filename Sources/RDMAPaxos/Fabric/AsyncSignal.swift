import Synchronization

/// A one-slot wake-up for one waiting task: `signal()` resumes the task waiting in `wait()`, or,
/// when none waits, makes the next `wait()` return at once. Signals made while one is pending
/// count as one.
final class AsyncSignal: Sendable {
    private struct State {
        var pending = false
        var waiter: CheckedContinuation<Void, Never>?
    }

    private let state = Mutex(State())

    func signal() {
        let waiter = state.withLock { s -> CheckedContinuation<Void, Never>? in
            guard let w = s.waiter else {
                s.pending = true
                return nil
            }
            s.waiter = nil
            return w
        }
        waiter?.resume()
    }

    /// Returns after a `signal()` (a pending one counts), or once the task is cancelled.
    /// One task waits at a time.
    func wait() async {
        await withTaskCancellationHandler {
            await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
                let now = state.withLock { s -> Bool in
                    if s.pending || Task.isCancelled {
                        s.pending = false
                        return true
                    }
                    precondition(s.waiter == nil, "AsyncSignal: one waiter at a time")
                    s.waiter = c
                    return false
                }
                if now { c.resume() }
            }
        } onCancel: {
            // Only a waiter already registered needs waking: a wait that starts after this sees
            // the task cancelled and returns. (A signal here could outlive the wait as a pending
            // one.)
            let waiter = state.withLock { s -> CheckedContinuation<Void, Never>? in
                defer { s.waiter = nil }
                return s.waiter
            }
            waiter?.resume()
        }
    }
}
