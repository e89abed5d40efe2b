import Synchronization

/// `RingTransport`'s state per peer: the sending side of this node's ring in the peer's region,
/// and the receiving side of the peer's ring in this node's region.
final class PeerLink: Sendable {
    let peer: NodeID
    /// The peer's ring (and the credit cell it writes) in this node's layout.
    let inIndex: Int
    /// This node's ring (and the credit cell it writes) in the peer's layout.
    let outIndex: Int
    let remoteLayout: RingLayout
    let out = Mutex(Sender())
    let inbound = Mutex(Receiver())
    /// Wakes the task that keeps this link connected: its queue pair may have failed, or its
    /// address changed.
    let check = AsyncSignal()

    init(peer: NodeID, inIndex: Int, outIndex: Int, remoteLayout: RingLayout) {
        self.peer = peer
        self.inIndex = inIndex
        self.outIndex = outIndex
        self.remoteLayout = remoteLayout
    }
}

/// The sending side of one session: the queue pair and the ring writer of its epoch.
struct Sender {
    var address: PeerAddress?
    var qp: (any QueuePair)?
    /// This session's ring writer (its session is the epoch); nil before the first connect.
    var writer: CreditRingWriter?
    /// The peer acknowledged the epoch through the credit cell.
    var ready = false
    var posted: UInt64 = 0
    /// Credit requests written to the control cell in this session, and the credit position
    /// at the last one (one request per position).
    var creditRequests: UInt64 = 0
    var requestedAt: UInt64 = .max

    /// An address is known and no usable queue pair exists: the link's `maintain` task should connect.
    var needsConnect: Bool { address != nil && qp?.isUsable != true }

    mutating func reset(qp: any QueuePair, writer: CreditRingWriter) {
        let address = self.address
        self = Sender(address: address, qp: qp, writer: writer)
    }
}

/// The receiving side of the session the peer announced last.
struct Receiver {
    /// The ring reader of the peer's session; nil until one is announced.
    var reader: CreditRingReader?
    /// The control cell's credit requests already answered.
    var creditRequests: UInt64 = 0
    /// Read position of the last torn record counted (once per position).
    var tornAt: UInt64 = .max
}
