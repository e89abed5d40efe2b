// Per-connection TCP rewriting between a guest and the wire. Two guests that ran the same inputs
// may still pick different initial sequence numbers for a new connection (Linux mixes its clock
// into the ISN) and stamp the same segment with different TCP timestamps (the backup's clock
// lags). Release on match records such differences as offsets per connection instead of
// declaring divergence; a VM whose connection was shown to clients with the other guest's numbers
// then speaks to clients through this rewriting: outgoing sequence numbers and TSvals are moved
// into the numbers clients saw, incoming acknowledgements, SACK edges and TSecrs back into the
// guest's own. docs/design/vmreplica.md, "Connection offsets".

/// A TCP connection of the guest: its address and port, and the client's.
public struct TCPConnectionKey: Hashable, Sendable, CustomStringConvertible {
    /// The guest's IPv4 address, big-endian in one word.
    public var guestIP: UInt32
    /// The guest's TCP port.
    public var guestPort: UInt16
    /// The client's IPv4 address, big-endian in one word.
    public var peerIP: UInt32
    /// The client's TCP port.
    public var peerPort: UInt16

    /// A connection from its four fields.
    public init(guestIP: UInt32, guestPort: UInt16, peerIP: UInt32, peerPort: UInt16) {
        self.guestIP = guestIP
        self.guestPort = guestPort
        self.peerIP = peerIP
        self.peerPort = peerPort
    }

    /// The connection of a TCP segment over IPv4 in `frame`, which the guest sent (`fromGuest`)
    /// or is to receive; nil for any other frame.
    public init?(frame f: [UInt8], fromGuest: Bool) {
        guard let s = TCPSegmentLayout(f) else { return nil }
        let src = UInt32(bigEndianBytes: f, at: 26), dst = UInt32(bigEndianBytes: f, at: 30)
        let sport = UInt16(f[s.tcp]) << 8 | UInt16(f[s.tcp + 1]), dport = UInt16(f[s.tcp + 2]) << 8 | UInt16(f[s.tcp + 3])
        self = fromGuest ? Self(guestIP: src, guestPort: sport, peerIP: dst, peerPort: dport)
            : Self(guestIP: dst, guestPort: dport, peerIP: src, peerPort: sport)
    }

    /// "a.b.c.d:p<->e.f.g.h:q" (guest first).
    public var description: String {
        func ip(_ v: UInt32) -> String { (0..<4).map { String(v >> (24 - 8 * UInt32($0)) & 0xff) }.joined(separator: ".") }
        return "\(ip(guestIP)):\(guestPort)<->\(ip(peerIP)):\(peerPort)"
    }
}

/// How one connection's numbers on the wire differ from the guest's own: wire = guest + offset,
/// in 32-bit modular arithmetic.
public struct ConnectionOffset: Equatable, Sendable {
    /// Added to the guest's sequence numbers (and taken from clients' acknowledgements and SACK edges).
    public var sequence: UInt32
    /// Added to the guest's TSvals (and taken from clients' TSecrs).
    public var timestamp: UInt32

    /// An offset from its two parts.
    public init(sequence: UInt32 = 0, timestamp: UInt32 = 0) {
        self.sequence = sequence
        self.timestamp = timestamp
    }

    /// No change.
    public static let zero = ConnectionOffset()
    /// Both offsets applied one after the other.
    public static func + (a: ConnectionOffset, b: ConnectionOffset) -> ConnectionOffset {
        ConnectionOffset(sequence: a.sequence &+ b.sequence, timestamp: a.timestamp &+ b.timestamp)
    }
}

/// Where the TCP header of an IPv4 segment in an Ethernet frame lies (nil: not a whole,
/// unfragmented TCP segment over IPv4 with sane lengths).
struct TCPSegmentLayout {
    /// Offset of the TCP header and of the end of its options.
    let tcp: Int
    let optionsEnd: Int

    init?(_ f: [UInt8]) {
        guard f.count >= 34, f[12] == 0x08, f[13] == 0x00, f[14] >> 4 == 4, f[23] == 6 else { return nil }
        let ihl = Int(f[14] & 0x0f) * 4
        let total = Int(f[16]) << 8 | Int(f[17])
        let fragment = (Int(f[20]) << 8 | Int(f[21])) & 0x3fff
        guard ihl >= 20, fragment == 0, total >= ihl + 20, 14 + total <= f.count else { return nil }
        tcp = 14 + ihl
        let dataOffset = Int(f[tcp + 12] >> 4) * 4
        guard dataOffset >= 20, dataOffset <= total - ihl else { return nil }
        optionsEnd = tcp + dataOffset
    }

    /// Calls `body` with the kind, offset and length of each TCP option of `f` between `start`
    /// and `end`, in order; no-ops are skipped, and the end-of-list option or a length that does
    /// not fit ends the walk.
    static func forEachOption(in f: [UInt8], from start: Int, to end: Int, _ body: (_ kind: UInt8, _ at: Int, _ length: Int) -> Void) {
        var o = start
        while o < end {
            let kind = f[o]
            if kind == 0 { break }
            if kind == 1 { o += 1; continue }
            guard o + 1 < end else { break }
            let len = Int(f[o + 1])
            guard len >= 2, o + len <= end else { break }
            body(kind, o, len)
            o += len
        }
    }
}

