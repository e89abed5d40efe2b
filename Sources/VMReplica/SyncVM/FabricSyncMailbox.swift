// The mailbox `FabricSyncChannel` keeps in each side's registered region: where its cells and
// ring sit, and the byte format of what the peer writes there (docs/design/syncvm.md,
// "Transport over a Fabric", has the same tables).

import RDMAPaxos

/// One mailbox: written by the peer with one-sided WRITEs, read by the region's owner.
/// ```
/// +0     64 B   credit cell: how far the peer consumed MY ring in ITS region (u64 position)
/// +64    64 B   status cell: u64 state (1 open, 2 closed), u64 ringBytes
/// +128   R      ring: records from the peer
/// ```
/// The primary's region is one mailbox. The backup's region is its guest RAM at guest-physical
/// offsets, padding to a system page, then one mailbox (in `GuestMemory`'s trailer). Either way
/// the mailbox is the last `bytes` of the region, so a peer finds it from the region's length.
struct MailboxLayout: Hashable, Sendable {
    static let cellBytes = 64
    static let creditOffset = 0
    static let statusOffset = 64
    static let ringOffset = 128
    /// Record header: u64 checksum, u32 totalBytes, u8 kind, u8 flags, u16 reserved, u64 sequence,
    /// u32 frame bytes, u32 fragment offset.
    static let recordHeaderBytes = 32
    static let recordAlignBytes = 32

    let ringBytes: Int

    init(ringBytes: Int) throws(FabricSyncChannelError) {
        guard ringBytes >= 4096, ringBytes % 64 == 0, ringBytes <= 1 << 30 else {
            throw .badConfiguration("ringBytes \(ringBytes) must be a multiple of 64 in 4096...2^30")
        }
        self.ringBytes = ringBytes
    }

    var bytes: Int { Self.ringOffset + ringBytes }
    /// Largest payload one record carries: a record plus the wrap waste before it fits an empty ring.
    var payloadBytesMax: Int { ringBytes / 2 - Self.recordHeaderBytes }

    static func stride(_ totalBytes: Int) -> Int {
        (totalBytes + recordAlignBytes - 1) / recordAlignBytes * recordAlignBytes
    }
}

/// Checksummed cells and records, big-endian.
enum MailboxFormat {
    enum Kind: UInt8 {
        /// A piece of one control frame (a sync message); flag bit 0 marks the last piece.
        case fragment = 1
        /// Skip to the ring's start (records never straddle its end).
        case wrap = 2
        /// The page WRITEs before this record have landed: u64 pages in the batch, u64 total.
        case pagesDone = 3
    }
    static let lastFragment: UInt8 = 1

    enum Status: UInt64 { case open = 1, closed = 2 }

    /// Immediate values: only a hint of what changed (the receiver rescans everything).
    enum Immediate: UInt32 { case record = 1, credit = 2, status = 3 }

    /// The two u64 values of a sealed 24-byte cell, when its checksum matches.
    static func cell(_ b: UnsafeRawBufferPointer) -> (UInt64, UInt64)? {
        guard b.count >= 24, let body = RingFormat.unsealed(UnsafeRawBufferPointer(rebasing: b[..<24])) else { return nil }
        return (RingFormat.readU64(body, 0), RingFormat.readU64(body, 8))
    }

    static func cell(_ a: UInt64, _ b: UInt64) -> [UInt8] {
        var w = ByteWriter(capacity: 16)
        w.u64(a); w.u64(b)
        return RingFormat.sealed(w.bytes)
    }

    static func record(_ kind: Kind, flags: UInt8 = 0, sequence: UInt64, frameBytes: UInt32 = 0,
                       fragmentOffset: UInt32 = 0, payload: ArraySlice<UInt8>) -> [UInt8] {
        var w = ByteWriter(capacity: MailboxLayout.recordHeaderBytes - 8 + payload.count)
        w.u32(UInt32(MailboxLayout.recordHeaderBytes + payload.count))
        w.u8(kind.rawValue); w.u8(flags); w.u16(0)
        w.u64(sequence); w.u32(frameBytes); w.u32(fragmentOffset)
        w.raw(payload)
        return RingFormat.sealed(w.bytes)
    }

    /// What a record header claims, before its checksum is verified.
    struct Header {
        var totalBytes: Int
        var kind: UInt8
        var flags: UInt8
        var reserved: UInt16
        var sequence: UInt64
        var frameBytes: Int
        var fragmentOffset: Int
    }

    static func header(_ b: UnsafeRawBufferPointer) -> Header {
        Header(totalBytes: Int(RingFormat.readU32(b, 8)), kind: b[12], flags: b[13], reserved: UInt16(b[14]) << 8 | UInt16(b[15]),
               sequence: RingFormat.readU64(b, 16), frameBytes: Int(RingFormat.readU32(b, 24)),
               fragmentOffset: Int(RingFormat.readU32(b, 28)))
    }
}
