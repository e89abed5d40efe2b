import Foundation
import Logging
import Synchronization
import Testing
import VerbsTestSupport
@testable import RDMAPaxos

#if canImport(Glibc)
import Glibc
#endif

/// The fabrics the shared suites (conformance, rings, clusters over rings) run against.
enum FabricKind: String, CaseIterable, Sendable, CustomTestStringConvertible {
    case memory, tcp
    /// `VerbsFabric` over the software RDMA device, connected out of band, waiting for completion
    /// events (the default `poll`).
    case verbs
    /// The same, busy-polling its completion queue (`poll = .busy`).
    case verbsBusy = "verbs-busy"
    /// `VerbsFabric` on a real device, connected out of band / with rdma_cm (`make test-rdma`).
    case verbsHardware = "verbs-hardware"
    case verbsHardwareCM = "verbs-hardware-rdma_cm"

    /// The hardware kinds only where `ibv_get_device_list` finds a device (and, for rdma_cm, where
    /// `PLOVER_RDMA_ADDRESS` names an IPv4 address of its interface).
    static var allCases: [FabricKind] { [.memory, .tcp, .verbs, .verbsBusy] + RDMAHardware.kinds }
    var testDescription: String { rawValue }

    /// Whether a reader sees each write land all at once: the software fabrics copy under the
    /// region's lock; a NIC, and the software RDMA device, land bytes while the owner reads (a
    /// reader may catch a record half-landed: the rings' checksums are there for that).
    var landsAtomically: Bool { self == .memory || self == .tcp }
}

/// The RDMA device the hardware cases run on, if this machine has one (docs/design/fabric.md,
/// "Verbs under test"). `PLOVER_RDMA_DEVICE` picks a device; `PLOVER_RDMA_ADDRESS` enables rdma_cm.
enum RDMAHardware {
    static let devices: Result<[String], VerbsError> = Result { () throws(VerbsError) in try VerbsProbe.deviceNames() }
    static var present: Bool { (try? devices.get()) != nil }
    static let deviceName = ProcessInfo.processInfo.environment["PLOVER_RDMA_DEVICE"]
    static let connectionManagerAddress = ProcessInfo.processInfo.environment["PLOVER_RDMA_ADDRESS"]
    static var kinds: [FabricKind] {
        present ? [.verbsHardware] + (connectionManagerAddress == nil ? [] : [.verbsHardwareCM]) : []
    }
    /// Why the hardware cases do not run here.
    static var absence: String {
        switch devices {
        case .success: "an RDMA device is present"
        case let .failure(e): "\(e.message); the hardware cases (verbs-hardware) are skipped"
        }
    }
}

let testClusterKey = Array("plover test cluster key, 32 byte".utf8)
let testMembers: Set<NodeID> = [1, 2, 3]

/// Fabric endpoints of one kind that can reach each other.
final class FabricWorld: Sendable {
    let kind: FabricKind
    let network = MemoryNetwork()
    /// The software RDMA device's subnet (`.verbs` only), made on first use.
    private let subnet = Mutex<SoftSubnet?>(nil)
    let softLedger = SoftVerbsLedger()
    init(_ kind: FabricKind) { self.kind = kind }

    /// The shared suites run the software device with a random read delay of up to this long, so
    /// a staging slot the fabric reused before its write completed would send the wrong bytes.
    static let softReadDelayMicroseconds: UInt32 = 50

    func softVerbs(ethernet: Bool = false, readDelayMicroseconds: UInt32 = FabricWorld.softReadDelayMicroseconds) throws -> SoftVerbs {
        let subnet = try self.subnet.withLock { s in
            if let s { return s }
            let fresh = try SoftSubnet()
            s = fresh
            return fresh
        }
        return SoftVerbs(subnet: subnet, ethernet: ethernet, ledger: softLedger, readDelayMicroseconds: readDelayMicroseconds)
    }

    func fabric(_ node: NodeID, key: [UInt8] = testClusterKey, members: Set<NodeID> = testMembers,
                outstandingWritesMax: Int = 1024) throws -> any Fabric {
        func verbs(_ connection: VerbsFabric.Configuration.Connection) -> VerbsFabric.Configuration {
            .init(clusterKey: key, deviceName: RDMAHardware.deviceName, connection: connection, members: members,
                  outstandingWritesMax: outstandingWritesMax)
        }
        return switch kind {
        case .memory: MemoryFabric(node: node, network: network, outstandingWritesMax: outstandingWritesMax)
        case .tcp: try TCPFabric(node: node, configuration: .init(clusterKey: key, members: members,
                                                                  outstandingWritesMax: outstandingWritesMax,
                                                                  handshakeTimeout: .seconds(3)))
        case .verbs, .verbsBusy:
            try VerbsFabric(node: node, configuration: .init(clusterKey: key, connection: .outOfBand, members: members,
                                                             outstandingWritesMax: outstandingWritesMax,
                                                             poll: kind == .verbsBusy ? .busy : .event),
                            driver: try softVerbs())
        case .verbsHardware: try VerbsFabric(node: node, configuration: verbs(.outOfBand))
        case .verbsHardwareCM: try VerbsFabric(node: node, configuration: verbs(.connectionManager))
        }
    }

    func listenAddress(_ node: NodeID) -> PeerAddress {
        PeerAddress(node: node, host: kind == .verbsHardwareCM ? RDMAHardware.connectionManagerAddress ?? "127.0.0.1" : "127.0.0.1", port: 0)
    }
}

