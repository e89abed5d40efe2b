import Foundation

/// A `StableLog` kept in this process's memory: the log of a node with `durability = "memory"`,
/// and the in-memory twin of `BerkeleyDBLog` for tests of code built on a `StableLog`.
///
/// Same contract: contiguity traps, completions of `append(_:onDurable:)` run in append order on
/// another thread, every call after `close()` throws `.closed`, and a failure is sticky. Appends
/// are durable at once, and `appendInline` appends on the caller's thread. Entries are held as
/// given: their payloads share storage with the caller's copies (no bytes are copied). With a
/// `capacityBytes`, an append that would hold more fails with `.memoryFull`. A restart is
/// simulated by closing the log and opening a new one over the same `Storage`; `fail(with:)`
/// injects an operating failure such as a full disk.
public final class MemoryLog: StableLog, @unchecked Sendable {
    // @unchecked Sendable: every mutable field (here and in `storage`) is guarded by `storage.lock`.

    /// What survives closing a `MemoryLog`: stands in for the disk. Open one log over it at a time.
    public final class Storage: @unchecked Sendable {
        // @unchecked Sendable: all fields are guarded by `lock`.
        let lock = NSLock()
        var entries: [LogEntry] = []
        /// `recordBytes` of `entries`, kept as they change.
        var heldBytes = 0
        var snapshot = SnapshotPoint.none
        var hardState = HardState()
        var inUse = false
        /// Completions of the open log's `append(_:onDurable:)` (and of hard states queued behind
        /// them) not run yet: an inline append or hard state must not report before them. Here,
        /// not in the log, so a completion does not keep the log alive: a log released by its
        /// completion would close itself on its own completion queue.
        var completionsPending = 0
        /// An empty disk.
        public init() {}
    }

    public let durability: Durability = .memory
    /// Names the log in errors, in place of a path.
    public let name: String
    private let storage: Storage
    private var closed = false
    private var failure: StableLogError?
    private let capacity: Int?
    /// Delivers completions off the caller's thread, in order, as the real log does.
    private let completions = DispatchQueue(label: "memory-log-completions")

    /// Opens a log over `storage`; throws `.locked` when another open `MemoryLog` uses it.
    /// `capacityBytes` bounds `heldBytes` (nil: unbounded).
    public init(name: String = "memory-log", storage: Storage = Storage(), capacityBytes: Int? = nil) throws {
        self.name = name
        self.storage = storage
        self.capacity = capacityBytes
        storage.lock.lock()
        defer { storage.lock.unlock() }
        guard !storage.inUse else { throw StableLogError.locked(path: name) }
        storage.inUse = true
    }

    deinit { try? close() }

    private func withState<T>(_ body: () throws -> T) throws -> T {
        storage.lock.lock()
        defer { storage.lock.unlock() }
        if closed { throw StableLogError.closed(path: name) }
        if let failure { throw failure }
        return try body()
    }

    private func peek<T>(_ body: () -> T) -> T {
        storage.lock.lock()
        defer { storage.lock.unlock() }
        return body()
    }

    /// From now on every operation fails with `error`, as after a real storage failure.
    public func fail(with error: StableLogError) {
        peek { if failure == nil { failure = error } }
    }

    public var firstIndex: LogIndex { peek { storage.snapshot.index + 1 } }
    public var lastIndex: LogIndex { peek { storage.entries.last?.index ?? storage.snapshot.index } }
    public var durableIndex: LogIndex { lastIndex }
    public var snapshot: SnapshotPoint { peek { storage.snapshot } }
    /// Record bytes (header and payload) of the entries held: no pages to model here.
    public var heldBytes: Int { peek { storage.heldBytes } }
    /// The bound given at `init`, or nil.
    public var capacityBytes: Int? { capacity }

    static func recordBytes<S: Sequence<LogEntry>>(_ entries: S) -> Int {
        entries.reduce(0) { $0 + LogRecord.headerBytes + $1.payload.count }
    }

    public func append(_ entries: [LogEntry], onDurable: @escaping @Sendable (Result<Void, StableLogError>) -> Void) {
        let result: Result<Void, StableLogError>
        do {
            try withState {
                try appendLocked(entries)
                storage.completionsPending += 1
            }
            result = .success(())
        } catch {
            result = .failure(error as! StableLogError)
            peek { storage.completionsPending += 1 }
        }
        queueCompletion(result, onDurable)
    }

