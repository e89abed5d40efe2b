// Page hashing: XXH3-64 over whole pages, spread over a fixed set of threads.
//
// Hashing is the bulk of a sync (both peers read every page of the dirty union), so it gets
// dedicated threads, one per core, rather than the cooperative pool.

import CXXHash
import Foundation
import RDMAPaxos
import Synchronization

/// Which build of XXH3 hashes the pages. Both give identical values (the algorithm is fixed);
/// they differ only in the SIMD code that runs, so peers may choose independently.
public enum PageHashFunction: String, Sendable, CaseIterable {
    /// libxxhash's runtime dispatcher: picks SSE2/AVX2/AVX-512 for the CPU it runs on.
    case xxh3Dispatch = "xxh3-dispatch"
    /// libxxhash's `XXH3_64bits_withSeed` as Debian builds it (no runtime dispatch).
    case xxh3Generic = "xxh3-generic"

    /// The engine's default: measured fastest or equal on every case (docs/design/syncvm.md, "syncvm").
    public static let `default` = PageHashFunction.xxh3Dispatch

    /// XXH3-64 of the `count` bytes at `bytes`, with `seed`.
    @inline(__always)
    public func hash(_ bytes: UnsafeRawPointer, count: Int, seed: UInt64) -> UInt64 {
        switch self {
        case .xxh3Dispatch:
            #if arch(x86_64)
            return XXH3_64bits_withSeed_dispatch(bytes, count, seed)
            #else
            return XXH3_64bits_withSeed(bytes, count, seed)
            #endif
        case .xxh3Generic:
            return XXH3_64bits_withSeed(bytes, count, seed)
        }
    }

    /// Hash of a whole byte buffer (used for digests over hash arrays).
    public func hash(_ bytes: UnsafeRawBufferPointer, seed: UInt64) -> UInt64 {
        guard let base = bytes.baseAddress else {
            // An empty array may have no address; XXH3 reads nothing for length 0 anyway.
            return withUnsafeBytes(of: UInt64(0)) { hash($0.baseAddress!, count: 0, seed: seed) }
        }
        return hash(base, count: bytes.count, seed: seed)
    }
}

/// A fixed pool of hashing threads. `hash` splits a page list into small chunks that threads
/// claim in turn (so a core busy with something else slows the sync down, not stalls it) and
/// writes the hash of `pages[i]` to `out[i]`: the output order is the input order, whichever
/// thread did the work.
public final class PageHashPool: Sendable {
    /// Threads that hash, including the calling thread.
    public let threadCount: Int
    /// The XXH3 build every thread of the pool uses.
    public let function: PageHashFunction
    private let workers: Workers

    /// Pages per claimed chunk: big enough that claiming is noise, small enough to balance.
    static let chunkPages = 256

    /// `threadCount` defaults to the number of cores this process may run on.
    public init(threadCount: Int = ProcessInfo.processInfo.activeProcessorCount,
                function: PageHashFunction = .default) {
        precondition(threadCount >= 1, "a hash pool needs at least one thread")
        self.threadCount = threadCount
        self.function = function
        self.workers = Workers(extraThreads: threadCount - 1)
    }

    deinit { workers.stop() }

    /// Hashes `pages` of `memory` with `seed`; `out.count` must equal `pages.count`. Blocks the
    /// caller, which hashes too, until every page is done.
    public func hash(pages: UnsafeBufferPointer<UInt32>, of memory: GuestMemory, seed: UInt64,
                     into out: UnsafeMutableBufferPointer<UInt64>) {
        precondition(out.count == pages.count, "hash output has \(out.count) slots for \(pages.count) pages")
        if pages.isEmpty { return }
        let job = HashJob(pages: pages, out: out, memory: memory, seed: seed, function: function)
        if threadCount == 1 || pages.count <= Self.chunkPages {
            job.run()
            return
        }
        workers.run(job)
    }

