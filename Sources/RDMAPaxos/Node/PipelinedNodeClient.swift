import Foundation
import Synchronization

/// An async client for the client protocol that keeps many requests in flight on one TCP
/// connection: each request is written as soon as it is made (with the others made while a
/// write was under way, in one write), and answers are matched by id in
/// whatever order the node sends them. Many tasks may call it at once; the node batches their
/// proposals as it batches those of many connections. It follows the leader by the rules of
/// `NodeClient` (the same answer handling, the same pauses once every member was tried).
///
/// A request in flight when its connection fails, or unanswered after `timeout`, fails: a
/// proposal with `NodeClient.Failure.outcomeUnknown` (it may have taken effect), a read is tried
/// again. Connecting blocks the calling task for at most `timeout`; cancelling a task does not
/// withdraw its request.
public final class PipelinedNodeClient: Sendable {
    /// Client addresses by node id ("host:port").
    public let endpoints: [NodeID: String]
    /// How long a request waits for its answer, and a connect for the node.
    public let timeout: Duration
    /// Runs the tasks that prefer it on the thread that reads the connection, so an answer
    /// resumes its task without a thread hand-off (`PipelinedClientExecutor`; such tasks must not
    /// block).
    public let executor = PipelinedClientExecutor()
    private let addresses: [NodeID: HostPort]
    private let ids: [NodeID]

    private struct State {
        var session: PipelinedSession?
        var nextID: UInt64 = 1
    }
    private let state = Mutex(State())

    /// A client of the cluster at `endpoints` (at least one); connects on first use.
    public init(endpoints: [NodeID: String], timeout: Duration = .seconds(5)) {
        precondition(!endpoints.isEmpty, "a client needs at least one endpoint")
        self.endpoints = endpoints
        addresses = endpoints.compactMapValues { HostPort(parsing: $0) }
        ids = endpoints.keys.sorted()
        self.timeout = timeout
    }

    deinit { close() }

    /// Proposes a command through the leader; returns the state machine's result. Retried
    /// elsewhere only while it certainly did not take effect, as `NodeClient.propose` is.
    public func propose(_ command: [UInt8], attempts: Int = 20) async throws -> [UInt8] {
        try await call(attempts: attempts, idempotent: false) { .propose(id: $0, command: command) }
    }

    /// A linearizable read through the leader (retried wherever it failed: reads change nothing).
    public func read(_ query: [UInt8], attempts: Int = 20) async throws -> [UInt8] {
        try await call(attempts: attempts, idempotent: true) { .read(id: $0, query: query) }
    }

    /// The node this client's connection goes to, if it has one.
    public var current: NodeID? { state.withLock { $0.session.flatMap { $0.isOpen ? $0.node : nil } } }

    /// Closes the connection once the requests in flight are answered; a later request connects
    /// again.
    public func close() {
        let open = state.withLock { s in
            defer { s.session = nil }
            executor.follow(nil)
            return s.session
        }
        open?.retire()
    }

    private func call(attempts: Int, idempotent: Bool, _ make: (UInt64) -> ClientFrame) async throws -> [UInt8] {
        var target = current ?? ids[0]
        var last = "no attempt made"
        for attempt in 0..<attempts {
            let session: PipelinedSession
            do { session = try self.session(to: target) } catch {
                last = "\(error)"
                target = try await next(after: target, attempt: attempt)
                continue
            }
            let id = state.withLock { s in defer { s.nextID += 1 }; return s.nextID }
            let answer: ClientFrame
            do {
                answer = try await session.request(make(id), id: id, deadline: .now + timeout)
            } catch let lost as PipelinedSession.Lost {
                last = lost.description
                drop(session)
                if lost.sent && !idempotent {
                    throw NodeClient.Failure(description: "\(lost); the command may or may not have taken effect", outcomeUnknown: true)
                }
                target = try await next(after: target, attempt: attempt)
                continue
            }
            switch try answer.clientStep(request: id, from: target, idempotent: idempotent, endpoints: endpoints) {
            case let .done(result):
                return result
            case let .retry(hint, why):
                last = why
                drop(session)
                if let hint { target = hint } else { target = try await next(after: target, attempt: attempt) }
            }
        }
        throw NodeClient.Failure(description: "no leader answered after \(attempts) attempts; last: \(last)")
    }

    /// The open session to `node`, connecting when there is none (the old one is retired).
    private func session(to node: NodeID) throws -> PipelinedSession {
        try state.withLock { s throws -> PipelinedSession in
            if let open = s.session, open.node == node, open.isOpen { return open }
            guard let address = endpoints[node] else { throw NodeClient.Failure(description: "node \(node) has no client address") }
            guard let hp = addresses[node] else { throw NodeClient.Failure(description: "node \(node): bad client address \(address)") }
            s.session?.retire()
            s.session = nil
            // The executor follows whatever this leaves in place: the new session, or none.
            defer { executor.follow(s.session) }
            do { s.session = try PipelinedSession(node: node, address: hp, timeout: timeout, executor: executor) } catch {
                throw NodeClient.Failure(description: "node \(node): \(error)")
            }
            return s.session!
        }
    }

    /// Stops using `session` for new requests (others' requests on it still get their answers).
    private func drop(_ session: PipelinedSession) {
        let mine = state.withLock { s in
            guard s.session === session else { return false }
            s.session = nil
            executor.follow(nil)
            return true
        }
        if mine { session.retire() }
    }

    /// The member after `node`, pausing first once every member was tried.
    private func next(after node: NodeID, attempt: Int) async throws -> NodeID {
        if let pause = NodeClient.retryPause(attempt: attempt, members: ids.count) { try await Task.sleep(for: pause) }
        return ids[((ids.firstIndex(of: node) ?? 0) + 1) % ids.count]
    }
}
