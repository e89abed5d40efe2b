// The Fabric seam: verbs semantics (docs/design/fabric.md, "Fabric and rings").
//
// A node registers memory regions, connects queue pairs to peers (learning the peer's exported
// region's key in the connect exchange), posts one-sided WRITEs (optionally WITH_IMM) into the
// peer's region, and reaps completions from its completion queue. Three implementations share
// these semantics: `VerbsFabric` (hardware), `TCPFabric` (software over TCP) and `MemoryFabric`
// (in-process twin for tests). The consensus runtime never knows which one it has.

/// Where a peer can be reached. `MemoryFabric` uses only `node`; `TCPFabric` and `VerbsFabric`
/// use `host` and `port` and check that the peer really is `node`.
public struct PeerAddress: Hashable, Sendable, CustomStringConvertible {
    /// The node expected at this address.
    public var node: NodeID
    /// Host name or IP address; unused by `MemoryFabric`.
    public var host: String
    /// TCP or RDMA CM port; 0 asks `listen` to pick one.
    public var port: Int

    /// An address for `node`, on the loopback interface with port 0 by default.
    public init(node: NodeID, host: String = "127.0.0.1", port: Int = 0) {
        self.node = node
        self.host = host
        self.port = port
    }

    public var description: String { "node \(node) at \(host):\(port)" }
}

/// What a peer needs to write into a region: its base address and remote key (verbs' rkey).
/// Exchanged out of band when a queue pair connects.
public struct RemoteRegion: Hashable, Sendable, CustomStringConvertible {
    /// The node that owns the region.
    public var node: NodeID
    /// The region's base address in its owner's address space (verbs writes name absolute
    /// addresses; the software fabrics only check it).
    public var base: UInt64
    /// The remote key that writes into the region must carry (verbs' rkey).
    public var key: UInt32
    /// Size of the region in bytes; writes must fit inside it.
    public var lengthBytes: Int

    /// Describes `lengthBytes` bytes at `base` of `node`'s memory, writable with `key`.
    public init(node: NodeID, base: UInt64, key: UInt32, lengthBytes: Int) {
        self.node = node
        self.base = base
        self.key = key
        self.lengthBytes = lengthBytes
    }

    public var description: String { "region of node \(node) key \(key) (\(lengthBytes) bytes)" }
}

/// How a work request ended (the subset of `ibv_wc_status` the runtime can act on).
public enum CompletionStatus: Hashable, Sendable {
    /// The request completed; for a write, the bytes have landed at the peer.
    case success
    /// Bad remote key, out-of-bounds offset, or a revoked key. The queue pair is now in error.
    case remoteAccessError
    /// The request was never executed: the queue pair entered the error state first.
    case flushed
    /// The peer stopped answering or the connection broke. The queue pair is now in error.
    case transportError
}

/// One entry of a completion queue.
public struct Completion: Hashable, Sendable {
    /// Which kind of work a completion reports.
    public enum Kind: Hashable, Sendable {
        /// A WRITE this node posted finished (for success: the bytes have landed at the peer).
        case write
        /// A peer's WRITE_WITH_IMM landed in this node's region; `immediate` holds its value.
        case writeImmediateReceived
    }

    /// Whether this is a finished write or a received immediate.
    public var kind: Kind
    /// How the request ended; received immediates are always `.success`.
    public var status: CompletionStatus
    /// The other end: the target of a `.write`, the writer of a `.writeImmediateReceived`.
    public var peer: NodeID
    /// The caller's id for a `.write`; zero for received immediates.
    public var workRequestID: UInt64
    /// The 32-bit immediate value of a WRITE_WITH_IMM; nil for plain writes.
    public var immediate: UInt32?

    /// A completion with every field given.
    public init(kind: Kind, status: CompletionStatus, peer: NodeID, workRequestID: UInt64, immediate: UInt32?) {
        self.kind = kind
        self.status = status
        self.peer = peer
        self.workRequestID = workRequestID
        self.immediate = immediate
    }
}

/// Operating conditions a fabric reports (rule 6: a user can act on each).
public enum FabricError: Error, Hashable, Sendable, CustomStringConvertible {
    /// The peer could not be reached or refused the connection.
    case connectFailed(peer: NodeID, reason: String)
    /// The queue pair is in the error state (after a failed request, a fence or a lost connection).
    case queuePairInError(peer: NodeID)
    /// More writes are outstanding than the queue pair allows (`outstandingWritesMax`).
    case tooManyOutstandingWrites(peer: NodeID, limit: Int)
    /// The local bytes or remote range are not valid for this request.
    case invalidRequest(String)
    /// The fabric is closed or not listening.
    case notRunning
    /// The configuration cannot work (limits, addresses, keys).
    case badConfiguration(String)
    /// The RDMA device or its libraries refused (only `VerbsFabric`).
    case device(VerbsError)

