// The configuration's binary form, in the log (membership entries), the hard state, snapshots and
// install-snapshot messages.
//
// Format 1 (no addresses): u16 count, then per member u32 id, u8 role, u8 priority.
// Format 2 (addresses):    u8 0xFF, u8 version (2), u16 count, then per member u32 id, u8 role,
//                          u8 priority, u16 length + peer address, u16 length + client address.
// A format 1 configuration starts with the high byte of its member count, never 0xFF (at most 255
// members), so the first byte tells the two apart. Format 1 still decodes (an old data directory
// opens, its members without addresses); an unknown version is refused naming both versions.

extension Membership {
    /// The format `encoded()` writes.
    public static let formatVersion: UInt8 = 2
    /// Most members a configuration holds.
    public static let membersMax = 255
    /// Longest address, in UTF-8 bytes.
    public static let addressBytesMax = 1024
    static let formatMarker: UInt8 = 0xFF

    /// The configuration as bytes, in format 2.
    public func encoded() -> [UInt8] {
        precondition(members.count <= Self.membersMax, "a configuration holds at most \(Self.membersMax) members")
        var w = ByteWriter()
        w.u8(Self.formatMarker)
        w.u8(Self.formatVersion)
        w.u16(UInt16(members.count))
        for m in members {
            w.u32(m.id); w.u8(m.role.rawValue); w.u8(m.priority)
            for a in [m.peerAddress, m.clientAddress] {
                let bytes = Array(a.utf8.prefix(Self.addressBytesMax))
                w.u16(UInt16(bytes.count)); w.raw(bytes)
            }
        }
        return w.bytes
    }

    /// Decodes format 1 or 2; throws on truncation, trailing bytes, an unknown format or role, a
    /// zero or duplicate id.
    public init(decoding bytes: [UInt8]) throws(DecodeError) {
        var r = ByteReader(bytes, what: "membership")
        var version: UInt8 = 1
        if bytes.first == Self.formatMarker {
            _ = try r.u8()
            version = try r.u8()
            guard version == Self.formatVersion else {
                throw DecodeError("membership", "format \(version), this build reads formats 1 and \(Self.formatVersion)")
            }
        }
        let n = Int(try r.u16())
        guard n <= Self.membersMax else { throw DecodeError("membership", "\(n) members exceed the limit of \(Self.membersMax)") }
        var ms: [Member] = []
        for _ in 0..<n {
            let id = try r.u32()
            guard id != 0 else { throw DecodeError("membership", "member id 0") }
            let raw = try r.u8()
            guard let role = MemberRole(rawValue: raw) else { throw DecodeError("membership", "unknown role \(raw)") }
            var m = Member(id: id, role: role, priority: try r.u8())
            if version >= 2 {
                m.peerAddress = try Self.address(&r)
                m.clientAddress = try Self.address(&r)
            }
            ms.append(m)
        }
        try r.finish()
        guard Set(ms.map(\.id)).count == ms.count else { throw DecodeError("membership", "duplicate member id") }
        self.init(ms)
    }

    /// Reads a u16 length and that many bytes of address (at most `addressBytesMax`).
    public static func address(_ r: inout ByteReader) throws(DecodeError) -> String {
        let n = Int(try r.u16())
        guard n <= addressBytesMax else { throw DecodeError("membership", "address of \(n) bytes exceeds \(addressBytesMax)") }
        return String(decoding: try r.raw(n), as: UTF8.self)
    }

    /// Bytes of `encoded()`.
    public var encodedBytes: Int {
        4 + members.reduce(0) { $0 + 10 + min($1.peerAddress.utf8.count, Self.addressBytesMax) + min($1.clientAddress.utf8.count, Self.addressBytesMax) }
    }
}
