// The syncvm control messages and their byte format (docs/design/syncvm.md, "syncvm").
//
// Every frame is a 20-byte header plus a bounded payload, big-endian like the rest of the
// project's wire formats. Decoding checks every length, count and enum before it allocates or
// trusts anything, and throws `DecodeError` on bad bytes: a peer can make a sync fail, never
// make this process trap or allocate without bound.

/// Limits and constants of the syncvm wire format, version 1.
public enum SyncWire {
    /// "PLSV" read as a big-endian u32.
    public static let magic: UInt32 = 0x504C_5356
    /// The format's version; a frame of another version is refused.
    public static let version: UInt16 = 1
    /// magic u32, version u16, kind u8, reserved u8, session u64, payload length u32.
    public static let headerBytes = 20
    /// Largest payload either side accepts. A dense bitmap must fit, which bounds the guest at
    /// `pageCountMax` pages (128 GiB of 4 KiB pages).
    public static let payloadBytesMax = 4 << 20
    /// Largest frame: the header and the largest payload.
    public static let frameBytesMax = headerBytes + payloadBytesMax
    /// Bytes before a bitmap's words or indices: form u8, 3 reserved, set count u32, page count u64.
    public static let bitmapHeaderBytes = 16
    /// Most pages a geometry or bitmap may have: a dense bitmap of them fills one payload.
    public static let pageCountMax = (payloadBytesMax - bitmapHeaderBytes) / 8 * 64
    /// Bytes before the values of a hashes message: first entry u32, count u32.
    public static let hashesHeaderBytes = 8
    /// Most hashes one frame carries.
    public static let hashesPerFrameMax = (payloadBytesMax - hashesHeaderBytes) / 8
    /// Smallest page size a peer may announce, in bytes.
    public static let pageSizeMin = 512
    /// Largest page size a peer may announce, in bytes (a power of two in between is accepted).
    public static let pageSizeMax = 1 << 20
    /// The only page hash so far: XXH3-64 with the session's seed.
    public static let hashAlgorithmXXH3_64: UInt8 = 1
    /// Bytes before the digests of an output-digests message: generation u64, count u32, 4 reserved.
    public static let outputDigestsHeaderBytes = 16
    /// Most output digests one frame carries.
    public static let outputDigestsPerFrameMax = (payloadBytesMax - outputDigestsHeaderBytes) / OutputDigest.wireBytes
}

/// The RAM shape both peers must share.
public struct SyncGeometry: Equatable, Sendable, CustomStringConvertible {
    /// Bytes per page.
    public var pageSize: Int
    /// Number of pages.
    public var pageCount: Int
    /// `pageCount` pages of `pageSize` bytes.
    public init(pageSize: Int, pageCount: Int) {
        self.pageSize = pageSize
        self.pageCount = pageCount
    }
    /// The shape of `memory`.
    public init(_ memory: GuestMemory) { self.init(pageSize: memory.pageSize, pageCount: memory.pageCount) }
    public var description: String { "\(pageCount) pages of \(pageSize) bytes (\(pageCount * pageSize) bytes)" }
}

/// The primary's opening message.
public struct SyncHello: Equatable, Sendable {
    /// The primary's RAM shape; a backup of another shape refuses the session.
    public var geometry: SyncGeometry
    /// The page hash to use; `SyncWire.hashAlgorithmXXH3_64` is the only one a backup accepts.
    public var hashAlgorithm: UInt8
    /// The backup re-hashes the pages it received before it claims to be in sync.
    public var verify: Bool
    /// Fresh per session so that page contents cannot be chosen to collide with another page.
    public var seed: UInt64
}

/// The backup's answer to a hello.
public enum HelloStatus: UInt8, Sendable {
    /// The backup takes part in the session.
    case accepted = 0
    /// The backup's RAM has another shape.
    case geometryMismatch = 1
    /// The backup does not know the hash algorithm.
    case unsupportedHash = 2
}

/// The backup's answer to a commit.
public enum CommitStatus: UInt8, Sendable {
    /// The backup recorded itself as in sync.
    case inSync = 0
    /// The backup's re-hash of the written pages did not match the primary's digest.
    case verifyFailed = 1
}

