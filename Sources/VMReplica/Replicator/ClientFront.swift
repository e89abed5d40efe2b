// The client-facing side of a VM replica, for tests and demos: a TCP port where each line a
// client sends becomes one UDP datagram to the guest's service, proposed to the input log,
// and every guest answer the output guard releases is sent to every connected client as a
// line. Clients match answers to their requests by content (the guest echoes an id).

#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// A line-based TCP front. `onLine` is called on the connection's thread for each line (without
/// the newline); it answers errors through the reply closure it is given.
public final class ClientFront: @unchecked Sendable {
    // @unchecked Sendable: `connections` and `stopped` are only touched under `lock`.
    /// The TCP port the front listens on (the bound one when `address` asked for port 0).
    public let port: Int
    private let listener: Int32
    private let lock = NSLock()
    private var connections: [Int32] = []
    private var stopped = false
    private let onLine: @Sendable (_ line: [UInt8], _ reply: @escaping @Sendable (String) -> Void) -> Void

    /// Lines longer than this close the connection (a datagram must fit one Ethernet frame).
    public static let lineBytesMax = 1400

    /// Listens at `address` (IPv4 host:port) and accepts clients on a thread of its own. Throws
    /// `SocketError` when the address does not parse or cannot be listened on.
    public init(address: String, onLine: @escaping @Sendable ([UInt8], @escaping @Sendable (String) -> Void) -> Void) throws {
        guard let (host, port) = splitHostPort(address) else {
            throw SocketError(operation: "parse front address", address: address, errno: EINVAL)
        }
        (listener, self.port) = try Sockets.listenTCP(host: host, port: port)
        self.onLine = onLine
        let t = Thread { [self] in acceptLoop() }
        t.name = "plover-vm-front"
        t.start()
    }

    /// A client that cannot take a line within this long (its socket buffer stays full) is cut
    /// off; it reconnects and resends what it has no answer for.
    public static let sendTimeout = Duration.seconds(2)

    /// Sends `bytes` to every connected client. Writes happen under the lock that also guards
    /// closing a connection, so a line never goes to a descriptor number the kernel has since
    /// handed to something else.
    public func broadcast(_ bytes: [UInt8]) {
        lock.withLock {
            for fd in connections where !Sockets.writeAll(fd, bytes) { shutdown(fd, Int32(SHUT_RDWR)) }
        }
    }

    /// Writes `bytes` to one connection if it is still open.
    private func send(_ bytes: [UInt8], to fd: Int32) {
        lock.withLock {
            guard connections.contains(fd) else { return }
            if !Sockets.writeAll(fd, bytes) { shutdown(fd, Int32(SHUT_RDWR)) }
        }
    }

    /// Stops accepting clients and shuts every connection down.
    public func stop() {
        lock.withLock {
            stopped = true
            for fd in connections { shutdown(fd, Int32(SHUT_RDWR)) }
        }
        shutdown(listener, Int32(SHUT_RDWR))
    }

    private func acceptLoop() {
        while true {
            let fd = accept(listener, nil, nil)
            if fd < 0 {
                if errno == EINTR || errno == ECONNABORTED { continue }
                break
            }
            var one: Int32 = 1
            setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
            var limit = timeval(tv_sec: Int(Self.sendTimeout.components.seconds), tv_usec: 0)
            setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &limit, socklen_t(MemoryLayout<timeval>.size))
            let ok = lock.withLock { () -> Bool in
                guard !stopped else { return false }
                connections.append(fd)
                return true
            }
            guard ok else { close(fd); break }
            let t = Thread { [self] in serve(fd) }
            t.name = "plover-vm-front-conn"
            t.start()
        }
        close(listener)
    }

    private func serve(_ fd: Int32) {
        var pending: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        let reply: @Sendable (String) -> Void = { [self] in send(Array(($0 + "\n").utf8), to: fd) }
        loop: while true {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress!, 4096) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { break }
            pending += chunk[..<n]
            while let nl = pending.firstIndex(of: 10) {
                let line = Array(pending[..<nl])
                pending.removeSubrange(...nl)
                if !line.isEmpty { onLine(line, reply) }
            }
            if pending.count > Self.lineBytesMax {
                reply("ERR line longer than \(Self.lineBytesMax) bytes")
                break loop
            }
        }
        lock.withLock {
            connections.removeAll { $0 == fd }
            close(fd)
        }
    }
}
