import Testing
@testable import RDMAPaxos

/// One message of every `Message.Body` case, with non-trivial field values.
func everyKindOfMessage(from: NodeID = 1, to: NodeID = 2, term: UInt64 = 7) -> [Message] {
    let b = Ballot(term: term, node: from)
    let membership = Membership([Member(id: 1, role: .voter, priority: 3), Member(id: 2, role: .witness),
                                 Member(id: 3, role: .learner)])
    let bodies: [Message.Body] = [
        .preVote(lastIndex: 41, lastBallot: Ballot(term: 6, node: 3)),
        .preVoteReply(granted: true),
        .prepare(lastIndex: 9, lastBallot: Ballot(term: 2, node: 2), commit: 7, force: true),
        .promise(granted: false, suffixPrevBallot: .zero, suffix: []),
        .accept(prevIndex: 10, prevBallot: Ballot(term: 5, node: 1), entries: [
            LogEntry(index: 11, ballot: b, kind: .command, payload: Array("set x 1".utf8)),
            LogEntry(index: 12, ballot: b, kind: .noop, payload: []),
            LogEntry(index: 13, ballot: b, kind: .membership, payload: membership.encoded()),
        ], commit: 10),
        .accept(prevIndex: 0, prevBallot: .zero, entries: [], commit: 0),
        .accepted(success: true, index: 13),
        .heartbeat(commit: 12, readRound: 99),
        .heartbeat(commit: 12, readRound: 0, votersDurable: 11),
        .heartbeatReply(readRound: 99),
        .commitNotice(commit: 12),
        .installSnapshot(SnapshotChunk(whole: Snapshot(index: 100, ballot: b, membership: membership, data: [1, 2, 3, 255]))),
        .installSnapshot(SnapshotChunk(index: 100, ballot: b, membership: membership, totalBytes: 1 << 30, offset: 1 << 20, data: [9, 8])),
        .timeoutNow,
        .snapshotReceived(index: 100, bytes: 1 << 20),
        .promise(granted: true, suffixPrevBallot: Ballot(term: 1, node: 1), suffix: [LogEntry(index: 8, ballot: Ballot(term: 2, node: 1), kind: .command, payload: [1, 2])]),
        .promise(granted: true, suffixPrevBallot: Ballot(term: 1, node: 1), suffix: [LogEntry(index: 8, ballot: Ballot(term: 2, node: 1), kind: .noop, payload: [])], more: true),
        .recovering(nonce: 0xDEAD_BEEF_0000_0001, index: 41),
        .recovering(nonce: 7, index: 0),
        .recovered(nonce: 0xDEAD_BEEF_0000_0001, barrier: 42),
    ]
    return bodies.map { Message(from: from, to: to, ballot: b, body: $0) }
}

@Suite struct WireCodecTests {
    @Test func everyBodyCaseRoundTrips() throws {
        let messages = everyKindOfMessage()
        #expect(Set(messages.map { WireCodec.tag($0.body) }).count == 14)
        for m in messages {
            #expect(try WireCodec.decode(WireCodec.encode(m)) == m)
        }
    }

    @Test func everyTruncationIsRejected() {
        for m in everyKindOfMessage() {
            let bytes = WireCodec.encode(m)
            for n in 0..<bytes.count {
                #expect(throws: DecodeError.self) { try WireCodec.decode(Array(bytes[..<n])) }
            }
        }
    }

    @Test func trailingBytesAreRejected() {
        let bytes = WireCodec.encode(everyKindOfMessage()[0]) + [0]
        #expect(throws: DecodeError.self) { try WireCodec.decode(bytes) }
    }

    @Test func unknownVersionTagAndBooleanAreRejected() {
        var bytes = WireCodec.encode(Message(from: 1, to: 2, ballot: .zero, body: .promise(granted: true, suffixPrevBallot: .zero, suffix: [])))
        var v = bytes; v[0] = WireCodec.version + 1
        #expect(throws: DecodeError.self) { try WireCodec.decode(v) }
        var t = bytes; t[1] = 200
        #expect(throws: DecodeError.self) { try WireCodec.decode(t) }
        bytes[bytes.count - 1] = 2
        #expect(throws: DecodeError.self) { try WireCodec.decode(bytes) }
    }

    @Test func limitsBoundEntryCountsAndPayloads() throws {
        let m = everyKindOfMessage()[4]
        let bytes = WireCodec.encode(m)
        #expect(throws: DecodeError.self) { try WireCodec.decode(bytes, limits: .init(entriesMax: 2)) }
        #expect(throws: DecodeError.self) { try WireCodec.decode(bytes, limits: .init(payloadBytesMax: 4)) }
        #expect(throws: DecodeError.self) { try WireCodec.decode(bytes, limits: .init(messageBytesMax: 16)) }
        #expect(try WireCodec.decode(bytes, limits: .init(entriesMax: 3)) == m)
    }

    @Test func snapshotChunkOutsideItsSnapshotIsRejected() throws {
        func chunk(total: UInt64, offset: UInt64, data: [UInt8]) -> [UInt8] {
            var w = ByteWriter()
            w.u8(WireCodec.version); w.u8(9); w.u32(1); w.u32(2); w.ballot(.zero)
            w.u64(5); w.ballot(.zero); w.blob(Membership.empty.encoded()); w.u64(total); w.u64(offset); w.blob(data)
            return w.bytes
        }
        #expect(throws: DecodeError.self) { try WireCodec.decode(chunk(total: 4, offset: 3, data: [1, 2])) }
        #expect(throws: DecodeError.self) { try WireCodec.decode(chunk(total: 4, offset: 5, data: [])) }
        #expect(throws: DecodeError.self) { try WireCodec.decode(chunk(total: .max, offset: 0, data: [])) }
        let ok = try WireCodec.decode(chunk(total: 4, offset: 2, data: [1, 2]))
        #expect(ok.body == .installSnapshot(SnapshotChunk(index: 5, ballot: .zero, membership: .empty, totalBytes: 4, offset: 2, data: [1, 2])))
    }

    @Test func hugeClaimedEntryCountFailsWithoutAllocating() {
        var w = ByteWriter()
        w.u8(WireCodec.version); w.u8(5); w.u32(1); w.u32(2); w.ballot(.zero)
        w.u64(0); w.ballot(.zero); w.u64(0); w.u32(60_000)
        #expect(throws: DecodeError.self) { try WireCodec.decode(w.bytes) }
    }

    /// Seeded garbage and seeded mutations of valid messages: decoding throws or returns, never traps or hangs.
    @Test(arguments: [1, 2, 3, 42] as [UInt64])
    func randomBytesNeverCrashTheDecoder(seed: UInt64) {
        var rng = SeededRandom(seed: seed)
        let valid = everyKindOfMessage().map(WireCodec.encode)
        var decoded = 0
        for round in 0..<3000 {
            var bytes: [UInt8]
            if round % 2 == 0 {
                bytes = (0..<Int(rng.next() % 200)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
                if bytes.count > 1 { bytes[0] = WireCodec.version; bytes[1] = UInt8(1 + rng.next() % 15) }
            } else {
                bytes = valid[Int(rng.next() % UInt64(valid.count))]
                for _ in 0..<(1 + rng.next() % 4) where !bytes.isEmpty {
                    bytes[Int(rng.next() % UInt64(bytes.count))] = UInt8(truncatingIfNeeded: rng.next())
                }
            }
            if (try? WireCodec.decode(bytes)) != nil { decoded += 1 }
        }
        // Some mutations leave a valid message (e.g. a changed payload byte); garbage mostly does not.
        #expect(decoded < 3000, "seed \(seed)")
    }
}

