// The control-frame format: round trips, and rejection of every kind of bad bytes.

import Testing
@testable import VMReplica

@Suite struct SyncMessagesTests {
    static let samples: [SyncMessage] = [
        .hello(SyncHello(geometry: SyncGeometry(pageSize: 4096, pageCount: 262_144), hashAlgorithm: 1, verify: true, seed: 0xDEAD_BEEF)),
        .hello(SyncHello(geometry: SyncGeometry(pageSize: 512, pageCount: 1), hashAlgorithm: 9, verify: false, seed: 0)),
        .helloReply(.accepted, SyncGeometry(pageSize: 4096, pageCount: 10)),
        .helloReply(.geometryMismatch, SyncGeometry(pageSize: 8192, pageCount: 3)),
        .dirtyBitmap(DirtyBitmap(pageCount: 1000, pages: [0, 5, 999])),              // sparse
        .dirtyBitmap(.all(pageCount: 130)),                                          // dense
        .dirtyBitmap(DirtyBitmap(pageCount: 64)),                                    // empty
        .hashes(first: 0, values: []),
        .hashes(first: 77, values: [1, .max, 0x0102_0304_0506_0708]),
        .commit(digest: 99, written: DirtyBitmap(pageCount: 300, pages: [299])),
        .commitReply(.inSync),
        .commitReply(.verifyFailed),
        .outputDigests(generation: 7, digests: []),
        .outputDigests(generation: .max, digests: [
            OutputDigest(kind: .tcp, stream: 0xABCD, content: 42, sequence: 1, acknowledgement: .max, flags: 0x18, window: 502,
                         payloadBytes: 1400, timestamp: 0),
            OutputDigest(kind: .other, stream: 0, content: .max, payloadBytes: 60),
            OutputDigest(kind: .arp, stream: 0, content: 1),
        ]),
    ]

    @Test func everyMessageRoundTrips() throws {
        for m in Self.samples {
            let frame = SyncFrame(session: 0x1122_3344_5566_7788, m)
            #expect(try SyncFrame.decode(frame.encoded()) == frame)
        }
    }

    @Test func headerIsTheDocumentedTwentyBytes() {
        let bytes = SyncFrame(session: 1, .commitReply(.inSync)).encoded()
        #expect(bytes == [0x50, 0x4C, 0x53, 0x56, 0, 1, 6, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 4, 0, 0, 0, 0])
    }

    @Test func everyTruncationIsRejected() {
        for m in Self.samples {
            let bytes = SyncFrame(session: 3, m).encoded()
            for n in 0..<bytes.count {
                #expect(throws: DecodeError.self, "\(m.name) cut to \(n) bytes") { try SyncFrame.decode(Array(bytes[..<n])) }
            }
        }
    }

    @Test func trailingBytesAreRejected() {
        var bytes = SyncFrame(session: 3, .commitReply(.inSync)).encoded()
        bytes.append(0)
        #expect(throws: DecodeError.self) { try SyncFrame.decode(bytes) }
    }

    /// Each case corrupts one field of a valid frame; the error says which.
    @Test(arguments: [
        ("bad magic", 0, UInt8(0x51)),
        ("unsupported version", 5, 2),
        ("unknown message kind", 6, 42),
        ("reserved header byte", 7, 1),
    ] as [(String, Int, UInt8)])
    func corruptHeaderFieldsAreRejectedWithAReason(reason: String, offset: Int, value: UInt8) {
        var bytes = SyncFrame(session: 3, .commitReply(.inSync)).encoded()
        bytes[offset] = value
        #expect { try SyncFrame.decode(bytes) } throws: { "\($0)".contains(reason) }
    }

    @Test func payloadLengthDisagreeingWithTheFrameIsRejected() {
        var bytes = SyncFrame(session: 3, .commitReply(.inSync)).encoded()
        bytes[19] = 5
        #expect { try SyncFrame.decode(bytes) } throws: { "\($0)".contains("payload bytes") }
        bytes[16] = 0xFF  // 4 GiB claimed: over the limit, checked before anything is read
        #expect { try SyncFrame.decode(bytes) } throws: { "\($0)".contains("exceeds the limit") }
    }

