import Crypto
import NIOCore

// Frames of the TCP fabric (docs/design/fabric.md, "Fabric and rings"):
//   u32 length (of what follows) | u8 type | body
// All integers big-endian. Every body has a fixed size except a write's trailing data, and
// parsing checks sizes exactly, so a malformed frame is detected before anything is touched.

enum FrameType: UInt8 {
    /// Connector → acceptor: u16 version, u32 connector id, u32 acceptor id, 32 B connector nonce.
    case hello = 1
    /// Acceptor → connector: u32 acceptor id, 32 B acceptor nonce, 32 B MAC proving the key.
    case challenge = 2
    /// Connector → acceptor: 32 B MAC proving the key, the connector's region descriptor.
    case response = 3
    /// Acceptor → connector: the acceptor's exported region descriptor. Data frames follow.
    case accept = 4
    /// Connector → acceptor: u64 sequence, u64 region base, u32 key, u64 offset, u8 has-immediate,
    /// u32 immediate, data (the rest).
    case write = 5
    /// Acceptor → connector: u64 sequence, u8 status (0 landed, 1 remote access error).
    case ack = 6
    /// Either way during the handshake: u8 reason, then the connection closes.
    case reject = 7
}

/// Why an acceptor refused a handshake (sent to the connector so it can say what to fix).
enum RejectReason: UInt8, CustomStringConvertible {
    case badVersion = 1, wrongNode = 2, unknownNode = 3, badMAC = 4, replayed = 5, notReady = 6

    var description: String {
        switch self {
        case .badVersion: "unsupported fabric protocol version"
        case .wrongNode: "the acceptor is a different node than the one addressed"
        case .unknownNode: "the connecting node id is not a cluster member"
        case .badMAC: "authentication failed (cluster keys differ)"
        case .replayed: "replayed handshake"
        case .notReady: "the acceptor is not accepting connections"
        }
    }
}

struct Frame {
    var type: FrameType
    var body: ByteBuffer
}

/// A malformed frame: the connection is closed with this reason in the log.
struct FrameError: Error, CustomStringConvertible {
    var description: String
    init(_ d: String) { description = d }
}

/// Frame length limit shared by the decoder and the connection handler: small until the peer
/// has authenticated, so an unauthenticated peer cannot make us buffer a large frame.
/// Event-loop confined (one per channel).
final class FrameLimit {
    var bytesMax: Int
    init(_ n: Int) { bytesMax = n }
    static let handshakeBytesMax = 256
}

struct FrameDecoder: ByteToMessageDecoder {
    typealias InboundOut = Frame
    let limit: FrameLimit

    mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let length = buffer.getInteger(at: buffer.readerIndex, as: UInt32.self) else { return .needMoreData }
        guard length >= 1, Int(length) <= limit.bytesMax else {
            throw FrameError("frame of \(length) bytes outside 1...\(limit.bytesMax)")
        }
        guard buffer.readableBytes >= 4 + Int(length) else { return .needMoreData }
        buffer.moveReaderIndex(forwardBy: 4)
        let raw = buffer.readInteger(as: UInt8.self)!
        let body = buffer.readSlice(length: Int(length) - 1)!
        guard let type = FrameType(rawValue: raw) else { throw FrameError("unknown frame type \(raw)") }
        context.fireChannelRead(Self.wrapInboundOut(Frame(type: type, body: body)))
        return .continue
    }

    mutating func decodeLast(context: ChannelHandlerContext, buffer: inout ByteBuffer, seenEOF: Bool) throws -> DecodingState {
        while try decode(context: context, buffer: &buffer) == .continue {}
        return .needMoreData
    }
}

/// Builders and strict parsers for each body.
enum Frames {
    static let nonceBytes = 32
    static let macBytes = 32
    static let regionBytes = 8 + 4 + 8
    /// Fixed part of a write body before its data.
    static let writeHeaderBytes = 8 + 8 + 4 + 8 + 1 + 4

    static func frame(_ type: FrameType, _ allocator: ByteBufferAllocator, capacity: Int = 64,
                      _ body: (inout ByteBuffer) -> Void) -> ByteBuffer {
        var b = allocator.buffer(capacity: 5 + capacity)
        b.writeInteger(UInt32(0))
        b.writeInteger(type.rawValue)
        body(&b)
        b.setInteger(UInt32(b.readableBytes - 4), at: b.readerIndex)
        return b
    }

    static func writeRegion(_ r: RemoteRegion, into b: inout ByteBuffer) {
        b.writeInteger(r.base); b.writeInteger(r.key); b.writeInteger(UInt64(r.lengthBytes))
    }

    static func readRegion(_ b: inout ByteBuffer, owner: NodeID) -> RemoteRegion? {
        guard let base = b.readInteger(as: UInt64.self), let key = b.readInteger(as: UInt32.self),
              let len = b.readInteger(as: UInt64.self), len <= UInt64(MemoryRegion.wrappedLengthBytesMax) else { return nil }
        return RemoteRegion(node: owner, base: base, key: key, lengthBytes: Int(len))
    }

