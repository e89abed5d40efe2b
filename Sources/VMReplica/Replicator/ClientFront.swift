// The client-facing side of a VM replica, for tests and demos: a TCP port where each line a
// client sends becomes one UDP datagram to the guest's service, proposed to the input log.
// Each connection has a UDP source port of its own, so a guest answer the output guard releases
// goes to the connection whose request it answers (the guest replies to the source port), and
// to no other client.

#if canImport(Glibc)
import Glibc
#endif
import Foundation
import RDMAPaxos

/// A line-based TCP front. `onLine` is called on the connection's thread for each line (without
/// the newline); it answers errors through the reply closure it is given.
public final class ClientFront: @unchecked Sendable {
    // @unchecked Sendable: `connections`, `ports`, `nextPort` and `stopped` are only touched under `lock`.
    /// The TCP port the front listens on (the bound one when `address` asked for port 0).
    public let port: Int
    private let listener: SocketDescriptor
    private let lock = NSLock()
    /// Open connections and the UDP source port each one's requests carry.
    private var connections: [Int32: UInt16] = [:]
    private var ports: [UInt16: Int32] = [:]
    private let portRange: Range<UInt16>
    private var nextPort: UInt16
    private var stopped = false
    /// Answers that reached no connection (the one that asked had gone).
    public private(set) var undeliverable = 0
    private let onLine: @Sendable (_ line: [UInt8], _ sourcePort: UInt16, _ reply: @escaping @Sendable (String) -> Void) -> Void

    /// Lines longer than this close the connection (a datagram must fit one Ethernet frame).
    public static let lineBytesMax = 1400

    /// Listens at `address` (IPv4 host:port) and accepts clients on a thread of its own. Throws
    /// `SocketError` when the address does not parse or cannot be listened on.
    /// Each connection gets a UDP source port from `sourcePorts` (a connection beyond that many
    /// is refused with an error line).
    public init(address: String, sourcePorts: Range<UInt16>,
                onLine: @escaping @Sendable ([UInt8], UInt16, @escaping @Sendable (String) -> Void) -> Void) throws {
        guard let parsed = HostPort(parsing: address, allowingPortZero: true) else {
            throw SocketError(operation: "parse front address", address: address, errno: EINVAL)
        }
        precondition(!sourcePorts.isEmpty, "a front needs at least one source port")
        listener = try Sockets.listenTCP(parsed)
        port = listener.localPort
        self.onLine = onLine
        self.portRange = sourcePorts
        self.nextPort = sourcePorts.lowerBound
        let t = Thread(named: "plover-vm-front") { [self] in acceptLoop() }
        t.start()
    }

    /// A client that cannot take a line within this long (its socket buffer stays full) is cut
    /// off; it reconnects and resends what it has no answer for.
    public static let sendTimeout = Duration.seconds(2)

    /// Sends `answer` to the connection whose requests carry its port, if that one is still
    /// open. Writes happen under the lock that also guards closing a connection, so a line never
    /// goes to a descriptor number the kernel has since handed to something else.
    public func deliver(_ answer: GuestAnswer) {
        lock.withLock {
            guard let fd = ports[answer.port] else { undeliverable += 1; return }
            if !Sockets.writeAll(fd, answer.payload) { shutdown(fd, Int32(SHUT_RDWR)) }
        }
    }

    /// Writes `bytes` to one connection if it is still open.
    private func send(_ bytes: [UInt8], to fd: Int32) {
        lock.withLock {
            guard connections[fd] != nil else { return }
            if !Sockets.writeAll(fd, bytes) { shutdown(fd, Int32(SHUT_RDWR)) }
        }
    }

    /// A free source port, or nil when every port of the range is in use. Called under `lock`.
    private func allocatePort() -> UInt16? {
        for _ in 0..<portRange.count {
            let p = nextPort
            nextPort = nextPort + 1 == portRange.upperBound ? portRange.lowerBound : nextPort + 1
            if ports[p] == nil { return p }
        }
        return nil
    }

    /// Stops accepting clients and shuts every connection down.
    public func stop() {
        lock.withLock {
            stopped = true
            for fd in connections.keys { shutdown(fd, Int32(SHUT_RDWR)) }
        }
        listener.shutdown()
    }

    private func acceptLoop() {
        while let client = try? listener.accept() {
            client.setNoDelay()
            client.setSendTimeout(Self.sendTimeout)
            let fd = client.rawValue
            let admitted = lock.withLock { () -> UInt16?? in
                guard !stopped else { return .none }
                guard let p = allocatePort() else { return .some(nil) }
                connections[fd] = p
                ports[p] = fd
                return .some(p)
            }
            guard let admitted else { client.close(); break }
            guard let sourcePort = admitted else {
                _ = Sockets.writeAll(fd, Array("ERR too many connections: this front serves at most \(portRange.count)\n".utf8))
                client.close()
                continue
            }
            let t = Thread(named: "vm-front-conn") { [self] in serve(client, sourcePort: sourcePort) }
            t.start()
        }
        listener.close()
    }

    private func serve(_ client: SocketDescriptor, sourcePort: UInt16) {
        let fd = client.rawValue
        var pending: [UInt8] = []
        let reply: @Sendable (String) -> Void = { [self] in send(Array(($0 + "\n").utf8), to: fd) }
        loop: while let chunk = try? client.receive(upTo: 4096), !chunk.isEmpty {
            pending += chunk
            while let nl = pending.firstIndex(of: 10) {
                let line = Array(pending[..<nl])
                pending.removeSubrange(...nl)
                if !line.isEmpty { onLine(line, sourcePort, reply) }
            }
            if pending.count > Self.lineBytesMax {
                reply("ERR line longer than \(Self.lineBytesMax) bytes")
                break loop
            }
        }
        lock.withLock {
            if let p = connections.removeValue(forKey: fd) { ports[p] = nil }
            client.close()
        }
    }
}
