// The transport syncvm needs, and an in-memory implementation of it.
//
// Two paths, shaped after RDMA: bounded control frames (send/receive), and a bulk path that
// lands whole pages in the backup's guest memory at their own offsets without the backup's
// CPU taking part — what a one-sided write of a page batch into the backup's registered RAM
// does. `FabricSyncChannel` implements it over RDMAPaxos's `Fabric` (verbs, TCP, in-memory).

import Synchronization

/// Why a `SyncChannel` call failed.
public enum SyncChannelError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The link went down (the peer closed it, or the transfer was cut off).
    case closed
    /// A control frame of `bytes` bytes, over `SyncWire.frameBytesMax`; nothing was sent.
    case frameTooLarge(bytes: Int)
    /// A bulk write named a page outside the backup's registered memory or of another size.
    case pageOutOfRange(page: Int, pageCount: Int)
    /// A bulk write of `local`-byte pages into a backup memory of `remote`-byte pages.
    case pageSizeMismatch(local: Int, remote: Int)

    public var description: String {
        switch self {
        case .closed: return "sync channel closed"
        case .frameTooLarge(let n): return "control frame of \(n) bytes exceeds \(SyncWire.frameBytesMax)"
        case .pageOutOfRange(let p, let n): return "bulk write of page \(p) outside the peer's \(n) pages"
        case .pageSizeMismatch(let l, let r): return "bulk write of \(l)-byte pages into \(r)-byte pages"
        }
    }
}

/// One end of a primary–backup link.
public protocol SyncChannel: Sendable {
    /// Queues one encoded control frame (at most `SyncWire.frameBytesMax` bytes), in order.
    func send(_ frame: [UInt8]) async throws
    /// The next control frame from the peer; throws `SyncChannelError.closed` once the link is down.
    func receive() async throws -> [UInt8]
    /// Primary only: copies `pages` of `memory` into the backup's registered guest memory at the
    /// same page offsets. Returns when the bytes have landed; control frames sent afterwards
    /// arrive after them (RDMA: writes and the following send on one queue pair stay ordered).
    func writePages(_ pages: ArraySlice<UInt32>, from memory: GuestMemory) async throws
    /// Takes the link down; pending and later calls on both ends throw `closed`.
    func close()
}

/// Both ends of an in-process link: control frames pass as bytes (so every frame is really
/// encoded and decoded) and bulk writes copy straight into the backup's memory.
public final class InMemorySyncChannel: SyncChannel {
    /// Faults to inject, for tests of interrupted syncs.
    public struct Faults: Sendable {
        /// Land this many pages in total, then take the link down mid-batch.
        public var cutAfterPages: Int?
        /// Deliver this many control frames in total, then take the link down.
        public var cutAfterFrames: Int?
        /// No faults unless a limit is given.
        public init(cutAfterPages: Int? = nil, cutAfterFrames: Int? = nil) {
            self.cutAfterPages = cutAfterPages
            self.cutAfterFrames = cutAfterFrames
        }
    }

    /// What crossed the link, counted by the link itself.
    public struct Counters: Equatable, Sendable {
        /// Control frames the primary sent.
        public var framesToBackup = 0
        /// Control frames the backup sent.
        public var framesToPrimary = 0
        /// Bytes of the control frames the primary sent.
        public var controlBytesToBackup = 0
        /// Bytes of the control frames the backup sent.
        public var controlBytesToPrimary = 0
        /// Pages the primary's bulk writes landed in the backup's memory.
        public var pagesWritten = 0
        /// Bytes of those pages.
        public var pageBytesWritten = 0
        /// Control-frame bytes in both directions.
        public var controlBytes: Int { controlBytesToBackup + controlBytesToPrimary }
        /// Every byte that crossed the link: control frames and pages.
        public var totalBytes: Int { controlBytes + pageBytesWritten }
    }

    private let link: Link
    private let isPrimary: Bool

    private init(link: Link, isPrimary: Bool) {
        self.link = link
        self.isPrimary = isPrimary
    }

    /// A connected pair; `backupMemory` is the region the primary's bulk writes land in.
    public static func pair(backupMemory: GuestMemory, faults: Faults = Faults())
        -> (primary: InMemorySyncChannel, backup: InMemorySyncChannel) {
        let link = Link(target: backupMemory, faults: faults)
        return (InMemorySyncChannel(link: link, isPrimary: true), InMemorySyncChannel(link: link, isPrimary: false))
    }