    private func queueCompletion(_ result: Result<Void, StableLogError>,
                                 _ onDurable: @escaping @Sendable (Result<Void, StableLogError>) -> Void) {
        completions.async { [storage] in
            onDurable(result)
            storage.lock.lock()
            storage.completionsPending -= 1
            storage.lock.unlock()
        }
    }

    /// Saved at once; reported at once too unless an append's completion is still to run, then
    /// after it.
    public func saveHardState(_ state: HardState, onDurable: @escaping @Sendable (Result<Void, StableLogError>) -> Void) {
        let result: Result<Void, StableLogError>
        do {
            try saveHardState(state)
            result = .success(())
        } catch {
            result = .failure(error as! StableLogError)
        }
        let queued = peek { () -> Bool in
            guard storage.completionsPending > 0 else { return false }
            storage.completionsPending += 1
            return true
        }
        if queued { queueCompletion(result, onDurable) } else { onDurable(result) }
    }

    public func append(_ entries: [LogEntry]) throws {
        try withState { try appendLocked(entries) }
    }

    /// Appends here unless a completion of `append(_:onDurable:)` is still to run.
    public func appendInline(_ entries: [LogEntry]) -> Result<Void, StableLogError>? {
        do {
            let done = try withState { () throws -> Bool in
                guard storage.completionsPending == 0 else { return false }
                try appendLocked(entries)
                return true
            }
            return done ? .success(()) : nil
        } catch {
            return .failure(error as! StableLogError)
        }
    }

    private func appendLocked(_ entries: [LogEntry]) throws(StableLogError) {
        var last = storage.entries.last?.index ?? storage.snapshot.index
        for e in entries {
            precondition(e.index == last + 1, "append of entry \(e.index) after \(last): the log must stay contiguous")
            last = e.index
        }
        let bytes = Self.recordBytes(entries)
        if let capacity, storage.heldBytes + bytes > capacity {
            let full = StableLogError.memoryFull(path: name, capacityBytes: capacity)
            failure = full
            throw full
        }
        storage.entries.append(contentsOf: entries)
        storage.heldBytes += bytes
    }

    public func entries(_ range: ClosedRange<LogIndex>) throws -> [LogEntry] {
        try withState {
            guard let base = storage.entries.first?.index else { return [] }
            let lo = max(range.lowerBound, base), hi = min(range.upperBound, storage.entries.last!.index)
            guard lo <= hi else { return [] }
            return Array(storage.entries[Int(lo - base)...Int(hi - base)])
        }
    }

    public func truncateSuffix(from index: LogIndex) throws {
        try withState {
            precondition(index > storage.snapshot.index, "truncateSuffix(from: \(index)) reaches into the compacted prefix (\(storage.snapshot.index))")
            guard let base = storage.entries.first?.index, index <= storage.entries.last!.index else { return }
            let cut = Int(index - base)
            storage.heldBytes -= Self.recordBytes(storage.entries[cut...])
            storage.entries.removeSubrange(cut...)
        }
        completions.sync {} // Waits for pending completions, as the real log waits for pending appends.
    }

    public func compactPrefix(through index: LogIndex, ballot: Ballot) throws {
        // The dropped entries are released after the lock: freeing a large prefix must not hold
        // up appends (the node appends from its loop while compactions run off it).
        var dropped: [LogEntry] = []
        try withState {
            guard index > storage.snapshot.index else { return }
            storage.snapshot = SnapshotPoint(index: index, ballot: ballot)
            guard let base = storage.entries.first?.index else { return }
            let count = Int(min(index, storage.entries.last!.index) + 1 - min(base, index + 1))
            guard count > 0 else { return }
            // Work under the lock in proportion to what is kept (the unapplied tail), not to
            // the prefix dropped.
            let kept = Array(storage.entries[count...])
            storage.heldBytes = Self.recordBytes(kept)
            dropped = storage.entries
            storage.entries = kept
        }
        withExtendedLifetime(dropped) {}
    }

    public func loadHardState() throws -> HardState { try withState { storage.hardState } }

    public func saveHardState(_ state: HardState) throws { try withState { storage.hardState = state } }

    public func close() throws {
        storage.lock.lock()
        let wasClosed = closed
        closed = true
        if !wasClosed { storage.inUse = false }
        storage.lock.unlock()
        if wasClosed { throw StableLogError.closed(path: name) }
        completions.sync {}
    }
}