/// A syncvm control message; the cases are in the order a session sends them.
public enum SyncMessage: Equatable, Sendable {
    /// The primary opens the session.
    case hello(SyncHello)
    /// The backup's answer, carrying its own geometry so a mismatch names both sides.
    case helloReply(HelloStatus, SyncGeometry)
    /// The sender's dirty set since the last sync.
    case dirtyBitmap(DirtyBitmap)
    /// Backup hashes of union entries `first ..< first + values.count`.
    case hashes(first: Int, values: [UInt64])
    /// All divergent pages have landed: `written` lists them, `digest` hashes the primary's
    /// page hashes of them in ascending page order.
    case commit(digest: UInt64, written: DirtyBitmap)
    /// The backup's outcome, its last message in the session.
    case commitReply(CommitStatus)
    /// Backup → primary outside any session (session 0): digests of the frames its guest sent,
    /// in the guest's order, from the VM that the checkpoint of epoch `generation` installed.
    case outputDigests(generation: UInt64, digests: [OutputDigest])

    var kind: UInt8 {
        switch self {
        case .hello: 1
        case .helloReply: 2
        case .dirtyBitmap: 3
        case .hashes: 4
        case .commit: 5
        case .commitReply: 6
        case .outputDigests: 7
        }
    }

    var name: String {
        switch self {
        case .hello: "hello"
        case .helloReply: "hello reply"
        case .dirtyBitmap: "dirty bitmap"
        case .hashes: "hashes"
        case .commit: "commit"
        case .commitReply: "commit reply"
        case .outputDigests: "output digests"
        }
    }
}

/// A message in a session.
public struct SyncFrame: Equatable, Sendable {
    /// The sync session, chosen by the primary.
    public var session: UInt64
    /// What the frame carries; its kind goes in the header.
    public var message: SyncMessage

    /// `message` as a frame of `session`.
    public init(session: UInt64, _ message: SyncMessage) {
        self.session = session
        self.message = message
    }

    /// The frame's bytes, header then payload. A payload over `SyncWire.payloadBytesMax` is a
    /// caller bug and traps.
    public func encoded() -> [UInt8] {
        var w = ByteWriter(capacity: SyncWire.headerBytes + 64)
        w.u32(SyncWire.magic)
        w.u16(SyncWire.version)
        w.u8(message.kind)
        w.u8(0)
        w.u64(session)
        w.u32(0)  // payload length, patched below
        switch message {
        case .hello(let h):
            w.u32(UInt32(h.geometry.pageSize))
            w.u64(UInt64(h.geometry.pageCount))
            w.u8(h.hashAlgorithm)
            w.u8(h.verify ? 1 : 0)
            w.u16(0)
            w.u64(h.seed)
        case .helloReply(let status, let g):
            w.u8(status.rawValue)
            w.u8(0); w.u16(0)
            w.u32(UInt32(g.pageSize))
            w.u64(UInt64(g.pageCount))
        case .dirtyBitmap(let b):
            w.bitmap(b)
        case .hashes(let first, let values):
            w.u32(UInt32(first))
            w.u32(UInt32(values.count))
            w.u64s(values)
        case .commit(let digest, let written):
            w.u64(digest)
            w.bitmap(written)
        case .commitReply(let status):
            w.u8(status.rawValue)
            w.u8(0); w.u16(0)
        case .outputDigests(let generation, let digests):
            w.u64(generation)
            w.u32(UInt32(digests.count))
            w.u32(0)
            for d in digests { w.outputDigest(d) }
        }
        let payload = w.bytes.count - SyncWire.headerBytes
        precondition(payload <= SyncWire.payloadBytesMax, "syncvm \(message.name) payload of \(payload) bytes exceeds the limit")
        w.patchU32(at: 16, UInt32(payload))
        return w.bytes
    }

