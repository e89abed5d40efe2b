// Little binary codec for values the core defines, used by storage and the wire.
// Big-endian, length-prefixed; decoding never traps on bad bytes: it throws `DecodeError`.

/// Malformed bytes: what was being decoded and why it failed.
public struct DecodeError: Error, Equatable, Sendable, CustomStringConvertible {
    public var what: String
    public var reason: String
    public init(_ what: String, _ reason: String) {
        self.what = what
        self.reason = reason
    }
    public var description: String { "cannot decode \(what): \(reason)" }
}

/// Appends big-endian fields to a byte array.
public struct ByteWriter: Sendable {
    public private(set) var bytes: [UInt8] = []
    public init(capacity: Int = 64) { bytes.reserveCapacity(capacity) }

    public mutating func u8(_ v: UInt8) { bytes.append(v) }
    public mutating func u16(_ v: UInt16) { for s in stride(from: 8, through: 0, by: -8) { bytes.append(UInt8(truncatingIfNeeded: v >> UInt16(s))) } }
    public mutating func u32(_ v: UInt32) { for s in stride(from: 24, through: 0, by: -8) { bytes.append(UInt8(truncatingIfNeeded: v >> UInt32(s))) } }
    public mutating func u64(_ v: UInt64) { for s in stride(from: 56, through: 0, by: -8) { bytes.append(UInt8(truncatingIfNeeded: v >> UInt64(s))) } }
    public mutating func raw(_ b: [UInt8]) { bytes.append(contentsOf: b) }
    /// A u32 length followed by the bytes.
    public mutating func blob(_ b: [UInt8]) { u32(UInt32(b.count)); bytes.append(contentsOf: b) }
    public mutating func ballot(_ b: Ballot) { u64(b.term); u32(b.node) }
}

/// Reads big-endian fields from a byte array, throwing on truncation.
public struct ByteReader: Sendable {
    public let bytes: [UInt8]
    public private(set) var offset: Int = 0
    let what: String

    public init(_ bytes: [UInt8], what: String) {
        self.bytes = bytes
        self.what = what
    }

    public var remaining: Int { bytes.count - offset }

    mutating func take(_ n: Int) throws(DecodeError) -> ArraySlice<UInt8> {
        guard n >= 0, remaining >= n else {
            throw DecodeError(what, "truncated at byte \(offset): need \(n), have \(remaining)")
        }
        defer { offset += n }
        return bytes[offset..<offset + n]
    }

    mutating func uint<T: FixedWidthInteger & UnsignedInteger>(_: T.Type) throws(DecodeError) -> T {
        var v: T = 0
        for b in try take(MemoryLayout<T>.size) { v = v << 8 | T(b) }
        return v
    }

    public mutating func u8() throws(DecodeError) -> UInt8 { try uint(UInt8.self) }
    public mutating func u16() throws(DecodeError) -> UInt16 { try uint(UInt16.self) }
    public mutating func u32() throws(DecodeError) -> UInt32 { try uint(UInt32.self) }
    public mutating func u64() throws(DecodeError) -> UInt64 { try uint(UInt64.self) }
    public mutating func raw(_ n: Int) throws(DecodeError) -> [UInt8] { Array(try take(n)) }
    public mutating func blob(max: Int) throws(DecodeError) -> [UInt8] {
        let n = Int(try u32())
        guard n <= max else { throw DecodeError(what, "length \(n) exceeds limit \(max)") }
        return Array(try take(n))
    }
    public mutating func ballot() throws(DecodeError) -> Ballot { Ballot(term: try u64(), node: try u32()) }

    /// Throws unless every byte was consumed.
    public func finish() throws(DecodeError) {
        guard remaining == 0 else { throw DecodeError(what, "\(remaining) trailing bytes") }
    }
}

extension Membership {
    public func encoded() -> [UInt8] {
        var w = ByteWriter()
        w.u16(UInt16(members.count))
        for m in members { w.u32(m.id); w.u8(m.role.rawValue); w.u8(m.priority) }
        return w.bytes
    }

    public init(decoding bytes: [UInt8]) throws(DecodeError) {
        var r = ByteReader(bytes, what: "membership")
        let n = Int(try r.u16())
        var ms: [Member] = []
        for _ in 0..<n {
            let id = try r.u32()
            let raw = try r.u8()
            guard let role = MemberRole(rawValue: raw) else { throw DecodeError("membership", "unknown role \(raw)") }
            ms.append(Member(id: id, role: role, priority: try r.u8()))
        }
        try r.finish()
        guard Set(ms.map(\.id)).count == ms.count else { throw DecodeError("membership", "duplicate member id") }
        self.init(ms)
    }
}

extension HardState {
    public func encoded() -> [UInt8] {
        var w = ByteWriter()
        w.ballot(promised)
        w.u64(commitIndex)
        w.blob(membership.encoded())
        return w.bytes
    }

    public init(decoding bytes: [UInt8]) throws(DecodeError) {
        var r = ByteReader(bytes, what: "hard state")
        let promised = try r.ballot()
        let commit = try r.u64()
        let m = try Membership(decoding: try r.blob(max: 1 << 20))
        try r.finish()
        self.init(promised: promised, commitIndex: commit, membership: m)
    }
}
