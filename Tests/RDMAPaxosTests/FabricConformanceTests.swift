import Testing
@testable import RDMAPaxos

/// Verbs semantics every `Fabric` must keep; each test runs against every software fabric.
@Suite struct FabricConformanceTests {
    @Test(arguments: FabricKind.allCases)
    func writeLandsAtOffsetBeforeItsCompletion(kind: FabricKind) async throws {
        let p = try await FabricPair.make(FabricWorld(kind))
        defer { p.close() }
        #expect(p.qp.remote == p.regionB.remote)
        try p.qp.postWrite([1, 2, 3, 4], remoteOffset: 100, workRequestID: 7)
        let cs = collect(p.a.completions, count: 1)
        #expect(cs == [Completion(kind: .write, status: .success, peer: 2, workRequestID: 7, immediate: nil)])
        // The completion is only queued after landing, so the bytes are visible now.
        #expect(p.regionB.read(offset: 98, count: 8) == [0, 0, 1, 2, 3, 4, 0, 0])
    }

    @Test(arguments: FabricKind.allCases)
    func onlyWriteWithImmediateCompletesOnTheTarget(kind: FabricKind) async throws {
        let p = try await FabricPair.make(FabricWorld(kind))
        defer { p.close() }
        try p.qp.postWrite([9], remoteOffset: 0, workRequestID: 1)
        try p.qp.postWrite([5, 6], remoteOffset: 10, immediate: 0xABCD_0001, workRequestID: 2)
        #expect(collect(p.a.completions, count: 2).map(\.workRequestID) == [1, 2])
        let target = collect(p.b.completions, count: 1)
        #expect(target == [Completion(kind: .writeImmediateReceived, status: .success, peer: 1, workRequestID: 0,
                                      immediate: 0xABCD_0001)])
        #expect(p.regionB.read(offset: 10, count: 2) == [5, 6])
        #expect(p.b.completions.poll().isEmpty)
    }

    /// Unsignaled writes complete silently, yet must not stay outstanding: a queue pair that
    /// allows 8 at once carries 2,000 of them (a refused post is retried), and the signaled
    /// write after them is the one completion the writer sees.
    @Test(arguments: FabricKind.allCases)
    func unsignaledWritesAreReleasedWithoutCompletions(kind: FabricKind) async throws {
        let world = FabricWorld(kind)
        let a = try world.fabric(1, outstandingWritesMax: 8), b = try world.fabric(2)
        defer { a.close(); b.close() }
        let ra = try a.registerRegion(lengthBytes: 4096), rb = try b.registerRegion(lengthBytes: 4096)
        _ = try await a.listen(at: world.listenAddress(1), exporting: ra)
        let qp = try await a.connect(to: try await b.listen(at: world.listenAddress(2), exporting: rb), exporting: ra)
        for i in 0..<2_000 {
            guard await postRetrying(qp, [UInt8(truncatingIfNeeded: i)], at: i % 64, id: UInt64(i), signaled: false) else { return }
        }
        guard await postRetrying(qp, [7], at: 100, id: 9_999, signaled: true) else { return }
        #expect(collect(a.completions, count: 1) == [Completion(kind: .write, status: .success, peer: 2, workRequestID: 9_999, immediate: nil)])
        #expect(rb.read(offset: 100, count: 1) == [7])
        #expect(rb.read(offset: 1_999 % 64, count: 1) == [UInt8(truncatingIfNeeded: 1_999)])
        #expect(a.completions.poll().isEmpty)
    }

    @Test(arguments: FabricKind.allCases)
    func writesOnOneQueuePairLandInPostingOrder(kind: FabricKind) async throws {
        let p = try await FabricPair.make(FabricWorld(kind), regionBytes: 8192)
        defer { p.close() }
        let n = 400
        for i in 0..<n {
            var w = ByteWriter(); w.u32(UInt32(i))
            // Every write overwrites one cell (the last must win) and fills its own slot.
            try p.qp.postWrite(w.bytes, remoteOffset: 0, immediate: UInt32(i), signaled: false)
            try p.qp.postWrite(w.bytes, remoteOffset: 16 + 4 * (i % 1000), workRequestID: UInt64(i), signaled: i == n - 1)
        }
        #expect(collect(p.a.completions, count: 1).map(\.workRequestID) == [UInt64(n - 1)])
        var r = ByteReader(p.regionB.read(offset: 0, count: 4), what: "cell")
        #expect(try r.u32() == UInt32(n - 1))
        let imms = collect(p.b.completions, count: n).compactMap(\.immediate)
        #expect(imms == (0..<n).map(UInt32.init))
        var slots = ByteReader(p.regionB.read(offset: 16, count: 4 * n), what: "slots")
        #expect(try (0..<n).map { _ in try slots.u32() } == (0..<n).map(UInt32.init))
    }

    @Test(arguments: FabricKind.allCases)
    func badKeyIsARemoteAccessErrorThatBreaksTheQueuePair(kind: FabricKind) async throws {
        let p = try await FabricPair.make(FabricWorld(kind))
        defer { p.close() }
        try p.qp.postWrite([7], remoteOffset: 0, key: p.qp.remote.key &+ 1, immediate: 1, workRequestID: 3, signaled: false)
        #expect(collect(p.a.completions, count: 1).map(\.status) == [.remoteAccessError])
        #expect(!p.qp.isUsable)
        #expect(throws: FabricError.queuePairInError(peer: 2)) { try p.qp.postWrite([1], remoteOffset: 0) }
        #expect(p.regionB.read(offset: 0, count: 1) == [0])
        #expect(p.b.completions.poll().isEmpty)
    }

    @Test(arguments: FabricKind.allCases)
    func outOfBoundsWriteIsARemoteAccessError(kind: FabricKind) async throws {
        let p = try await FabricPair.make(FabricWorld(kind), regionBytes: 4096)
        defer { p.close() }
        try p.qp.postWrite([1, 2], remoteOffset: 4095, workRequestID: 1)
        #expect(collect(p.a.completions, count: 1).map(\.status) == [.remoteAccessError])
        let qp2 = try await p.reconnect()
        try qp2.postWrite([1], remoteOffset: -1, workRequestID: 2)
        #expect(collect(p.a.completions, count: 1).map(\.status) == [.remoteAccessError])
        #expect(p.regionB.read(offset: 4095, count: 1) == [0])
    }

    @Test(arguments: FabricKind.allCases)
    func rotatedKeyFencesOldWritersUntilTheyReconnect(kind: FabricKind) async throws {
        let p = try await FabricPair.make(FabricWorld(kind))
        defer { p.close() }
        let old = p.regionB.key
        let fresh = try p.b.rotateKey(of: p.regionB)
        #expect(fresh.key != old)
        try p.qp.postWrite([1], remoteOffset: 0, workRequestID: 1)
        #expect(collect(p.a.completions, count: 1).map(\.status) == [.remoteAccessError])
        #expect(p.regionB.read(offset: 0, count: 1) == [0])
        let qp2 = try await p.reconnect()
        #expect(qp2.remote.key == fresh.key)
        try qp2.postWrite([1], remoteOffset: 0, workRequestID: 2)
        #expect(collect(p.a.completions, count: 1).map(\.status) == [.success])
        #expect(p.regionB.read(offset: 0, count: 1) == [1])
    }

    @Test(arguments: FabricKind.allCases)
    func revokedPeerWritesNeverLand(kind: FabricKind) async throws {
        let p = try await FabricPair.make(FabricWorld(kind))
        defer { p.close() }
        try p.qp.postWrite([1], remoteOffset: 0, workRequestID: 1)
        #expect(collect(p.a.completions, count: 1).map(\.status) == [.success])
        p.b.revokeAccess(from: 1)
        do {
            try p.qp.postWrite([2], remoteOffset: 1, workRequestID: 2)
            let cs = collect(p.a.completions, count: 1)
            #expect(cs.count == 1 && cs[0].status != .success)
        } catch {
            #expect(error == .queuePairInError(peer: 2))  // the connection was already gone
        }
        #expect(await eventually { !p.qp.isUsable })
        #expect(p.regionB.read(offset: 0, count: 2) == [1, 0])
    }

    @Test(arguments: FabricKind.allCases)
    func movingToErrorFlushesOutstandingWritesInOrder(kind: FabricKind) async throws {
        let p = try await FabricPair.make(FabricWorld(kind))
        defer { p.close() }
        for i in 0..<200 { try p.qp.postWrite([UInt8(i % 256)], remoteOffset: i, workRequestID: UInt64(i)) }
        p.qp.moveToError()
        #expect(!p.qp.isUsable)
        let cs = collect(p.a.completions, count: 200)
        #expect(cs.map(\.workRequestID) == (0..<200).map(UInt64.init))
        // Whatever finished before the fence succeeded; everything after it was flushed.
        let firstFlushed = cs.firstIndex { $0.status != .success } ?? cs.count
        #expect(cs[firstFlushed...].allSatisfy { $0.status == .flushed })
        #expect(throws: FabricError.queuePairInError(peer: 2)) { try p.qp.postWrite([1], remoteOffset: 0) }
    }

    @Test(arguments: FabricKind.allCases)
    func connectingToAnAbsentPeerFails(kind: FabricKind) async throws {
        let world = FabricWorld(kind)
        let a = try world.fabric(1)
        defer { a.close() }
        let r = try a.registerRegion(lengthBytes: 64)
        // A port nothing listens on (the memory network ignores it).
        await #expect(throws: FabricError.self) { try await a.connect(to: PeerAddress(node: 2, port: 1), exporting: r) }
    }
}

