import Foundation

/// Runs `body` on a thread of its own and returns what it returns. For long CPU-bound or blocking
/// work in tests: run inline, it would hold one of the few threads (one per core) that run every
/// test's asynchronous work, and starve tests that wait on timers or connections meanwhile.
/// Record expectations after it returns, in the test's own context.
public func onOwnThread<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { (c: CheckedContinuation<T, any Error>) in
        let t = Thread { c.resume(with: Result { try body() }) }
        t.name = "test-work"
        t.start()
    }
}

/// What a fuzz loop found: inputs run, inputs accepted, and a description of each failure.
public struct FuzzOutcome: Sendable {
    /// Inputs run.
    public var runs = 0
    /// Inputs the code under test accepted rather than rejected.
    public var accepted = 0
    /// One description per failed check.
    public var failures: [String] = []

    /// Nothing run yet.
    public init() {}

    /// Notes a failure unless `ok`.
    public mutating func check(_ ok: Bool, _ what: @autoclosure () -> String) {
        if !ok { failures.append(what()) }
    }
}
