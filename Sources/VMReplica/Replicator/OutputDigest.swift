// The summary of one guest output frame that the backup sends to the primary, so the primary can
// release a held frame as soon as the backup's guest produced the same one (docs/design/vmreplica.md,
// "Release on match"). A pure function of the frame's bytes: what may differ between two guests
// that sent the same segment (the IPv4 id, checksums, the TCP timestamp option's values, Ethernet
// padding) is normalized away; everything else is compared as it is.

/// One guest output frame, reduced to what the primary compares.
public struct OutputDigest: Equatable, Sendable {
    /// What kind of frame it summarizes.
    public enum Kind: UInt8, Sendable {
        /// A TCP segment over IPv4: compared within its connection (`stream`).
        case tcp = 1
        /// Anything else (UDP, IPv6, ...): the whole frame, in one stream of its own.
        case other = 2
        /// An ARP frame: it carries only the guest's own addresses, which both guests share, so it
        /// promises a client nothing the backup lacks and needs no match.
        case arp = 3
    }

    /// TCP or other.
    public var kind: Kind
    /// The connection: a hash of (source address, destination address, source port, destination
    /// port) for TCP; 0 for every other frame.
    public var stream: UInt64
    /// XXH3-64 of the normalized frame (payload, acknowledgement number, flags, window and
    /// options included; IPv4 id, checksums, the sequence number, timestamp values and padding
    /// zeroed: the sequence number is compared on its own, possibly with a connection's offset).
    public var content: UInt64
    /// TCP sequence number (0 for other frames).
    public var sequence: UInt32 = 0
    /// TCP acknowledgement number (0 for other frames).
    public var acknowledgement: UInt32 = 0
    /// TCP flags byte (FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10).
    public var flags: UInt8 = 0
    /// TCP window field.
    public var window: UInt16 = 0
    /// TCP payload bytes (for other frames: the frame's length), at most 65,535.
    public var payloadBytes: UInt16 = 0
    /// TSval of the TCP timestamp option, when the segment carries one.
    public var timestamp: UInt32?

    /// Bytes of one digest on the wire (`SyncMessage.outputDigests`).
    public static let wireBytes = 36

    /// A segment that only acknowledges: no payload, no SYN, FIN or RST. Sending one the other
    /// side did not send promises nothing the other side lacks beyond its acknowledgement number.
    public var isPureAcknowledgement: Bool { kind == .tcp && payloadBytes == 0 && flags & 0x07 == 0 }

    /// The digest of `frame` as the guest sent it.
    public init(of frame: [UInt8]) {
        var f = frame
        if f.count >= 14, f[12] == 0x08, f[13] == 0x06 {
            self.init(other: f)
            kind = .arp
            return
        }
        // Ethernet + IPv4 with a sane header and total length; anything else is "other".
        guard f.count >= 34, f[12] == 0x08, f[13] == 0x00, f[14] >> 4 == 4 else {
            self.init(other: f)
            return
        }
        let ihl = Int(f[14] & 0x0f) * 4
        let total = Int(f[16]) << 8 | Int(f[17])
        guard ihl >= 20, total >= ihl, 14 + total <= f.count else {
            self.init(other: f)
            return
        }
        f.removeSubrange((14 + total)...)  // padding is not the guest's
        f[18] = 0; f[19] = 0  // IPv4 id
        f[24] = 0; f[25] = 0  // header checksum
        let proto = f[23]
        let l4 = 14 + ihl
        if proto == 17, f.count >= l4 + 8 {
            f[l4 + 6] = 0; f[l4 + 7] = 0  // UDP checksum
        }
        let fragment = (Int(f[20]) << 8 | Int(f[21])) & 0x3fff  // offset or "more fragments"
        guard proto == 6, fragment == 0, f.count >= l4 + 20 else {
            self.init(other: f)
            return
        }
        let dataOffset = Int(f[l4 + 12] >> 4) * 4
        guard dataOffset >= 20, l4 + dataOffset <= f.count else {
            self.init(other: f)
            return
        }
        let sequence = Self.be32(f, l4 + 4)
        for i in (l4 + 4)..<(l4 + 8) { f[i] = 0 }  // sequence number: compared on its own (`sequence`)
        f[l4 + 16] = 0; f[l4 + 17] = 0  // TCP checksum
        var ts: UInt32?
        let end = l4 + dataOffset
        // Options are walked in `frame`: zeroing values in `f` moves no kind or length.
        TCPSegmentLayout.forEachOption(in: frame, from: l4 + 20, to: end) { kind, o, len in
            guard kind == 8, len == 10 else { return }
            ts = Self.be32(f, o + 2)
            for i in (o + 2)..<(o + 10) { f[i] = 0 }  // TSval and TSecr
        }
        var key: [UInt8] = Array(f[26..<34]) + Array(f[l4..<(l4 + 4)])
        key.append(6)
        self.init(kind: .tcp, stream: Self.hash(key), content: Self.hash(f), sequence: sequence,
                  acknowledgement: Self.be32(f, l4 + 8), flags: f[l4 + 13], window: UInt16(f[l4 + 14]) << 8 | UInt16(f[l4 + 15]),
                  payloadBytes: UInt16(min(f.count - end, Int(UInt16.max))), timestamp: ts)
    }