/// Node 1 connected to node 2, each with a registered and exported region.
struct FabricPair {
    var a: any Fabric
    var b: any Fabric
    var regionA: MemoryRegion
    var regionB: MemoryRegion
    var addressB: PeerAddress
    var qp: any QueuePair

    static func make(_ world: FabricWorld, regionBytes: Int = 4096) async throws -> FabricPair {
        let a = try world.fabric(1), b = try world.fabric(2)
        let ra = try a.registerRegion(lengthBytes: regionBytes), rb = try b.registerRegion(lengthBytes: regionBytes)
        _ = try await a.listen(at: world.listenAddress(1), exporting: ra)
        let addressB = try await b.listen(at: world.listenAddress(2), exporting: rb)
        let qp = try await a.connect(to: addressB, exporting: ra)
        return FabricPair(a: a, b: b, regionA: ra, regionB: rb, addressB: addressB, qp: qp)
    }

    func reconnect() async throws -> any QueuePair { try await a.connect(to: addressB, exporting: regionA) }

    func close() { a.close(); b.close() }
}

/// Tells two ring transports where the other listens and starts both (`b` hands what it
/// receives to `receivedByB`); the caller stops them.
func introduceAndStart(_ a: RingTransport, _ b: RingTransport,
                       receivedByB: @escaping @Sendable (Message) -> Void = { _ in }) throws {
    a.setAddress(b.listeningAddress)
    b.setAddress(a.listeningAddress)
    try a.start { _ in }
    do { try b.start(onReceive: receivedByB) } catch {
        a.stop()  // no transport left running behind a failed set-up
        throw error
    }
}

/// Collects completions until `count` arrived or a generous deadline passed (a failure, not a timing claim).
func collect(_ cq: CompletionQueue, count: Int, deadline: Duration = .seconds(10)) -> [Completion] {
    var out: [Completion] = []
    let end = ContinuousClock.now + deadline
    while out.count < count, ContinuousClock.now < end {
        out += cq.wait(max: count - out.count, timeout: .milliseconds(50))
    }
    return out
}

/// Polls `condition` until it holds or a generous deadline passes; returns whether it held.
func eventually(_ deadline: Duration = .seconds(10), _ condition: () -> Bool) async -> Bool {
    let end = ContinuousClock.now + deadline
    while ContinuousClock.now < end {
        if condition() { return true }
        try? await Task.sleep(for: .milliseconds(2))
    }
    return condition()
}

/// Messages delivered to one node, in delivery order.
final class Inbox: Sendable {
    private let messages = Mutex<[Message]>([])
    func append(_ m: Message) { messages.withLock { $0.append(m) } }
    var all: [Message] { messages.withLock { $0 } }
    var count: Int { messages.withLock { $0.count } }
}

/// A blocking TCP client for speaking the fabric's wire format by hand (replays, forgeries, garbage).
final class RawClient {
    private let socket: SocketDescriptor
    /// Set when a read gave up after the receive timeout rather than at end of stream.
    private(set) var timedOut = false

    init(port: Int) throws {
        do { socket = try SocketDescriptor.connect(to: HostPort(host: "127.0.0.1", port: port)) } catch {
            throw CommandError("\(error)")
        }
        socket.setReceiveTimeout(.seconds(5))
    }

    deinit { socket.close() }

    func send(_ bytes: [UInt8]) { _ = try? socket.send(bytes) }

    /// Half-closes the connection: the server sees end of stream after what was sent.
    func finishSending() { socket.shutdownSending() }

    func read(_ n: Int) -> [UInt8]? {
        var out: [UInt8] = []
        while out.count < n {
            guard let chunk = try? socket.receive(upTo: n - out.count) else {
                timedOut = true
                return nil
            }
            if chunk.isEmpty { return nil }
            out += chunk
        }
        return out
    }

    /// The next frame (type, body), or nil when the server closed the connection.
    func readFrame() -> (type: UInt8, body: [UInt8])? {
        guard let len = read(4) else { return nil }
        let n = Int(len.reduce(UInt32(0)) { $0 << 8 | UInt32($1) })
        guard n >= 1, let rest = read(n) else { return nil }
        return (rest[0], Array(rest[1...]))
    }

    /// True when the server closed the connection (EOF before any further frame).
    func closedByServer() -> Bool {
        while readFrame() != nil {}
        return !timedOut
    }

    static func frame(_ type: UInt8, _ body: [UInt8]) -> [UInt8] {
        var w = ByteWriter()
        w.u32(UInt32(body.count + 1)); w.u8(type); w.raw(body)
        return w.bytes
    }
}

/// A `LogHandler` that keeps every message, for tests that check what a component logged (a
/// refused peer must be named in the log).
struct CapturedLog: LogHandler {
    final class Lines: Sendable {
        private let lines = Mutex<[String]>([])
        func append(_ line: String) { lines.withLock { $0.append(line) } }
        var all: [String] { lines.withLock { $0 } }
        func contains(_ fragment: String) -> Bool { all.contains { $0.contains(fragment) } }
    }

    let lines = Lines()
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .trace

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        lines.append("\(event.level) \(event.message)")
    }

    /// A logger writing here, and the lines it wrote.
    static func logger() -> (Logger, Lines) {
        let handler = CapturedLog()
        return (Logger(label: "test") { _ in handler }, handler.lines)
    }
}
