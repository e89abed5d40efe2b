import CVerbs
import Foundation
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// How a `VerbsFabric` connects queue pairs: `ConnectionManager` (rdma_cm) or `OutOfBandConnector`.
/// Both hand over the same region descriptor (`VerbsFabric.privateData`).
protocol VerbsConnector: AnyObject, Sendable {
    /// Starts accepting queue pairs; returns the bound port.
    func listen(fabric: VerbsFabric, host: String, port: Int) throws(VerbsError) -> Int
    /// Connects a queue pair to `peer`, offering `descriptor`; calls `done` once, on any thread.
    func connect(fabric: VerbsFabric, to peer: PeerAddress, descriptor: [UInt8], timeout: Duration,
                 done: @escaping @Sendable (Result<VerbsQueuePair, any Error>) -> Void)
    /// The connector's event thread; returns soon after `stop()`.
    func run(fabric: VerbsFabric)
    func stop()
}

/// Connects queue pairs without rdma_cm, the way many RDMA programs do: the two ends trade QP
/// number, first PSN, LID/GID, MTU and region descriptor over TCP, and each moves its own queue
/// pair INIT → RTR → RTS. Both ends first prove the cluster key, with the TCP fabric's kind of
/// HMAC challenge (`OutOfBandDialer`, `OutOfBandAnswerer`): the acceptor creates its queue pair
/// only for a connector that proved it, and the connector moves its own past INIT only for an
/// acceptor that did. The acceptor reaches RTS before it answers, so the connector's first write
/// always finds it ready. The TCP connection then stays open as the queue pair's liveness signal:
/// when it ends (the peer closed its fabric, died, or its queue pair entered the error state) this
/// end's queue pair moves to ERROR — what rdma_cm's DISCONNECTED event does on the other path.
/// Works on hardware and on the tests' software device alike.
///
/// The event thread answers one connection at a time, waiting at most `connectTimeout` for each
/// message.
final class OutOfBandConnector: VerbsConnector, Sendable {
    private struct State {
        var listener: Int32 = -1
        /// The side-channel socket of every established queue pair.
        var watched: [Int32: VerbsQueuePair] = [:]
        var stopped = false
    }
    private let state = Mutex(State())
    /// Rung when the listener or the watched sockets change, and by `stop()`.
    private let wake: WakePipe

    init() throws(VerbsError) {
        do { wake = try WakePipe() } catch {
            throw VerbsError(operation: "pipe", code: error.errno, message: "the out-of-band connector cannot open its wake-up pipe: \(error)")
        }
    }

    func stop() {
        state.withLock { $0.stopped = true }
        wake.ring()
    }

    func listen(fabric: VerbsFabric, host: String, port: Int) throws(VerbsError) -> Int {
        let listener: SocketDescriptor
        do { listener = try SocketDescriptor.listen(on: HostPort(host: host, port: port), backlog: 16) } catch {
            throw VerbsError(operation: "listen", code: error.errno, message: "out-of-band listener: \(error)")
        }
        let previous = state.withLock { s in defer { s.listener = listener.rawValue }; return s.listener }
        if previous >= 0 { close(previous) }
        wake.ring()
        return listener.localPort
    }

    func connect(fabric: VerbsFabric, to peer: PeerAddress, descriptor: [UInt8], timeout: Duration,
                 done: @escaping @Sendable (Result<VerbsQueuePair, any Error>) -> Void) {
        let thread = Thread(named: "verbs-connect") { [self] in
            do {
                done(.success(try dial(fabric, peer, descriptor, timeout)))
            } catch {
                done(.failure(FabricError.connectFailed(peer: peer.node, reason: "\(error)")))
            }
        }
        thread.start()
    }

