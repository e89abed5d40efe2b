import CXXHash

/// The on-disk layout of a log store's records (format version 3; docs/design/stable-log.md, "Stable log").
/// Version 2 changed no record layout: membership entries and the hard state hold configurations
/// in format 2 (with addresses, `Membership.encoded()`), which a build of version 1 cannot read.
/// Version 3 keeps the entries in segments, one database file each (`entries.db`, then
/// `entries-<first index>.db`), listed in `meta.db`'s `segments` record, which a build of version
/// 2 does not read. A version 1 or 2 store opens and is marked version 3 at once: its
/// `entries.db` becomes the first segment.
///
/// Each segment (btree) holds one record per log entry:
/// ```
/// key:   u64 index, big-endian (so btree order is index order)
/// value: u64 checksum   XXH3-64 of bytes 8..<end, seeded with the index
///        u8  kind
///        u64 ballot.term
///        u32 ballot.node
///        u32 payload length
///        ... payload
/// ```
/// Seeding with the index binds a value to its key: a record copied under another key fails.
///
/// `meta.db` (btree), ASCII keys, each value `u64 checksum | body` where the checksum is XXH3-64
/// of the key's bytes followed by the body:
/// `format` (u32 version), `durability` (mode name the store was last opened with),
/// `snapshot` (u64 index, ballot), `hardstate` (`HardState.encoded()`), `segments` (u32 count,
/// then each segment's first index as u64, ascending).
public enum LogRecord {
    /// The format this build writes.
    public static let formatVersion: UInt32 = 3
    /// The formats this build opens (a version 1 or 2 store is upgraded to 3 when opened for writing).
    public static let formatsRead: ClosedRange<UInt32> = 1...3
    package static let headerBytes = 25
    /// Largest payload a record may claim; anything above is treated as corruption.
    public static let payloadBytesMax = 64 << 20

    /// Bytes of `entries.db` pages one record with a value of `valueBytes` takes, erring high
    /// (Berkeley DB 5.3 btree, no checksums: 26-byte page header, bt_minkey 2). A value above
    /// the overflow threshold, about a quarter page, gets overflow pages of its own and takes
    /// them whole: with 16 KiB pages a 4 KiB command costs 16 KiB, four times its size. A smaller
    /// value shares a leaf page; its items count twice, as leaves may be half full after a split.
    /// Freed pages go on the database's free list and are reused, never given back, so in
    /// `.memory` mode the cache holds the most this sum ever reached.
    static func storedBytes(valueBytes: Int, pageBytes: Int) -> Int {
        let pageHeader = 26, keyItem = 14, overflowItem = 14 // BKEYDATA_PSIZE(8), BOVERFLOW_PSIZE
        let overflowThreshold = (pageBytes - pageHeader) / 4 - 10 // B_MINKEY_TO_OVFLSIZE
        if valueBytes > overflowThreshold {
            let perPage = pageBytes - pageHeader
            return (valueBytes + perPage - 1) / perPage * pageBytes + 2 * (keyItem + overflowItem)
        }
        return 2 * (keyItem + (3 + valueBytes + 3) / 4 * 4 + 2)
    }

    /// The keys of `meta.db`.
    public enum MetaKey: String, CaseIterable, Sendable {
        /// Format version, durability mode, snapshot point, hard state and the segments'
        /// first indexes (layout above).
        case format, durability, snapshot, hardstate, segments
    }

    /// The `entries.db` key of `index`: eight bytes, big-endian.
    public static func key(_ index: LogIndex) -> [UInt8] {
        var w = ByteWriter(capacity: 8)
        w.u64(index)
        return w.bytes
    }

    /// The index a key names, or nil when the key is not 8 bytes.
    public static func index(ofKey key: [UInt8]) -> LogIndex? {
        guard key.count == 8 else { return nil }
        return key.reduce(0) { $0 << 8 | LogIndex($1) }
    }

    static func checksum(_ bytes: UnsafeRawBufferPointer, seed: UInt64) -> UInt64 {
        XXH3_64bits_withSeed(bytes.baseAddress, bytes.count, seed)
    }

    static func checksum(_ bytes: ArraySlice<UInt8>, seed: UInt64) -> UInt64 {
        bytes.withUnsafeBytes { checksum($0, seed: seed) }
    }

    /// The `entries.db` value of `e`, checksum included.
    public static func encode(_ e: LogEntry) -> [UInt8] {
        var w = ByteWriter(capacity: headerBytes + e.payload.count)
        w.u64(0)
        w.u8(e.kind.rawValue)
        w.ballot(e.ballot)
        w.u32(UInt32(e.payload.count))
        w.raw(e.payload)
        var bytes = w.bytes
        let sum = checksum(bytes[8...], seed: e.index)
        for i in 0..<8 { bytes[i] = UInt8(truncatingIfNeeded: sum >> UInt64(56 - 8 * i)) }
        return bytes
    }

