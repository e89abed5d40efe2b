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

    /// The ring's size and record format (`MailboxFormat.records`).
    let ring: CreditRing
    var ringBytes: Int { ring.ringBytes }

    init(ringBytes: Int) throws(FabricSyncChannelError) {
        guard ringBytes >= 4096, ringBytes % 64 == 0, ringBytes <= 1 << 30 else {
            throw .badConfiguration("ringBytes \(ringBytes) must be a multiple of 64 in 4096...2^30")
        }
        do {
            ring = try CreditRing(ringBytes: ringBytes, format: MailboxFormat.records)
        } catch {
            throw .badConfiguration("ringBytes \(ringBytes): \(error)")
        }
    }

    var bytes: Int { Self.ringOffset + ringBytes }
    /// Largest payload one record carries: a record plus the wrap waste before it fits an empty ring.
    var payloadBytesMax: Int { ring.payloadBytesMax }
}

/// The mailbox's records and cells, big-endian. Records are `CreditRing` records whose u32 kind
/// word is u8 kind, u8 flags, u16 reserved (0), and whose caller's word is u32 frame bytes, u32
/// fragment offset; cells are `CreditRing` sealed cells.
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

    /// The ring's record format: sequence numbers without sessions (a mailbox is cleared before
    /// each channel), credit returned after every scan that read anything.
    static let records = CreditRing.RecordFormat(stamp: .sequenceThenWord, wrapKind: kindWord(.wrap))

    enum Status: UInt64 { case open = 1, closed = 2 }

    /// Immediate values: only a hint of what changed (the receiver rescans everything).
    enum Immediate: UInt32 { case record = 1, credit = 2, status = 3 }

    /// The two u64 values of a sealed 24-byte cell, when its checksum matches.
    static func cell(_ b: UnsafeRawBufferPointer) -> (UInt64, UInt64)? { CreditRing.unsealCell(b) }

    static func cell(_ a: UInt64, _ b: UInt64) -> [UInt8] { CreditRing.sealCell(a, b) }

    /// The record kind word of `kind` with `flags`.
    static func kindWord(_ kind: Kind, flags: UInt8 = 0) -> UInt32 { UInt32(kind.rawValue) << 24 | UInt32(flags) << 16 }

    /// The caller's word of a record: frame bytes, then fragment offset.
    static func word(frameBytes: Int, fragmentOffset: Int) -> UInt64 { UInt64(frameBytes) << 32 | UInt64(fragmentOffset) }

    /// What a record's header says, in the mailbox's terms.
    struct Header {
        var kind: UInt8
        var flags: UInt8
        var reserved: UInt16
        var sequence: UInt64
        var frameBytes: Int
        var fragmentOffset: Int

        init(_ r: CreditRingReader.Record) {
            kind = UInt8(r.kind >> 24)
            flags = UInt8(truncatingIfNeeded: r.kind >> 16)
            reserved = UInt16(truncatingIfNeeded: r.kind)
            sequence = r.sequence
            frameBytes = Int(r.word >> 32)
            fragmentOffset = Int(r.word & 0xFFFF_FFFF)
        }
    }
}
