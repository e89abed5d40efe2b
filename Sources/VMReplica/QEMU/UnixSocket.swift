// Small blocking functions over Unix-domain and TCP stream sockets, shared by the QMP client, the
// guest NIC stream and the client front. Each names the address in its errors.

#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// A socket operation failed: which operation, on what address, and errno's text.
public struct SocketError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The operation that failed, as words ("connect to", "listen on", ...).
    public var operation: String
    /// The address it was about: a socket path or "host:port".
    public var address: String
    /// The errno the operation left.
    public var errno: Int32
    public var description: String { "\(operation) \(address): \(String(cString: strerror(errno)))" }
}

enum Sockets {
    static func unixAddress(_ path: String) throws -> sockaddr_un {
        var a = sockaddr_un()
        a.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: a.sun_path) else {
            throw SocketError(operation: "unix socket path too long:", address: path, errno: ENAMETOOLONG)
        }
        withUnsafeMutableBytes(of: &a.sun_path) { p in
            for (i, b) in bytes.enumerated() { p[i] = b }
        }
        return a
    }

    /// Listens on a Unix-domain socket at `path` (an old socket file there is removed first).
    static func listenUnix(_ path: String) throws -> Int32 {
        unlink(path)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw SocketError(operation: "socket", address: path, errno: errno) }
        var a = try unixAddress(path)
        let r = withUnsafePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
        guard r == 0, listen(fd, 8) == 0 else {
            let e = errno
            close(fd)
            throw SocketError(operation: "listen on", address: path, errno: e)
        }
        return fd
    }

    static func connectUnix(_ path: String) throws -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw SocketError(operation: "socket", address: path, errno: errno) }
        var a = try unixAddress(path)
        let r = withUnsafePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
        guard r == 0 else {
            let e = errno
            close(fd)
            throw SocketError(operation: "connect to", address: path, errno: e)
        }
        return fd
    }

    /// Listens on TCP `host:port` (IPv4 dotted quad). Returns the descriptor and the bound port.
    static func listenTCP(host: String, port: Int) throws -> (fd: Int32, port: Int) {
        let name = "\(host):\(port)"
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw SocketError(operation: "socket", address: name, errno: errno) }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var a = try ipv4Address(host: host, port: port, closingOnError: fd)
        let r = withUnsafePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        guard r == 0, listen(fd, 64) == 0 else {
            let e = errno
            close(fd)
            throw SocketError(operation: "listen on", address: name, errno: e)
        }
        var bound = sockaddr_in()
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &bound) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
        return (fd, Int(UInt16(bigEndian: bound.sin_port)))
    }

    /// `host:port` (IPv4 dotted quad) as a socket address; closes `fd` when `host` is not one.
    private static func ipv4Address(host: String, port: Int, closingOnError fd: Int32) throws -> sockaddr_in {
        var a = sockaddr_in()
        a.sin_family = sa_family_t(AF_INET)
        a.sin_port = in_port_t(UInt16(port).bigEndian)
        guard inet_pton(AF_INET, host, &a.sin_addr) == 1 else {
            close(fd)
            throw SocketError(operation: "parse IPv4 address", address: "\(host):\(port)", errno: EINVAL)
        }
        return a
    }

    /// Connects to TCP `host:port` (IPv4 dotted quad).
    static func connectTCP(host: String, port: Int) throws -> Int32 {
        let name = "\(host):\(port)"
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw SocketError(operation: "socket", address: name, errno: errno) }
        var a = try ipv4Address(host: host, port: port, closingOnError: fd)
        let r = withUnsafePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        guard r == 0 else {
            let e = errno
            close(fd)
            throw SocketError(operation: "connect to", address: name, errno: e)
        }
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        return fd
    }

    /// Waits up to `timeout` for a connection on a listening socket.
    static func accept(_ fd: Int32, timeout: Duration, what: String) throws -> Int32 {
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        let ms = Int32(clamping: timeout.wholeMilliseconds)
        guard poll(&p, 1, ms) == 1 else { throw SocketError(operation: "no connection within \(timeout) on", address: what, errno: ETIMEDOUT) }
        let c = Glibc.accept(fd, nil, nil)
        guard c >= 0 else { throw SocketError(operation: "accept on", address: what, errno: errno) }
        return c
    }

    /// Writes all of `bytes`; false once the peer is gone.
    @discardableResult
    /// Accepts connections on `listener` on a thread named `name` until the listener is shut
    /// down (then closes it), serving each on a thread of its own; `serve` owns the descriptor
    /// and closes it.
    static func serve(_ listener: Int32, name: String, _ serve: @escaping @Sendable (Int32) -> Void) {
        let t = Thread {
            while true {
                let fd = Glibc.accept(listener, nil, nil)
                if fd < 0 {
                    if errno == EINTR || errno == ECONNABORTED { continue }
                    break
                }
                let c = Thread { serve(fd) }
                c.name = name + "-conn"
                c.start()
            }
            close(listener)
        }
        t.name = name
        t.start()
    }

    static func writeAll(_ fd: Int32, _ bytes: [UInt8]) -> Bool {
        var off = 0
        while off < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + off, bytes.count - off, Int32(MSG_NOSIGNAL)) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { return false }
            off += n
        }
        return true
    }

    /// Reads exactly `count` bytes; nil at end of stream or on error.
    static func readExactly(_ fd: Int32, _ count: Int) -> [UInt8]? {
        var buf = [UInt8](repeating: 0, count: count)
        var off = 0
        while off < count {
            let n = buf.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress! + off, count - off) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { return nil }
            off += n
        }
        return buf
    }

    /// How a read with a deadline ended.
    enum TimedRead: Equatable {
        case bytes([UInt8])
        /// End of stream before `count` bytes.
        case closed
        case timedOut
        case failed(Int32)
    }

    /// Reads exactly `count` bytes unless `deadline` passes first.
    static func readExactly(_ fd: Int32, _ count: Int, deadline: ContinuousClock.Instant) -> TimedRead {
        var buf = [UInt8](repeating: 0, count: count)
        var off = 0
        while off < count {
            let left = deadline - ContinuousClock.now
            guard left > .zero else { return .timedOut }
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let ms = Int32(clamping: left.wholeMilliseconds + 1)
            let ready = poll(&p, 1, ms)
            if ready < 0 && errno == EINTR { continue }
            if ready < 0 { return .failed(errno) }
            if ready == 0 { continue }
            let n = buf.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress! + off, count - off) }
            if n < 0 && errno == EINTR { continue }
            if n < 0 { return .failed(errno) }
            if n == 0 { return .closed }
            off += n
        }
        return .bytes(buf)
    }
}

/// Splits "host:port"; nil when it has no numeric port.
func splitHostPort(_ s: String) -> (host: String, port: Int)? {
    guard let colon = s.lastIndex(of: ":"), let p = Int(s[s.index(after: colon)...]), (0...65535).contains(p) else { return nil }
    return (String(s[..<colon]), p)
}