    struct Hello { var version: UInt16; var connector: NodeID; var acceptor: NodeID; var nonce: [UInt8] }
    static func parseHello(_ body: ByteBuffer) -> Hello? {
        var b = body
        guard b.readableBytes == 2 + 4 + 4 + nonceBytes, let v = b.readInteger(as: UInt16.self),
              let c = b.readInteger(as: UInt32.self), let a = b.readInteger(as: UInt32.self),
              let n = b.readBytes(length: nonceBytes) else { return nil }
        return Hello(version: v, connector: c, acceptor: a, nonce: n)
    }

    struct Challenge { var acceptor: NodeID; var nonce: [UInt8]; var mac: [UInt8] }
    static func parseChallenge(_ body: ByteBuffer) -> Challenge? {
        var b = body
        guard b.readableBytes == 4 + nonceBytes + macBytes, let a = b.readInteger(as: UInt32.self),
              let n = b.readBytes(length: nonceBytes), let m = b.readBytes(length: macBytes) else { return nil }
        return Challenge(acceptor: a, nonce: n, mac: m)
    }

    static func parseResponse(_ body: ByteBuffer, connector: NodeID) -> (mac: [UInt8], region: RemoteRegion)? {
        var b = body
        guard b.readableBytes == macBytes + regionBytes, let m = b.readBytes(length: macBytes),
              let r = readRegion(&b, owner: connector) else { return nil }
        return (m, r)
    }

    static func parseAccept(_ body: ByteBuffer, acceptor: NodeID) -> RemoteRegion? {
        var b = body
        guard b.readableBytes == regionBytes else { return nil }
        return readRegion(&b, owner: acceptor)
    }

    /// A write frame's flag bits: it carries an immediate; the writer wants it acknowledged.
    enum WriteFlag { static let immediate: UInt8 = 1, acknowledge: UInt8 = 2 }
    /// A write. The target acknowledges it only when asked (`acknowledge`), or when it did not
    /// land; an acknowledgement of sequence n answers every earlier write too (they landed: TCP
    /// keeps them in order and a write that does not land ends the connection).
    struct Write { var sequence: UInt64; var base: UInt64; var key: UInt32; var offset: UInt64; var immediate: UInt32?; var acknowledge: Bool; var data: ByteBuffer }
    static func parseWrite(_ body: ByteBuffer) -> Write? {
        var b = body
        guard b.readableBytes >= writeHeaderBytes, let s = b.readInteger(as: UInt64.self),
              let base = b.readInteger(as: UInt64.self), let k = b.readInteger(as: UInt32.self),
              let o = b.readInteger(as: UInt64.self), let flags = b.readInteger(as: UInt8.self), flags <= WriteFlag.immediate | WriteFlag.acknowledge,
              let imm = b.readInteger(as: UInt32.self) else { return nil }
        return Write(sequence: s, base: base, key: k, offset: o, immediate: flags & WriteFlag.immediate != 0 ? imm : nil,
                     acknowledge: flags & WriteFlag.acknowledge != 0, data: b)
    }

    static func parseAck(_ body: ByteBuffer) -> (sequence: UInt64, landed: Bool)? {
        var b = body
        guard b.readableBytes == 9, let s = b.readInteger(as: UInt64.self), let st = b.readInteger(as: UInt8.self),
              st <= 1 else { return nil }
        return (s, st == 0)
    }
}

/// HMAC-SHA256 challenge–response in both directions. Each side MACs both nonces and both node
/// ids under a role label, so a MAC cannot be reflected back, reused with other ids, or replayed
/// against a fresh nonce.
enum TCPHandshake {
    static let version: UInt16 = 2
    enum Role: String { case acceptor = "plover-fabric-v1 acceptor", connector = "plover-fabric-v1 connector" }

    static func mac(key: SymmetricKey, role: Role, connector: NodeID, acceptor: NodeID,
                    connectorNonce: [UInt8], acceptorNonce: [UInt8]) -> [UInt8] {
        Array(HMAC<SHA256>.authenticationCode(
            for: transcript(role, connector, acceptor, connectorNonce, acceptorNonce), using: key))
    }

    static func mac(clusterKey: [UInt8], role: Role, connector: NodeID, acceptor: NodeID,
                    connectorNonce: [UInt8], acceptorNonce: [UInt8]) -> [UInt8] {
        mac(key: SymmetricKey(data: clusterKey), role: role, connector: connector, acceptor: acceptor,
            connectorNonce: connectorNonce, acceptorNonce: acceptorNonce)
    }

    static func verify(_ mac: [UInt8], key: SymmetricKey, role: Role, connector: NodeID, acceptor: NodeID,
                       connectorNonce: [UInt8], acceptorNonce: [UInt8]) -> Bool {
        HMAC<SHA256>.isValidAuthenticationCode(
            mac, authenticating: transcript(role, connector, acceptor, connectorNonce, acceptorNonce), using: key)
    }

    private static func transcript(_ role: Role, _ c: NodeID, _ a: NodeID, _ cn: [UInt8], _ an: [UInt8]) -> [UInt8] {
        var w = ByteWriter(capacity: 128)
        w.raw(Array(role.rawValue.utf8)); w.u32(c); w.u32(a); w.raw(cn); w.raw(an)
        return w.bytes
    }

    static func nonce() -> [UInt8] {
        var g = SystemRandomNumberGenerator()
        return (0..<Frames.nonceBytes).map { _ in UInt8.random(in: 0...255, using: &g) }
    }
}
