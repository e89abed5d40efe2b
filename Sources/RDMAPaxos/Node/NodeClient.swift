import Foundation

/// A blocking client for the client protocol: one TCP connection at a time, follows the
/// leader hint in `notLeader` answers, retries on other members when one is unreachable.
/// Used by `plover kv`, `plover status`, the demo and the benchmark load generator
/// (one client per thread).
public final class NodeClient {
    /// Client addresses by node id ("host:port").
    public let endpoints: [NodeID: String]
    /// `endpoints` parsed once (an address that does not parse is left out and refused when used).
    private let addresses: [NodeID: HostPort]
    /// Send and receive timeout of each socket operation.
    public let timeout: Duration
    private var socket: SocketDescriptor?
    private var connectedTo: NodeID?
    var nextID: UInt64 = 1

    /// A client of the cluster at `endpoints` (at least one); connects on first use.
    public init(endpoints: [NodeID: String], timeout: Duration = .seconds(5)) {
        precondition(!endpoints.isEmpty, "a client needs at least one endpoint")
        self.endpoints = endpoints
        addresses = endpoints.compactMapValues { HostPort(parsing: $0) }
        self.timeout = timeout
    }

    deinit { disconnect() }

    /// Why a client call failed after trying what it could.
    public struct Failure: Error, CustomStringConvertible {
        public var description: String
        /// True when a proposal may have taken effect: it reached a node and then the connection
        /// failed, or the node answered with an error that leaves its outcome open ("timed out",
        /// a snapshot overtook it, the node stopped or its storage failed, an error this client
        /// does not know; `ClientErrorCode.leavesProposalOutcomeUnknown`). Read before retrying it.
        public var outcomeUnknown = false
    }

    /// Proposes a command through the leader; returns the state machine's result.
    ///
    /// Retries elsewhere only while the command certainly did not take effect (no connection,
    /// "not the leader", "superseded"). Once it may have reached a leader, a failure throws a
    /// `Failure` with `outcomeUnknown` instead: sending it again could apply it twice. Errors that
    /// say it did not take effect ("refused", a bad request) throw with `outcomeUnknown` false.
    public func propose(_ command: [UInt8], attempts: Int = 20) throws -> [UInt8] {
        try call(attempts: attempts, idempotent: false) { .propose(id: $0, command: command) }
    }

    /// A linearizable read through the leader (retried wherever it failed: reads change nothing).
    public func read(_ query: [UInt8], attempts: Int = 20) throws -> [UInt8] {
        try call(attempts: attempts, idempotent: true) { .read(id: $0, query: query) }
    }

    /// Reads `node`'s own state machine, whatever its role: possibly stale, never linearizable.
    public func localRead(_ query: [UInt8], at node: NodeID) throws -> [UInt8] {
        try connect(node)
        let id = nextID
        nextID += 1
        try send(.localRead(id: id, query: query))
        switch try receive() {
        case let .ok(_, result): return result
        case let .error(_, _, _, message): throw Failure(description: "node \(node): \(message)")
        default: throw Failure(description: "node \(node) sent an unexpected answer to a local read")
        }
    }

    /// The `key=value` status text of one node.
    public func status(of node: NodeID) throws -> String {
        try connect(node)
        let id = nextID
        nextID += 1
        try send(.status(id: id))
        guard case let .statusReply(_, text) = try receive() else { throw Failure(description: "node \(node) sent an unexpected answer to status") }
        return text
    }

    /// The node this client is talking to (the leader, after a successful call).
    public var current: NodeID? { connectedTo }

    func call(attempts: Int, idempotent: Bool, _ make: (UInt64) -> ClientFrame) throws -> [UInt8] {
        var target = connectedTo ?? endpoints.keys.sorted().first!
        var last = "no attempt made"
        for attempt in 0..<attempts {
            let answer: ClientFrame
            let id = nextID
            nextID += 1
            var connected = false
            do {
                try connect(target)
                connected = true
                try send(make(id))
                answer = try receive()
            } catch {
                last = "\(error)"
                disconnect()
                // Cut off after (part of) the request went out: a leader may have it.
                if connected && !idempotent {
                    throw Failure(description: "\(error); the command may or may not have taken effect", outcomeUnknown: true)
                }
                // Unreachable: try the next member below.
                target = nextEndpoint(after: target, attempt: attempt)
                continue
            }
            switch try answer.clientStep(request: id, from: target, idempotent: idempotent, endpoints: endpoints) {
            case let .done(result):
                return result
            case let .retry(hint, why):
                // Leadership is moving: follow the hint, else try the next member.
                last = why
                if let hint {
                    target = hint
                } else {
                    disconnect()
                    target = nextEndpoint(after: target, attempt: attempt)
                }
            }
        }
        throw Failure(description: "no leader answered after \(attempts) attempts; last: \(last)")
    }

    /// The member after `node`, pausing first once every member was tried (`retryPause`).
    func nextEndpoint(after node: NodeID, attempt: Int) -> NodeID {
        let ids = endpoints.keys.sorted()
        if let pause = Self.retryPause(attempt: attempt, members: ids.count) {
            Thread.sleep(forTimeInterval: pause.inSeconds)
        }
        return ids[((ids.firstIndex(of: node) ?? 0) + 1) % ids.count]
    }

    // MARK: Socket

    func connect(_ node: NodeID) throws {
        if connectedTo == node, let s = socket {
            // Reuse the connection unless the node closed it meanwhile (it restarted, or dropped
            // an idle client): a request sent into a dead connection would look lost in flight.
            if !s.waitReadable(.zero) { return }
        }
        disconnect()
        guard let address = endpoints[node] else { throw Failure(description: "node \(node) has no client address") }
        guard let hp = addresses[node] else { throw Failure(description: "node \(node): bad client address \(address)") }
        do { socket = try SocketDescriptor.connect(to: hp, timeout: timeout) } catch {
            throw Failure(description: "node \(node): \(error)")
        }
        connectedTo = node
    }

    /// Closes the connection, if any; the next request connects again.
    public func disconnect() {
        socket?.close()
        socket = nil
        connectedTo = nil
    }

    func send(_ f: ClientFrame) throws {
        guard let s = socket else { throw Failure(description: "not connected") }
        do { try s.send(f.encoded()) } catch {
            throw Failure(description: "connection to node \(connectedTo ?? 0) lost while sending: \(String(cString: strerror(error.errno)))")
        }
    }

    func receive() throws -> ClientFrame {
        let header = try readExactly(4)
        let length = header.reduce(0) { $0 << 8 | Int($1) }
        guard length <= ClientFrame.bytesMax else { throw Failure(description: "node \(connectedTo ?? 0) sent a \(length)-byte frame (limit \(ClientFrame.bytesMax))") }
        do {
            return try ClientFrame(body: try readExactly(length))
        } catch let e as DecodeError {
            throw Failure(description: "node \(connectedTo ?? 0) sent a malformed frame: \(e)")
        }
    }

    func readExactly(_ n: Int) throws -> [UInt8] {
        guard let s = socket else { throw Failure(description: "not connected") }
        let got: [UInt8]?
        do { got = try s.receive(exactly: n) } catch {
            let why = error.errno == EAGAIN ? "timed out" : String(cString: strerror(error.errno))
            throw Failure(description: "connection to node \(connectedTo ?? 0) failed: \(why)")
        }
        guard let got else { throw Failure(description: "connection to node \(connectedTo ?? 0) closed") }
        return got
    }
}
