import Foundation

/// The floor for any request/response over loopback: a fixed-size ping-pong between two threads
/// of this process over one TCP connection on 127.0.0.1 (blocking sockets, TCP_NODELAY).
enum LoopbackRoundTrip {
    static func measure(messageBytes: Int = 64, seconds: Double = 2, warmupRounds: Int = 1000) throws -> LatencySummary {
        let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard listener >= 0 else { throw CLIError("socket: \(String(cString: strerror(errno)))") }
        defer { close(listener) }
        var a = sockaddr_in()
        a.sin_family = sa_family_t(AF_INET)
        a.sin_addr.s_addr = inet_addr("127.0.0.1")
        a.sin_port = 0  // the kernel picks a free port
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &a) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(listener, $0, len) == 0 && listen(listener, 1) == 0 && getsockname(listener, $0, &len) == 0
            }
        }
        guard bound else { throw CLIError("loopback listener: \(String(cString: strerror(errno)))") }

        // The echo side: read a message, send it back, until the peer closes.
        let echoDone = DispatchSemaphore(value: 0)
        Thread {
            let s = accept(listener, nil, nil)
            if s >= 0 {
                noDelay(s)
                var buf = [UInt8](repeating: 0, count: messageBytes)
                while exchange(s, &buf, receiveFirst: true) {}
                close(s)
            }
            echoDone.signal()
        }.start()

        let c = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard c >= 0 else { throw CLIError("socket: \(String(cString: strerror(errno)))") }
        noDelay(c)
        let connected = withUnsafePointer(to: &a) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(c, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 }
        }
        guard connected else {
            close(c)
            throw CLIError("loopback connect: \(String(cString: strerror(errno)))")
        }
        var buf = [UInt8](repeating: 0x5A, count: messageBytes)
        var samples: [UInt64] = []
        samples.reserveCapacity(1 << 16)
        for _ in 0..<warmupRounds { _ = exchange(c, &buf, receiveFirst: false) }
        let end = ClosedLoopLoad.now() + UInt64(seconds * 1e9)
        while true {
            let t0 = ClosedLoopLoad.now()
            if t0 >= end { break }
            guard exchange(c, &buf, receiveFirst: false) else { break }
            samples.append(ClosedLoopLoad.now() - t0)
        }
        close(c)
        echoDone.wait()
        guard !samples.isEmpty else { throw CLIError("loopback round trip: the echo thread went away") }
        return LatencySummary(nanoseconds: samples)
    }

    private static func noDelay(_ s: Int32) {
        var one: Int32 = 1
        setsockopt(s, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
    }

    /// Sends then receives `buf` (or receives then sends it back); false once the peer is gone.
    private static func exchange(_ s: Int32, _ buf: inout [UInt8], receiveFirst: Bool) -> Bool {
        func sendAll(_ buf: inout [UInt8]) -> Bool {
            var done = 0
            while done < buf.count {
                let n = buf[done...].withUnsafeBytes { send(s, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { return false }
                done += n
            }
            return true
        }
        func receiveAll(_ buf: inout [UInt8]) -> Bool {
            var got = 0
            while got < buf.count {
                let n = buf[got...].withUnsafeMutableBytes { recv(s, $0.baseAddress, $0.count, 0) }
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { return false }
                got += n
            }
            return true
        }
        return receiveFirst ? receiveAll(&buf) && sendAll(&buf) : sendAll(&buf) && receiveAll(&buf)
    }
}
