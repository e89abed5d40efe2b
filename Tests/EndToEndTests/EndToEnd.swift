import Foundation
import PloverCheck
@testable import PloverTesting
import Testing

/// Every suite that runs real replica processes, one at a time.
///
/// Their tests block (sleeps, sockets, waiting for processes), so each body runs on a thread of
/// its own (`onCluster`): run inline, it would hold one of the few threads (one per core) that
/// run every other test's asynchronous work, and starve tests that wait on timers meanwhile.
/// The body reports through `Checks`, recorded as the test's issues once it returns.
@Suite(.serialized) enum EndToEnd {
    /// Starts a cluster (`ClusterProcessTests.withCluster`) and runs `body` on it off the shared threads.
    static func onCluster<T: Sendable>(_ name: String, witness: Bool = false, replicas: Int = 3, extraConfig: String = "",
                                       diskStallFailpoints: Bool = false, _ body: @escaping @Sendable (DemoCluster, Checks) throws -> T) async throws -> T {
        let checks = Checks()
        defer { checks.recordIssues() }
        return try await onOwnThread {
            try ClusterProcessTests.withCluster(name, witness: witness, replicas: replicas, extraConfig: extraConfig,
                                                diskStallFailpoints: diskStallFailpoints) { try body($0, checks) }
        }
    }
}

/// Failed expectations collected on another thread, with where they failed.
final class Checks: @unchecked Sendable {
    // @unchecked Sendable: `failures` is only touched under `lock`.
    private let lock = NSLock()
    private var failures: [(String, SourceLocation)] = []

    func expect(_ ok: Bool, _ message: @autoclosure () -> String = "", sourceLocation: SourceLocation = #_sourceLocation) {
        if !ok { record("Expectation failed" + { $0.isEmpty ? "" : ": " + $0 }(message()), sourceLocation: sourceLocation) }
    }

    func record(_ message: String, sourceLocation: SourceLocation = #_sourceLocation) {
        lock.withLock { failures.append((message, sourceLocation)) }
    }

    var hasFailures: Bool { lock.withLock { !failures.isEmpty } }

    /// The first failures' messages, one line each (for a test that expects failures).
    var summary: String {
        lock.withLock { failures.prefix(3).map { String($0.0.prefix(300)) }.joined(separator: "; ") }
    }

    /// Records every collected failure as an issue of the current test.
    func recordIssues() {
        for (message, location) in lock.withLock({ failures }) { Issue.record(Comment(rawValue: message), sourceLocation: location) }
    }
}
