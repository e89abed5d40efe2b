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

/// The one message each way of the out-of-band exchange: 68 bytes, big-endian.
///
/// | offset | bytes | field |
/// | --- | --- | --- |
/// | 0 | 4 | "PLVQ" |
/// | 4 | 2 | version (1) |
/// | 6 | 1 | kind: 1 request (connector), 2 accept (acceptor) |
/// | 7 | 1 | link layer: 0 InfiniBand, 1 Ethernet (RoCE) |
/// | 8 | 4 | sender's node id |
/// | 12 | 4 | receiver's node id |
/// | 16 | 4 | sender's QP number |
/// | 20 | 4 | sender's first PSN |
/// | 24 | 2 | sender's LID |
/// | 26 | 1 | sender's active MTU (`ibv_mtu`) |
/// | 27 | 1 | zero |
/// | 28 | 16 | sender's GID |
/// | 44 | 24 | region descriptor: u32 node, u64 base, u32 rkey, u64 length |
struct OutOfBandHello: Hashable, Sendable {
    enum Kind: UInt8, Sendable { case request = 1, accept = 2 }
    static let magic = Array("PLVQ".utf8)
    static let version: UInt16 = 1
    static let bytes = 68

    var kind: Kind
    var from: NodeID
    var to: NodeID
    var endpoint: VerbsEndpoint
    /// The sender's exported region (`VerbsFabric.privateData`).
    var descriptor: [UInt8]

    func encoded() -> [UInt8] {
        var w = ByteWriter(capacity: Self.bytes)
        w.raw(Self.magic)
        w.u16(Self.version)
        w.u8(kind.rawValue)
        w.u8(endpoint.port.ethernet ? 1 : 0)
        w.u32(from)
        w.u32(to)
        w.u32(endpoint.queuePair)
        w.u32(endpoint.psn)
        w.u16(endpoint.port.lid)
        w.u8(UInt8(truncatingIfNeeded: endpoint.port.mtu))
        w.u8(0)
        w.raw(Array((endpoint.port.gid + [UInt8](repeating: 0, count: 16)).prefix(16)))
        w.raw(descriptor)
        return w.bytes
    }

    /// Nil unless `bytes` is exactly one well-formed message.
    static func decode(_ bytes: [UInt8]) -> OutOfBandHello? {
        guard bytes.count == Self.bytes else { return nil }
        var r = ByteReader(bytes, what: "out-of-band hello")
        guard let magic = try? r.raw(4), magic == Self.magic, (try? r.u16()) == Self.version,
              let kind = (try? r.u8()).flatMap(Kind.init(rawValue:)), let linkLayer = try? r.u8(), linkLayer <= 1,
              let from = try? r.u32(), let to = try? r.u32(), let qpn = try? r.u32(), qpn <= 0xFF_FFFF,
              let psn = try? r.u32(), psn <= 0xFF_FFFF, let lid = try? r.u16(),
              let mtu = try? r.u8(), (1...5).contains(mtu), (try? r.u8()) == 0,
              let gid = try? r.raw(16), let descriptor = try? r.raw(24)
        else { return nil }
        let port = VerbsPortAddress(lid: lid, gid: gid, ethernet: linkLayer == 1, mtu: UInt32(mtu))
        return OutOfBandHello(kind: kind, from: from, to: to, endpoint: VerbsEndpoint(queuePair: qpn, psn: psn, port: port),
                              descriptor: descriptor)
    }
}