@Suite struct MemoryFabricTests {
    @Test func pausedNetworkHoldsWritesAndFencingFlushesThem() async throws {
        let world = FabricWorld(.memory)
        let p = try await FabricPair.make(world)
        defer { p.close() }
        world.network.pause()
        for i in 0..<3 { try p.qp.postWrite([1], remoteOffset: i, workRequestID: UInt64(i)) }
        #expect(p.a.completions.poll().isEmpty)
        p.qp.moveToError()
        #expect(collect(p.a.completions, count: 3).map(\.status) == [.flushed, .flushed, .flushed])
        world.network.resume()
        #expect(p.regionB.read(offset: 0, count: 3) == [0, 0, 0])
    }

    @Test func outstandingWritesAreBounded() async throws {
        let network = MemoryNetwork()
        let a = MemoryFabric(node: 1, network: network, outstandingWritesMax: 4)
        let b = MemoryFabric(node: 2, network: network)
        defer { a.close(); b.close() }
        let rb = try b.registerRegion(lengthBytes: 64)
        _ = try await b.listen(at: PeerAddress(node: 2), exporting: rb)
        let qp = try await a.connect(to: PeerAddress(node: 2), exporting: try a.registerRegion(lengthBytes: 64))
        network.pause()
        for i in 0..<4 { try qp.postWrite([1], remoteOffset: i) }
        #expect(throws: FabricError.tooManyOutstandingWrites(peer: 2, limit: 4)) { try qp.postWrite([1], remoteOffset: 5) }
        network.resume()
        #expect(collect(a.completions, count: 4).allSatisfy { $0.status == .success })
        #expect(rb.read(offset: 0, count: 5) == [1, 1, 1, 1, 0])
    }

