import CXXHash

/// The credit-ring protocol shared by `RingTransport` (consensus messages) and syncvm's
/// `FabricSyncChannel` (docs/design/fabric.md, "Credit rings"): a writer appends sealed records
/// into a ring in its reader's registered memory with one-sided WRITEs; the reader consumes them
/// in sequence order and hands credit back by writing how far it read into a cell of the
/// writer's memory.
///
/// `CreditRing` is what both halves agree on: the ring's size and its record format.
/// `CreditRingWriter` and `CreditRingReader` are the two halves' state — pure values that say
/// which bytes go where, when the ring is full, which records are complete and when credit is
/// due. Posting the writes, and where the ring and the cells sit in a region, are the caller's.
///
/// A record (all integers big-endian), starting at a multiple of 32 bytes within the ring and
/// never straddling its end:
/// ```
/// 0    u64  XXH3-64 of bytes 8..<totalBytes (the seal)
/// 8    u32  totalBytes: 32 + payload
/// 12   u32  kind: the caller's, except `RecordFormat.wrapKind` (skip to the ring's start)
/// 16   u64  session, then 24 u64 sequence     (`.sessionThenSequence`)
///      u64  sequence, then 24 u64 caller's word (`.sequenceThenWord`)
/// 32   payload
/// ```
/// Sequence numbers count every record of a writer from 1, wrap markers included, so a record
/// left from an earlier lap (or, with sessions, an earlier session) is never taken for the next.
public struct CreditRing: Hashable, Sendable {
    /// Bytes of a record header, seal included.
    public static let recordHeaderBytes = 32
    /// Records start on multiples of this, so a wrap marker always fits before the ring's end.
    public static let recordAlignBytes = 32
    /// Bytes of a sealed cell: the seal and two u64 values.
    public static let cellBytes = 24

    /// How records name their order, mark a wrap and ask for credit.
    public struct RecordFormat: Hashable, Sendable {
        /// What the two u64 words after the kind hold.
        public enum Stamp: Hashable, Sendable {
            /// Bytes 16..<24 hold the writer's session, 24..<32 the sequence number. A reader
            /// takes only records of its own session; credit cells hold (session, position).
            case sessionThenSequence
            /// Bytes 16..<24 hold the sequence number, 24..<32 a word the caller gives each record;
            /// credit cells hold (position, 0).
            case sequenceThenWord
        }

        /// What the two words after the kind hold.
        public var stamp: Stamp
        /// The kind of a wrap marker (a record without payload that sends the reader back to the
        /// ring's start).
        public var wrapKind: UInt32
        /// The kind bit by which a record asks for its credit back (lazy credit: the reader
        /// returns credit only when a record asks or `CreditRingReader.requestCredit()` was
        /// called). Nil: the reader owes credit whenever it read anything since it last returned it.
        public var creditWantedBit: UInt32?

        /// A record format; see the properties.
        public init(stamp: Stamp, wrapKind: UInt32, creditWantedBit: UInt32? = nil) {
            self.stamp = stamp
            self.wrapKind = wrapKind
            self.creditWantedBit = creditWantedBit
        }
    }

    /// What a record header claims, before its seal is checked.
    public struct RecordHeader: Hashable, Sendable {
        /// Header plus payload bytes.
        public var totalBytes: Int
        /// The record's kind, credit-wanted bit included.
        public var kind: UInt32
        /// The record's sequence number.
        public var sequence: UInt64
        /// The session (`.sessionThenSequence`) or the caller's word (`.sequenceThenWord`).
        public var word: UInt64
    }

    /// Data bytes of the ring.
    public let ringBytes: Int
    /// The record format both halves use.
    public let format: RecordFormat

    /// A ring of `ringBytes` (a multiple of 64, at least 1024) with records in `format`. Throws
    /// `.badConfiguration` naming the size, or the bits of `format` that clash.
    public init(ringBytes: Int, format: RecordFormat) throws(FabricError) {
        guard ringBytes >= 1024, ringBytes % 64 == 0 else {
            throw .badConfiguration("credit ring of \(ringBytes) bytes: must be a multiple of 64 and at least 1024")
        }
        if let bit = format.creditWantedBit {
            guard bit != 0, bit & (bit - 1) == 0, format.wrapKind & bit == 0 else {
                throw .badConfiguration("credit-wanted bit \(bit) must be one bit outside the wrap kind \(format.wrapKind)")
            }
        }
        self.ringBytes = ringBytes
        self.format = format
    }

    /// Largest payload one record carries: a record plus the wrap waste before it fits an empty ring.
    public var payloadBytesMax: Int { ringBytes / 2 - Self.recordHeaderBytes }

