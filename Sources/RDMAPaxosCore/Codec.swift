// Little binary codec for values the core defines, used by storage and the wire.
// Big-endian, length-prefixed; decoding never traps on bad bytes: it throws `DecodeError`.

/// Malformed bytes: what was being decoded and why it failed.
public struct DecodeError: Error, Equatable, Sendable, CustomStringConvertible {
    /// What was being decoded.
    public var what: String
    /// Why the bytes were rejected.
    public var reason: String
    /// An error decoding `what`, failing for `reason`.
    public init(_ what: String, _ reason: String) {
        self.what = what
        self.reason = reason
    }
    public var description: String { "cannot decode \(what): \(reason)" }
}

/// Appends big-endian fields to a byte array.
public struct ByteWriter: Sendable {
    /// The bytes written so far.
    public private(set) var bytes: [UInt8] = []
    /// An empty writer with room for `capacity` bytes.
    public init(capacity: Int = 64) { bytes.reserveCapacity(capacity) }

    /// Appends one byte.
    public mutating func u8(_ v: UInt8) { bytes.append(v) }
    /// Appends two bytes, big-endian.
    public mutating func u16(_ v: UInt16) { withUnsafeBytes(of: v.bigEndian) { bytes.append(contentsOf: $0) } }
    /// Appends four bytes, big-endian.
    public mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.bigEndian) { bytes.append(contentsOf: $0) } }
    /// Appends eight bytes, big-endian.
    public mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.bigEndian) { bytes.append(contentsOf: $0) } }
    /// Appends the bytes as they are, without a length.
    public mutating func raw(_ b: some Sequence<UInt8>) { bytes.append(contentsOf: b) }
    /// Appends each value as eight big-endian bytes, in one resize (hash arrays reach megabytes).
    public mutating func u64s(_ values: [UInt64]) {
        let start = bytes.count
        bytes.append(contentsOf: repeatElement(0, count: values.count * 8))
        bytes.withUnsafeMutableBytes { out in
            for (i, v) in values.enumerated() { out.storeBytes(of: v.bigEndian, toByteOffset: start + i * 8, as: UInt64.self) }
        }
    }
    /// Overwrites the four bytes at `offset` (written earlier) with `v`, big-endian: a length
    /// known only once what follows it is written.
    public mutating func patchU32(at offset: Int, _ v: UInt32) {
        bytes.withUnsafeMutableBytes { $0.storeBytes(of: v.bigEndian, toByteOffset: offset, as: UInt32.self) }
    }
    /// A u32 length followed by the bytes.
    public mutating func blob(_ b: [UInt8]) { u32(UInt32(b.count)); bytes.append(contentsOf: b) }
    /// Appends a ballot: term as u64, then node as u32 (12 bytes).
    public mutating func ballot(_ b: Ballot) { u64(b.term); u32(b.node) }
}

/// Reads big-endian fields from a byte array, throwing on truncation.
public struct ByteReader: Sendable {
    /// The whole input.
    public let bytes: [UInt8]
    /// Number of bytes consumed so far.
    public private(set) var offset: Int = 0
    let what: String

    /// A reader at the start of `bytes`; errors name `what`.
    public init(_ bytes: [UInt8], what: String) {
        self.bytes = bytes
        self.what = what
    }

    /// Number of bytes not yet consumed.
    public var remaining: Int { bytes.count - offset }

    mutating func take(_ n: Int) throws(DecodeError) -> ArraySlice<UInt8> {
        guard n >= 0, remaining >= n else {
            throw DecodeError(what, "truncated at byte \(offset): need \(n), have \(remaining)")
        }
        defer { offset += n }
        return bytes[offset..<offset + n]
    }

    mutating func uint<T: FixedWidthInteger & UnsignedInteger>(_: T.Type) throws(DecodeError) -> T {
        let n = MemoryLayout<T>.size
        guard remaining >= n else { throw error("truncated at byte \(offset): need \(n), have \(remaining)") }
        let v = bytes.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: offset, as: T.self) }
        offset += n
        return T(bigEndian: v)
    }

    /// A decoding error naming what this reader decodes.
    public func error(_ reason: String) -> DecodeError { DecodeError(what, reason) }

    /// Reads one byte; throws when none is left.
    public mutating func u8() throws(DecodeError) -> UInt8 { try uint(UInt8.self) }
    /// Reads a big-endian u16; throws on truncation.
    public mutating func u16() throws(DecodeError) -> UInt16 { try uint(UInt16.self) }
    /// Reads a big-endian u32; throws on truncation.
    public mutating func u32() throws(DecodeError) -> UInt32 { try uint(UInt32.self) }
    /// Reads a big-endian u64; throws on truncation.
    public mutating func u64() throws(DecodeError) -> UInt64 { try uint(UInt64.self) }
    /// Reads the next `n` bytes; throws on truncation.
    public mutating func raw(_ n: Int) throws(DecodeError) -> [UInt8] { Array(try take(n)) }
    /// Reads `count` big-endian u64 values in one pass; throws on truncation.
    public mutating func u64s(_ count: Int) throws(DecodeError) -> [UInt64] {
        guard count >= 0, remaining >= count * 8 else { throw error("truncated: \(count) words need \(count * 8) bytes, have \(remaining)") }
        let start = offset
        offset += count * 8
        return bytes.withUnsafeBytes { raw in
            (0..<count).map { UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: start + $0 * 8, as: UInt64.self)) }
        }
    }
    /// Reads a u32 length and that many bytes; throws if the length exceeds `max` or the input.
    public mutating func blob(max: Int) throws(DecodeError) -> [UInt8] {
        let n = Int(try u32())
        guard n <= max else { throw DecodeError(what, "length \(n) exceeds limit \(max)") }
        return Array(try take(n))
    }
    /// Reads a ballot written by `ByteWriter.ballot(_:)`.
    public mutating func ballot() throws(DecodeError) -> Ballot { Ballot(term: try u64(), node: try u32()) }

    /// Throws unless every byte was consumed.
    public func finish() throws(DecodeError) {
        guard remaining == 0 else { throw DecodeError(what, "\(remaining) trailing bytes") }
    }
}

extension HardState {
    /// The hard state as bytes: promised ballot, commit index, the encoded membership, then one
    /// byte 1 only when recovering (so that hard states written before that flag existed decode
    /// as not recovering).
    public func encoded() -> [UInt8] {
        var w = ByteWriter()
        w.ballot(promised)
        w.u64(commitIndex)
        w.blob(membership.encoded())
        if recovering { w.u8(1) }
        return w.bytes
    }

    /// Decodes `encoded()`; throws on malformed bytes.
    public init(decoding bytes: [UInt8]) throws(DecodeError) {
        var r = ByteReader(bytes, what: "hard state")
        let promised = try r.ballot()
        let commit = try r.u64()
        let m = try Membership(decoding: try r.blob(max: 1 << 20))
        var recovering = false
        if r.remaining > 0 {
            let flag = try r.u8()
            guard flag == 1 else { throw DecodeError("hard state", "recovering flag \(flag)") }
            recovering = true
        }
        try r.finish()
        self.init(promised: promised, commitIndex: commit, membership: m, recovering: recovering)
    }
}