    @Test func closedTargetBreaksWriters() async throws {
        let p = try await FabricPair.make(FabricWorld(.memory))
        defer { p.a.close() }
        p.b.close()
        try p.qp.postWrite([1], remoteOffset: 0, workRequestID: 1)
        #expect(collect(p.a.completions, count: 1).map(\.status) == [.transportError])
    }

    /// Registering existing memory (guest RAM, say): writes land in that memory itself, nothing in
    /// it is zeroed, bounds are the wrapped length, and the region keeps the memory's owner alive.
    @Test(arguments: FabricKind.allCases)
    func wrappedMemoryReceivesWritesInPlace(kind: FabricKind) async throws {
        let world = FabricWorld(kind)
        let a = try world.fabric(1), b = try world.fabric(2)
        defer { a.close(); b.close() }
        let memory = OwnedBytes(count: 3 * 4096, fill: 0xAA)
        let rb = try b.registerRegion(wrapping: memory.bytes, retaining: memory)
        #expect(rb.lengthBytes == 3 * 4096 && rb.remote.base == UInt64(UInt(bitPattern: memory.bytes.baseAddress)))
        let address = try await b.listen(at: world.listenAddress(2), exporting: rb)
        let qp = try await a.connect(to: address, exporting: try a.registerRegion(lengthBytes: 64))
        #expect(qp.remote.lengthBytes == 3 * 4096)
        try qp.postWrite([UInt8](repeating: 0x11, count: 4096), remoteOffset: 4096, workRequestID: 1)
        #expect(collect(a.completions, count: 1).map(\.status) == [.success])
        #expect(memory.bytes[4095] == 0xAA && memory.bytes[4096] == 0x11 && memory.bytes[8191] == 0x11 && memory.bytes[8192] == 0xAA)
        try qp.postWrite([1], remoteOffset: 3 * 4096, workRequestID: 2)
        #expect(collect(a.completions, count: 1).map(\.status) == [.remoteAccessError])
    }

