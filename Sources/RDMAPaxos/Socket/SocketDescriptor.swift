// rdma_cma.h (in CVerbs) includes the socket headers too, so clang may attribute constants such
// as SOCK_STREAM and IPPROTO_TCP to either module; importing both finds them in every build order.
import CVerbs
import Foundation
import Glibc

/// Why a socket call failed: the operation, the address it was about and the system's reason.
package struct SocketFailure: Error, Equatable, Sendable, CustomStringConvertible {
    /// What was being done, e.g. "connect to", "listen on", "read from".
    package var operation: String
    /// The address or peer, e.g. "127.0.0.1:7000" or a Unix socket's path.
    package var peer: String
    /// The errno value (`ETIMEDOUT` for a timeout, `ECONNRESET` for a peer gone mid-message).
    package var errno: Int32

    package init(_ operation: String, _ peer: String, errno: Int32) {
        self.operation = operation
        self.peer = peer
        self.errno = errno
    }

    package var description: String { "\(operation) \(peer): \(String(cString: strerror(errno)))" }
}

/// A blocking stream socket (TCP or Unix-domain) as the project's plain-socket code uses it: the
/// one place that calls socket, bind, listen, connect and accept. A value type over the
/// descriptor in the style of swift-system's `FileDescriptor`: copying it does not duplicate the
/// socket, and `close()` is explicit. Every error names the address.
package struct SocketDescriptor: Hashable, Sendable {
    /// The file descriptor.
    package let rawValue: Int32
    /// The address it is connected to or listening on, for errors.
    package let peer: String

    package init(rawValue: Int32, peer: String) {
        self.rawValue = rawValue
        self.peer = peer
    }

    // MARK: Opening

    /// Connects over TCP to `address`, Nagle off. A name that resolves to several addresses
    /// (`localhost` to ::1 and 127.0.0.1) is tried at each in turn; the error is the last one's.
    /// With `timeout`, each connect, send and receive gives up after it (`ETIMEDOUT`/`EAGAIN`/
    /// `EINPROGRESS` in the error; on Linux SO_SNDTIMEO bounds connect).
    package static func connect(to address: HostPort, timeout: Duration? = nil) throws(SocketFailure) -> SocketDescriptor {
        let name = address.description
        let fd = try withAddress(address, passive: false) { first throws(SocketFailure) -> Int32 in
            var failure = SocketFailure("connect to", name, errno: EADDRNOTAVAIL)
            var next: UnsafeMutablePointer<addrinfo>? = first
            while let ai = next {
                next = ai.pointee.ai_next
                let fd = socket(ai.pointee.ai_family, ai.pointee.ai_socktype | Int32(SOCK_CLOEXEC.rawValue), ai.pointee.ai_protocol)
                guard fd >= 0 else {
                    failure = SocketFailure("socket for", name, errno: errno)
                    continue
                }
                if let timeout { SocketDescriptor(rawValue: fd, peer: name).setTimeouts(timeout) }
                if Glibc.connect(fd, ai.pointee.ai_addr, ai.pointee.ai_addrlen) == 0 { return fd }
                failure = SocketFailure("connect to", name, errno: errno)
                Glibc.close(fd)
            }
            throw failure
        }
        let s = SocketDescriptor(rawValue: fd, peer: name)
        s.setNoDelay()
        return s
    }

    /// Listens on TCP `address` (port 0: any free port, see `localPort`; errors then name the
    /// port it got), with SO_REUSEADDR.
    package static func listen(on address: HostPort, backlog: Int32 = 128) throws(SocketFailure) -> SocketDescriptor {
        let name = address.description
        let fd = try withAddress(address, passive: true) { ai throws(SocketFailure) -> Int32 in
            let fd = socket(ai.pointee.ai_family, ai.pointee.ai_socktype | Int32(SOCK_CLOEXEC.rawValue), ai.pointee.ai_protocol)
            guard fd >= 0 else { throw SocketFailure("socket for", name, errno: errno) }
            var one: Int32 = 1
            setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
            guard bind(fd, ai.pointee.ai_addr, ai.pointee.ai_addrlen) == 0, Glibc.listen(fd, backlog) == 0 else {
                let e = errno
                Glibc.close(fd)
                throw SocketFailure("listen on", name, errno: e)
            }
            return fd
        }
        let s = SocketDescriptor(rawValue: fd, peer: name)
        // Errors about it and its clients name the port it got, not port 0.
        guard address.port == 0 else { return s }
        return SocketDescriptor(rawValue: fd, peer: HostPort(host: address.host, port: s.localPort).description)
    }

    /// Connects to the Unix-domain stream socket at `path`.
    package static func connect(unixPath path: String) throws(SocketFailure) -> SocketDescriptor {
        var a = try unixAddress(path)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw SocketFailure("socket for", path, errno: errno) }
        let r = withUnsafePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
        guard r == 0 else {
            let e = errno
            Glibc.close(fd)
            throw SocketFailure("connect to", path, errno: e)
        }
        return SocketDescriptor(rawValue: fd, peer: path)
    }

    /// Listens on a Unix-domain stream socket at `path` (a stale socket file there is removed).
    package static func listen(unixPath path: String, backlog: Int32 = 8) throws(SocketFailure) -> SocketDescriptor {
        var a = try unixAddress(path)
        unlink(path)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw SocketFailure("socket for", path, errno: errno) }
        let r = withUnsafePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
        guard r == 0, Glibc.listen(fd, backlog) == 0 else {
            let e = errno
            Glibc.close(fd)
            throw SocketFailure("listen on", path, errno: e)
        }
        return SocketDescriptor(rawValue: fd, peer: path)
    }

    /// Accepts one connection; with `timeout`, throws `ETIMEDOUT` when none came. Interrupted
    /// and aborted accepts are retried.
    package func accept(timeout: Duration? = nil) throws(SocketFailure) -> SocketDescriptor {
        if let timeout, !waitReadable(timeout) { throw SocketFailure("no connection within \(timeout) on", peer, errno: ETIMEDOUT) }
        while true {
            let c = Glibc.accept(rawValue, nil, nil)
            if c >= 0 { return SocketDescriptor(rawValue: c, peer: "a client of \(peer)") }
            if errno == EINTR || errno == ECONNABORTED { continue }
            throw SocketFailure("accept on", peer, errno: errno)
        }
    }

    // MARK: Using

    /// The local port (a listener opened on port 0 learns its port here); 0 when unknown.
    package var localPort: Int {
        var storage = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let ok = withUnsafeMutablePointer(to: &storage) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(rawValue, $0, &len) == 0 } }
        guard ok else { return 0 }
        return withUnsafePointer(to: &storage) { p in
            if Int32(p.pointee.ss_family) == AF_INET6 {
                return p.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { Int(UInt16(bigEndian: $0.pointee.sin6_port)) }
            }
            return p.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { Int(UInt16(bigEndian: $0.pointee.sin_port)) }
        }
    }

    /// Sends every byte (retrying short and interrupted sends; never raises SIGPIPE).
    package func send(_ bytes: [UInt8]) throws(SocketFailure) {
        try bytes.withUnsafeBytes { b in Result { () throws(SocketFailure) in try send(b) } }.get()
    }

    /// Sends every byte of `buffer`.
    package func send(_ buffer: UnsafeRawBufferPointer) throws(SocketFailure) {
        var done = 0
        while done < buffer.count {
            let n = Glibc.send(rawValue, buffer.baseAddress! + done, buffer.count - done, Int32(MSG_NOSIGNAL))
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { throw SocketFailure("send to", peer, errno: n == 0 ? EPIPE : errno) }
            done += n
        }
    }

    /// Receives up to `buffer.count` bytes; 0 when the peer closed. Interrupted reads are retried.
    package func receive(into buffer: UnsafeMutableRawBufferPointer) throws(SocketFailure) -> Int {
        while true {
            let n = recv(rawValue, buffer.baseAddress, buffer.count, 0)
            if n >= 0 { return n }
            if errno == EINTR { continue }
            throw SocketFailure("receive from", peer, errno: errno)
        }
    }

    /// Receives what is there, up to `count` bytes (waiting for at least one); empty when the
    /// peer closed.
    package func receive(upTo count: Int) throws(SocketFailure) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        let n = try out.withUnsafeMutableBytes { b in Result { () throws(SocketFailure) in try receive(into: b) } }.get()
        out.removeLast(count - n)
        return out
    }

    /// Receives exactly `count` bytes; nil when the peer closed before the first byte, an error
    /// (`ECONNRESET`) when it closed in the middle.
    package func receive(exactly count: Int) throws(SocketFailure) -> [UInt8]? {
        try receiveExactly(count, until: nil)
    }

    /// Receives exactly `count` bytes unless `deadline` passes first (then `ETIMEDOUT`); nil
    /// when the peer closed before the first byte, `ECONNRESET` when it closed in the middle.
    package func receive(exactly count: Int, until deadline: ContinuousClock.Instant) throws(SocketFailure) -> [UInt8]? {
        try receiveExactly(count, until: deadline)
    }

    private func receiveExactly(_ count: Int, until deadline: ContinuousClock.Instant?) throws(SocketFailure) -> [UInt8]? {
        var out = [UInt8](repeating: 0, count: count)
        var got = 0
        while got < count {
            if let deadline, !(try waitReadable(until: deadline)) {
                throw SocketFailure("no \(count)-byte message before the deadline from", peer, errno: ETIMEDOUT)
            }
            let n = try out.withUnsafeMutableBytes { b in
                Result { () throws(SocketFailure) in try receive(into: UnsafeMutableRawBufferPointer(rebasing: b[got...])) }
            }.get()
            if n == 0 {
                if got == 0 { return nil }
                throw SocketFailure("receive from", peer, errno: ECONNRESET)
            }
            got += n
        }
        return out
    }

    /// Receives what is there, up to `count` bytes, unless `deadline` passes before anything
    /// comes (then `ETIMEDOUT`); empty when the peer closed.
    package func receive(upTo count: Int, until deadline: ContinuousClock.Instant) throws(SocketFailure) -> [UInt8] {
        guard try waitReadable(until: deadline) else { throw SocketFailure("nothing before the deadline from", peer, errno: ETIMEDOUT) }
        return try receive(upTo: count)
    }

    /// Whether something can be read (or the peer closed) within `timeout`.
    package func waitReadable(_ timeout: Duration) -> Bool {
        (try? waitReadable(until: .now + timeout)) ?? true
    }

    /// Whether something can be read (or the peer closed) before `deadline`; a failed poll (a
    /// descriptor that is not open) is an error.
    package func waitReadable(until deadline: ContinuousClock.Instant) throws(SocketFailure) -> Bool {
        try waitReadable(orRung: nil, until: deadline).readable
    }

    /// The wrapper's one poll loop: waits until the descriptor is readable (or the peer closed),
    /// `wakeFD` (when given) is readable, or `deadline` passes; says which of the two were ready.
    /// A failed poll (a descriptor that is not open) is an error.
    func waitReadable(orRung wakeFD: Int32?, until deadline: ContinuousClock.Instant) throws(SocketFailure) -> (readable: Bool, rung: Bool) {
        var fds = (pollfd(fd: rawValue, events: Int16(POLLIN), revents: 0),
                   pollfd(fd: wakeFD ?? -1, events: Int16(POLLIN), revents: 0))
        let count: nfds_t = wakeFD == nil ? 1 : 2
        while true {
            // Polled at least once (a deadline already past asks "readable now?"); the wait is
            // rounded up, so the last fraction of a millisecond is waited for rather than spun.
            let left = deadline - .now
            let wait = left > .zero ? Int32(clamping: left.wholeMilliseconds + 1) : 0
            let r = withUnsafeMutablePointer(to: &fds) { $0.withMemoryRebound(to: pollfd.self, capacity: 2) { poll($0, count, wait) } }
            if r < 0 && errno == EINTR { continue }
            if r < 0 { throw SocketFailure("wait for data from", peer, errno: errno) }
            if r > 0 {
                if fds.0.revents & Int16(POLLNVAL) != 0 { throw SocketFailure("wait for data from", peer, errno: EBADF) }
                return (fds.0.revents != 0, fds.1.revents != 0)
            }
            if left <= .zero { return (false, false) }
        }
    }

    /// Turns Nagle's algorithm off (small requests that wait for their answer).
    package func setNoDelay() {
        var one: Int32 = 1
        setsockopt(rawValue, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
    }

    /// Send and receive timeouts.
    package func setTimeouts(_ timeout: Duration) {
        setSendTimeout(timeout)
        setReceiveTimeout(timeout)
    }

    /// A send (and, before the socket is connected, a connect) gives up after `timeout`.
    package func setSendTimeout(_ timeout: Duration) {
        var tv = timeout.timeval
        setsockopt(rawValue, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    /// A receive gives up after `timeout` (`EAGAIN`).
    package func setReceiveTimeout(_ timeout: Duration) {
        var tv = timeout.timeval
        setsockopt(rawValue, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    /// Shuts both directions down (a thread blocked in receive or accept returns).
    package func shutdown() { _ = Glibc.shutdown(rawValue, Int32(SHUT_RDWR)) }

    /// Half-closes the socket: the peer reads end of stream after what was sent, and can still
    /// answer.
    package func shutdownSending() { _ = Glibc.shutdown(rawValue, Int32(SHUT_WR)) }

    /// Closes the descriptor.
    package func close() { _ = Glibc.close(rawValue) }

    // MARK: Addresses

    private static func withAddress<T>(_ address: HostPort, passive: Bool,
                                       _ body: (UnsafeMutablePointer<addrinfo>) throws(SocketFailure) -> T) throws(SocketFailure) -> T {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = AI_NUMERICSERV | (passive ? AI_PASSIVE : 0)
        var res: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(address.host, String(address.port), &hints, &res)
        guard rc == 0, let ai = res else {
            throw SocketFailure("resolve", "\(address) (\(String(cString: gai_strerror(rc))))", errno: EINVAL)
        }
        defer { freeaddrinfo(res) }
        return try body(ai)
    }

    private static func unixAddress(_ path: String) throws(SocketFailure) -> sockaddr_un {
        var a = sockaddr_un()
        a.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: a.sun_path) else {
            throw SocketFailure("use as a Unix socket path (too long)", path, errno: ENAMETOOLONG)
        }
        withUnsafeMutableBytes(of: &a.sun_path) { p in
            for (i, b) in bytes.enumerated() { p[i] = b }
        }
        return a
    }
}
