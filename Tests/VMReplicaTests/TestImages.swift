// Shared fixtures: seeded randomness, guest-memory images with a known dirtying history, and
// a runner that drives both ends of a sync at once.

import Foundation
import RDMAPaxos
import Testing
import VerbsTestSupport
@testable import VMReplica

// Seeded pages use the core's `SeededRandom` (SplitMix64): a failing seed reproduces.

extension GuestMemory {
    /// Fills page `index` with bytes drawn from `rng`.
    func randomize(page index: Int, _ rng: inout SeededRandom) {
        withMutablePage(index) { p in
            for i in stride(from: 0, to: p.count, by: 8) { p.storeBytes(of: rng.next(), toByteOffset: i, as: UInt64.self) }
        }
    }

    func copyPage(_ index: Int, from other: GuestMemory) {
        writePage(index, from: other.page(index))
    }

    func pageEquals(_ index: Int, _ other: GuestMemory) -> Bool {
        page(index).elementsEqual(other.page(index))
    }

    func isIdentical(to other: GuestMemory) -> Bool {
        pageCount == other.pageCount && pageSize == other.pageSize && bytes.elementsEqual(other.bytes)
    }
}

/// Two images that were equal at the last sync, then dirtied: some pages only by the primary,
/// some only by the backup, some by both (to equal or to different contents), and some written
/// with the bytes they already held.
struct DivergedPair {
    let primary: GuestMemory
    let backup: GuestMemory
    let primaryDirty: DirtyBitmap
    let backupDirty: DirtyBitmap
    /// Pages whose contents differ, found by comparing the images byte by byte.
    let divergent: DirtyBitmap

    init(pageCount: Int, seed: UInt64, dirtyFraction: Double = 0.2) throws {
        var rng = SeededRandom(seed: seed)
        primary = try GuestMemory(pageCount: pageCount)
        backup = try backupMemory(pageCount: pageCount)
        // Common starting image; leave some pages zero, as in a fresh guest.
        for p in 0..<pageCount where rng.next() % 4 != 0 {
            primary.randomize(page: p, &rng)
            backup.copyPage(p, from: primary)
        }
        var pd = DirtyBitmap(pageCount: pageCount)
        var bd = DirtyBitmap(pageCount: pageCount)
        for p in 0..<pageCount where Double(rng.next() % 10_000) / 10_000 < dirtyFraction {
            switch rng.next() % 6 {
            case 0:  // primary only
                primary.randomize(page: p, &rng); pd.insert(p)
            case 1:  // backup only
                backup.randomize(page: p, &rng); bd.insert(p)
            case 2:  // both, same new contents (deterministic replay did its job)
                primary.randomize(page: p, &rng); backup.copyPage(p, from: primary)
                pd.insert(p); bd.insert(p)
            case 3:  // both, different contents
                primary.randomize(page: p, &rng); backup.randomize(page: p, &rng)
                pd.insert(p); bd.insert(p)
            case 4:  // primary rewrote the bytes it had: dirty but equal
                pd.insert(p)
            default: // backup rewrote the bytes it had
                bd.insert(p)
            }
        }
        var d = DirtyBitmap(pageCount: pageCount)
        for p in 0..<pageCount where !primary.pageEquals(p, backup) { d.insert(p) }
        primaryDirty = pd
        backupDirty = bd
        divergent = d
    }
}

/// The links the sync suites run over.
enum SyncTransport: String, CaseIterable, Sendable, CustomTestStringConvertible {
    /// `InMemorySyncChannel`.
    case inMemory
    /// `FabricSyncChannel` over `MemoryFabric` endpoints.
    case memoryFabric
    /// `FabricSyncChannel` over `TCPFabric` on loopback.
    case tcpFabric
    /// `FabricSyncChannel` over `VerbsFabric` on the software RDMA device (connected out of band,
    /// sized by `SyncLink.verbsFabricConfiguration`, each WRITE read up to 50 µs after its post).
    case verbsFabric
    /// The same on a real RDMA device (`make test-rdma`; `PLOVER_RDMA_DEVICE` picks one): only
    /// where `ibv_get_device_list` finds a device.
    case verbsHardware = "verbs-hardware"