    /// Parses one frame. Throws `DecodeError` for a wrong magic or version, a length or count
    /// that does not add up, an unknown kind or status, reserved bits set, or trailing bytes.
    public static func decode(_ bytes: [UInt8]) throws(DecodeError) -> SyncFrame {
        var r = ByteReader(bytes, what: "syncvm frame")
        guard bytes.count >= SyncWire.headerBytes else {
            throw DecodeError("syncvm frame", "\(bytes.count) bytes, shorter than the \(SyncWire.headerBytes)-byte header")
        }
        let magic = try r.u32()
        guard magic == SyncWire.magic else { throw r.error("bad magic 0x\(String(magic, radix: 16))") }
        let version = try r.u16()
        guard version == SyncWire.version else {
            throw r.error("unsupported version \(version) (this side speaks \(SyncWire.version))")
        }
        let kind = try r.u8()
        guard try r.u8() == 0 else { throw r.error("reserved header byte is not zero") }
        let session = try r.u64()
        let length = Int(try r.u32())
        guard length <= SyncWire.payloadBytesMax else {
            throw r.error("payload length \(length) exceeds the limit \(SyncWire.payloadBytesMax)")
        }
        guard length == r.remaining else {
            throw r.error("header says \(length) payload bytes, frame has \(r.remaining)")
        }
        let message: SyncMessage
        switch kind {
        case 1:
            let pageSize = try r.pageSize()
            let pageCount = try r.pageCount()
            let algorithm = try r.u8()
            let flags = try r.u8()
            guard flags & ~1 == 0 else { throw r.error("unknown hello flags 0x\(String(flags, radix: 16))") }
            guard try r.u16() == 0 else { throw r.error("reserved hello bytes are not zero") }
            let seed = try r.u64()
            message = .hello(SyncHello(geometry: SyncGeometry(pageSize: pageSize, pageCount: pageCount),
                                       hashAlgorithm: algorithm, verify: flags & 1 != 0, seed: seed))
        case 2:
            let raw = try r.u8()
            guard let status = HelloStatus(rawValue: raw) else { throw r.error("unknown hello status \(raw)") }
            guard try r.u8() == 0, try r.u16() == 0 else { throw r.error("reserved hello-reply bytes are not zero") }
            let pageSize = try r.pageSize()
            let pageCount = try r.pageCount()
            message = .helloReply(status, SyncGeometry(pageSize: pageSize, pageCount: pageCount))
        case 3:
            message = .dirtyBitmap(try r.bitmap())
        case 4:
            let first = Int(try r.u32())
            let count = Int(try r.u32())
            guard count <= SyncWire.hashesPerFrameMax, count * 8 == r.remaining else {
                throw r.error("hash count \(count) does not match \(r.remaining) payload bytes")
            }
            guard first + count <= SyncWire.pageCountMax else {
                throw r.error("hashes \(first)..<\(first + count) exceed \(SyncWire.pageCountMax) pages")
            }
            message = .hashes(first: first, values: try r.u64s(count))
        case 5:
            let digest = try r.u64()
            message = .commit(digest: digest, written: try r.bitmap())
        case 6:
            let raw = try r.u8()
            guard let status = CommitStatus(rawValue: raw) else { throw r.error("unknown commit status \(raw)") }
            guard try r.u8() == 0, try r.u16() == 0 else { throw r.error("reserved commit-reply bytes are not zero") }
            message = .commitReply(status)
        case 7:
            let generation = try r.u64()
            let count = Int(try r.u32())
            guard try r.u32() == 0 else { throw r.error("reserved output-digests bytes are not zero") }
            guard count <= SyncWire.outputDigestsPerFrameMax, count * OutputDigest.wireBytes == r.remaining else {
                throw r.error("output digest count \(count) does not match \(r.remaining) payload bytes")
            }
            var digests: [OutputDigest] = []
            digests.reserveCapacity(count)
            for _ in 0..<count { digests.append(try r.outputDigest()) }
            message = .outputDigests(generation: generation, digests: digests)
        default:
            throw r.error("unknown message kind \(kind)")
        }
        guard r.remaining == 0 else { throw r.error("\(r.remaining) trailing bytes after \(message.name)") }
        return SyncFrame(session: session, message)
    }

    /// Whether `bytes` look like an output-digests frame (magic, version and kind; the rest is
    /// checked by `decode`): the primary's link takes these aside as they arrive.
    public static func isOutputDigests(_ bytes: [UInt8]) -> Bool {
        bytes.count >= SyncWire.headerBytes && bytes[0] == 0x50 && bytes[1] == 0x4C && bytes[2] == 0x53 && bytes[3] == 0x56
            && bytes[4] == 0 && bytes[5] == UInt8(SyncWire.version) && bytes[6] == 7
    }
}

// MARK: - Dirty bitmap encoding

extension DirtyBitmap {
    /// Bytes of the encoding `ByteWriter.bitmap` picks: dense words, or a u32 index list when
    /// that is strictly smaller (sparse dirty sets are the common case).
    public var encodedByteCount: Int {
        SyncWire.bitmapHeaderBytes + min(words.count * 8, count * 4)
    }

    var encodesSparse: Bool { count * 4 < words.count * 8 }
}