    /// Ring bytes a record of `payloadBytes` occupies: header and payload, rounded up to the alignment.
    public static func recordBytes(payloadBytes: Int) -> Int { stride(recordHeaderBytes + payloadBytes) }

    static func stride(_ totalBytes: Int) -> Int {
        (totalBytes + recordAlignBytes - 1) / recordAlignBytes * recordAlignBytes
    }

    // MARK: sealing

    /// XXH3-64 of `bytes`: the seal of every cell and record.
    public static func checksum(_ bytes: UnsafeRawBufferPointer) -> UInt64 { XXH3_64bits(bytes.baseAddress, bytes.count) }

    /// A sealed cell: the checksum of the 16 bytes after it, then `first` and `second`.
    public static func sealCell(_ first: UInt64, _ second: UInt64) -> [UInt8] {
        var w = ByteWriter(capacity: cellBytes)
        w.u64(0); w.u64(first); w.u64(second)
        var bytes = w.bytes
        seal(&bytes)
        return bytes
    }

    /// The two values of a sealed cell (`bytes` holds at least `cellBytes`); nil when the seal
    /// does not match (never written, torn, or still landing).
    public static func unsealCell(_ bytes: UnsafeRawBufferPointer) -> (UInt64, UInt64)? {
        guard bytes.count >= cellBytes else { return nil }
        let body = UnsafeRawBufferPointer(rebasing: bytes[8..<cellBytes])
        guard u64(bytes, 0) == checksum(body) else { return nil }
        return (u64(bytes, 8), u64(bytes, 16))
    }

    /// Replaces the first 8 bytes of `bytes` with the checksum of the rest.
    static func seal(_ bytes: inout [UInt8]) {
        let sum = bytes.withUnsafeBytes { checksum(UnsafeRawBufferPointer(rebasing: $0[8...])) }
        bytes.withUnsafeMutableBytes { $0.storeBytes(of: sum.bigEndian, toByteOffset: 0, as: UInt64.self) }
    }

    static func u64(_ b: UnsafeRawBufferPointer, _ at: Int) -> UInt64 {
        UInt64(bigEndian: b.loadUnaligned(fromByteOffset: at, as: UInt64.self))
    }

    static func u32(_ b: UnsafeRawBufferPointer, _ at: Int) -> UInt32 {
        UInt32(bigEndian: b.loadUnaligned(fromByteOffset: at, as: UInt32.self))
    }

    // MARK: records

    /// A sealed record.
    func record(kind: UInt32, sequence: UInt64, word: UInt64, payload: ArraySlice<UInt8>) -> [UInt8] {
        var w = ByteWriter(capacity: Self.recordHeaderBytes + payload.count)
        w.u64(0)
        w.u32(UInt32(Self.recordHeaderBytes + payload.count)); w.u32(kind)
        switch format.stamp {
        case .sessionThenSequence: w.u64(word); w.u64(sequence)
        case .sequenceThenWord: w.u64(sequence); w.u64(word)
        }
        var bytes = w.bytes
        bytes.append(contentsOf: payload)
        Self.seal(&bytes)
        return bytes
    }

    /// What the first `recordHeaderBytes` of `bytes` claim.
    public func header(_ bytes: UnsafeRawBufferPointer) -> RecordHeader {
        let a = Self.u64(bytes, 16), b = Self.u64(bytes, 24)
        let (sequence, word) = format.stamp == .sessionThenSequence ? (b, a) : (a, b)
        return RecordHeader(totalBytes: Int(Self.u32(bytes, 8)), kind: Self.u32(bytes, 12), sequence: sequence, word: word)
    }

    /// The credit cell that tells a writer of `session` the reader consumed up to `position`.
    func creditCell(session: UInt64, position: UInt64) -> [UInt8] {
        format.stamp == .sessionThenSequence ? Self.sealCell(session, position) : Self.sealCell(position, 0)
    }

    /// The consumed position a credit cell reports to a writer of `session`; nil when the seal
    /// does not match or the cell is another session's.
    func consumedPosition(cell: UnsafeRawBufferPointer, session: UInt64) -> UInt64? {
        guard let (a, b) = Self.unsealCell(cell) else { return nil }
        switch format.stamp {
        case .sessionThenSequence: return a == session ? b : nil
        case .sequenceThenWord: return a
        }
    }
}

/// Memory a ring is read from: a registered `MemoryRegion`, or plain bytes in tests.
public protocol RingMemory {
    /// Runs `body` over `count` bytes at `offset`.
    func withBytes<R>(offset: Int, count: Int, _ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R
}

extension MemoryRegion: RingMemory {}
