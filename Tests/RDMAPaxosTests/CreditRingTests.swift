// The credit ring on its own, without a fabric: a writer's planned writes land in plain bytes
// and a reader takes them back. Both record formats in use are covered: consensus rings
// (sessions, lazy credit) and syncvm mailboxes (sequence then the caller's word, eager credit).

import CXXHash
import Testing
@testable import RDMAPaxos

/// A ring's bytes, landed by hand.
struct ByteRing: RingMemory {
    var bytes: [UInt8]
    init(_ ringBytes: Int) { bytes = [UInt8](repeating: 0, count: ringBytes) }

    func withBytes<R>(offset: Int, count: Int, _ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        try bytes.withUnsafeBytes { try body(UnsafeRawBufferPointer(rebasing: $0[offset..<offset + count])) }
    }

    mutating func land(_ w: CreditRingWriter.Write) {
        bytes.replaceSubrange(w.offset..<w.offset + w.bytes.count, with: w.bytes)
    }
}

enum RingFormatCase: String, CaseIterable, CustomTestStringConvertible {
    case consensus, mailbox
    var format: CreditRing.RecordFormat {
        switch self {
        case .consensus: RingLayout.recordFormat
        case .mailbox: CreditRing.RecordFormat(stamp: .sequenceThenWord, wrapKind: 2 << 24)
        }
    }
    /// A record kind the format leaves to its caller.
    var kind: UInt32 { self == .consensus ? 0 : 1 << 24 }
    var testDescription: String { rawValue }
}

@Suite struct CreditRingTests {
    /// A writer and a reader of one session over an empty ring.
    static func ends(_ format: RingFormatCase, ringBytes: Int) throws -> (CreditRingWriter, CreditRingReader, ByteRing) {
        let ring = try CreditRing(ringBytes: ringBytes, format: format.format)
        return (CreditRingWriter(ring: ring, session: 9), CreditRingReader(ring: ring, session: 9), ByteRing(ringBytes))
    }

