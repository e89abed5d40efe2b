// rdma_cma.h (in CVerbs) includes the socket headers too, so clang may attribute constants such
// as SOCK_STREAM and IPPROTO_TCP to either module; importing both finds them in every build order.
import CVerbs
import Foundation
import Glibc

/// A blocking TCP connection as the command-line clients use it: `host` resolved (IPv4 or IPv6),
/// send and receive timeouts of `timeout` on the socket, and Nagle off (requests are small and
/// wait for their answer). Returns the connected descriptor; the caller closes it. The error
/// text names the address and the system's reason.
package func connectBlockingTCP(host: String, port: Int, timeout: Duration) throws(BlockingTCPError) -> Int32 {
    var hints = addrinfo()
    hints.ai_family = AF_UNSPEC
    hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
    var res: UnsafeMutablePointer<addrinfo>?
    guard getaddrinfo(host, String(port), &hints, &res) == 0, let ai = res else {
        throw BlockingTCPError(description: "cannot resolve \(host):\(port)")
    }
    defer { freeaddrinfo(res) }
    let s = socket(ai.pointee.ai_family, ai.pointee.ai_socktype, ai.pointee.ai_protocol)
    guard s >= 0 else { throw BlockingTCPError(description: "socket: \(String(cString: strerror(errno)))") }
    var tv = timeout.timeval
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    var one: Int32 = 1
    setsockopt(s, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
    guard Glibc.connect(s, ai.pointee.ai_addr, ai.pointee.ai_addrlen) == 0 else {
        let why = String(cString: strerror(errno))
        close(s)
        throw BlockingTCPError(description: "cannot connect to \(host):\(port): \(why)")
    }
    return s
}

/// Why `connectBlockingTCP` failed.
package struct BlockingTCPError: Error, CustomStringConvertible {
    package var description: String
}
