// The frame normalization behind release on match, on hand-built frames: what two guests may
// differ in (IPv4 id, checksums, TCP timestamp values, padding) leaves the digest alone; what a
// client would see differently (payload, sequence or acknowledgement number, flags, the connection)
// changes it.

import Testing
@testable import VMReplica

/// Hand-built Ethernet frames from the guest (10.99.0.2) to a client (10.99.0.10).
enum Frames {
    static let guestMAC: [UInt8] = [0x52, 0x54, 0, 0x12, 0x34, 0x56]
    static let clientMAC: [UInt8] = [0x02, 0, 0, 0, 0, 0x0a]

    static func be16(_ v: UInt16) -> [UInt8] { [UInt8(v >> 8), UInt8(v & 0xff)] }
    static func be32(_ v: UInt32) -> [UInt8] { [UInt8(v >> 24), UInt8(v >> 16 & 0xff), UInt8(v >> 8 & 0xff), UInt8(v & 0xff)] }

    static func ipv4(protocol proto: UInt8, id: UInt16, checksum: UInt16, body: [UInt8]) -> [UInt8] {
        clientMAC + guestMAC + [0x08, 0x00, 0x45, 0] + be16(UInt16(20 + body.count)) + be16(id) + [0x40, 0, 64, proto]
            + be16(checksum) + [10, 99, 0, 2, 10, 99, 0, 10] + body
    }

    /// A TCP segment 6379 → `port` with a timestamp option (unless `ts` is nil).
    static func tcp(seq: UInt32 = 1000, ack: UInt32 = 5000, flags: UInt8 = 0x18, window: UInt16 = 502, payload: [UInt8] = Array("+OK\r\n".utf8),
                    port: UInt16 = 40001, id: UInt16 = 1, checksum: UInt16 = 0x1111, ts: (UInt32, UInt32)? = (700, 300),
                    padding: Int = 0) -> [UInt8] {
        var options: [UInt8] = []
        if let (val, ecr) = ts { options = [1, 1, 8, 10] + be32(val) + be32(ecr) }
        let header = be16(6379) + be16(port) + be32(seq) + be32(ack) + [UInt8((20 + options.count) / 4) << 4, flags]
            + be16(window) + be16(checksum) + [0, 0] + options
        return ipv4(protocol: 6, id: id, checksum: checksum &+ 7, body: header + payload) + [UInt8](repeating: 0xEE, count: padding)
    }

    static func udp(payload: [UInt8], id: UInt16 = 1, checksum: UInt16 = 0x2222) -> [UInt8] {
        ipv4(protocol: 17, id: id, checksum: checksum, body: be16(7000) + be16(40001) + be16(UInt16(8 + payload.count)) + be16(checksum) + payload)
    }

    static let arp: [UInt8] = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff] + guestMAC + [0x08, 0x06] + [UInt8](repeating: 1, count: 28)
}

@Suite struct OutputDigestTests {
    @Test func whatTwoGuestsMayDifferInIsNormalized() {
        let a = OutputDigest(of: Frames.tcp(id: 1, checksum: 0x1111, ts: (700, 300)))
        let b = OutputDigest(of: Frames.tcp(id: 999, checksum: 0xBEEF, ts: (712, 305), padding: 6))
        #expect(a.kind == .tcp && a.sameFrame(as: b))
        #expect(a.sequence == 1000 && a.acknowledgement == 5000 && a.flags == 0x18 && a.window == 502 && a.payloadBytes == 5)
        #expect(a.timestamp == 700 && b.timestamp == 712, "the timestamps are kept aside for their own rule")
        #expect(a.stream == b.stream && a.difference(from: b) == "none")
        #expect(OutputDigest(of: Frames.tcp(ts: nil)).timestamp == nil)
    }

    @Test func whatAClientWouldSeeDifferentlyIsNot() {
        let a = OutputDigest(of: Frames.tcp())
        let cases: [(OutputDigest, String)] = [
            (OutputDigest(of: Frames.tcp(payload: Array("+OK\r\r".utf8))), "tcp-payload-or-options"),
            (OutputDigest(of: Frames.tcp(seq: 1001)), "tcp-seq"),
            (OutputDigest(of: Frames.tcp(ack: 5001)), "tcp-ack"),
            (OutputDigest(of: Frames.tcp(flags: 0x19)), "tcp-flags"),
            (OutputDigest(of: Frames.tcp(window: 501)), "tcp-window"),
            (OutputDigest(of: Frames.tcp(payload: Array("+OK\r\n+OK\r\n".utf8))), "tcp-length"),
            (OutputDigest(of: Frames.tcp(port: 40002)), "stream"),
        ]
        for (d, cause) in cases {
            #expect(!a.sameFrame(as: d), "\(cause)")
            #expect(a.difference(from: d) == cause)
        }
        // Two SYN-ACKs with other initial sequence numbers (the guests' clocks differ).
        let synAck = OutputDigest(of: Frames.tcp(seq: 1000, flags: 0x12, payload: []))
        #expect(synAck.difference(from: OutputDigest(of: Frames.tcp(seq: 77, flags: 0x12, payload: []))) == "tcp-syn-seq")
    }

    @Test func otherFramesAreComparedWholeAndARPNeedsNoMatch() {
        let u = OutputDigest(of: Frames.udp(payload: [1, 2, 3], id: 1, checksum: 0x2222))
        #expect(u.kind == .other && u.stream == 0)
        #expect(u.sameFrame(as: OutputDigest(of: Frames.udp(payload: [1, 2, 3], id: 77, checksum: 0x3333))))
        #expect(!u.sameFrame(as: OutputDigest(of: Frames.udp(payload: [1, 2, 4]))))
        #expect(OutputDigest(of: Frames.arp).kind == .arp)
        // Malformed or foreign frames are "other", compared byte for byte, never a trap.
        for f in [[], [1, 2, 3], Array(Frames.tcp().prefix(40)), Array(Frames.tcp().prefix(14))] as [[UInt8]] {
            #expect(OutputDigest(of: f).kind == .other)
        }
        var badOffset = Frames.tcp()
        badOffset[14 + 20 + 12] = 0xF0  // data offset past the frame
        #expect(OutputDigest(of: badOffset).kind == .other)
    }

    @Test func pureAcknowledgementsAreRecognized() {
        #expect(OutputDigest(of: Frames.tcp(flags: 0x10, payload: [])).isPureAcknowledgement)
        #expect(!OutputDigest(of: Frames.tcp(flags: 0x11, payload: [])).isPureAcknowledgement, "a FIN is no pure ACK")
        #expect(!OutputDigest(of: Frames.tcp(flags: 0x10)).isPureAcknowledgement, "data is no pure ACK")
    }
}