    /// Decodes an entry's value; the error text says exactly what is wrong with it.
    public static func decode(index: LogIndex, value: [UInt8]) -> Result<LogEntry, RecordProblem> {
        guard value.count >= headerBytes else {
            return .failure(.init(index: index, detail: "record is \(value.count) bytes, shorter than the \(headerBytes)-byte header"))
        }
        var r = ByteReader(value, what: "log entry \(index)")
        do {
            let stored = try r.u64()
            let computed = checksum(value[8...], seed: index)
            guard stored == computed else {
                return .failure(.init(index: index, detail: "checksum mismatch (stored \(hex(stored)), computed \(hex(computed)))"))
            }
            let rawKind = try r.u8()
            guard let kind = EntryKind(rawValue: rawKind) else {
                return .failure(.init(index: index, detail: "unknown entry kind \(rawKind)"))
            }
            let ballot = try r.ballot()
            let payload = try r.blob(max: payloadBytesMax)
            try r.finish()
            return .success(LogEntry(index: index, ballot: ballot, kind: kind, payload: payload))
        } catch {
            return .failure(.init(index: index, detail: "\(error)"))
        }
    }

    /// The `meta.db` value for `key`: checksum, then `body`.
    public static func encodeMeta(_ key: MetaKey, _ body: [UInt8]) -> [UInt8] {
        var w = ByteWriter(capacity: 8 + body.count)
        w.u64(metaChecksum(key, body[...]))
        w.raw(body)
        return w.bytes
    }

    /// The body of a meta record, or a description of why it cannot be trusted.
    public static func decodeMeta(_ key: MetaKey, _ value: [UInt8]) -> Result<[UInt8], RecordProblem> {
        guard value.count >= 8 else {
            return .failure(.init(index: nil, detail: "metadata record '\(key.rawValue)' is \(value.count) bytes, too short"))
        }
        let stored = value[0..<8].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        let computed = metaChecksum(key, value[8...])
        guard stored == computed else {
            return .failure(.init(index: nil, detail: "metadata record '\(key.rawValue)': checksum mismatch (stored \(hex(stored)), computed \(hex(computed)))"))
        }
        return .success(Array(value[8...]))
    }

    private static func metaChecksum(_ key: MetaKey, _ body: ArraySlice<UInt8>) -> UInt64 {
        checksum(Array(key.rawValue.utf8)[...] + body, seed: 0)
    }

    static func encodeSnapshot(_ s: SnapshotPoint) -> [UInt8] {
        var w = ByteWriter(capacity: 20)
        w.u64(s.index)
        w.ballot(s.ballot)
        return w.bytes
    }

    static func decodeSnapshot(_ b: [UInt8]) throws -> SnapshotPoint {
        var r = ByteReader(b, what: "snapshot point")
        let s = SnapshotPoint(index: try r.u64(), ballot: try r.ballot())
        try r.finish()
        return s
    }

    /// The file (on disk) or database name (in memory) of the segment whose first index is
    /// `start`: `entries.db` for the first (0), `entries-<start, 20 digits>.db` for the others.
    static func segmentFile(start: LogIndex) -> String {
        guard start > 0 else { return BerkeleyDB.entriesFile }
        let digits = String(start)
        return "entries-" + String(repeating: "0", count: max(0, 20 - digits.count)) + digits + ".db"
    }

    static func encodeSegments(_ starts: [LogIndex]) -> [UInt8] {
        var w = ByteWriter(capacity: 4 + 8 * starts.count)
        w.u32(UInt32(starts.count))
        w.u64s(starts)
        return w.bytes
    }

    /// The segments' first indexes: at least one, strictly ascending (0 for `entries.db`, until
    /// a compaction removes it).
    static func decodeSegments(_ b: [UInt8]) throws -> [LogIndex] {
        var r = ByteReader(b, what: "segments")
        let count = Int(try r.u32())
        guard count >= 1, count <= r.remaining / 8 else { throw r.error("\(count) segments in \(b.count) bytes") }
        let starts = try r.u64s(count)
        try r.finish()
        for (a, b) in zip(starts, starts.dropFirst()) where b <= a {
            throw r.error("segment starts \(a) and \(b) are not ascending")
        }
        return starts
    }

    static func encodeFormat(_ v: UInt32) -> [UInt8] {
        var w = ByteWriter(capacity: 4)
        w.u32(v)
        return w.bytes
    }

    static func decodeFormat(_ b: [UInt8]) throws -> UInt32 {
        var r = ByteReader(b, what: "format version")
        let v = try r.u32()
        try r.finish()
        return v
    }

    static func hex(_ v: UInt64) -> String {
        let s = String(v, radix: 16)
        return "0x" + String(repeating: "0", count: 16 - s.count) + s
    }
}

/// Why one record cannot be trusted: which entry (nil for metadata) and what is wrong.
public struct RecordProblem: Error, Hashable, Sendable, CustomStringConvertible {
    /// Index of the entry concerned; nil for a metadata record.
    public var index: LogIndex?
    /// What is wrong with the record.
    public var detail: String
    /// A problem with the record of `index` (nil: metadata).
    public init(index: LogIndex?, detail: String) {
        self.index = index
        self.detail = detail
    }
    public var description: String {
        if let index { return "entry \(index): \(detail)" }
        return detail
    }
}