    @Test func invalidGeometryInHelloIsRejected() {
        for (size, count) in [(4095, 10), (256, 10), (4096, 0), (4096, SyncWire.pageCountMax + 1)] {
            var w = ByteWriter(capacity: 64)
            w.u32(SyncWire.magic); w.u16(1); w.u8(1); w.u8(0); w.u64(1); w.u32(24)
            w.u32(UInt32(size)); w.u64(UInt64(count)); w.u8(1); w.u8(1); w.u16(0); w.u64(0)
            #expect(throws: DecodeError.self, "\(size) x \(count)") { try SyncFrame.decode(w.bytes) }
        }
    }

    @Test func unknownStatusAndFlagsAreRejected() {
        var reply = SyncFrame(session: 1, .commitReply(.inSync)).encoded()
        reply[20] = 7
        #expect { try SyncFrame.decode(reply) } throws: { "\($0)".contains("unknown commit status") }
        var hello = SyncFrame(session: 1, Self.samples[0]).encoded()
        hello[20 + 13] = 0x80
        #expect { try SyncFrame.decode(hello) } throws: { "\($0)".contains("flags") }
    }

    @Test func bitmapsThatLieAreRejected() {
        func frame(_ body: (inout ByteWriter) -> Void) -> [UInt8] {
            var w = ByteWriter(capacity: 64)
            w.u32(SyncWire.magic); w.u16(1); w.u8(3); w.u8(0); w.u64(1); w.u32(0)
            body(&w)
            w.patchU32(at: 16, UInt32(w.bytes.count - 20))
            return w.bytes
        }
        let cases: [(String, [UInt8])] = [
            ("count mismatch", frame { $0.u8(0); $0.u8(0); $0.u16(0); $0.u32(2); $0.u64(64); $0.u64(1) }),
            ("bit past the end", frame { $0.u8(0); $0.u8(0); $0.u16(0); $0.u32(1); $0.u64(10); $0.u64(1 << 20) }),
            ("sparse out of order", frame { $0.u8(1); $0.u8(0); $0.u16(0); $0.u32(2); $0.u64(100); $0.u32(5); $0.u32(5) }),
            ("sparse out of range", frame { $0.u8(1); $0.u8(0); $0.u16(0); $0.u32(1); $0.u64(100); $0.u32(100) }),
            ("more set than pages", frame { $0.u8(1); $0.u8(0); $0.u16(0); $0.u32(11); $0.u64(10) }),
            ("unknown form", frame { $0.u8(2); $0.u8(0); $0.u16(0); $0.u32(0); $0.u64(10) }),
            ("huge sparse count", frame { $0.u8(1); $0.u8(0); $0.u16(0); $0.u32(.max); $0.u64(UInt64(SyncWire.pageCountMax)) }),
        ]
        for (name, bytes) in cases {
            #expect(throws: DecodeError.self, "\(name)") { try SyncFrame.decode(bytes) }
        }
    }

    @Test func hashCountDisagreeingWithPayloadIsRejected() {
        var bytes = SyncFrame(session: 1, .hashes(first: 0, values: [1, 2])).encoded()
        bytes[27] = 3  // count 3, only two hashes follow
        #expect { try SyncFrame.decode(bytes) } throws: { "\($0)".contains("hash count") }
    }

