// rdma_cm's private data, authenticated: pure encoding and checks. The wiring (ConnectionManager,
// VerbsConnectionManager.swift) runs only on hardware; these functions are tested everywhere.
//
// A connect request (the CM REQ) carries at most 56 bytes of private data, so there is no room for
// a challenge round trip: the connector signs its region descriptor with a fresh nonce and the
// time, and the acceptor takes it only within a time window and only once per nonce.
//
// Request, 56 bytes, big-endian:
//   0   24  region descriptor: u32 node, u64 base, u32 rkey, u64 length
//   24   1  version (1)
//   25   3  zero
//   28   4  u32 seconds since 1970 (the connector's clock)
//   32   8  nonce
//   40  16  HMAC-SHA256(key, "plover-verbs-cm-v1 request" | u32 acceptor | bytes 0..<40), first 16 bytes
//
// Accept (the CM REP, room for 196), 40 bytes:
//   0   24  the acceptor's region descriptor
//   24  16  HMAC-SHA256(key, "plover-verbs-cm-v1 accept" | u32 connector | u32 acceptor | the
//           request's u32 time and nonce | bytes 0..<24), first 16 bytes
//
// A 128-bit truncated HMAC-SHA256 is a standard construction (RFC 2104, section 5); a forger
// has one guess per connect request.

/// The authenticated private data of an rdma_cm connect request, and the acceptor's answer.
struct VerbsConnectRequest: Hashable, Sendable {
    static let bytes = 56
    static let acceptBytes = 40
    static let version: UInt8 = 1
    static let nonceBytes = 8
    static let macBytes = 16
    /// How far the request's time may be from the acceptor's clock, either way.
    static let windowSeconds: UInt32 = 30
    static let requestLabel = "plover-verbs-cm-v1 request"
    static let acceptLabel = "plover-verbs-cm-v1 accept"

    /// The connector's node and region (the descriptor's fields).
    var node: NodeID
    var region: RemoteRegion
    var time: UInt32
    var nonce: [UInt8]

    /// The request `node` sends to `acceptor`, signed.
    static func signed(key: [UInt8], node: NodeID, region: RemoteRegion, acceptor: NodeID, time: UInt32,
                       nonce: [UInt8] = VerbsPeerMAC.nonce(bytes: nonceBytes)) -> (request: VerbsConnectRequest, bytes: [UInt8]) {
        let request = VerbsConnectRequest(node: node, region: region, time: time, nonce: nonce)
        let body = request.body
        return (request, body + Array(VerbsPeerMAC.mac(key: key, label: requestLabel, acceptorField(acceptor) + body).prefix(macBytes)))
    }

    private var body: [UInt8] {
        var w = ByteWriter(capacity: 40)
        w.raw(VerbsFabric.privateData(node: node, region: region))
        w.u8(Self.version); w.u8(0); w.u16(0)
        w.u32(time)
        w.raw(nonce)
        return w.bytes
    }

    private static func acceptorField(_ acceptor: NodeID) -> [UInt8] {
        var w = ByteWriter(capacity: 4)
        w.u32(acceptor)
        return w.bytes
    }

    /// The acceptor's checks, cheapest first and the nonce recorded last, so forged requests
    /// cannot fill the replay memory: the layout and version, a member other than `me`, the time
    /// within `windowSeconds` of `now`, the MAC, a nonce not used before. rdma_cm may deliver the
    /// private data padded with zeros: only the first 56 bytes count.
    static func verify(_ data: [UInt8], key: [UInt8], me: NodeID, members: Set<NodeID>, now: UInt32,
                       replays: VerbsReplayMemory) throws(VerbsPeerRefusal) -> VerbsConnectRequest {
        guard data.count >= bytes else { throw .init(.malformed) }
        let body = Array(data[0..<40]), mac = Array(data[40..<56])
        guard let (node, region) = VerbsFabric.parsePrivateData(Array(body[0..<24])) else { throw .init(.malformed) }
        guard body[24] == version else { throw .init(.badVersion, claimed: node) }
        guard body[25] == 0, body[26] == 0, body[27] == 0 else { throw .init(.malformed, claimed: node) }
        guard node != me, members.contains(node) else { throw .init(.unknownNode, claimed: node) }
        let time = body[28..<32].reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
        guard (time > now ? time - now : now - time) <= windowSeconds else { throw .init(.expired, claimed: node) }
        guard VerbsPeerMAC.verify(mac, key: key, label: requestLabel, acceptorField(me) + body) else {
            throw .init(.badMAC, claimed: node)
        }
        let nonce = Array(body[32..<40])
        guard replays.admit([UInt8](acceptorField(node)) + nonce, time: time, now: now, window: windowSeconds) else {
            throw .init(.replayed, claimed: node)
        }
        return VerbsConnectRequest(node: node, region: region, time: time, nonce: nonce)
    }

    /// The acceptor's private data for the REP: its region, signed for this request.
    func accept(key: [UInt8], acceptor: NodeID, region: RemoteRegion) -> [UInt8] {
        let descriptor = VerbsFabric.privateData(node: acceptor, region: region)
        return descriptor + Array(VerbsPeerMAC.mac(key: key, label: Self.acceptLabel, acceptFields(acceptor, descriptor)).prefix(Self.macBytes))
    }

    /// The connector's check of the REP: the acceptor's region, signed for this request under the key.
    func verifyAccept(_ data: [UInt8], key: [UInt8], acceptor: NodeID) throws(VerbsPeerRefusal) -> RemoteRegion {
        guard data.count >= Self.acceptBytes else { throw .init(.malformed, claimed: acceptor) }
        let descriptor = Array(data[0..<24])
        guard VerbsPeerMAC.verify(Array(data[24..<40]), key: key, label: Self.acceptLabel, acceptFields(acceptor, descriptor)) else {
            throw .init(.badMAC, claimed: acceptor)
        }
        guard let (node, region) = VerbsFabric.parsePrivateData(descriptor), node == acceptor else {
            throw .init(.malformed, claimed: acceptor)
        }
        return region
    }

    private func acceptFields(_ acceptor: NodeID, _ descriptor: [UInt8]) -> [UInt8] {
        var w = ByteWriter(capacity: 48)
        w.u32(node); w.u32(acceptor); w.u32(time); w.raw(nonce); w.raw(descriptor)
        return w.bytes
    }
}
