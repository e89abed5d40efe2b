import CXXHash

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
/// Every cell and record starts with an XXH3-64 checksum of the bytes after it, so a torn or
/// half-landed write is never trusted; records also carry the session epoch and a sequence
/// number, so a stale record from an earlier lap or session is never delivered.
public struct RingLayout: Hashable, Sendable {
    /// Layout version written into the header cell.
    public static let version: UInt16 = 2
    /// Size of the region's header cell.
    public static let headerBytes = 64
    /// Size of one credit or control cell.
    public static let cellBytes = 64
    /// Record header: u64 checksum, u32 totalBytes, u32 flags, u64 epoch, u64 sequence.
    public static let recordHeaderBytes = 32
    /// Records start on multiples of this, so a wrap marker always fits before the ring's end.
    public static let recordAlignBytes = 32

    /// The node whose region this describes.
    public let owner: NodeID
    /// The other members, sorted: the order of credit cells and rings.
    public let peers: [NodeID]
    /// Data bytes of each ring.
    public let ringBytes: Int

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
        self.ringBytes = ringBytes
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
    public var payloadBytesMax: Int { ringBytes / 2 - Self.recordHeaderBytes }

    /// The header cell: "PLVR", version, peer count, ring size and owner, zero-padded to
    /// `headerBytes`.
    public func headerCell() -> [UInt8] {
        var w = ByteWriter(capacity: Self.headerBytes)
        w.raw(Array("PLVR".utf8)); w.u16(Self.version); w.u16(UInt16(peers.count)); w.u32(UInt32(ringBytes))
        w.u32(owner)
        w.raw([UInt8](repeating: 0, count: Self.headerBytes - w.bytes.count))
        return w.bytes
    }

    static func stride(_ totalBytes: Int) -> Int { (totalBytes + recordAlignBytes - 1) / recordAlignBytes * recordAlignBytes }
}

/// Checksummed cells and records (all big-endian). The sealing and big-endian reads are shared
/// with syncvm's mailbox (`VMReplica.MailboxFormat`), which seals its own cells and records the same way.
package enum RingFormat {
    enum Flags: UInt32 { case message = 0, wrap = 1 }
    /// A record flag bit beside `Flags`: the writer wants its credit back once this record is
    /// read (its ring is filling up); without it the reader keeps the credit for later.
    static let creditWanted: UInt32 = 2

    package static func checksum(_ b: UnsafeRawBufferPointer) -> UInt64 { XXH3_64bits(b.baseAddress, b.count) }

    package static func sealed(_ body: [UInt8]) -> [UInt8] {
        var w = ByteWriter(capacity: 8 + body.count)
        w.u64(body.withUnsafeBytes { checksum($0) })
        w.raw(body)
        return w.bytes
    }

    /// The body of a sealed cell or record when its checksum matches.
    package static func unsealed(_ b: UnsafeRawBufferPointer) -> UnsafeRawBufferPointer? {
        guard b.count >= 8 else { return nil }
        let body = UnsafeRawBufferPointer(rebasing: b[8...])
        return readU64(b, 0) == checksum(body) ? body : nil
    }

    package static func readU64(_ b: UnsafeRawBufferPointer, _ at: Int) -> UInt64 {
        var v: UInt64 = 0
        for i in 0..<8 { v = v << 8 | UInt64(b[at + i]) }
        return v
    }

    package static func readU32(_ b: UnsafeRawBufferPointer, _ at: Int) -> UInt32 {
        var v: UInt32 = 0
        for i in 0..<4 { v = v << 8 | UInt32(b[at + i]) }
        return v
    }

    /// Credit cell: checksum, epoch, consumed position.
    static func credit(epoch: UInt64, consumed: UInt64) -> [UInt8] {
        var w = ByteWriter(capacity: 16); w.u64(epoch); w.u64(consumed)
        return sealed(w.bytes)
    }

    /// Control cell: checksum, epoch of the sender's session, and how many times in that session
    /// the sender asked for its credit at once (its ring had no room for a message).
    static func control(epoch: UInt64, creditRequests: UInt64 = 0) -> [UInt8] {
        var w = ByteWriter(capacity: 16); w.u64(epoch); w.u64(creditRequests)
        return sealed(w.bytes)
    }
    /// Bytes of a sealed control cell.
    static let controlBytes = 24
    /// (epoch, credit requests) of a sealed control cell; nil when torn or never written.
    static func controlCell(_ b: UnsafeRawBufferPointer) -> (epoch: UInt64, creditRequests: UInt64)? {
        guard let body = unsealed(b), body.count >= 16 else { return nil }
        return (readU64(body, 0), readU64(body, 8))
    }

    /// A record: checksum, u32 totalBytes (header + payload), u32 flags, u64 epoch, u64 seq, payload.
    static func record(_ flags: Flags, epoch: UInt64, sequence: UInt64, payload: [UInt8], creditWanted: Bool = false) -> [UInt8] {
        var w = ByteWriter(capacity: RingLayout.recordHeaderBytes - 8 + payload.count)
        w.u32(UInt32(RingLayout.recordHeaderBytes + payload.count)); w.u32(flags.rawValue | (creditWanted ? Self.creditWanted : 0))
        w.u64(epoch); w.u64(sequence); w.raw(payload)
        return sealed(w.bytes)
    }

    /// What a record header claims, before its checksum is verified.
    struct Header { var totalBytes: Int; var flags: UInt32; var epoch: UInt64; var sequence: UInt64 }

    static func header(_ b: UnsafeRawBufferPointer) -> Header {
        Header(totalBytes: Int(readU32(b, 8)), flags: readU32(b, 12), epoch: readU64(b, 16), sequence: readU64(b, 24))
    }
}
