/// The binary form of a `Message` inside a ring record or any other transport (version 5;
/// docs/design/fabric.md, "Fabric and rings"). Big-endian, built on the core's `ByteWriter`/`ByteReader`.
///
/// Version 3 (recovery from lost state, bounded witness hand-over, witness compaction) added
/// `more` to promise, `votersDurable` to heartbeat, and tags 12 and 13; version 2 peers are
/// refused (a cluster upgrades all its members together). Version 4 (membership for operators)
/// carries the configuration in format 2 (with addresses; `Membership.encoded()`) and adds tag 14.
/// Version 5 adds tag 15, the commit notice that asks for no answer.
///
/// ```
/// u8  version (5)   u8 tag (Body case)   u32 from   u32 to   ballot (u64 term, u32 node)
/// body, by tag:
///  1 preVote        u64 lastIndex, ballot lastBallot
///  2 preVoteReply   u8 granted
///  3 prepare        u64 lastIndex, ballot lastBallot, u64 commit, u8 force
///  4 promise        u8 granted, ballot suffixPrevBallot, u32 count, count × entry (as in accept),
///                   u8 more
///  5 accept         u64 prevIndex, ballot prevBallot, u64 commit, u32 count,
///                   count × (u64 index, ballot, u8 kind, u32 length, payload)
///  6 accepted       u8 success, u64 index
///  7 heartbeat      u64 commit, u64 readRound, u64 votersDurable
///  8 heartbeatReply u64 readRound
///  9 installSnapshot u64 index, ballot, u32 length + Membership.encoded(), u64 totalBytes,
///                   u64 offset, u32 length + data (one chunk; offset + length ≤ totalBytes)
/// 10 timeoutNow     (nothing)
/// 11 snapshotReceived u64 index, u64 bytes
/// 12 recovering     u64 nonce, u64 index
/// 13 recovered      u64 nonce, u64 barrier
/// 14 removed        u64 configIndex
/// 15 commitNotice   u64 commit
/// ```
/// Decoding never traps: every length is checked against the bytes present and the limits
/// below, booleans must be 0 or 1, and trailing bytes are an error.
public enum WireCodec {
    /// Wire format version; messages of any other version are refused.
    public static let version: UInt8 = 5
    /// Fixed part before the body: version, tag, from, to, ballot.
    static let headerBytes = 1 + 1 + 4 + 4 + 12
    /// Smallest encoded entry (empty payload); bounds `count` before allocating anything.
    static let entryBytesMin = 8 + 12 + 1 + 4

    /// Limits a decoder enforces (fixed at start-up; a peer claiming more is corrupt or hostile).
    public struct Limits: Sendable, Hashable {
        /// Largest encoded message, in bytes.
        public var messageBytesMax: Int
        /// Most entries in one accept or promise.
        public var entriesMax: Int
        /// Largest payload of one entry, in bytes.
        public var payloadBytesMax: Int
        /// Largest snapshot chunk, in bytes.
        public var snapshotBytesMax: Int

        /// Limits of 64 MiB per message, 65,536 entries, 16 MiB per payload and 64 MiB per snapshot
        /// chunk by default.
        public init(messageBytesMax: Int = 64 << 20, entriesMax: Int = 65_536,
                    payloadBytesMax: Int = 16 << 20, snapshotBytesMax: Int = 64 << 20) {
            self.messageBytesMax = messageBytesMax
            self.entriesMax = entriesMax
            self.payloadBytesMax = payloadBytesMax
            self.snapshotBytesMax = snapshotBytesMax
        }
        /// The default limits.
        public static let standard = Limits()
    }

    /// The message in wire format (layout above).
    public static func encode(_ m: Message) -> [UInt8] {
        var w = ByteWriter(capacity: headerBytes + estimatedBodyBytes(m.body))
        w.u8(version)
        w.u8(tag(m.body))
        w.u32(m.from)
        w.u32(m.to)
        w.ballot(m.ballot)
        switch m.body {
        case let .preVote(i, b): w.u64(i); w.ballot(b)
        case let .preVoteReply(g): w.u8(g ? 1 : 0)
        case let .prepare(i, b, c, f): w.u64(i); w.ballot(b); w.u64(c); w.u8(f ? 1 : 0)
        case let .promise(g, pb, s, more): w.u8(g ? 1 : 0); w.ballot(pb); writeEntries(s, &w); w.u8(more ? 1 : 0)
        case let .accept(pi, pb, es, c):
            w.u64(pi); w.ballot(pb); w.u64(c)
            writeEntries(es, &w)
        case let .accepted(s, i): w.u8(s ? 1 : 0); w.u64(i)
        case let .heartbeat(c, r, v): w.u64(c); w.u64(r); w.u64(v)
        case let .heartbeatReply(r): w.u64(r)
        case let .commitNotice(c): w.u64(c)
        case let .installSnapshot(c):
            w.u64(c.index); w.ballot(c.ballot); w.blob(c.membership.encoded())
            w.u64(UInt64(c.totalBytes)); w.u64(UInt64(c.offset)); w.blob(c.data)
        case .timeoutNow: break
        case let .snapshotReceived(i, n): w.u64(i); w.u64(UInt64(n))
        case let .recovering(n, i): w.u64(n); w.u64(i)
        case let .recovered(n, b): w.u64(n); w.u64(b)
        case let .removed(i): w.u64(i)
        }
        return w.bytes
    }