    /// The connector's half: create and initialize a queue pair, prove the key both ways, trade
    /// endpoints, connect it.
    private func dial(_ fabric: VerbsFabric, _ peer: PeerAddress, _ descriptor: [UInt8], _ timeout: Duration) throws(VerbsError) -> VerbsQueuePair {
        let qp = try fabric.makeQueuePair(peer: peer.node, inboundFrom: nil)
        let fd: Int32
        do { fd = try Self.dialTCP(host: peer.host, port: peer.port, timeout: timeout) } catch { qp.moveToError(); throw error }
        do {
            var dialer = OutOfBandDialer(key: fabric.configuration.clusterKey, me: fabric.localNode, peer: peer.node)
            try Self.send(fd, dialer.hello.encoded())
            let request: OutOfBandMessage
            do {
                request = try dialer.respond(to: try Self.receiveMessage(fd), endpoint: qp.endpoint, descriptor: descriptor)
            } catch let refusal as VerbsPeerRefusal where refusal.reason == .badMAC {
                // Tell the acceptor why this end hangs up, so its log names the cause too.
                try? Self.send(fd, OutOfBandMessage.reject(.badMAC).encoded())
                throw refusal
            }
            try Self.send(fd, request.encoded())
            let (endpoint, region) = try dialer.accepted(try Self.receiveMessage(fd))
            try qp.connect(to: endpoint, region: region)
        } catch {
            close(fd)
            qp.moveToError()
            if let refusal = error as? VerbsPeerRefusal {
                fabric.noteRefused()
                fabric.logger.warning("out-of-band connection to node \(peer.node) at \(peer.host):\(peer.port) refused: \(refusal)")
                throw VerbsError(operation: "out-of-band exchange", code: EACCES,
                                 message: "node \(peer.node) at \(peer.host):\(peer.port): \(refusal)")
            }
            throw error as? VerbsError ?? VerbsError(operation: "out-of-band exchange", code: EIO, message: "\(error)")
        }
        watch(fd, qp)
        return qp
    }

    /// The acceptor's half, on the event thread. Every refusal is logged with the connector's
    /// address and claimed node, and sent to it; no queue pair exists before the key is proven.
    private func answer(_ fabric: VerbsFabric, _ fd: Int32) {
        SocketDescriptor(rawValue: fd, peer: "an out-of-band connector").setTimeouts(fabric.configuration.connectTimeout)
        let from = Self.peerName(fd)  // now: a refused connector may be gone by the time it is logged
        var answerer = OutOfBandAnswerer(key: fabric.configuration.clusterKey, me: fabric.localNode,
                                         members: fabric.configuration.members)
        var qp: VerbsQueuePair?
        do {
            let challenge = try answerer.challenge(try Self.receiveMessage(fd), replays: fabric.replays)
            try Self.send(fd, challenge.encoded())
            let (peer, endpoint, region) = try answerer.verify(try Self.receiveMessage(fd))
            guard let exported = fabric.exportedDescriptor() else { throw VerbsPeerRefusal(.notReady, claimed: peer) }
            let created = try fabric.makeQueuePair(peer: peer, inboundFrom: peer)
            qp = created
            try created.connect(to: endpoint, region: region)
            try Self.send(fd, answerer.accept(endpoint: created.endpoint, descriptor: exported).encoded())
            fabric.logger.info("accepted a queue pair from node \(peer) (\(from), out of band)")
            watch(fd, created)
        } catch {
            // Read once, outside the log calls' autoclosures (capturing `answerer` there crashed
            // the release compiler's ownership verifier, Swift 6.3.1).
            let claimed = answerer.claimed
            if let refusal = error as? VerbsPeerRefusal {
                fabric.noteRefused()
                try? Self.send(fd, OutOfBandMessage.reject(refusal.reason).encoded())
                let who = (refusal.claimed ?? claimed).map(String.init) ?? "?"
                fabric.logger.warning("refused an out-of-band connection from \(from) claiming node \(who): \(refusal)")
            } else {
                let who = claimed.map(String.init) ?? "?"
                fabric.logger.warning("out-of-band connection from \(from) claiming node \(who) failed: \(error)")
            }
            close(fd)
            if let qp {
                qp.moveToError()
                fabric.forget(qp)
            }
        }
    }

    private func watch(_ fd: Int32, _ qp: VerbsQueuePair) {
        let stopped = state.withLock { s in
            if !s.stopped { s.watched[fd] = qp }
            return s.stopped
        }
        if stopped {
            close(fd)
            qp.moveToError()
        } else {
            wake.ring()
        }
    }

    /// The side channel of `fd` ended, or its queue pair broke: end both.
    private func drop(_ fabric: VerbsFabric, _ fd: Int32) {
        guard let qp = state.withLock({ $0.watched.removeValue(forKey: fd) }) else { return }
        close(fd)
        qp.moveToError()
        fabric.forget(qp)
    }