    static var allCases: [SyncTransport] {
        [.inMemory, .memoryFabric, .tcpFabric, .verbsFabric] + ((try? VerbsProbe.deviceNames()) == nil ? [] : [.verbsHardware])
    }
    /// The fabric transports (every case but `inMemory`).
    static var fabrics: [SyncTransport] { allCases.filter { $0 != .inMemory } }
    var testDescription: String { rawValue }
}

/// Small rings, so control frames are cut into several records, wrap, and wait for credit.
let testFabricConfiguration = FabricSyncChannel.Configuration(ringBytes: 4096)

/// Writable anonymous guest memory with room for a fabric mailbox after it (any transport can use it).
func backupMemory(pageCount: Int, pageSize: Int = GuestMemory.defaultPageSize) throws -> GuestMemory {
    try GuestMemory(pageCount: pageCount, pageSize: pageSize, trailingBytes: testFabricConfiguration.mailboxBytes)
}

/// Both ends of one sync, run concurrently over one transport.
struct SyncRun {
    var primary: Result<SyncResult, any Error>
    var backup: Result<SyncResult, any Error>
    /// What crossed the link, as the in-memory channel counts it (the primary end's view for fabrics).
    var counters: InMemorySyncChannel.Counters
    /// Each end's own counters, over a fabric.
    var fabric: (primary: FabricSyncChannel.Counters, backup: FabricSyncChannel.Counters)?
}

func runSync(primary: GuestMemory, primaryDirty: DirtyBitmap,
             backup: GuestMemory, backupDirty: DirtyBitmap,
             state: any SyncStateStore = MemorySyncStateStore(),
             options: SyncOptions = SyncOptions(), faults: InMemorySyncChannel.Faults = .init(),
             session: UInt64 = 7, seed: UInt64 = 42, over transport: SyncTransport = .inMemory,
             channel: FabricSyncChannel.Configuration = testFabricConfiguration) async -> SyncRun {
    let p = SyncPrimary(memory: primary, pool: PageHashPool(threadCount: 2), options: options)
    let b = SyncBackup(memory: backup, pool: PageHashPool(threadCount: 2), state: state, options: options)
    guard transport != .inMemory else {
        let (pc, bc) = InMemorySyncChannel.pair(backupMemory: backup, faults: faults)
        async let backupSide = outcome { try await b.run(dirty: backupDirty, over: bc) }
        let pr = await outcome { try await p.run(dirty: primaryDirty, over: pc, session: session, seed: seed) }
        let br = await backupSide
        return SyncRun(primary: pr, backup: br, counters: pc.counters)
    }
    var configuration = channel
    configuration.faults = FabricSyncChannel.Faults(cutAfterPages: faults.cutAfterPages, cutAfterFrames: faults.cutAfterFrames)
    let link: FabricLink
    do {
        link = try await FabricLink.make(transport, backup: backup, configuration: configuration)
    } catch {
        Issue.record("cannot set up the \(transport) link: \(error)")
        return SyncRun(primary: .failure(error), backup: .failure(error), counters: .init())
    }
    defer { link.close() }
    async let backupSide = outcome { try await b.run(dirty: backupDirty, over: link.backup) }
    let pr = await outcome { try await p.run(dirty: primaryDirty, over: link.primary, session: session, seed: seed) }
    let br = await backupSide
    let pcs = link.primary.counters
    var counters = InMemorySyncChannel.Counters()
    counters.framesToBackup = pcs.framesSent
    counters.controlBytesToBackup = pcs.controlBytesSent
    counters.framesToPrimary = pcs.framesReceived
    counters.controlBytesToPrimary = pcs.controlBytesReceived
    counters.pagesWritten = pcs.pagesWritten
    counters.pageBytesWritten = pcs.pageBytesWritten
    return SyncRun(primary: pr, backup: br, counters: counters, fabric: (pcs, link.backup.counters))
}