    private init(other f: [UInt8]) {
        self.init(kind: .other, stream: 0, content: Self.hash(f), payloadBytes: UInt16(min(f.count, Int(UInt16.max))))
    }

    /// A digest from its fields (decoding, tests).
    public init(kind: Kind, stream: UInt64, content: UInt64, sequence: UInt32 = 0, acknowledgement: UInt32 = 0,
                flags: UInt8 = 0, window: UInt16 = 0, payloadBytes: UInt16 = 0, timestamp: UInt32? = nil) {
        self.kind = kind
        self.stream = stream
        self.content = content
        self.sequence = sequence
        self.acknowledgement = acknowledgement
        self.flags = flags
        self.window = window
        self.payloadBytes = payloadBytes
        self.timestamp = timestamp
    }

    /// Whether `other` (the backup's) shows the same frame: same stream, the same normalized
    /// bytes and, for TCP, the same sequence number once `sequenceOffset` (the connection's
    /// offset, primary minus backup) is added to the backup's. Timestamps are not part of it
    /// (`OutputMatcher` applies their rule).
    public func sameFrame(as other: OutputDigest, sequenceOffset: UInt32 = 0) -> Bool {
        kind == other.kind && stream == other.stream && content == other.content
            && (kind != .tcp || sequence == other.sequence &+ sequenceOffset)
    }

    /// Whether `other` differs from this frame only in its sequence number and both are a SYN
    /// (the first segment of a connection): another initial sequence number, not divergence.
    public func differsOnlyInInitialSequence(from other: OutputDigest) -> Bool {
        kind == .tcp && flags & 0x02 != 0 && kind == other.kind && stream == other.stream && content == other.content
    }

    /// The first field in which `other` differs (its sequence number taken with
    /// `sequenceOffset`), for the mismatch causes a benchmark reports.
    public func difference(from other: OutputDigest, sequenceOffset: UInt32 = 0) -> String {
        if kind != other.kind { return "kind" }
        if stream != other.stream { return "stream" }
        if kind == .other { return "other-frame" }
        if flags != other.flags { return "tcp-flags" }
        // A SYN's sequence number is the connection's initial one, which Linux derives from its clock.
        if sequence != other.sequence &+ sequenceOffset { return flags & 0x02 != 0 ? "tcp-syn-seq" : "tcp-seq" }
        if acknowledgement != other.acknowledgement { return "tcp-ack" }
        if payloadBytes != other.payloadBytes { return "tcp-length" }
        if window != other.window { return "tcp-window" }
        if content != other.content { return "tcp-payload-or-options" }
        return "none"
    }

    static func be32(_ f: [UInt8], _ i: Int) -> UInt32 {
        UInt32(f[i]) << 24 | UInt32(f[i + 1]) << 16 | UInt32(f[i + 2]) << 8 | UInt32(f[i + 3])
    }

    static func hash(_ bytes: [UInt8]) -> UInt64 {
        bytes.withUnsafeBytes { PageHashFunction.default.hash($0, seed: 0x706c_6f76_6572) }
    }
}