    func run(fabric: VerbsFabric) {
        while true {
            let (listener, watched, stopped) = state.withLock { ($0.listener, $0.watched, $0.stopped) }
            if stopped { break }
            let sockets = Array(watched.keys)
            var fds = [pollfd(fd: wake.readFD, events: Int16(POLLIN), revents: 0),
                       pollfd(fd: listener, events: Int16(POLLIN), revents: 0)]  // poll ignores a negative fd
            fds += sockets.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
            _ = poll(&fds, nfds_t(fds.count), 100)
            wake.drain()
            if listener >= 0, fds[1].revents != 0 {
                if let c = try? SocketDescriptor(rawValue: listener, peer: "the out-of-band listener").accept() { answer(fabric, c.rawValue) }
            }
            // Nothing is ever sent after the exchange: readable means closed (or a broken peer).
            for (i, fd) in sockets.enumerated() where fds[2 + i].revents != 0 || watched[fd]?.isUsable == false {
                drop(fabric, fd)
            }
        }
        let (listener, watched) = state.withLock { s in
            defer { s.listener = -1; s.watched = [:] }
            return (s.listener, s.watched)
        }
        if listener >= 0 { close(listener) }
        for (fd, qp) in watched {
            qp.moveToError()
            close(fd)
        }
    }

    // MARK: blocking socket I/O with timeouts (two small messages per connection)

    private static func dialTCP(host: String, port: Int, timeout: Duration) throws(VerbsError) -> Int32 {
        do { return try SocketDescriptor.connect(to: HostPort(host: host, port: port), timeout: timeout).rawValue } catch {
            throw VerbsError(operation: "connect", code: error.errno,
                             message: "cannot reach \(host):\(port) for the out-of-band exchange (\(VerbsError.explain(error.errno)))")
        }
    }

    private static func send(_ fd: Int32, _ bytes: [UInt8]) throws(VerbsError) {
        do { try SocketDescriptor(rawValue: fd, peer: "the out-of-band peer").send(bytes) } catch {
            throw VerbsError(operation: "send", code: error.errno, message: "out-of-band exchange: send failed (\(VerbsError.explain(error.errno)))")
        }
    }

    /// One whole message: the header, then the body its kind sizes. Throws a `VerbsPeerRefusal`
    /// for bytes that are not this protocol's, a `VerbsError` when the connection ends or times out.
    private static func receiveMessage(_ fd: Int32) throws -> OutOfBandMessage {
        let header = try receive(fd, count: OutOfBandMessage.headerBytes)
        let kind = try OutOfBandMessage.kind(ofHeader: header)
        return try OutOfBandMessage.decode(header + (try receive(fd, count: OutOfBandMessage.bodyBytes(kind: kind)!)))
    }

    private static func receive(_ fd: Int32, count: Int) throws(VerbsError) -> [UInt8] {
        let got: [UInt8]?
        do { got = try SocketDescriptor(rawValue: fd, peer: "the out-of-band peer").receive(exactly: count) } catch {
            if error.errno == ECONNRESET { throw VerbsError(operation: "recv", code: ECONNRESET, message: "the peer ended the out-of-band exchange") }
            throw VerbsError(operation: "recv", code: error.errno,
                             message: error.errno == EAGAIN ? "out-of-band exchange timed out" : "out-of-band exchange: recv failed (\(VerbsError.explain(error.errno)))")
        }
        guard let got else { throw VerbsError(operation: "recv", code: ECONNRESET, message: "the peer ended the out-of-band exchange") }
        return got
    }

    /// "a.b.c.d:port" of the other end of `fd`, for the log.
    private static func peerName(_ fd: Int32) -> String {
        var sin = sockaddr_in()
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let rc = withUnsafeMutablePointer(to: &sin) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getpeername(fd, $0, &length) } }
        guard rc == 0 else { return "?" }
        var text = [CChar](repeating: 0, count: Int(INET_ADDRSTRLEN))
        inet_ntop(AF_INET, &sin.sin_addr, &text, socklen_t(text.count))
        return "\(String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)):\(UInt16(bigEndian: sin.sin_port))"
    }
}