/// Which way a frame travels.
public enum FrameDirection: Sendable {
    /// Sent by the guest, on its way to clients.
    case fromGuest
    /// From a client, on its way into the guest.
    case toGuest
}

/// The rewriting of one VM's TCP frames by a table of connection offsets: a pure function of
/// the frame, its direction and the table. Frames of connections without an offset, and every
/// frame that is not TCP over IPv4, pass unchanged. The TCP checksum is updated incrementally
/// (RFC 1624), so a segment whose checksum was wrong stays wrong.
public struct ConnectionRewriter: Equatable, Sendable {
    /// Offset per connection.
    public private(set) var offsets: [TCPConnectionKey: ConnectionOffset] = [:]

    /// A rewriter with `offsets` (zero offsets are left out).
    public init(_ offsets: [TCPConnectionKey: ConnectionOffset] = [:]) {
        for (k, o) in offsets where o != .zero { self.offsets[k] = o }
    }

    /// Whether nothing is rewritten.
    public var isEmpty: Bool { offsets.isEmpty }

    /// The offset of `key` (zero when it has none).
    public subscript(key: TCPConnectionKey) -> ConnectionOffset {
        get { offsets[key] ?? .zero }
        set { offsets[key] = newValue == .zero ? nil : newValue }
    }

    /// Both tables applied one after the other (`self` first).
    public func composed(with other: ConnectionRewriter) -> ConnectionRewriter {
        var out = self
        for (k, o) in other.offsets { out[k] = out[k] + o }
        return out
    }

    /// `frame` as it leaves the guest for the wire (`.fromGuest`: sequence number and TSval
    /// plus the offset) or as it enters the guest (`.toGuest`: acknowledgement number, SACK
    /// edges and TSecr minus the offset, only when the segment carries ACK).
    public func rewrite(_ frame: [UInt8], _ direction: FrameDirection) -> [UInt8] {
        guard !offsets.isEmpty, let key = TCPConnectionKey(frame: frame, fromGuest: direction == .fromGuest),
              let off = offsets[key], let s = TCPSegmentLayout(frame) else { return frame }
        var f = frame
        let t = s.tcp
        switch direction {
        case .fromGuest:
            Self.add(off.sequence, at: t + 4, in: &f, checksumAt: t + 16)
        case .toGuest:
            guard f[t + 13] & 0x10 != 0 else { return frame }  // no ACK: no acknowledgement, no TSecr
            Self.add(0 &- off.sequence, at: t + 8, in: &f, checksumAt: t + 16)
        }
        // Options are walked in `frame`: only values inside them change in `f`.
        TCPSegmentLayout.forEachOption(in: frame, from: t + 20, to: s.optionsEnd) { kind, o, len in
            switch (kind, direction) {
            case (8, .fromGuest) where len == 10:
                Self.add(off.timestamp, at: o + 2, in: &f, checksumAt: t + 16)
            case (8, .toGuest) where len == 10:
                Self.add(0 &- off.timestamp, at: o + 6, in: &f, checksumAt: t + 16)
            case (5, .toGuest) where (len - 2) % 8 == 0:
                // SACK blocks: left and right edges in the guest's sequence space.
                var e = o + 2
                while e + 4 <= o + len {
                    Self.add(0 &- off.sequence, at: e, in: &f, checksumAt: t + 16)
                    e += 4
                }
            default: break
            }
        }
        return f
    }

    /// Adds `delta` to the big-endian word at `i` (which may be unaligned to the 16-bit words
    /// the checksum sums, as option fields are) and updates the checksum at `c`.
    static func add(_ delta: UInt32, at i: Int, in f: inout [UInt8], checksumAt c: Int) {
        guard delta != 0 else { return }
        let old = UInt32(bigEndianBytes: f, at: i)
        let new = old &+ delta
        // The checksum sums 16-bit words from the TCP header's start, an even offset from the
        // frame's start (the Ethernet header is 14 bytes, the IPv4 header a multiple of 4).
        var sum = UInt32(~(UInt16(f[c]) << 8 | UInt16(f[c + 1])))
        for k in 0..<4 {
            let pos = i + k
            let oldByte = UInt32(old >> (24 - 8 * UInt32(k)) & 0xff), newByte = UInt32(new >> (24 - 8 * UInt32(k)) & 0xff)
            let shift: UInt32 = pos % 2 == 0 ? 8 : 0  // high or low byte of its 16-bit word
            sum += (~(oldByte << shift) & 0xffff) + (newByte << shift)
            f[pos] = UInt8(newByte)
        }
        while sum > 0xffff { sum = (sum & 0xffff) + (sum >> 16) }
        let check = ~UInt16(sum)
        f[c] = UInt8(check >> 8)
        f[c + 1] = UInt8(check & 0xff)
    }
}

extension UInt32 {
    /// The big-endian word at `i` of `bytes`.
    init(bigEndianBytes b: [UInt8], at i: Int) {
        self = UInt32(b[i]) << 24 | UInt32(b[i + 1]) << 16 | UInt32(b[i + 2]) << 8 | UInt32(b[i + 3])
    }
}
