// Connection offsets on hand-built segments with real checksums: the rewriter moves exactly the
// fields that live in the guest's numbering (sequence number and TSval out; acknowledgement,
// SACK edges and TSecr in) and leaves a valid checksum; the table keeps what a checkpoint
// installed and what the log taught, and the log entries carrying them round-trip.

import RDMAPaxos
import Testing
@testable import VMReplica

/// TCP segments between the guest (10.99.0.2:6379) and a client (10.99.0.10), with correct checksums.
enum Segments {
    static let guest: [UInt8] = [10, 99, 0, 2], client: [UInt8] = [10, 99, 0, 10]

    static func segment(fromGuest: Bool, port: UInt16 = 40001, seq: UInt32, ack: UInt32, flags: UInt8 = 0x18,
                        options: [UInt8] = [], payload: [UInt8] = Array("+OK\r\n".utf8)) -> [UInt8] {
        let (src, dst) = fromGuest ? (guest, client) : (client, guest)
        let (sport, dport) = fromGuest ? (UInt16(6379), port) : (port, UInt16(6379))
        var tcp = Frames.be16(sport) + Frames.be16(dport) + Frames.be32(seq) + Frames.be32(ack)
            + [UInt8((20 + options.count) / 4) << 4, flags] + Frames.be16(502) + [0, 0, 0, 0] + options + payload
        let sum = checksum(src: src, dst: dst, tcp: tcp)
        tcp[16] = UInt8(sum >> 8)
        tcp[17] = UInt8(sum & 0xff)
        return Frames.clientMAC + Frames.guestMAC + [0x08, 0x00, 0x45, 0] + Frames.be16(UInt16(20 + tcp.count))
            + [0, 1, 0x40, 0, 64, 6, 0, 0] + src + dst + tcp
    }

    /// The TCP checksum over the pseudo-header and `tcp` (its checksum field as it is).
    static func checksum(src: [UInt8], dst: [UInt8], tcp: [UInt8]) -> UInt16 {
        var bytes = src + dst + [0, 6] + Frames.be16(UInt16(tcp.count)) + tcp
        if bytes.count % 2 == 1 { bytes.append(0) }
        var sum: UInt32 = 0
        for i in stride(from: 0, to: bytes.count, by: 2) { sum += UInt32(bytes[i]) << 8 | UInt32(bytes[i + 1]) }
        while sum > 0xffff { sum = (sum & 0xffff) + (sum >> 16) }
        return ~UInt16(sum)
    }

    /// Whether the frame's TCP checksum verifies (the sum over everything, checksum included, is 0).
    static func checksumHolds(_ f: [UInt8]) -> Bool {
        checksum(src: Array(f[26..<30]), dst: Array(f[30..<34]), tcp: Array(f[34...])) == 0
    }

    static func ts(_ val: UInt32, _ ecr: UInt32) -> [UInt8] { [1, 1, 8, 10] + Frames.be32(val) + Frames.be32(ecr) }
    /// NOP then one SACK block: its edges start at an odd offset in the header.
    static func sack(_ l: UInt32, _ r: UInt32) -> [UInt8] { [1, 5, 10] + Frames.be32(l) + Frames.be32(r) + [1, 1, 1, 1, 1] }
    static func word(_ f: [UInt8], _ i: Int) -> UInt32 { UInt32(bigEndianBytes: f, at: i) }

    static let key = TCPConnectionKey(guestIP: 0x0a63_0002, guestPort: 6379, peerIP: 0x0a63_000a, peerPort: 40001)
}

@Suite struct ConnectionRewriterTests {
    let rewriter = ConnectionRewriter([Segments.key: ConnectionOffset(sequence: 0xFFFF_FF00, timestamp: 40)])

    @Test func outgoingSegmentsGetTheClientsSequenceNumbersAndTimestamps() {
        let f = Segments.segment(fromGuest: true, seq: 0x0000_0200, ack: 5000, options: Segments.ts(700, 300))
        #expect(Segments.checksumHolds(f))
        let r = rewriter.rewrite(f, .fromGuest)
        #expect(Segments.word(r, 38) == 0x0000_0100, "sequence number plus the offset, modulo 2^32")
        #expect(Segments.word(r, 42) == 5000, "the acknowledgement is in the client's numbers already")
        #expect(Segments.word(r, 58) == 740 && Segments.word(r, 62) == 300, "TSval moved, TSecr (the client's) not")
        #expect(Segments.checksumHolds(r))
        #expect(r.count == f.count && r[0..<38] == f[0..<38] && r[(r.count - 5)...] == f[(f.count - 5)...])
        // Another connection, and frames that are not TCP, pass unchanged.
        let other = Segments.segment(fromGuest: true, port: 40002, seq: 0x200, ack: 5000, options: Segments.ts(700, 300))
        #expect(rewriter.rewrite(other, .fromGuest) == other)
        #expect(rewriter.rewrite(Frames.udp(payload: [1, 2, 3]), .fromGuest) == Frames.udp(payload: [1, 2, 3]))
        #expect(ConnectionRewriter().rewrite(f, .fromGuest) == f)
    }