// syncvm's fields on the package's one byte codec (RDMAPaxosCore's ByteWriter/ByteReader).
extension ByteWriter {
    /// form u8 (0 dense, 1 sparse), 3 zero bytes, set count u32, page count u64, then the
    /// words (dense) or the ascending page indices as u32 (sparse).
    mutating func bitmap(_ b: DirtyBitmap) {
        let sparse = b.encodesSparse
        u8(sparse ? 1 : 0)
        u8(0); u16(0)
        u32(UInt32(b.count))
        u64(UInt64(b.pageCount))
        if sparse {
            b.forEachPage { u32(UInt32(truncatingIfNeeded: $0)) }
        } else {
            u64s(b.words)
        }
    }
}

extension ByteWriter {
    /// kind u8, has-timestamp u8 (0/1), TCP flags u8, reserved u8, stream u64, content u64,
    /// sequence u32, acknowledgement u32, window u16, payload bytes u16, timestamp u32.
    mutating func outputDigest(_ d: OutputDigest) {
        u8(d.kind.rawValue)
        u8(d.timestamp == nil ? 0 : 1)
        u8(d.flags)
        u8(0)
        u64(d.stream)
        u64(d.content)
        u32(d.sequence)
        u32(d.acknowledgement)
        u16(d.window)
        u16(d.payloadBytes)
        u32(d.timestamp ?? 0)
    }
}

extension ByteReader {
    mutating func outputDigest() throws(DecodeError) -> OutputDigest {
        let raw = try u8()
        guard let kind = OutputDigest.Kind(rawValue: raw) else { throw error("unknown output digest kind \(raw)") }
        let hasTimestamp = try u8()
        guard hasTimestamp <= 1 else { throw error("output digest timestamp flag \(hasTimestamp) is not 0 or 1") }
        let flags = try u8()
        guard try u8() == 0 else { throw error("reserved output digest byte is not zero") }
        var d = OutputDigest(kind: kind, stream: try u64(), content: try u64(), flags: flags)
        d.sequence = try u32()
        d.acknowledgement = try u32()
        d.window = try u16()
        d.payloadBytes = try u16()
        let ts = try u32()
        d.timestamp = hasTimestamp == 1 ? ts : nil
        return d
    }

    mutating func pageSize() throws(DecodeError) -> Int {
        let v = Int(try u32())
        guard v >= SyncWire.pageSizeMin, v <= SyncWire.pageSizeMax, v.nonzeroBitCount == 1 else {
            throw error("page size \(v) is not a power of two in \(SyncWire.pageSizeMin)...\(SyncWire.pageSizeMax)")
        }
        return v
    }

    mutating func pageCount() throws(DecodeError) -> Int {
        let v = try u64()
        guard v >= 1, v <= UInt64(SyncWire.pageCountMax) else {
            throw error("page count \(v) outside 1...\(SyncWire.pageCountMax)")
        }
        return Int(v)
    }

    mutating func bitmap() throws(DecodeError) -> DirtyBitmap {
        let form = try u8()
        guard try u8() == 0, try u16() == 0 else { throw error("reserved bitmap bytes are not zero") }
        let setCount = Int(try u32())
        let pages = try pageCount()
        guard setCount <= pages else { throw error("bitmap claims \(setCount) of \(pages) pages") }
        switch form {
        case 0:
            let words = DirtyBitmap.wordCount(forPages: pages)
            guard remaining >= words * 8 else { throw error("dense bitmap of \(pages) pages needs \(words * 8) bytes, have \(remaining)") }
            guard let b = DirtyBitmap(pageCount: pages, words: try u64s(words)) else {
                throw error("dense bitmap has bits set past page \(pages)")
            }
            guard b.count == setCount else { throw error("dense bitmap holds \(b.count) pages, header says \(setCount)") }
            return b
        case 1:
            guard remaining >= setCount * 4 else { throw error("sparse bitmap of \(setCount) pages needs \(setCount * 4) bytes, have \(remaining)") }
            var b = DirtyBitmap(pageCount: pages)
            var previous = -1
            for _ in 0..<setCount {
                let p = Int(try u32())
                guard p > previous, p < pages else {
                    throw error("sparse bitmap index \(p) is out of order or outside 0..<\(pages)")
                }
                b.insert(p)
                previous = p
            }
            return b
        default:
            throw error("unknown bitmap form \(form)")
        }
    }
}