    /// Seeded random bytes and random corruptions of valid frames: decoding returns or throws,
    /// never traps.
    @Test func randomBytesNeverTrap() {
        var rng = SeededRandom(seed: 2024)
        var rejected = 0
        for i in 0..<20_000 {
            var bytes: [UInt8]
            if i % 2 == 0 {
                bytes = (0..<Int(rng.next() % 64)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            } else {
                bytes = SyncFrame(session: 5, Self.samples[Int(rng.next() % UInt64(Self.samples.count))]).encoded()
                for _ in 0..<Int(1 + rng.next() % 3) {
                    bytes[Int(rng.next() % UInt64(bytes.count))] = UInt8(truncatingIfNeeded: rng.next())
                }
            }
            if (try? SyncFrame.decode(bytes)) == nil { rejected += 1 }
        }
        #expect(rejected > 10_000)
    }
}

/// A peer that sends bad bytes makes the sync fail with a decode error, and the backup does
/// not claim sync.
@Suite(.timeLimit(.minutes(1))) struct MalformedPeerTests {
    @Test func backupRejectsGarbageInsteadOfHello() async throws {
        let m = try GuestMemory(pageCount: 8)
        let (pc, bc) = InMemorySyncChannel.pair(backupMemory: m)
        let state = MemorySyncStateStore(.inSync(session: 1))
        try await pc.send([0x50, 0x4C, 0x53, 0x56, 0, 1])
        let b = SyncBackup(memory: m, pool: PageHashPool(threadCount: 1), state: state)
        let e = await outcome { try await b.run(dirty: DirtyBitmap(pageCount: 8), over: bc) }.error
        #expect(e is DecodeError)
        #expect(state.load() == .inSync(session: 1), "nothing was written, so the old claim stands")
    }

    @Test func backupRejectsGarbageMidSessionAndStaysNotInSync() async throws {
        let m = try GuestMemory(pageCount: 8)
        let (pc, bc) = InMemorySyncChannel.pair(backupMemory: m)
        let state = MemorySyncStateStore(.inSync(session: 1))
        let hello = SyncHello(geometry: SyncGeometry(m), hashAlgorithm: 1, verify: true, seed: 0)
        try await pc.send(SyncFrame(session: 2, .hello(hello)).encoded())
        var bad = SyncFrame(session: 2, .dirtyBitmap(.all(pageCount: 8))).encoded()
        bad[bad.count - 2] = 0xFF  // bits for pages 8..15, past the end
        try await pc.send(bad)
        let b = SyncBackup(memory: m, pool: PageHashPool(threadCount: 1), state: state)
        let e = await outcome { try await b.run(dirty: DirtyBitmap(pageCount: 8), over: bc) }.error
        #expect(e is DecodeError)
        #expect(!state.load().isInSync)
    }

    @Test func backupRejectsAFrameFromAnotherSession() async throws {
        let m = try GuestMemory(pageCount: 8)
        let (pc, bc) = InMemorySyncChannel.pair(backupMemory: m)
        let hello = SyncHello(geometry: SyncGeometry(m), hashAlgorithm: 1, verify: true, seed: 0)
        try await pc.send(SyncFrame(session: 2, .hello(hello)).encoded())
        try await pc.send(SyncFrame(session: 3, .dirtyBitmap(.all(pageCount: 8))).encoded())
        let b = SyncBackup(memory: m, pool: PageHashPool(threadCount: 1), state: MemorySyncStateStore())
        let e = await outcome { try await b.run(dirty: DirtyBitmap(pageCount: 8), over: bc) }.error
        #expect(e as? SyncError == .wrongSession(expected: 2, got: 3))
    }

    @Test func primaryRejectsHashesOutOfSequence() async throws {
        let m = try GuestMemory(pageCount: 8)
        let (pc, bc) = InMemorySyncChannel.pair(backupMemory: m)
        let g = SyncGeometry(m)
        try await bc.send(SyncFrame(session: 4, .helloReply(.accepted, g)).encoded())
        try await bc.send(SyncFrame(session: 4, .dirtyBitmap(.all(pageCount: 8))).encoded())
        try await bc.send(SyncFrame(session: 4, .hashes(first: 3, values: [1])).encoded())
        let p = SyncPrimary(memory: m, pool: PageHashPool(threadCount: 1))
        let e = await outcome { try await p.run(dirty: DirtyBitmap(pageCount: 8), over: pc, session: 4) }.error
        guard case .hashSequence? = e as? SyncError else {
            Issue.record("expected a hash sequence error, got \(String(describing: e))")
            return
        }
    }

    @Test func unknownHashAlgorithmIsRefused() async throws {
        let m = try GuestMemory(pageCount: 8)
        let (pc, bc) = InMemorySyncChannel.pair(backupMemory: m)
        let hello = SyncHello(geometry: SyncGeometry(m), hashAlgorithm: 9, verify: true, seed: 0)
        try await pc.send(SyncFrame(session: 2, .hello(hello)).encoded())
        let b = SyncBackup(memory: m, pool: PageHashPool(threadCount: 1), state: MemorySyncStateStore())
        let e = await outcome { try await b.run(dirty: DirtyBitmap(pageCount: 8), over: bc) }.error
        #expect(e as? SyncError == .unsupportedHash(algorithm: 9))
        let reply = try SyncFrame.decode(try await pc.receive())
        #expect(reply.message == .helloReply(.unsupportedHash, SyncGeometry(m)))
    }
}