/// Connects queue pairs without rdma_cm, the way many RDMA programs do: the two ends trade QP
/// number, first PSN, LID/GID, MTU and region descriptor over TCP, and each moves its own queue
/// pair INIT → RTR → RTS. The acceptor reaches RTS before it answers, so the connector's first
/// write always finds it ready. The TCP connection then stays open as the queue pair's liveness
/// signal: when it ends (the peer closed its fabric, died, or its queue pair entered the error
/// state) this end's queue pair moves to ERROR — what rdma_cm's DISCONNECTED event does on the
/// other path. Works on hardware and on the tests' software device alike.
///
/// Like rdma_cm's private data, the exchange is not authenticated: a host that can reach the port
/// and names a member can learn the exported region's key. The event thread answers one request at
/// a time, waiting at most `connectTimeout` for each.
final class OutOfBandConnector: VerbsConnector, @unchecked Sendable {
    // `@unchecked Sendable`: the wake pipe's descriptors are written once; the rest is in `state`.
    private struct State {
        var listener: Int32 = -1
        /// The side-channel socket of every established queue pair.
        var watched: [Int32: VerbsQueuePair] = [:]
        var stopped = false
    }
    private let state = Mutex(State())
    private let wakeRead: Int32
    private let wakeWrite: Int32

    init() throws(VerbsError) {
        var fds: [Int32] = [-1, -1]
        try Verbs.check(pipe(&fds), "pipe")
        for fd in fds { _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) }
        wakeRead = fds[0]
        wakeWrite = fds[1]
    }

    deinit {
        close(wakeRead)
        close(wakeWrite)
    }

    func stop() {
        state.withLock { $0.stopped = true }
        wake()
    }

    private func wake() {
        var b: UInt8 = 1
        _ = write(wakeWrite, &b, 1)
    }

    func listen(fabric: VerbsFabric, host: String, port: Int) throws(VerbsError) -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        try Verbs.check(Int32(fd < 0 ? -1 : 0), "socket")
        do throws(VerbsError) {
            var one: Int32 = 1
            setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
            try Verbs.check(try Verbs.withIPv4Address(host: host, port: port) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) },
                            "bind \(host):\(port)")
            try Verbs.check(Glibc.listen(fd, 16), "listen")
            var sin = sockaddr_in()
            var length = socklen_t(MemoryLayout<sockaddr_in>.size)
            try Verbs.check(withUnsafeMutablePointer(to: &sin) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) } },
                            "getsockname")
            let previous = state.withLock { s in defer { s.listener = fd }; return s.listener }
            if previous >= 0 { close(previous) }
            wake()
            return Int(UInt16(bigEndian: sin.sin_port))
        } catch {
            close(fd)
            throw error
        }
    }

    func connect(fabric: VerbsFabric, to peer: PeerAddress, descriptor: [UInt8], timeout: Duration,
                 done: @escaping @Sendable (Result<VerbsQueuePair, any Error>) -> Void) {
        let thread = Thread { [self] in
            do {
                done(.success(try dial(fabric, peer, descriptor, timeout)))
            } catch {
                done(.failure(FabricError.connectFailed(peer: peer.node, reason: "\(error)")))
            }
        }
        thread.name = "plover-verbs-connect"
        thread.start()
    }

    /// The connector's half: create and initialize a queue pair, trade endpoints, connect it.
    private func dial(_ fabric: VerbsFabric, _ peer: PeerAddress, _ descriptor: [UInt8], _ timeout: Duration) throws(VerbsError) -> VerbsQueuePair {
        let qp = try fabric.makeQueuePair(peer: peer.node, inboundFrom: nil)
        let fd = try Self.dialTCP(host: peer.host, port: peer.port, timeout: timeout)
        do throws(VerbsError) {
            let request = OutOfBandHello(kind: .request, from: fabric.localNode, to: peer.node, endpoint: qp.endpoint, descriptor: descriptor)
            try Self.send(fd, request.encoded())
            guard let reply = OutOfBandHello.decode(try Self.receive(fd, count: OutOfBandHello.bytes)), reply.kind == .accept,
                  reply.from == peer.node, reply.to == fabric.localNode,
                  let (node, region) = VerbsFabric.parsePrivateData(reply.descriptor), node == peer.node else {
                throw VerbsError(operation: "out-of-band exchange", code: EPROTO, message: "node \(peer.node) answered with a malformed message")
            }
            try qp.connect(to: reply.endpoint, region: region)
        } catch {
            close(fd)
            qp.moveToError()
            throw error
        }
        watch(fd, qp)
        return qp
    }

    /// The acceptor's half, on the event thread.
    private func answer(_ fabric: VerbsFabric, _ fd: Int32) {
        Self.setTimeouts(fd, fabric.configuration.connectTimeout)
        var qp: VerbsQueuePair?
        do {
            guard let request = OutOfBandHello.decode(try Self.receive(fd, count: OutOfBandHello.bytes)), request.kind == .request,
                  request.to == fabric.localNode, request.from != fabric.localNode, fabric.configuration.members.contains(request.from),
                  let (node, region) = VerbsFabric.parsePrivateData(request.descriptor), node == request.from,
                  let exported = fabric.exportedDescriptor() else {
                throw VerbsError(operation: "out-of-band exchange", code: EPROTO,
                                 message: "malformed request, unknown node, request for another node, or nothing exported yet")
            }
            let created = try fabric.makeQueuePair(peer: request.from, inboundFrom: request.from)
            qp = created
            try created.connect(to: request.endpoint, region: region)
            try Self.send(fd, OutOfBandHello(kind: .accept, from: fabric.localNode, to: request.from, endpoint: created.endpoint,
                                             descriptor: exported).encoded())
            watch(fd, created)
        } catch {
            fabric.logger.warning("refused an out-of-band connection: \(error)")
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
            wake()
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
        var scratch = [UInt8](repeating: 0, count: 64)
        while true {
            let (listener, watched, stopped) = state.withLock { ($0.listener, $0.watched, $0.stopped) }
            if stopped { break }
            let sockets = Array(watched.keys)
            var fds = [pollfd(fd: wakeRead, events: Int16(POLLIN), revents: 0),
                       pollfd(fd: listener, events: Int16(POLLIN), revents: 0)]  // poll ignores a negative fd
            fds += sockets.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
            _ = poll(&fds, nfds_t(fds.count), 100)
            while read(wakeRead, &scratch, scratch.count) > 0 {}
            if listener >= 0, fds[1].revents != 0 {
                let fd = accept(listener, nil, nil)
                if fd >= 0 { answer(fabric, fd) }
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

    private static func setTimeouts(_ fd: Int32, _ timeout: Duration) {
        let (seconds, attoseconds) = timeout.components
        var tv = timeval(tv_sec: Int(seconds), tv_usec: Int(attoseconds / 1_000_000_000_000))
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    private static func dialTCP(host: String, port: Int, timeout: Duration) throws(VerbsError) -> Int32 {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        try Verbs.check(Int32(fd < 0 ? -1 : 0), "socket")
        setTimeouts(fd, timeout)  // on Linux SO_SNDTIMEO bounds connect() too
        let rc = try Verbs.withIPv4Address(host: host, port: port) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        if rc != 0 {
            let e = errno
            close(fd)
            throw VerbsError(operation: "connect", code: e, message: "cannot reach \(host):\(port) for the out-of-band exchange (\(VerbsError.explain(e)))")
        }
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        return fd
    }

    private static func send(_ fd: Int32, _ bytes: [UInt8]) throws(VerbsError) {
        var sent = 0
        while sent < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + sent, $0.count - sent, Int32(MSG_NOSIGNAL)) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else {
                let e = errno
                throw VerbsError(operation: "send", code: e, message: "out-of-band exchange: send failed (\(VerbsError.explain(e)))")
            }
            sent += n
        }
    }

    private static func receive(_ fd: Int32, count: Int) throws(VerbsError) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        var got = 0
        while got < count {
            let n = out.withUnsafeMutableBytes { recv(fd, $0.baseAddress! + got, count - got, 0) }
            if n < 0 && errno == EINTR { continue }
            if n == 0 {
                throw VerbsError(operation: "recv", code: ECONNRESET,
                                 message: "the peer ended the out-of-band exchange (it refused: wrong node, not a member, or nothing exported)")
            }
            guard n > 0 else {
                let e = errno
                throw VerbsError(operation: "recv", code: e,
                                 message: e == EAGAIN ? "out-of-band exchange timed out" : "out-of-band exchange: recv failed (\(VerbsError.explain(e)))")
            }
            got += n
        }
        return out
    }
}