    /// The hashes of `pages` of `memory` with `seed`, in the order of `pages`. Blocks the
    /// caller, which hashes too, until every page is done.
    public func hash(pages: [UInt32], of memory: GuestMemory, seed: UInt64) -> [UInt64] {
        [UInt64](unsafeUninitializedCapacity: pages.count) { out, initialized in
            pages.withUnsafeBufferPointer { p in hash(pages: p, of: memory, seed: seed, into: out) }
            initialized = pages.count
        }
    }

    /// Hashes every page of `memory` (the hash-diff dirty source's full scan).
    public func hashAllPages(of memory: GuestMemory, seed: UInt64) -> [UInt64] {
        let all = (0..<memory.pageCount).map { UInt32(truncatingIfNeeded: $0) }
        return hash(pages: all, of: memory, seed: seed)
    }
}

/// One hashing request shared by the threads working on it.
///
/// `@unchecked Sendable`: the pointers stay valid for the job's life because `PageHashPool.hash`
/// does not return before every thread has finished with the job; threads write disjoint
/// chunks of `out`, claimed through the atomic `next`, and only read `pages` and guest memory.
private final class HashJob: @unchecked Sendable {
    let pages: UnsafeBufferPointer<UInt32>
    let out: UnsafeMutableBufferPointer<UInt64>
    let memory: GuestMemory
    let seed: UInt64
    let function: PageHashFunction
    let next = Atomic<Int>(0)

    init(pages: UnsafeBufferPointer<UInt32>, out: UnsafeMutableBufferPointer<UInt64>,
         memory: GuestMemory, seed: UInt64, function: PageHashFunction) {
        self.pages = pages
        self.out = out
        self.memory = memory
        self.seed = seed
        self.function = function
    }

    /// Claims and hashes chunks until none are left.
    func run() {
        let n = pages.count
        let size = memory.pageSize
        let base = UnsafeRawPointer(memory.base)
        let limit = memory.pageCount
        while true {
            let start = next.wrappingAdd(PageHashPool.chunkPages, ordering: .relaxed).oldValue
            if start >= n { return }
            let end = min(start + PageHashPool.chunkPages, n)
            for i in start..<end {
                let page = Int(pages[i])
                precondition(page < limit, "page \(page) outside 0..<\(limit)")
                out[i] = function.hash(base + page * size, count: size, seed: seed)
            }
        }
    }
}

/// The extra threads of a pool, parked on a condition between jobs.
///
/// `@unchecked Sendable`: all mutable state (`job`, `generation`, `busy`, `stopping`) is read
/// and written only while holding `cond`.
private final class Workers: @unchecked Sendable {
    private let cond = NSCondition()
    private var job: HashJob?
    private var generation: UInt64 = 0
    private var busy = 0
    private var stopping = false
    private let extraThreads: Int

    init(extraThreads: Int) {
        self.extraThreads = extraThreads
        for i in 0..<extraThreads {
            let t = Thread(named: "syncvm-hash-\(i + 1)") { [self] in self.loop() }
            t.start()
        }
    }

    /// Publishes `job`, hashes on the calling thread too, then waits for the others.
    func run(_ job: HashJob) {
        cond.lock()
        // One job at a time: a second caller waits for the first to finish.
        while self.job != nil { cond.wait() }
        self.job = job
        generation &+= 1
        busy = extraThreads
        cond.broadcast()
        cond.unlock()

        job.run()

        cond.lock()
        while busy > 0 { cond.wait() }
        self.job = nil
        cond.broadcast()
        cond.unlock()
    }

    func stop() {
        cond.lock()
        stopping = true
        cond.broadcast()
        cond.unlock()
    }

    private func loop() {
        var seen: UInt64 = 0
        while true {
            cond.lock()
            while !stopping && generation == seen { cond.wait() }
            if stopping { cond.unlock(); return }
            seen = generation
            let current = job
            cond.unlock()

            current?.run()

            cond.lock()
            busy -= 1
            if busy == 0 { cond.broadcast() }
            cond.unlock()
        }
    }
}
