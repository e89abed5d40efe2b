// Small blocking functions over Unix-domain and TCP stream sockets, shared by the QMP client, the
// guest NIC stream and the client front. Each names the address in its errors.

#if canImport(Glibc)
import Glibc
#endif
import Foundation
import RDMAPaxos

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

/// The VM replica's blocking socket calls on raw descriptors (the QMP client, the NIC stream,
/// the front, the control sockets), carried out by RDMAPaxos's one socket wrapper,
/// `SocketDescriptor`, whose failures become `SocketError`s.
enum Sockets {
    private static func mapped<T>(_ body: () throws(SocketFailure) -> T) throws(SocketError) -> T {
        do { return try body() } catch { throw SocketError(operation: error.operation, address: error.peer, errno: error.errno) }
    }

    /// Listens on a Unix-domain socket at `path` (an old socket file there is removed first).
    static func listenUnix(_ path: String) throws -> Int32 {
        try mapped { () throws(SocketFailure) in try SocketDescriptor.listen(unixPath: path).rawValue }
    }

    /// Connects to the Unix-domain socket at `path`.
    static func connectUnix(_ path: String) throws -> Int32 {
        try mapped { () throws(SocketFailure) in try SocketDescriptor.connect(unixPath: path).rawValue }
    }

    /// Listens on TCP `address` (port 0: any; the bound port is the result's `localPort`).
    static func listenTCP(_ address: HostPort) throws -> SocketDescriptor {
        try mapped { () throws(SocketFailure) in try SocketDescriptor.listen(on: address, backlog: 64) }
    }

    /// Connects to TCP `host` and `port`, Nagle off.
    static func connectTCP(host: String, port: Int) throws -> Int32 {
        try mapped { () throws(SocketFailure) in try SocketDescriptor.connect(to: HostPort(host: host, port: port)).rawValue }
    }

    /// Waits up to `timeout` for a connection on a listening socket.
    static func accept(_ fd: Int32, timeout: Duration, what: String) throws -> Int32 {
        try mapped { () throws(SocketFailure) in try SocketDescriptor(rawValue: fd, peer: what).accept(timeout: timeout).rawValue }
    }

    /// Accepts connections on `listener` on a thread named `name` until the listener is shut
    /// down (then closes it), serving each on a thread of its own; `serve` owns the descriptor
    /// and closes it.
    static func serve(_ listener: Int32, name: String, _ serve: @escaping @Sendable (Int32) -> Void) {
        let t = Thread(named: name) {
            let l = SocketDescriptor(rawValue: listener, peer: name)
            while let c = try? l.accept() {
                let conn = Thread(named: name + "-conn") { serve(c.rawValue) }
                conn.start()
            }
            l.close()
        }
        t.start()
    }

    /// Writes all of `bytes`; false once the peer is gone.
    @discardableResult
    static func writeAll(_ fd: Int32, _ bytes: [UInt8]) -> Bool {
        (try? SocketDescriptor(rawValue: fd, peer: "").send(bytes)) != nil
    }

    /// Reads exactly `count` bytes; nil at end of stream or on error.
    static func readExactly(_ fd: Int32, _ count: Int) -> [UInt8]? {
        (try? SocketDescriptor(rawValue: fd, peer: "").receive(exactly: count)) ?? nil
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
        do {
            guard let bytes = try SocketDescriptor(rawValue: fd, peer: "").receive(exactly: count, until: deadline) else { return .closed }
            return .bytes(bytes)
        } catch {
            switch error.errno {
            case ETIMEDOUT: return .timedOut
            // The wrapper's word for a stream that ended in the middle of the message.
            case ECONNRESET: return .closed
            default: return .failed(error.errno)
            }
        }
    }
}