    /// Every fabric with a cluster key refuses a peer that holds another one (the memory fabric
    /// has none). On an RDMA machine this runs both verbs connect paths on the device.
    @Test(arguments: FabricKind.allCases.filter { $0 != .memory })
    func aPeerWithAnotherClusterKeyCannotConnect(kind: FabricKind) async throws {
        let world = FabricWorld(kind)
        let b = try world.fabric(2)
        let a = try world.fabric(1, key: Array("another cluster's key, 32 bytes!".utf8))
        defer { a.close(); b.close() }
        let address = try await b.listen(at: world.listenAddress(2), exporting: try b.registerRegion(lengthBytes: 4096))
        let regionA = try a.registerRegion(lengthBytes: 64)
        await #expect(throws: FabricError.self) { _ = try await a.connect(to: address, exporting: regionA) }
    }

    @Test func wrappingNothingIsRefused() throws {
        let f = MemoryFabric(node: 1, network: MemoryNetwork())
        defer { f.close() }
        #expect(throws: FabricError.self) { _ = try f.registerRegion(wrapping: UnsafeMutableRawBufferPointer(start: nil, count: 0), retaining: nil) }
    }
}

/// Memory allocated outside any fabric, freed when the last reference goes.
final class OwnedBytes: Sendable {
    // Immutable after init; the bytes are shared with the fabric under test.
    nonisolated(unsafe) let bytes: UnsafeMutableRawBufferPointer
    init(count: Int, fill: UInt8) {
        bytes = .allocate(byteCount: count, alignment: 4096)
        bytes.initializeMemory(as: UInt8.self, repeating: fill)
    }
    deinit { bytes.deallocate() }
}

/// Posts a write, retrying while the queue pair refuses it as having too many outstanding; false
/// (with an issue recorded) after 10 s of refusals or on any other error.
func postRetrying(_ qp: any QueuePair, _ bytes: [UInt8], at offset: Int, id: UInt64, signaled: Bool) async -> Bool {
    let deadline = ContinuousClock.now + .seconds(10)
    while true {
        var refused = false
        do {
            try qp.postWrite(bytes, remoteOffset: offset, workRequestID: id, signaled: signaled)
            return true
        } catch {
            guard case .tooManyOutstandingWrites = error else {
                Issue.record("write \(id): \(error)")
                return false
            }
            refused = true
        }
        guard refused, ContinuousClock.now < deadline else {
            Issue.record("write \(id) refused for 10 s: unsignaled writes stay outstanding")
            return false
        }
        try? await Task.sleep(for: .microseconds(200))
    }
}