    /// Appends and lands one record; false when the ring has no room.
    static func write(_ payload: [UInt8], kind: UInt32, word: UInt64 = 0, _ w: inout CreditRingWriter, into ring: inout ByteRing) -> Bool {
        guard let a = w.append(kind: kind, word: word, payload: payload) else { return false }
        for write in [a.wrapMarker, a.record].compactMap({ $0 }) {
            #expect(write.offset % CreditRing.recordAlignBytes == 0 && write.offset + write.bytes.count <= w.ring.ringBytes,
                    "a record at \(write.offset) of \(write.bytes.count) bytes straddles the ring's end")
            ring.land(write)
            w.posted(write)
        }
        return true
    }

    @Test(arguments: RingFormatCase.allCases)
    func recordsArriveInOrderAcrossManyLapsWithCreditFlowingBack(format: RingFormatCase) throws {
        var (writer, reader, memory) = try Self.ends(format, ringBytes: 4096)
        let ring = writer.ring
        var rng = SeededRandom(seed: 11)
        var sent: [[UInt8]] = [], received: [[UInt8]] = []
        var words: [UInt64] = []
        while writer.writePosition < 40 * 4096 {
            // Write until the ring is full, then read everything and hand the credit back.
            while true {
                let n = Int(rng.next() % UInt64(ring.payloadBytesMax + 1))
                let payload = (0..<n).map { UInt8(truncatingIfNeeded: $0 &+ sent.count) }
                guard Self.write(payload, kind: format.kind, word: UInt64(sent.count), &writer, into: &memory) else { break }
                sent.append(payload)
            }
            #expect(!writer.fits(payloadBytes: ring.payloadBytesMax))
            while case .record(let r) = reader.next(in: memory, at: 0) {
                #expect(r.kind == format.kind)
                received.append(r.payload)
                words.append(r.word)
            }
            #expect(reader.next(in: memory, at: 0) == .empty)
            // Eager credit is owed after any read; lazy credit because a record of the full ring asked.
            guard reader.creditDue else { Issue.record("no credit owed after a full ring"); break }
            #expect(reader.creditCell().withUnsafeBytes { writer.takeCredit(cell: $0) })
            reader.returnedCredit(at: reader.readPosition)
        }
        #expect(received == sent)
        if format == .mailbox { #expect(words == (0..<UInt64(sent.count)).map { $0 }) }
        #expect(reader.readPosition == writer.writePosition)
    }

    @Test func recordBytesMatchTheDesignTables() throws {
        let payload: [UInt8] = [0xAA, 0xBB]
        func be(_ v: UInt64, _ n: Int) -> [UInt8] { (0..<n).reversed().map { UInt8(truncatingIfNeeded: v >> (8 * $0)) } }
        func sealed(_ body: [UInt8]) -> [UInt8] { be(body.withUnsafeBytes { XXH3_64bits($0.baseAddress, $0.count) }, 8) + body }

        let consensus = try CreditRing(ringBytes: 1024, format: RingLayout.recordFormat)
        var w = CreditRingWriter(ring: consensus, session: 0x0102_0304_0506_0708)
        let r1 = try #require(w.append(kind: 0, payload: payload)).record
        // offset 8 totalBytes, 12 flags, 16 epoch, 24 sequence, 32 payload; bit 2: credit wanted.
        #expect(r1.bytes == sealed(be(34, 4) + be(0, 4) + be(0x0102_0304_0506_0708, 8) + be(1, 8) + payload))
        w.posted(r1)
        #expect(CreditRingReader(ring: consensus, session: 5).creditCell() == sealed(be(5, 8) + be(0, 8)))

        let mailbox = try CreditRing(ringBytes: 4096, format: RingFormatCase.mailbox.format)
        let m = try #require(CreditRingWriter(ring: mailbox).append(kind: 1 << 24 | 1 << 16, word: 70_001 << 32 | 2016, payload: payload)).record
        // offset 12 kind, 13 flags, 14 reserved, 16 sequence, 24 frame length, 28 fragment offset.
        #expect(m.bytes == sealed(be(34, 4) + [1, 1, 0, 0] + be(1, 8) + be(70_001, 4) + be(2016, 4) + payload))
        #expect(CreditRingReader(ring: mailbox).creditCell() == sealed(be(0, 8) + be(0, 8)))
        #expect(CreditRing.sealCell(1, 4096) == sealed(be(1, 8) + be(4096, 8)))
    }

    @Test(arguments: RingFormatCase.allCases)
    func aRecordThatDoesNotFitBeforeTheEndWrapsBehindAMarker(format: RingFormatCase) throws {
        let ring = try CreditRing(ringBytes: 1024, format: format.format)
        var writer = CreditRingWriter(ring: ring, session: 3)
        var memory = ByteRing(1024)
        #expect(Self.write([UInt8](repeating: 1, count: 400), kind: format.kind, &writer, into: &memory))  // 0..<448
        #expect(Self.write([UInt8](repeating: 2, count: 400), kind: format.kind, &writer, into: &memory))  // 448..<896
        writer.takeCredit(consumed: 896)
        let a = try #require(writer.append(kind: format.kind, payload: [UInt8](repeating: 3, count: 200)))
        #expect(a.wrapMarker?.offset == 896 && a.wrapMarker?.isWrapMarker == true && a.wrapMarker?.bytes.count == 32)
        #expect(a.record.offset == 0)
        #expect(writer.bytesNeeded(payloadBytes: 200) == 128 + 256)
        // Nothing changes until the writes are reported posted.
        #expect(writer.append(kind: format.kind, payload: [UInt8](repeating: 3, count: 200)) == a)
        #expect(writer.writePosition == 896 && writer.nextSequence == 3)
    }

    @Test(arguments: RingFormatCase.allCases)
    func aFullRingRefusesUntilTheReaderReturnsCredit(format: RingFormatCase) throws {
        var (writer, reader, memory) = try Self.ends(format, ringBytes: 1024)
        var n = 0
        while Self.write([UInt8](repeating: 9, count: 32), kind: format.kind, &writer, into: &memory) { n += 1 }
        #expect(n == 16 && writer.uncreditedBytes == 1024)
        #expect(writer.append(kind: format.kind, payload: [0]) == nil)
        guard case .record = reader.next(in: memory, at: 0) else { Issue.record("no record"); return }
        // Credit arrives only through the cell, and only as far as was read.
        #expect(writer.append(kind: format.kind, payload: [0]) == nil)
        #expect(reader.creditCell().withUnsafeBytes { writer.takeCredit(cell: $0) })
        #expect(writer.uncreditedBytes == 1024 - 64)
        #expect(Self.write([UInt8](repeating: 9, count: 32), kind: format.kind, &writer, into: &memory))
    }

    @Test func creditCellsOfAnotherSessionBeyondTheWritesOrTornAreIgnored() throws {
        let ring = try CreditRing(ringBytes: 1024, format: RingLayout.recordFormat)
        var writer = CreditRingWriter(ring: ring, session: 7)
        var memory = ByteRing(1024)
        #expect(Self.write([1, 2, 3], kind: 0, &writer, into: &memory))
        #expect(!CreditRing.sealCell(6, 64).withUnsafeBytes { writer.takeCredit(cell: $0) }, "another session's cell")
        #expect(!CreditRing.sealCell(7, 128).withUnsafeBytes { writer.takeCredit(cell: $0) }, "beyond what was written")
        var torn = CreditRing.sealCell(7, 64)
        torn[23] ^= 1
        #expect(!torn.withUnsafeBytes { writer.takeCredit(cell: $0) }, "a torn cell")
        #expect(writer.creditPosition == 0)
        #expect(CreditRing.sealCell(7, 64).withUnsafeBytes { writer.takeCredit(cell: $0) })
        #expect(CreditRing.sealCell(7, 0).withUnsafeBytes { writer.takeCredit(cell: $0) })
        #expect(writer.creditPosition == 64, "credit never moves backwards")
    }

    @Test(arguments: RingFormatCase.allCases)
    func staleTornAndOversizedRecordsAreNotTaken(format: RingFormatCase) throws {
        let ring = try CreditRing(ringBytes: 1024, format: format.format)
        var memory = ByteRing(1024)
        var reader = CreditRingReader(ring: ring, session: 5)
        let good = try #require(CreditRingWriter(ring: ring, session: 5).append(kind: format.kind, payload: [1, 2, 3]))
        // A record of another session (consensus) or an earlier lap (its sequence number is old).
        var other = CreditRingWriter(ring: ring, session: 6)
        if format == .mailbox { other.posted(other.append(kind: format.kind, payload: [0])!.record) }
        memory.land(CreditRingWriter.Write(copying: try #require(other.append(kind: format.kind, payload: [1, 2, 3])).record, to: 0))
        #expect(reader.next(in: memory, at: 0) == .empty)
        #expect(!reader.hasRecord(in: memory, at: 0))
        // The right header, but the payload has not landed completely.
        var torn = good.record.bytes
        torn[torn.count - 1] ^= 0xFF
        memory.bytes.replaceSubrange(0..<torn.count, with: torn)
        #expect(reader.hasRecord(in: memory, at: 0))
        #expect(reader.next(in: memory, at: 0) == .landing)
        #expect(reader.readPosition == 0 && reader.nextSequence == 1)
        // A length beyond half the ring is never read, sealed or not.
        var long = good.record.bytes
        long.replaceSubrange(8..<12, with: [0, 0, 2, 32])
        memory.bytes.replaceSubrange(0..<long.count, with: long)
        #expect(reader.next(in: memory, at: 0) == .empty)
        memory.land(good.record)
        #expect(reader.next(in: memory, at: 0) == .record(.init(kind: format.kind, sequence: 1, word: format == .consensus ? 5 : 0, payload: [1, 2, 3])))
        #expect(reader.readPosition == 64 && reader.nextSequence == 2)
    }

    @Test func aWrapMarkerWithAPayloadIsMalformedAndNotTaken() throws {
        let ring = try CreditRing(ringBytes: 1024, format: RingFormatCase.mailbox.format)
        var memory = ByteRing(1024)
        memory.bytes.replaceSubrange(0..<36, with: ring.record(kind: 2 << 24, sequence: 1, word: 0, payload: [1, 2, 3, 4]))
        var reader = CreditRingReader(ring: ring)
        guard case .malformed(let why) = reader.next(in: memory, at: 0) else { Issue.record("taken"); return }
        #expect(why.contains("wrap marker 1"))
        #expect(reader.nextSequence == 1)
    }

    @Test func lazyCreditIsAskedForOncePerQuarterRingAndOwedOnlyThen() throws {
        let ring = try CreditRing(ringBytes: 4096, format: RingLayout.recordFormat)
        var writer = CreditRingWriter(ring: ring, session: 1)
        var reader = CreditRingReader(ring: ring, session: 1)
        var memory = ByteRing(4096)
        var asked: [Int] = []
        for i in 0..<48 {  // 64-byte records: a quarter ring is 16 of them
            let a = try #require(writer.append(kind: 0, payload: [UInt8](repeating: 0, count: 32)))
            if a.record.asksForCredit { asked.append(i) }
            memory.land(a.record)
            writer.posted(a.record)
            guard case .record(let r) = reader.next(in: memory, at: 0) else { Issue.record("record \(i) not read"); return }
            #expect(r.kind == 0, "the credit-wanted bit is not part of the kind the caller sees")
            #expect(reader.creditDue == ((16...30).contains(i) || i == 47), "record \(i)")
            if i == 30 {
                // Only now does the reader answer the first request.
                _ = reader.creditCell().withUnsafeBytes { writer.takeCredit(cell: $0) }
                reader.returnedCredit(at: reader.readPosition)
            }
        }
        // 16 records fit a quarter; the 17th asks; no other asks until credit reached it (after
        // record 30), and then only once a quarter is uncredited again.
        #expect(asked == [16, 47])
        #expect(reader.creditDue)
        reader.returnedCredit(at: reader.readPosition)
        #expect(!reader.creditDue)
        reader.requestCredit()
        #expect(reader.creditDue, "a session or an explicit request makes credit due however little was read")
    }

    @Test func badRingSizesAndClashingBitsAreRefusedByName() {
        #expect(throws: FabricError.badConfiguration("credit ring of 1000 bytes: must be a multiple of 64 and at least 1024")) {
            try CreditRing(ringBytes: 1000, format: RingLayout.recordFormat)
        }
        #expect(throws: FabricError.self) { try CreditRing(ringBytes: 512, format: RingLayout.recordFormat) }
        #expect(throws: FabricError.badConfiguration("credit-wanted bit 3 must be one bit outside the wrap kind 1")) {
            try CreditRing(ringBytes: 1024, format: .init(stamp: .sessionThenSequence, wrapKind: 1, creditWantedBit: 3))
        }
        #expect(throws: FabricError.self) {
            try CreditRing(ringBytes: 1024, format: .init(stamp: .sessionThenSequence, wrapKind: 3, creditWantedBit: 2))
        }
    }
}

extension CreditRingWriter.Write {
    /// The same bytes at another offset (for planting records by hand).
    init(copying w: Self, to offset: Int) {
        self.init(offset: offset, bytes: w.bytes, isWrapMarker: w.isWrapMarker, asksForCredit: w.asksForCredit,
                  position: w.position, end: w.end, sequence: w.sequence)
    }
}
