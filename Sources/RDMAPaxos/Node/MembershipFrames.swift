// The bodies of the client protocol's membership requests and answers (ClientProtocol.swift,
// kinds 5 and 6). Big-endian, on the core's ByteWriter/ByteReader; the configuration inside is
// `Membership.encoded()` (format 2).

/// What a replica answers to a configuration request: the leader it knows and the configuration
/// it follows (the latest in its log).
public struct ConfigurationReply: Sendable, Equatable {
    /// The leader the replica knows of, if any.
    public var leader: NodeID?
    /// The configuration in force at the replica.
    public var membership: Membership

    /// A reply with every field given.
    public init(leader: NodeID?, membership: Membership) {
        self.leader = leader
        self.membership = membership
    }

    /// u32 leader (0: none), then the encoded configuration.
    public var wireBytes: [UInt8] {
        var w = ByteWriter()
        w.u32(leader ?? 0)
        w.raw(membership.encoded())
        return w.bytes
    }

    /// Decodes `wireBytes`; throws on malformed bytes.
    public init(wireBytes b: [UInt8]) throws(DecodeError) {
        var r = ByteReader(b, what: "configuration reply")
        let l = try r.u32()
        leader = l == 0 ? nil : l
        membership = try Membership(decoding: try r.raw(r.remaining))
    }
}

extension MembershipChange {
    /// u8 operation (1 add, 2 remove, 3 promote, 4 change role), u32 id, u8 role, u8 priority,
    /// u8 1 when the priority is given (change role), u16 length + peer address, u16 length +
    /// client address (add).
    public var wireBytes: [UInt8] {
        var w = ByteWriter()
        var role = MemberRole.learner, priority: UInt8?, peer = "", client = ""
        let op: UInt8
        switch self {
        case let .add(m): op = 1; role = m.role; priority = m.priority; peer = m.peerAddress; client = m.clientAddress
        case .remove: op = 2
        case .promote: op = 3
        case let .changeRole(_, r, p): op = 4; role = r; priority = p
        }
        w.u8(op); w.u32(member); w.u8(role.rawValue); w.u8(priority ?? 0); w.u8(priority == nil ? 0 : 1)
        for a in [peer, client] {
            let bytes = Array(a.utf8.prefix(Membership.addressBytesMax))
            w.u16(UInt16(bytes.count)); w.raw(bytes)
        }
        return w.bytes
    }

    /// Decodes `wireBytes`; throws on malformed bytes.
    public init(wireBytes b: [UInt8]) throws(DecodeError) {
        var r = ByteReader(b, what: "membership change")
        let op = try r.u8(), id = try r.u32(), rawRole = try r.u8(), p = try r.u8(), hasPriority = try r.u8()
        guard let role = MemberRole(rawValue: rawRole) else { throw DecodeError("membership change", "unknown role \(rawRole)") }
        guard hasPriority <= 1 else { throw DecodeError("membership change", "priority flag \(hasPriority)") }
        let peer = try Membership.address(&r), client = try Membership.address(&r)
        try r.finish()
        switch op {
        case 1: self = .add(Member(id: id, role: role, priority: p, peerAddress: peer, clientAddress: client))
        case 2: self = .remove(id)
        case 3: self = .promote(id)
        case 4: self = .changeRole(id, role: role, priority: hasPriority == 1 ? p : nil)
        default: throw DecodeError("membership change", "unknown operation \(op)")
        }
    }
}

extension MembershipAnswer {
    /// The change, u64 index (0: handed over), u32 handed-over-to (0: none), the configuration.
    public var wireBytes: [UInt8] {
        var w = ByteWriter()
        w.blob(change.wireBytes)
        w.u64(index ?? 0); w.u32(handedOverTo ?? 0)
        w.raw(membership.encoded())
        return w.bytes
    }

    /// Decodes `wireBytes`; throws on malformed bytes.
    public init(wireBytes b: [UInt8]) throws(DecodeError) {
        var r = ByteReader(b, what: "membership answer")
        let change = try MembershipChange(wireBytes: try r.blob(max: 4096))
        let index = try r.u64(), to = try r.u32()
        self.init(change: change, index: index == 0 ? nil : index, membership: try Membership(decoding: try r.raw(r.remaining)),
                  handedOverTo: to == 0 ? nil : to)
    }
}
