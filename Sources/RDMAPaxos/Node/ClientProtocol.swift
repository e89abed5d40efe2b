/// The client protocol a replica serves on its client address (`plover kv`, `plover status`,
/// load generators): length-prefixed frames over TCP, pipelined, answered by request id.
///
///     frame    = u32 length (of the rest) | u8 kind | u64 request id | body
///     requests : 1 propose(command bytes)  2 read(query bytes)  3 status()
///                4 local read(query bytes): this replica's state, possibly stale (any role)
///                5 configuration(): the replica's configuration (`ConfigurationReply`)
///                6 change membership(`MembershipChange.wireBytes`): answered with a
///                  `MembershipAnswer.wireBytes` once committed (MembershipFrames.swift)
///                7 backup(): this replica's state machine and configuration as a snapshot file
///                  (`FileSnapshotStore.encode`)
///     responses: 128 ok(result bytes)  129 error(u8 code, u32 leader or 0, message utf8)
///                130 status(text utf8)
public enum ClientFrame: Equatable, Sendable {
    /// Request 1: propose `command` for the log; answered with the state machine's result.
    case propose(id: UInt64, command: [UInt8])
    /// Request 2: a linearizable read, confirmed by the leader.
    case read(id: UInt64, query: [UInt8])
    /// Request 3: the replica's status as text.
    case status(id: UInt64)
    /// Request 4: a read of this replica's state as it is, possibly stale; any role answers.
    case localRead(id: UInt64, query: [UInt8])
    /// Request 5: the configuration this replica follows and the leader it knows.
    case configuration(id: UInt64)
    /// Request 6: a membership change, through the leader.
    case changeMembership(id: UInt64, change: MembershipChange)
    /// Request 7: a snapshot of this replica's applied state, for a backup.
    case backup(id: UInt64)
    /// Response 128: the request succeeded with `result`.
    case ok(id: UInt64, result: [UInt8])
    /// Response 129: the request failed; `leader` says where to retry when known.
    case error(id: UInt64, code: ClientErrorCode, leader: NodeID?, message: String)
    /// Response 130: the answer to `status`.
    case statusReply(id: UInt64, text: String)

    /// Largest frame either side accepts; larger ones close the connection.
    public static let bytesMax = 32 << 20

    /// The request id, echoed in the response.
    public var id: UInt64 {
        switch self {
        case let .propose(id, _), let .read(id, _), let .status(id), let .localRead(id, _), let .ok(id, _), let .error(id, _, _, _), let .statusReply(id, _),
             let .configuration(id), let .changeMembership(id, _), let .backup(id): id
        }
    }

    /// The frame as sent: a u32 length prefix, then kind, id and body.
    public func encoded() -> [UInt8] {
        var w = ByteWriter()
        switch self {
        case let .propose(id, c): w.u8(1); w.u64(id); w.raw(c)
        case let .read(id, q): w.u8(2); w.u64(id); w.raw(q)
        case let .status(id): w.u8(3); w.u64(id)
        case let .localRead(id, q): w.u8(4); w.u64(id); w.raw(q)
        case let .configuration(id): w.u8(5); w.u64(id)
        case let .changeMembership(id, c): w.u8(6); w.u64(id); w.raw(c.wireBytes)
        case let .backup(id): w.u8(7); w.u64(id)
        case let .ok(id, r): w.u8(128); w.u64(id); w.raw(r)
        case let .error(id, code, leader, msg): w.u8(129); w.u64(id); w.u8(code.rawValue); w.u32(leader ?? 0); w.raw(Array(msg.utf8))
        case let .statusReply(id, text): w.u8(130); w.u64(id); w.raw(Array(text.utf8))
        }
        var out = ByteWriter(capacity: w.bytes.count + 4)
        out.u32(UInt32(w.bytes.count))
        out.raw(w.bytes)
        return out.bytes
    }

    /// Decodes one frame body (without the length prefix).
    public init(body: [UInt8]) throws(DecodeError) {
        var r = ByteReader(body, what: "client frame")
        let kind = try r.u8()
        let id = try r.u64()
        let rest = try r.raw(r.remaining)
        switch kind {
        case 1: self = .propose(id: id, command: rest)
        case 2: self = .read(id: id, query: rest)
        case 3:
            guard rest.isEmpty else { throw DecodeError("client frame", "status request carries \(rest.count) stray bytes") }
            self = .status(id: id)
        case 4: self = .localRead(id: id, query: rest)
        case 5:
            guard rest.isEmpty else { throw DecodeError("client frame", "configuration request carries \(rest.count) stray bytes") }
            self = .configuration(id: id)
        case 6: self = .changeMembership(id: id, change: try MembershipChange(wireBytes: rest))
        case 7:
            guard rest.isEmpty else { throw DecodeError("client frame", "backup request carries \(rest.count) stray bytes") }
            self = .backup(id: id)
        case 128: self = .ok(id: id, result: rest)
        case 129:
            var e = ByteReader(rest, what: "client error frame")
            let raw = try e.u8()
            let code = ClientErrorCode(rawValue: raw) ?? .other
            let leader = try e.u32()
            self = .error(id: id, code: code, leader: leader == 0 ? nil : leader, message: String(decoding: try e.raw(e.remaining), as: UTF8.self))
        case 130: self = .statusReply(id: id, text: String(decoding: rest, as: UTF8.self))
        default: throw DecodeError("client frame", "unknown kind \(kind)")
        }
    }
}

/// Why a request failed, as carried in an `error` frame (one code per `NodeError` case; unknown
/// codes decode as `other`).
public enum ClientErrorCode: UInt8, Sendable {
    /// Not the leader; timed out or overtaken by a snapshot (outcome unknown); superseded by a new
    /// leader; refused by the core; node stopped; storage failure; malformed request; anything else.
    case notLeader = 1, timedOut = 2, superseded = 3, refused = 4, stopped = 5, storage = 6, badRequest = 7, other = 255

    /// Whether a proposal answered with this code may still take effect, so that sending it again
    /// could apply it twice: it may be in a leader's log although this answer is an error. True
    /// for `timedOut`, `stopped` and `storage` (the node stopped, or its log failed, while the
    /// command may already have been replicated) and for `other` (an error this client cannot
    /// interpret); false for the codes that say it did not take effect.
    public var leavesProposalOutcomeUnknown: Bool {
        switch self {
        case .timedOut, .stopped, .storage, .other: true
        case .notLeader, .superseded, .refused, .badRequest: false
        }
    }

    init(_ e: NodeError) {
        switch e {
        case .notLeader: self = .notLeader
        case .timedOut, .outcomeUnknown: self = .timedOut
        case .superseded: self = .superseded
        case .refused, .membershipRefused: self = .refused
        case .stopped: self = .stopped
        case .storage: self = .storage
        }
    }
}
