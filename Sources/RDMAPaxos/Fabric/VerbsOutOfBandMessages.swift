// The messages of the out-of-band connect exchange (version 2) and the two ends' rules, as pure
// values and functions: the sockets are in VerbsOutOfBand.swift. docs/design/fabric.md, "Verbs
// connect exchanges", has the tables.
//
//   connector                                   acceptor
//   hello(c, a, nonce_c)                  →
//                                         ←     challenge(a, c, nonce_a, MAC_challenge)   [or reject]
//   request(endpoint_c, region_c, MAC_request) →
//                                         ←     accept(endpoint_a, region_a, MAC_accept)  [or reject]
//
// The MACs cover both node ids and both nonces (and the endpoint and region they carry), each
// under its own label: a MAC proves the key for this connection only. The acceptor creates its
// queue pair only after the request's MAC checked out, and the connector moves its own past INIT
// only after the accept's did: a peer without the key gets no queue pair to RTR on either side.

/// One out-of-band message: an 8-byte header ("PLVQ", u16 version, u8 kind, u8 zero), then a
/// body whose size the kind fixes. Big-endian.
enum OutOfBandMessage: Hashable, Sendable {
    case hello(from: NodeID, to: NodeID, nonce: [UInt8])
    case challenge(from: NodeID, to: NodeID, nonce: [UInt8], mac: [UInt8])
    case request(endpoint: VerbsEndpoint, descriptor: [UInt8], mac: [UInt8])
    case accept(endpoint: VerbsEndpoint, descriptor: [UInt8], mac: [UInt8])
    case reject(VerbsPeerRefusal.Reason)

    static let magic = Array("PLVQ".utf8)
    static let version: UInt16 = 2
    static let headerBytes = 8
    static let nonceBytes = 32
    static let descriptorBytes = 24
    /// u8 link layer, u8 MTU, u16 LID, u32 QP number, u32 PSN, 16 B GID.
    static let endpointBytes = 28

    var kind: UInt8 {
        switch self {
        case .hello: 1
        case .challenge: 2
        case .request: 3
        case .accept: 4
        case .reject: 5
        }
    }

    /// The body size of each kind; nil for an unknown kind.
    static func bodyBytes(kind: UInt8) -> Int? {
        switch kind {
        case 1: 8 + nonceBytes
        case 2: 8 + nonceBytes + VerbsPeerMAC.bytes
        case 3, 4: endpointBytes + descriptorBytes + VerbsPeerMAC.bytes
        case 5: 4
        default: nil
        }
    }

    func encoded() -> [UInt8] {
        var w = ByteWriter(capacity: 96)
        w.raw(Self.magic); w.u16(Self.version); w.u8(kind); w.u8(0)
        switch self {
        case let .hello(from, to, nonce):
            w.u32(from); w.u32(to); w.raw(nonce)
        case let .challenge(from, to, nonce, mac):
            w.u32(from); w.u32(to); w.raw(nonce); w.raw(mac)
        case let .request(endpoint, descriptor, mac), let .accept(endpoint, descriptor, mac):
            w.raw(Self.encode(endpoint)); w.raw(descriptor); w.raw(mac)
        case let .reject(reason):
            w.u8(reason.rawValue); w.u8(0); w.u16(0)
        }
        return w.bytes
    }

    /// The kind named by a header, or why it is refused: not this protocol, another version, an
    /// unknown kind.
    static func kind(ofHeader header: [UInt8]) throws(VerbsPeerRefusal) -> UInt8 {
        guard header.count == headerBytes, Array(header[0..<4]) == magic, header[7] == 0 else { throw .init(.malformed) }
        guard UInt16(header[4]) << 8 | UInt16(header[5]) == version else { throw .init(.badVersion) }
        guard bodyBytes(kind: header[6]) != nil else { throw .init(.malformed) }
        return header[6]
    }

    /// Decodes a whole message (header and body); throws `.malformed` or `.badVersion`.
    static func decode(_ bytes: [UInt8]) throws(VerbsPeerRefusal) -> OutOfBandMessage {
        guard bytes.count >= headerBytes else { throw .init(.malformed) }
        let kind = try kind(ofHeader: Array(bytes[0..<headerBytes]))
        guard bytes.count == headerBytes + bodyBytes(kind: kind)! else { throw .init(.malformed) }
        var r = ByteReader(Array(bytes[headerBytes...]), what: "out-of-band message")
        do {
            switch kind {
            case 1:
                return .hello(from: try r.u32(), to: try r.u32(), nonce: try r.raw(nonceBytes))
            case 2:
                return .challenge(from: try r.u32(), to: try r.u32(), nonce: try r.raw(nonceBytes), mac: try r.raw(VerbsPeerMAC.bytes))
            case 3, 4:
                guard let endpoint = decodeEndpoint(try r.raw(endpointBytes)) else { throw VerbsPeerRefusal(.malformed) }
                let descriptor = try r.raw(descriptorBytes), mac = try r.raw(VerbsPeerMAC.bytes)
                return kind == 3 ? .request(endpoint: endpoint, descriptor: descriptor, mac: mac)
                                 : .accept(endpoint: endpoint, descriptor: descriptor, mac: mac)
            default:
                guard let reason = VerbsPeerRefusal.Reason(rawValue: try r.u8()), try r.u8() == 0, try r.u16() == 0 else {
                    throw VerbsPeerRefusal(.malformed)
                }
                return .reject(reason)
            }
        } catch let e as VerbsPeerRefusal {
            throw e
        } catch {
            throw .init(.malformed)
        }
    }