    @Test func incomingSegmentsGetTheGuestsOwnNumbersBack() {
        let f = Segments.segment(fromGuest: false, seq: 5000, ack: 0x0000_0100, flags: 0x10,
                                 options: Segments.ts(900, 740) + Segments.sack(0x0000_0050, 0x0000_0090), payload: [])
        #expect(Segments.checksumHolds(f))
        let r = rewriter.rewrite(f, .toGuest)
        #expect(Segments.word(r, 38) == 5000, "the client's own sequence number stays")
        #expect(Segments.word(r, 42) == 0x0000_0200, "acknowledgement minus the offset")
        #expect(Segments.word(r, 58) == 900 && Segments.word(r, 62) == 700, "TSecr minus the offset, TSval (the client's) not")
        #expect(Segments.word(r, 69) == 0x0000_0150 && Segments.word(r, 73) == 0x0000_0190, "SACK edges at odd offsets")
        #expect(Segments.checksumHolds(r))
        // A SYN without ACK carries no acknowledgement or TSecr worth rewriting.
        let syn = Segments.segment(fromGuest: false, seq: 5000, ack: 77, flags: 0x02, options: Segments.ts(900, 0), payload: [])
        #expect(rewriter.rewrite(syn, .toGuest) == syn)
        // Out and back: the guest acknowledged by the client in its own numbers.
        let out = rewriter.rewrite(Segments.segment(fromGuest: true, seq: 0x200, ack: 5000), .fromGuest)
        let reply = Segments.segment(fromGuest: false, seq: 5000, ack: Segments.word(out, 38) &+ 5, flags: 0x10, payload: [])
        #expect(Segments.word(rewriter.rewrite(reply, .toGuest), 42) == 0x205)
    }

    @Test func aTableKeepsTheInstalledOffsetsAndLearnsInTicketOrder() {
        var t = ConnectionTable()
        let other = TCPConnectionKey(guestIP: 1, guestPort: 2, peerIP: 3, peerPort: 4)
        t.installCheckpoint(primaryTable: ConnectionRewriter([other: ConnectionOffset(sequence: 5)]))
        func learnt(_ ticket: UInt64, _ seq: UInt32) -> LearntOffset {
            LearntOffset(generation: 3, proposer: 1, ticket: ticket, key: Segments.key, offset: ConnectionOffset(sequence: seq, timestamp: 9))
        }
        t.learn(learnt(2, 100))
        t.learn(learnt(1, 50))
        #expect(t.full[Segments.key] == ConnectionOffset(sequence: 100, timestamp: 9), "an older entry applied later changes nothing")
        #expect(t.base[Segments.key] == .zero, "a backup digests in the numbers of the table it was installed with")
        #expect(t.full[other] == ConnectionOffset(sequence: 5))
        t.becomePrimary()
        #expect(t.base[Segments.key].sequence == 100 && t.learnt.isEmpty && t.base[other].sequence == 5)
        t.installCheckpoint(primaryTable: ConnectionRewriter())
        #expect(t.full.isEmpty, "a checkpoint's copy of the primary voids what was learnt about the old VM")
    }

    @Test func theLogEntriesRoundTrip() throws {
        let table = ConnectionRewriter([Segments.key: ConnectionOffset(sequence: 0xDEAD_BEEF, timestamp: 7),
                                        TCPConnectionKey(guestIP: 1, guestPort: 2, peerIP: 3, peerPort: 4): ConnectionOffset(sequence: 1)])
        let e = LearntOffset(generation: 0x0102_0304_0506_0708, proposer: 2, ticket: 99, key: Segments.key,
                             offset: ConnectionOffset(sequence: 0x8000_0001, timestamp: 0xFFFF_FFF0))
        for entry in [VMLogEntry.checkpoint(epoch: 4, proposer: 1, connections: table), .checkpoint(epoch: 5, proposer: 2), .connectionOffset(e)] {
            #expect(try VMLogEntry(decoding: entry.encoded()) == entry)
        }
        #expect(VMLogEntry.checkpoint(epoch: 4, proposer: 1).encoded().count == 13, "a checkpoint without offsets is encoded as before")
        #expect(throws: DecodeError.self) { try VMLogEntry(decoding: Array(VMLogEntry.connectionOffset(e).encoded().dropLast())) }
        #expect(throws: DecodeError.self) { try VMLogEntry(decoding: Array(VMLogEntry.checkpoint(epoch: 4, proposer: 1, connections: table).encoded().dropLast())) }
    }
}