let testClusterKey = Array("plover test cluster key, 32 byte".utf8)

/// Two fabric endpoints (node 1 primary, node 2 backup) joined by a `FabricSyncChannel` pair.
struct FabricLink {
    var primaryFabric: any Fabric
    var backupFabric: any Fabric
    var primary: FabricSyncChannel
    var backup: FabricSyncChannel

    static func fabrics(_ transport: SyncTransport, channel: FabricSyncChannel.Configuration) throws -> (any Fabric, any Fabric) {
        switch transport {
        case .inMemory, .memoryFabric:
            let network = MemoryNetwork()
            return (MemoryFabric(node: 1, network: network), MemoryFabric(node: 2, network: network))
        case .tcpFabric:
            let c = TCPFabric.Configuration(clusterKey: testClusterKey, members: [1, 2])
            return (try TCPFabric(node: 1, configuration: c), try TCPFabric(node: 2, configuration: c))
        case .verbsFabric:
            let driver = SoftVerbs(subnet: try SoftSubnet(), readDelayMicroseconds: 50)
            let c = SyncLink.verbsFabricConfiguration(clusterKey: try ClusterKey(bytes: testClusterKey), connection: .outOfBand,
                                                      members: [1, 2], channel: channel)
            return (try VerbsFabric(node: 1, configuration: c, driver: driver), try VerbsFabric(node: 2, configuration: c, driver: driver))
        case .verbsHardware:
            var c = SyncLink.verbsFabricConfiguration(clusterKey: try ClusterKey(bytes: testClusterKey), connection: .outOfBand,
                                                      members: [1, 2], channel: channel)
            c.deviceName = ProcessInfo.processInfo.environment["PLOVER_RDMA_DEVICE"]
            return (try VerbsFabric(node: 1, configuration: c), try VerbsFabric(node: 2, configuration: c))
        }
    }

    static func make(_ transport: SyncTransport, backup memory: GuestMemory,
                     configuration: FabricSyncChannel.Configuration = testFabricConfiguration,
                     backupConfiguration: FabricSyncChannel.Configuration? = nil,
                     divert: FabricSyncChannel.Divert? = nil) async throws -> FabricLink {
        let (pf, bf) = try fabrics(transport, channel: configuration)
        do {
            let pe = try await FabricSyncChannel.Endpoint.primary(
                fabric: pf, listenAt: PeerAddress(node: 1, host: "127.0.0.1", port: 0), configuration: configuration, divert: divert)
            let be = try await FabricSyncChannel.Endpoint.backup(
                memory: memory, fabric: bf, listenAt: PeerAddress(node: 2, host: "127.0.0.1", port: 0),
                configuration: backupConfiguration ?? configuration)
            async let pc = pe.connect(to: be.address)
            let bc = try await be.connect(to: pe.address)
            return FabricLink(primaryFabric: pf, backupFabric: bf, primary: try await pc, backup: bc)
        } catch {
            pf.close(); bf.close()
            throw error
        }
    }

    func close() {
        primary.close()
        backup.close()
        primaryFabric.close()
        backupFabric.close()
    }
}

func outcome<T>(_ body: () async throws -> T) async -> Result<T, any Error> {
    do { return .success(try await body()) } catch { return .failure(error) }
}

extension Result where Failure == any Error {
    var error: (any Error)? {
        if case .failure(let e) = self { return e }
        return nil
    }
}

/// Encoded size of a dirty bitmap, restated from the format in docs/design/syncvm.md rather than
/// taken from the library: 16-byte header, then dense words or 4-byte indices, whichever is
/// strictly smaller (dense on a tie).
func expectedBitmapBytes(pageCount: Int, set: Int) -> Int {
    let dense = (pageCount + 63) / 64 * 8
    let sparse = set * 4
    return 16 + (sparse < dense ? sparse : dense)
}