    /// Decodes `encode(_:)`; throws `DecodeError` for anything malformed or beyond `limits`.
    public static func decode(_ bytes: [UInt8], limits: Limits = .standard) throws(DecodeError) -> Message {
        do {
            return try decodeUnchecked(bytes, limits: limits)
        } catch let e as DecodeError {
            throw e
        } catch {
            throw DecodeError("message", "\(error)")
        }
    }

    private static func decodeUnchecked(_ bytes: [UInt8], limits: Limits) throws -> Message {
        guard bytes.count <= limits.messageBytesMax else {
            throw DecodeError("message", "\(bytes.count) bytes exceed limit \(limits.messageBytesMax)")
        }
        var r = ByteReader(bytes, what: "message")
        let v = try r.u8()
        guard v == version else {
            throw DecodeError("message", "wire format \(v), this build reads \(version): every member of a cluster must run a build of the same wire format")
        }
        let tag = try r.u8()
        let from = try r.u32(), to = try r.u32(), ballot = try r.ballot()
        let body: Message.Body
        switch tag {
        case 1: body = .preVote(lastIndex: try r.u64(), lastBallot: try r.ballot())
        case 2: body = .preVoteReply(granted: try bool(&r))
        case 3: body = .prepare(lastIndex: try r.u64(), lastBallot: try r.ballot(), commit: try r.u64(), force: try bool(&r))
        case 4:
            let g = try bool(&r), pb = try r.ballot(), s = try readEntries(&r, limits)
            body = .promise(granted: g, suffixPrevBallot: pb, suffix: s, more: try bool(&r))
        case 5:
            let pi = try r.u64(), pb = try r.ballot(), c = try r.u64()
            body = .accept(prevIndex: pi, prevBallot: pb, entries: try readEntries(&r, limits), commit: c)
        case 6: body = .accepted(success: try bool(&r), index: try r.u64())
        case 7: body = .heartbeat(commit: try r.u64(), readRound: try r.u64(), votersDurable: try r.u64())
        case 8: body = .heartbeatReply(readRound: try r.u64())
        case 15: body = .commitNotice(commit: try r.u64())
        case 9:
            let index = try r.u64(), b = try r.ballot()
            let m = try Membership(decoding: try r.blob(max: 1 << 20))
            let total = try r.u64(), offset = try r.u64()
            let data = try r.blob(max: limits.snapshotBytesMax)
            guard total <= UInt64(Int.max), offset <= total, UInt64(data.count) <= total - offset else {
                throw DecodeError("message", "snapshot chunk \(offset)+\(data.count) lies outside its \(total) bytes")
            }
            body = .installSnapshot(SnapshotChunk(index: index, ballot: b, membership: m, totalBytes: Int(total),
                                                  offset: Int(offset), data: data))
        case 10: body = .timeoutNow
        case 11:
            let index = try r.u64(), n = try r.u64()
            guard n <= UInt64(Int.max) else { throw DecodeError("message", "snapshot byte count \(n) out of range") }
            body = .snapshotReceived(index: index, bytes: Int(n))
        case 12: body = .recovering(nonce: try r.u64(), index: try r.u64())
        case 13: body = .recovered(nonce: try r.u64(), barrier: try r.u64())
        case 14: body = .removed(configIndex: try r.u64())
        default: throw DecodeError("message", "unknown body tag \(tag)")
        }
        try r.finish()
        return Message(from: from, to: to, ballot: ballot, body: body)
    }

    private static func writeEntries(_ es: [LogEntry], _ w: inout ByteWriter) {
        w.u32(UInt32(es.count))
        for e in es { w.u64(e.index); w.ballot(e.ballot); w.u8(e.kind.rawValue); w.blob(e.payload) }
    }

    private static func readEntries(_ r: inout ByteReader, _ limits: Limits) throws -> [LogEntry] {
        let n = Int(try r.u32())
        guard n <= limits.entriesMax else { throw DecodeError("message", "\(n) entries exceed limit \(limits.entriesMax)") }
        guard n <= r.remaining / entryBytesMin else { throw DecodeError("message", "\(n) entries cannot fit in \(r.remaining) bytes") }
        var es: [LogEntry] = []
        es.reserveCapacity(n)
        for _ in 0..<n {
            let index = try r.u64(), b = try r.ballot(), k = try r.u8()
            guard let kind = EntryKind(rawValue: k) else { throw DecodeError("message", "unknown entry kind \(k)") }
            es.append(LogEntry(index: index, ballot: b, kind: kind, payload: try r.blob(max: limits.payloadBytesMax)))
        }
        return es
    }

    private static func bool(_ r: inout ByteReader) throws -> Bool {
        switch try r.u8() {
        case 0: return false
        case 1: return true
        case let b: throw DecodeError("message", "boolean byte \(b)")
        }
    }

    static func tag(_ b: Message.Body) -> UInt8 {
        switch b {
        case .preVote: 1
        case .preVoteReply: 2
        case .prepare: 3
        case .promise: 4
        case .accept: 5
        case .accepted: 6
        case .heartbeat: 7
        case .heartbeatReply: 8
        case .commitNotice: 15
        case .installSnapshot: 9
        case .timeoutNow: 10
        case .snapshotReceived: 11
        case .recovering: 12
        case .recovered: 13
        case .removed: 14
        }
    }

    private static func estimatedBodyBytes(_ b: Message.Body) -> Int {
        switch b {
        case let .accept(_, _, es, _), let .promise(_, _, es, _): 40 + es.reduce(0) { $0 + entryBytesMin + $1.payload.count }
        case let .installSnapshot(c): 80 + c.data.count + c.membership.encodedBytes
        default: 32
        }
    }
}
