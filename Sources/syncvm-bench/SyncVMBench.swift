// syncvm benchmark (benchmarks/README.md, "syncvm"): page-hash throughput
// against memcpy, and syncs of a 1 GiB image against sending every dirty page.
//
// Usage: syncvm-bench [--gib N] [--reps N] [--json PATH] [--fabric memory|tcp]
// Prints markdown tables; with --json also writes the raw numbers for the plot script. With
// --fabric the syncs (and the every-dirty-page baseline) run over `FabricSyncChannel` on a
// `MemoryFabric` or a loopback `TCPFabric` instead of the in-memory channel.

import Foundation
import RDMAPaxos
import VMReplica

@main
enum SyncVMBench {
    static func main() async throws {
        // MARK: - Arguments

        var gib = 1
        var reps = 3
        var jsonPath: String?
        var fabricKind: String?
        var args = CommandLine.arguments.dropFirst()
        while let a = args.popFirst() {
            switch a {
            case "--gib": gib = Int(args.popFirst() ?? "") ?? gib
            case "--reps": reps = Int(args.popFirst() ?? "") ?? reps
            case "--json": jsonPath = args.popFirst()
            case "--fabric" where ["memory", "tcp"].contains(args.first ?? ""): fabricKind = args.popFirst()
            default:
                FileHandle.standardError.write(Data("usage: syncvm-bench [--gib N] [--reps N] [--json PATH] [--fabric memory|tcp]\n".utf8))
                exit(2)
            }
        }

        let cores = ProcessInfo.processInfo.activeProcessorCount
        let pageSize = GuestMemory.defaultPageSize
        let pageCount = gib << 30 / pageSize
        let bytes = pageCount * pageSize

        func seconds(_ d: Duration) -> Double { d.inSeconds }

        /// Best of `reps` runs: the least disturbed by other work on a shared machine.
        func best(_ body: () -> Void) -> Double {
            var t = Double.infinity
            for _ in 0..<reps {
                let start = ContinuousClock.now
                body()
                t = min(t, seconds(ContinuousClock.now - start))
            }
            return t
        }

        /// Fills memory with cheap pseudo-random words (xorshift), touching every page.
        func fill(_ m: GuestMemory, seed: UInt64) {
            var x = seed | 1
            for p in 0..<m.pageCount {
                m.withMutablePage(p) { page in
                    let w = page.bindMemory(to: UInt64.self)
                    for i in 0..<w.count { x ^= x << 13; x ^= x >> 7; x ^= x << 17; w[i] = x }
                }
            }
        }

        func copyAll(from a: GuestMemory, to b: GuestMemory, threads: Int) {
            let chunk = (a.byteCount + threads - 1) / threads
            DispatchQueue.concurrentPerform(iterations: threads) { t in
                let start = t * chunk
                let n = min(chunk, a.byteCount - start)
                if n > 0 { memcpy(UnsafeMutableRawPointer(mutating: b.bytes.baseAddress! + start), a.bytes.baseAddress! + start, n) }
            }
        }

        func fmt(_ v: Double, _ digits: Int = 2) -> String { String(format: "%.\(digits)f", v) }

        print("# syncvm benchmark: \(gib) GiB image (\(pageCount) pages of \(pageSize) B), \(cores) cores, best of \(reps)\n")
        let a = try GuestMemory(pageCount: pageCount)
        // Room for the fabric mailbox after the backup's RAM (unused by the in-memory channel).
        let fabricConfiguration = FabricSyncChannel.Configuration()
        let b = try GuestMemory(pageCount: pageCount, trailingBytes: fabricConfiguration.mailboxBytes)
        // One fabric link for every sync of the run (a channel carries any number of syncs).
        var link: BenchLink?
        if let fabricKind { link = try await fabricLink(fabricKind, backup: b, configuration: fabricConfiguration) }
        defer { link?.close() }
        fill(a, seed: 0x1234_5678)
        fill(b, seed: 0x9ABC_DEF0)

        // MARK: - 1. Hashing against memcpy

        struct ThroughputRow: Codable {
            var threads: Int
            var hashDispatchGBs: Double
            var hashGenericGBs: Double
            var memcpyGBs: Double
        }
        var throughput = [ThroughputRow]()
        let allPages = (0..<pageCount).map { UInt32($0) }
        for threads in Array(Set([1, min(2, cores)])).sorted() {
            var row = ThroughputRow(threads: threads, hashDispatchGBs: 0, hashGenericGBs: 0, memcpyGBs: 0)
            for function in PageHashFunction.allCases {
                let pool = PageHashPool(threadCount: threads, function: function)
                var out = [UInt64](repeating: 0, count: pageCount)
                let t = best {
                    out.withUnsafeMutableBufferPointer { o in
                        allPages.withUnsafeBufferPointer { pool.hash(pages: $0, of: a, seed: 1, into: o) }
                    }
                }
                let gbs = Double(bytes) / t / 1e9
                if function == .xxh3Dispatch { row.hashDispatchGBs = gbs } else { row.hashGenericGBs = gbs }
            }
            row.memcpyGBs = Double(bytes) / best { copyAll(from: a, to: b, threads: threads) } / 1e9
            throughput.append(row)
        }

        // The compute ceiling: one thread, 256 KiB that stays in cache.
        let hot = try GuestMemory(pageCount: 64)
        fill(hot, seed: 3)
        let hotCopy = try GuestMemory(pageCount: 64)
        let hotPages = (0..<64).map { UInt32($0) }
        let hotRounds = 4096
        var hotHash = [String: Double]()
        for function in PageHashFunction.allCases {
            let pool = PageHashPool(threadCount: 1, function: function)
            var sink: UInt64 = 0
            let t = best { for _ in 0..<hotRounds { sink &+= pool.hash(pages: hotPages, of: hot, seed: 1)[0] } }
            hotHash[function.rawValue] = Double(hot.byteCount * hotRounds) / t / 1e9
            if sink == 42 { print("") }  // keeps the loop
        }
        let hotMemcpy = Double(hot.byteCount * hotRounds) / best {
            for _ in 0..<hotRounds { copyAll(from: hot, to: hotCopy, threads: 1) }
        } / 1e9

        print("## Page hashing vs memcpy (\(gib) GiB, out of cache)\n")
        print("| threads | XXH3-64 dispatch GB/s | per thread | XXH3-64 generic GB/s | memcpy GB/s | per thread | hash/memcpy per core |")
        print("|---|---|---|---|---|---|---|")
        for r in throughput {
            let t = Double(r.threads)
            print("| \(r.threads) | \(fmt(r.hashDispatchGBs)) | \(fmt(r.hashDispatchGBs / t)) | \(fmt(r.hashGenericGBs)) | \(fmt(r.memcpyGBs)) | \(fmt(r.memcpyGBs / t)) | \(fmt(r.hashDispatchGBs / r.memcpyGBs))x |")
        }
        print("\nIn cache (256 KiB, 1 thread): XXH3-64 dispatch \(fmt(hotHash["xxh3-dispatch"]!)) GB/s, generic \(fmt(hotHash["xxh3-generic"]!)) GB/s, memcpy \(fmt(hotMemcpy)) GB/s.\n")

        // Hash-diff dirty source: a full scan per sync with unpatched QEMU.
        let scanPool = PageHashPool(threadCount: cores)
        let source = HashDiffDirtySource(memory: a, pool: scanPool)
        let scan = best { _ = source.collect() }
        print("Hash-diff dirty scan of \(gib) GiB with \(cores) threads: \(fmt(scan * 1000, 1)) ms.\n")

        // MARK: - 2. Syncs against sending every dirty page

        struct SyncRow: Codable {
            var dirtyFraction: Double
            var divergentFraction: Double
            var dirtyPages: Int
            var divergentPages: Int
            var syncSeconds: Double
            var syncWireBytes: Int
            var syncControlBytes: Int
            var syncPageBytes: Int
            var allDirtySeconds: Double
            var allDirtyWireBytes: Int
            var phases: [String: Double]
        }

        /// Makes `b` equal to `a`, then dirties `dirty` on both (the same pages, as replay of the same
        /// inputs does) and gives the first `divergent` of them different contents on the primary.
        func prepare(dirty: [UInt32], divergent: Int, round: UInt64) {
            copyAll(from: a, to: b, threads: cores)
            for (i, p) in dirty.prefix(divergent).enumerated() {
                a.withMutablePage(Int(p)) { $0.storeBytes(of: round &* 0x9E37_79B9 &+ UInt64(i), toByteOffset: 64, as: UInt64.self) }
            }
        }

        var rng = SystemRandomNumberGenerator()
        var syncs = [SyncRow]()
        // The two peers share this machine: each gets half the cores, as each would have its own
        // machine in a deployment.
        let sidePool = max(1, cores / 2)
        let primaryPool = PageHashPool(threadCount: sidePool)
        let backupPool = PageHashPool(threadCount: sidePool)
        var round: UInt64 = 1
        for d in [0.01, 0.10, 0.50] {
            let dirtyPages = Array((0..<UInt32(pageCount)).shuffled(using: &rng).prefix(Int(Double(pageCount) * d))).sorted()
            let dirty = DirtyBitmap(pageCount: pageCount, pages: dirtyPages)
            for v in [0.01, 0.10, 1.0] {
                let divergent = Int((Double(dirtyPages.count) * v).rounded())
                // Divergent pages spread over the dirty set rather than clustered at low addresses.
                let order = dirtyPages.shuffled(using: &rng)
                var runs = [SyncStats]()
                var baseline = Double.infinity
                var baselineBytes = 0
                var backupHashing = Double.infinity
                for _ in 0..<reps {
                    round += 1
                    prepare(dirty: order, divergent: divergent, round: round)
                    let (pc, bc): (any SyncChannel, any SyncChannel) =
                        link.map { ($0.primary, $0.backup) } ?? InMemorySyncChannel.pair(backupMemory: b)
                    let primary = SyncPrimary(memory: a, pool: primaryPool)
                    let backup = SyncBackup(memory: b, pool: backupPool, state: MemorySyncStateStore())
                    async let backupSide = backup.run(dirty: dirty, over: bc)
                    let result = try await primary.run(dirty: dirty, over: pc)
                    let backupStats = try await backupSide.stats
                    backupHashing = min(backupHashing, seconds(backupStats.phases.hashing))
                    precondition(result.stats.divergentPages == divergent, "expected \(divergent) divergent pages, found \(result.stats.divergentPages)")
                    precondition(memcmp(a.bytes.baseAddress!, b.bytes.baseAddress!, bytes) == 0, "images differ after sync")
                    runs.append(result.stats)

                    // Remus/COLO-style: every page the primary dirtied crosses, plus its bitmap.
                    prepare(dirty: order, divergent: divergent, round: round)
                    let pc2: any SyncChannel = link?.primary ?? InMemorySyncChannel.pair(backupMemory: b).primary
                    let start = ContinuousClock.now
                    var sent = 0
                    while sent < dirtyPages.count {
                        let batch = dirtyPages[sent..<min(sent + 256, dirtyPages.count)]
                        try await pc2.writePages(batch, from: a)
                        sent += batch.count
                    }
                    baseline = min(baseline, seconds(ContinuousClock.now - start))
                    baselineBytes = dirtyPages.count * pageSize + dirty.encodedByteCount
                }
                let s = runs.min { $0.phases.total < $1.phases.total }!
                let ph = s.phases
                syncs.append(SyncRow(
                    dirtyFraction: d, divergentFraction: v, dirtyPages: dirtyPages.count, divergentPages: s.divergentPages,
                    syncSeconds: seconds(ph.total), syncWireBytes: s.wireBytes, syncControlBytes: s.controlBytes,
                    syncPageBytes: s.pageBytesSent, allDirtySeconds: baseline, allDirtyWireBytes: baselineBytes,
                    phases: ["handshake": seconds(ph.handshake), "bitmaps": seconds(ph.bitmapExchange),
                             "hashing": seconds(ph.hashing), "backup hashing": backupHashing, "hash exchange": seconds(ph.hashExchange),
                             "transfer": seconds(ph.transfer), "commit+verify": seconds(ph.commit)]))
            }
        }

        // The in-memory link moves pages at memcpy speed, faster than any network. The last two
        // columns model a 10 Gb/s link instead: measured time without the in-memory transfer,
        // plus every wire byte at 1.25 GB/s.
        let linkBytesPerSecond = 1.25e9
        func mib(_ n: Int) -> String { fmt(Double(n) / 1_048_576, 2) }
        func ms(_ s: Double) -> String { fmt(s * 1000, 1) }

        print("## Sync of a \(gib) GiB image (\(sidePool) hashing thread(s) per peer, in-memory link, verify on)\n")
        print("| dirty d | divergent v | dirty pages | divergent pages | syncvm MiB (control + pages) | all-dirty MiB | bytes ratio | syncvm ms | all-dirty ms | at 10 Gb/s: syncvm ms | at 10 Gb/s: all-dirty ms |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in syncs {
            print("| \(Int(r.dirtyFraction * 100))% | \(Int(r.divergentFraction * 100))% | \(r.dirtyPages) | \(r.divergentPages) | \(mib(r.syncWireBytes)) (\(mib(r.syncControlBytes)) + \(mib(r.syncPageBytes))) | \(mib(r.allDirtyWireBytes)) | 1/\(fmt(Double(r.allDirtyWireBytes) / Double(r.syncWireBytes), 1)) | \(ms(r.syncSeconds)) | \(ms(r.allDirtySeconds)) | \(ms(r.syncSeconds - r.phases["transfer"]! + Double(r.syncWireBytes) / linkBytesPerSecond)) | \(ms(Double(r.allDirtyWireBytes) / linkBytesPerSecond)) |")
        }
        print("\n## Where the syncvm time goes (primary's phases, ms)\n")
        let phaseNames = ["handshake", "bitmaps", "hashing", "hash exchange", "transfer", "commit+verify"]
        print("| d | v | " + phaseNames.joined(separator: " | ") + " | total | backup's hashing (in parallel) |")
        print("|---|---|" + String(repeating: "---|", count: phaseNames.count + 2))
        for r in syncs {
            print("| \(Int(r.dirtyFraction * 100))% | \(Int(r.divergentFraction * 100))% | " + phaseNames.map { ms(r.phases[$0]!) }.joined(separator: " | ") + " | \(ms(r.syncSeconds)) | \(ms(r.phases["backup hashing"]!)) |")
        }

        if let jsonPath {
            struct Report: Codable {
                var gib: Int; var cores: Int; var reps: Int; var sideThreads: Int
                var throughput: [ThroughputRow]
                var hotHashGBs: [String: Double]; var hotMemcpyGBs: Double; var hashDiffScanSeconds: Double
                var syncs: [SyncRow]
            }
            let report = Report(gib: gib, cores: cores, reps: reps, sideThreads: sidePool, throughput: throughput,
                                hotHashGBs: hotHash, hotMemcpyGBs: hotMemcpy, hashDiffScanSeconds: scan, syncs: syncs)
            let enc = JSONEncoder()
            enc.outputFormatting = [.prettyPrinted, .sortedKeys]
            try enc.encode(report).write(to: URL(fileURLWithPath: jsonPath))
        }
    }
}