    /// What has crossed the link so far; both ends see the same numbers.
    public var counters: Counters { link.state.withLock { $0.counters } }

    public func send(_ frame: [UInt8]) async throws {
        guard frame.count <= SyncWire.frameBytesMax else { throw SyncChannelError.frameTooLarge(bytes: frame.count) }
        let to = isPrimary ? 1 : 0
        let waiter: CheckedContinuation<[UInt8], any Error>? = try link.state.withLock { s in
            guard !s.closed else { throw SyncChannelError.closed }
            if let limit = s.faults.cutAfterFrames, s.counters.framesToBackup + s.counters.framesToPrimary >= limit {
                s.close()
                throw SyncChannelError.closed
            }
            if isPrimary {
                s.counters.framesToBackup += 1
                s.counters.controlBytesToBackup += frame.count
            } else {
                s.counters.framesToPrimary += 1
                s.counters.controlBytesToPrimary += frame.count
            }
            if let w = s.waiters[to] {
                s.waiters[to] = nil
                return w
            }
            s.queues[to].append(frame)
            return nil
        }
        waiter?.resume(returning: frame)
    }

    public func receive() async throws -> [UInt8] {
        let me = isPrimary ? 0 : 1
        return try await withCheckedThrowingContinuation { (c: CheckedContinuation<[UInt8], any Error>) in
            let ready: Result<[UInt8], any Error>? = link.state.withLock { s in
                if let f = s.queues[me].popFirst() { return .success(f) }
                if s.closed { return .failure(SyncChannelError.closed) }
                precondition(s.waiters[me] == nil, "two concurrent receives on one sync channel end")
                s.waiters[me] = c
                return nil
            }
            if let ready { c.resume(with: ready) }
        }
    }

    public func writePages(_ pages: ArraySlice<UInt32>, from memory: GuestMemory) async throws {
        precondition(isPrimary, "only the primary writes pages")
        let target = link.target
        guard memory.pageSize == target.pageSize else {
            throw SyncChannelError.pageSizeMismatch(local: memory.pageSize, remote: target.pageSize)
        }
        // Decide under the lock how many pages may land before an injected cut.
        let allowed: Int = try link.state.withLock { s in
            guard !s.closed else { throw SyncChannelError.closed }
            guard let limit = s.faults.cutAfterPages else { return pages.count }
            return max(0, min(pages.count, limit - s.counters.pagesWritten))
        }
        for p in pages.prefix(allowed) {
            guard Int(p) < target.pageCount else {
                throw SyncChannelError.pageOutOfRange(page: Int(p), pageCount: target.pageCount)
            }
            target.writePage(Int(p), from: memory.page(Int(p)))
        }
        try link.state.withLock { s in
            s.counters.pagesWritten += allowed
            s.counters.pageBytesWritten += allowed * memory.pageSize
            if allowed < pages.count {
                s.close()
                throw SyncChannelError.closed
            }
        }
    }

    public func close() {
        link.state.withLock { $0.close() }
    }
}

/// State shared by both ends.
private final class Link: Sendable {
    struct State: Sendable {
        /// Index 0: frames for the primary; 1: frames for the backup.
        var queues: [FrameQueue] = [FrameQueue(), FrameQueue()]
        var waiters: [CheckedContinuation<[UInt8], any Error>?] = [nil, nil]
        var closed = false
        var faults: InMemorySyncChannel.Faults
        var counters = InMemorySyncChannel.Counters()

        /// Marks the link down and fails both pending receives.
        mutating func close() {
            closed = true
            for i in waiters.indices {
                waiters[i]?.resume(throwing: SyncChannelError.closed)
                waiters[i] = nil
            }
        }
    }

    let state: Mutex<State>
    let target: GuestMemory

    init(target: GuestMemory, faults: InMemorySyncChannel.Faults) {
        self.target = target
        self.state = Mutex(State(faults: faults))
    }
}

/// FIFO of frames without the O(n) cost of removing an array's first element.
struct FrameQueue: Sendable {
    private var items: [[UInt8]] = []
    private var head = 0

    mutating func append(_ f: [UInt8]) { items.append(f) }

    mutating func popFirst() -> [UInt8]? {
        guard head < items.count else { return nil }
        let f = items[head]
        items[head] = []
        head += 1
        if head == items.count { items.removeAll(keepingCapacity: true); head = 0 }
        return f
    }
}