    static func encode(_ e: VerbsEndpoint) -> [UInt8] {
        var w = ByteWriter(capacity: endpointBytes)
        w.u8(e.port.ethernet ? 1 : 0)
        w.u8(UInt8(truncatingIfNeeded: e.port.mtu))
        w.u16(e.port.lid)
        w.u32(e.queuePair)
        w.u32(e.psn)
        w.raw(Array((e.port.gid + [UInt8](repeating: 0, count: 16)).prefix(16)))
        return w.bytes
    }

    /// Nil unless the link layer is 0/1, the MTU a verbs `ibv_mtu` (1…5), QP number and PSN 24-bit.
    static func decodeEndpoint(_ bytes: [UInt8]) -> VerbsEndpoint? {
        var r = ByteReader(bytes, what: "endpoint")
        guard let link = try? r.u8(), link <= 1, let mtu = try? r.u8(), (1...5).contains(mtu), let lid = try? r.u16(),
              let qpn = try? r.u32(), qpn <= 0xFF_FFFF, let psn = try? r.u32(), psn <= 0xFF_FFFF,
              let gid = try? r.raw(16), r.remaining == 0 else { return nil }
        return VerbsEndpoint(queuePair: qpn, psn: psn, port: VerbsPortAddress(lid: lid, gid: gid, ethernet: link == 1, mtu: UInt32(mtu)))
    }
}

/// The MAC transcripts of the exchange: label, both node ids, both nonces, and for a request or an
/// accept the endpoint and region it carries.
enum OutOfBandTranscript {
    static let challengeLabel = "plover-verbs-oob-v2 challenge"
    static let requestLabel = "plover-verbs-oob-v2 request"
    static let acceptLabel = "plover-verbs-oob-v2 accept"

    static func fields(connector: NodeID, acceptor: NodeID, connectorNonce: [UInt8], acceptorNonce: [UInt8],
                       endpoint: VerbsEndpoint? = nil, descriptor: [UInt8] = []) -> [UInt8] {
        var w = ByteWriter(capacity: 160)
        w.u32(connector); w.u32(acceptor); w.raw(connectorNonce); w.raw(acceptorNonce)
        if let endpoint { w.raw(OutOfBandMessage.encode(endpoint)) }
        w.raw(descriptor)
        return w.bytes
    }
}

/// The connector's end of one exchange.
struct OutOfBandDialer {
    let key: [UInt8]
    let me: NodeID
    let peer: NodeID
    let nonce: [UInt8]
    private var acceptorNonce: [UInt8]?

    init(key: [UInt8], me: NodeID, peer: NodeID, nonce: [UInt8] = VerbsPeerMAC.nonce(bytes: OutOfBandMessage.nonceBytes)) {
        self.key = key
        self.me = me
        self.peer = peer
        self.nonce = nonce
    }

    var hello: OutOfBandMessage { .hello(from: me, to: peer, nonce: nonce) }

    /// Checks the acceptor's challenge and answers it with this end's queue pair and region.
    mutating func respond(to message: OutOfBandMessage, endpoint: VerbsEndpoint, descriptor: [UInt8]) throws(VerbsPeerRefusal) -> OutOfBandMessage {
        // The acceptor refused this node (claimed: the id this end gave).
        if case let .reject(reason) = message { throw .init(reason, claimed: me) }
        guard case let .challenge(from, to, acceptorNonce, mac) = message else { throw .init(.malformed, claimed: peer) }
        guard from == peer, to == me else { throw .init(.wrongNode, claimed: from) }
        let fields = OutOfBandTranscript.fields(connector: me, acceptor: peer, connectorNonce: nonce, acceptorNonce: acceptorNonce)
        guard VerbsPeerMAC.verify(mac, key: key, label: OutOfBandTranscript.challengeLabel, fields) else {
            throw .init(.badMAC, claimed: peer)
        }
        self.acceptorNonce = acceptorNonce
        let signed = OutOfBandTranscript.fields(connector: me, acceptor: peer, connectorNonce: nonce, acceptorNonce: acceptorNonce,
                                                endpoint: endpoint, descriptor: descriptor)
        return .request(endpoint: endpoint, descriptor: descriptor,
                        mac: VerbsPeerMAC.mac(key: key, label: OutOfBandTranscript.requestLabel, signed))
    }

