/// Where things live in a node's receive region, and the byte format of what peers write there
/// (docs/design/fabric.md, "Fabric and rings", has the same tables).
///
/// Region of node R, with `peers` = the cluster minus R, sorted by id, peer i at index i:
/// ```
/// 0                         region header (64 B): "PLVR", layout version, peer count, ringBytes
/// 64 + 64·i                 credit cell i: written BY peer i, says how far it consumed R's ring
/// 64 + 64·n + i·(64+ring)   control cell of ring i: written by peer i to (re)start its session
///   … + 64                  ring i data (ringBytes): records written by peer i
/// ```
/// Each ring is a `CreditRing` in the `recordFormat` below: every cell and record starts with an
/// XXH3-64 checksum of the bytes after it, so a torn or half-landed write is never trusted;
/// records also carry the session epoch and a sequence number, so a stale record from an earlier
/// lap or session is never delivered.
public struct RingLayout: Hashable, Sendable {
    /// Layout version written into the header cell.
    public static let version: UInt16 = 2
    /// Size of the region's header cell.
    public static let headerBytes = 64
    /// Size of one credit or control cell.
    public static let cellBytes = 64
    /// Record header: u64 checksum, u32 totalBytes, u32 flags, u64 epoch, u64 sequence.
    public static let recordHeaderBytes = CreditRing.recordHeaderBytes
    /// Records start on multiples of this, so a wrap marker always fits before the ring's end.
    public static let recordAlignBytes = CreditRing.recordAlignBytes
    /// The rings' records: flags 0 a message, 1 a wrap marker, bit 2 set on a message that wants
    /// its credit back; the session epoch, then the sequence number.
    public static let recordFormat = CreditRing.RecordFormat(stamp: .sessionThenSequence, wrapKind: 1, creditWantedBit: 2)
    /// The record kind (flags) of a message.
    static let messageKind: UInt32 = 0

    /// The node whose region this describes.
    public let owner: NodeID
    /// The other members, sorted: the order of credit cells and rings.
    public let peers: [NodeID]
    /// Data bytes of each ring.
    public var ringBytes: Int { ring.ringBytes }
    /// Size and record format of each ring.
    public let ring: CreditRing

    /// The layout of `owner`'s region for `cluster` (`owner` itself is left out of `peers`). Throws
    /// `.badConfiguration` unless `ringBytes` is a multiple of 64 and at least 1024, there is a
    /// peer, and the region fits `MemoryRegion.lengthBytesMax`.
    public init(owner: NodeID, cluster: [NodeID], ringBytes: Int) throws(FabricError) {
        guard ringBytes >= 1024, ringBytes % 64 == 0 else {
            throw .badConfiguration("ringBytes \(ringBytes) must be a multiple of 64 and at least 1024")
        }
        let peers = Set(cluster).subtracting([owner]).sorted()
        guard !peers.isEmpty else { throw .badConfiguration("a ring layout needs at least one peer") }
        self.owner = owner
        self.peers = peers
        self.ring = try CreditRing(ringBytes: ringBytes, format: Self.recordFormat)
        guard regionBytes <= MemoryRegion.lengthBytesMax else {
            throw .badConfiguration("\(peers.count) rings of \(ringBytes) bytes exceed the region limit")
        }
    }

    /// Total size of the region: header, one credit cell per peer, and one control cell plus ring
    /// per peer.
    public var regionBytes: Int {
        Self.headerBytes + peers.count * Self.cellBytes + peers.count * (Self.cellBytes + ringBytes)
    }

    /// Position of `peer` in `peers`, the index the offset functions take; nil for a non-member.
    public func index(of peer: NodeID) -> Int? { peers.firstIndex(of: peer) }

    /// The credit cell that `peer` writes into this node's region.
    public func creditOffset(_ i: Int) -> Int { Self.headerBytes + i * Self.cellBytes }
    /// The control cell in front of the ring that peer `i` writes into this node's region.
    public func controlOffset(_ i: Int) -> Int {
        Self.headerBytes + peers.count * Self.cellBytes + i * (Self.cellBytes + ringBytes)
    }
    /// Start of the ring that peer `i` writes into this node's region.
    public func ringOffset(_ i: Int) -> Int { controlOffset(i) + Self.cellBytes }

    /// Largest message payload one record can carry.
    public var payloadBytesMax: Int { ring.payloadBytesMax }

    /// The header cell: "PLVR", version, peer count, ring size and owner, zero-padded to
    /// `headerBytes`.
    public func headerCell() -> [UInt8] {
        var w = ByteWriter(capacity: Self.headerBytes)
        w.raw(Array("PLVR".utf8)); w.u16(Self.version); w.u16(UInt16(peers.count)); w.u32(UInt32(ringBytes))
        w.u32(owner)
        w.raw([UInt8](repeating: 0, count: Self.headerBytes - w.bytes.count))
        return w.bytes
    }

    /// Control cell: checksum, epoch of the sender's session, and how many times in that session
    /// the sender asked for its credit at once (its ring had no room for a message).
    static func controlCell(epoch: UInt64, creditRequests: UInt64 = 0) -> [UInt8] {
        CreditRing.sealCell(epoch, creditRequests)
    }

    /// (epoch, credit requests) of a sealed control cell; nil when torn or never written.
    static func controlCell(_ b: UnsafeRawBufferPointer) -> (epoch: UInt64, creditRequests: UInt64)? {
        CreditRing.unsealCell(b).map { (epoch: $0.0, creditRequests: $0.1) }
    }
}