    public var description: String {
        switch self {
        case let .connectFailed(p, r): "cannot connect to node \(p): \(r)"
        case let .queuePairInError(p): "queue pair to node \(p) is in the error state; reconnect"
        case let .tooManyOutstandingWrites(p, l): "more than \(l) writes outstanding to node \(p)"
        case let .invalidRequest(r): "invalid fabric request: \(r)"
        case .notRunning: "the fabric is not running"
        case let .badConfiguration(r): "bad fabric configuration: \(r)"
        case let .device(e): "\(e)"
        }
    }
}

/// A connected reliable queue pair: the writing end of a connection to one peer.
/// Writes on one queue pair land in the order they were posted, and their completions are
/// queued in that order.
public protocol QueuePair: AnyObject, Sendable {
    /// The node at the other end of the queue pair.
    var peer: NodeID { get }
    /// The peer's exported region, learned in the connect exchange.
    var remote: RemoteRegion { get }
    /// False once the queue pair entered the error state; it never leaves it.
    var isUsable: Bool { get }

    /// Posts a one-sided WRITE of `bytes` into the peer's region at `remoteOffset`, using `key`
    /// (normally `remote.key`). With `immediate`, the peer gets a `.writeImmediateReceived`
    /// completion after the bytes landed. Unless `signaled`, success produces no completion here
    /// (errors always do). Throws without posting when the queue pair is in error or full.
    func postWrite(_ bytes: [UInt8], remoteOffset: Int, key: UInt32, immediate: UInt32?,
                   workRequestID: UInt64, signaled: Bool) throws(FabricError)

    /// Moves the queue pair to the error state (a fence): every outstanding request completes
    /// `.flushed` unless it already finished, and nothing can be posted any more. As with verbs,
    /// a flushed write may or may not have landed. Idempotent.
    func moveToError()
}

extension QueuePair {
    /// A signalled WRITE with the peer's current key.
    public func postWrite(_ bytes: [UInt8], remoteOffset: Int, immediate: UInt32? = nil,
                          workRequestID: UInt64 = 0, signaled: Bool = true) throws(FabricError) {
        try postWrite(bytes, remoteOffset: remoteOffset, key: remote.key, immediate: immediate,
                      workRequestID: workRequestID, signaled: signaled)
    }
}

/// One node's attachment to a fabric: its regions, its queue pairs, its completion queue.
public protocol Fabric: AnyObject, Sendable {
    /// The id of this node, checked by peers in the connect exchange.
    var localNode: NodeID { get }
    /// Completions of this node's writes and immediates received from peers.
    var completions: CompletionQueue { get }

    /// Registers `lengthBytes` of zeroed memory that peers may write once they hold its key.
    func registerRegion(lengthBytes: Int) throws(FabricError) -> MemoryRegion

    /// Registers memory the caller already has — `bytes` as they are, neither copied nor
    /// zeroed — so peers may write into it once they hold its key: verbs' `ibv_reg_mr` on
    /// existing memory (guest RAM mapped from a file, say). The region retains `owner`, which
    /// must keep `bytes` mapped and writable while it lives; the fabric holds its regions until
    /// it is released. At most `MemoryRegion.wrappedLengthBytesMax` bytes.
    func registerRegion(wrapping bytes: UnsafeMutableRawBufferPointer, retaining owner: AnyObject?) throws(FabricError) -> MemoryRegion

    /// Accepts incoming queue pairs, offering `region` in each connect exchange. Returns the
    /// address peers should connect to (with the real port when `address.port` was 0).
    func listen(at address: PeerAddress, exporting region: MemoryRegion) async throws(FabricError) -> PeerAddress

    /// Connects a queue pair to `peer`, offering `region` and learning the peer's exported region.
    func connect(to peer: PeerAddress, exporting region: MemoryRegion) async throws(FabricError) -> any QueuePair

    /// Gives `region` a new remote key: writes carrying the old key fail with
    /// `.remoteAccessError`. Peers learn the new key by connecting again.
    @discardableResult
    func rotateKey(of region: MemoryRegion) throws(FabricError) -> RemoteRegion

    /// Fences `peer`: its queue pairs into this node enter the error state, so nothing it posts
    /// lands until it connects again. A write of `peer`'s already being copied into a region
    /// has finished when this returns: nothing of the peer's lands afterwards.
    func revokeAccess(from peer: NodeID)

    /// Stops listening and moves every queue pair to the error state. Idempotent.
    func close()
}