/// Both ends of a `FabricSyncChannel` in this process: node 1 the primary, node 2 the backup.
struct BenchLink {
    var fabrics: [any Fabric]
    var primary: FabricSyncChannel
    var backup: FabricSyncChannel
    func close() {
        primary.close()
        backup.close()
        for f in fabrics { f.close() }
    }
}

func fabricLink(_ kind: String, backup: GuestMemory, configuration: FabricSyncChannel.Configuration) async throws -> BenchLink {
    let fabrics: [any Fabric]
    if kind == "tcp" {
        // A throwaway cluster key: both ends live in this process.
        let c = TCPFabric.Configuration(clusterKey: (0..<32).map { _ in UInt8.random(in: 0...255) }, members: [1, 2])
        fabrics = [try TCPFabric(node: 1, configuration: c), try TCPFabric(node: 2, configuration: c)]
    } else {
        let network = MemoryNetwork()
        fabrics = [MemoryFabric(node: 1, network: network), MemoryFabric(node: 2, network: network)]
    }
    let pe = try await FabricSyncChannel.Endpoint.primary(fabric: fabrics[0], listenAt: PeerAddress(node: 1, port: 0),
                                                          configuration: configuration)
    let be = try await FabricSyncChannel.Endpoint.backup(memory: backup, fabric: fabrics[1],
                                                         listenAt: PeerAddress(node: 2, port: 0), configuration: configuration)
    async let primary = pe.connect(to: be.address)
    let backupEnd = try await be.connect(to: pe.address)
    return BenchLink(fabrics: fabrics, primary: try await primary, backup: backupEnd)
}