    /// Checks the acceptor's answer: its queue pair and region, for this connection, under the key.
    func accepted(_ message: OutOfBandMessage) throws(VerbsPeerRefusal) -> (endpoint: VerbsEndpoint, region: RemoteRegion) {
        // The acceptor refused this node (claimed: the id this end gave).
        if case let .reject(reason) = message { throw .init(reason, claimed: me) }
        guard case let .accept(endpoint, descriptor, mac) = message, let acceptorNonce else { throw .init(.malformed, claimed: peer) }
        let signed = OutOfBandTranscript.fields(connector: me, acceptor: peer, connectorNonce: nonce, acceptorNonce: acceptorNonce,
                                                endpoint: endpoint, descriptor: descriptor)
        guard VerbsPeerMAC.verify(mac, key: key, label: OutOfBandTranscript.acceptLabel, signed) else {
            throw .init(.badMAC, claimed: peer)
        }
        guard let (node, region) = VerbsFabric.parsePrivateData(descriptor), node == peer else { throw .init(.malformed, claimed: peer) }
        return (endpoint, region)
    }
}

/// The acceptor's end of one exchange.
struct OutOfBandAnswerer {
    let key: [UInt8]
    let me: NodeID
    let members: Set<NodeID>
    let nonce: [UInt8]
    /// The connector's hello, once read.
    private struct Hello { let connector: NodeID; let nonce: [UInt8] }
    private var hello: Hello?

    init(key: [UInt8], me: NodeID, members: Set<NodeID>, nonce: [UInt8] = VerbsPeerMAC.nonce(bytes: OutOfBandMessage.nonceBytes)) {
        self.key = key
        self.me = me
        self.members = members
        self.nonce = nonce
    }

    /// The node the connector claims to be, once its hello was read.
    var claimed: NodeID? { hello?.connector }

    /// Checks a hello (addressed here, from a member, with a nonce not seen before) and challenges
    /// the connector to prove the key. Nothing is created yet.
    mutating func challenge(_ message: OutOfBandMessage, replays: VerbsReplayMemory) throws(VerbsPeerRefusal) -> OutOfBandMessage {
        guard case let .hello(from, to, connectorNonce) = message else { throw .init(.malformed) }
        guard to == me else { throw .init(.wrongNode, claimed: from) }
        guard from != me, members.contains(from) else { throw .init(.unknownNode, claimed: from) }
        guard replays.admit(connectorNonce) else { throw .init(.replayed, claimed: from) }
        hello = Hello(connector: from, nonce: connectorNonce)
        let fields = OutOfBandTranscript.fields(connector: from, acceptor: me, connectorNonce: connectorNonce, acceptorNonce: nonce)
        return .challenge(from: me, to: from, nonce: nonce, mac: VerbsPeerMAC.mac(key: key, label: OutOfBandTranscript.challengeLabel, fields))
    }

    /// Checks the connector's request: its MAC proves the key for this connection (so it cannot be
    /// a recording: this end's nonce is fresh), and its region is the connector's own.
    func verify(_ message: OutOfBandMessage) throws(VerbsPeerRefusal) -> (peer: NodeID, endpoint: VerbsEndpoint, region: RemoteRegion) {
        guard let hello else { throw .init(.malformed) }
        // The connector refuses this end's challenge when the keys differ, and says so.
        if case let .reject(reason) = message { throw .init(reason, claimed: hello.connector) }
        guard case let .request(endpoint, descriptor, mac) = message else { throw .init(.malformed, claimed: hello.connector) }
        let signed = OutOfBandTranscript.fields(connector: hello.connector, acceptor: me, connectorNonce: hello.nonce,
                                                acceptorNonce: nonce, endpoint: endpoint, descriptor: descriptor)
        guard VerbsPeerMAC.verify(mac, key: key, label: OutOfBandTranscript.requestLabel, signed) else {
            throw .init(.badMAC, claimed: hello.connector)
        }
        guard let (node, region) = VerbsFabric.parsePrivateData(descriptor), node == hello.connector else {
            throw .init(.malformed, claimed: hello.connector)
        }
        return (hello.connector, endpoint, region)
    }

    /// The answer to a verified request: this end's queue pair (already at RTS) and region.
    func accept(endpoint: VerbsEndpoint, descriptor: [UInt8]) -> OutOfBandMessage {
        let connector = hello?.connector ?? 0
        let signed = OutOfBandTranscript.fields(connector: connector, acceptor: me, connectorNonce: hello?.nonce ?? [],
                                                acceptorNonce: nonce, endpoint: endpoint, descriptor: descriptor)
        return .accept(endpoint: endpoint, descriptor: descriptor, mac: VerbsPeerMAC.mac(key: key, label: OutOfBandTranscript.acceptLabel, signed))
    }
}
