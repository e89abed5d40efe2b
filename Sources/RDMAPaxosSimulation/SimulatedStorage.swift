import RDMAPaxos

/// One replica's disk in the simulator: the stable log's records and the snapshot store's file.
/// Outlives the replica's process (a crash loses only what was still being written) and is
/// shared by the `SimulatedLog` and `SimulatedSnapshots` each incarnation opens over it.
package final class SimulatedStorage: @unchecked Sendable {
    // @unchecked Sendable: the simulator runs on one thread, and so do the nodes it steps.

    /// What is on the disk.
    package struct Durable {
        var hardState = HardState()
        /// The log's compaction point.
        var point = SnapshotPoint.none
        /// Log entries after `point`, in index order.
        var entries: [LogEntry] = []
        /// The snapshot store's file.
        var snapshot: Snapshot?

        package init() {}

        var lastIndex: LogIndex { entries.last?.index ?? point.index }

        func ballot(at index: LogIndex) -> Ballot? {
            if index == point.index, index > 0 { return point.ballot }
            guard let first = entries.first, index >= first.index, index <= lastIndex else { return nil }
            return entries[Int(index - first.index)].ballot
        }

        /// As the real logs compact: a point at or below the current one is ignored; entries
        /// above the point stay.
        mutating func compact(through index: LogIndex, ballot: Ballot) {
            guard index > point.index else { return }
            entries.removeAll { $0.index <= index }
            point = SnapshotPoint(index: index, ballot: ballot)
        }
    }

    /// A write issued and not yet durable, with its completion.
    package struct Pending {
        enum Write {
            case append([LogEntry])
            case hardState(HardState)
        }
        var write: Write
        var done: @Sendable (Result<Void, StableLogError>) -> Void
        var dueAt: UInt64
    }

    package var durable = Durable()
    /// The disk as of the last flush of the operating system's cache (what async mode keeps
    /// when the host goes down).
    var flushed = Durable()
    package var pending: [Pending] = []
    /// Nothing completes before this tick (a stalled disk).
    var stalledUntil: UInt64 = 0
    /// The disk has no room before this tick (the runtime holds its writes).
    var fullUntil: UInt64 = 0
    /// The simulator's clock, and the draws for how long each write takes.
    var now: UInt64 = 0
    var delayTicksMax: Int
    var random: SeededRandom

    package init(delayTicksMax: Int, seed: UInt64) {
        self.delayTicksMax = delayTicksMax
        random = SeededRandom(seed: seed)
    }

    var lastIndex: LogIndex { durable.lastIndex }

    /// The entries written, durable or not.
    var writtenLastIndex: LogIndex {
        for p in pending.reversed() { if case let .append(es) = p.write, let l = es.last { return l.index } }
        return durable.lastIndex
    }

    func queue(_ write: Pending.Write, _ done: @escaping @Sendable (Result<Void, StableLogError>) -> Void) {
        let due = now + UInt64(random.below(delayTicksMax + 1))
        pending.append(Pending(write: write, done: done, dueAt: max(due, stalledUntil)))
    }

    func makeDurable(_ w: Pending.Write) {
        switch w {
        case let .append(es):
            for e in es {
                precondition(e.index == durable.lastIndex + 1, "simulated log append must be contiguous (got \(e.index) after \(durable.lastIndex))")
                durable.entries.append(e)
            }
        case let .hardState(h): durable.hardState = h
        }
    }

    /// Completes the writes due by now, in order; returns whether any did.
    @discardableResult
    func completeDue() -> Bool {
        var any = false
        while let first = pending.first, first.dueAt <= now, stalledUntil <= now {
            completeFirst()
            any = true
        }
        return any
    }

    /// Completes every write issued so far (a call that waits for them, as `truncateSuffix` does).
    package func completeAll() {
        while !pending.isEmpty { completeFirst() }
    }

    /// Makes the oldest pending write durable and tells its writer.
    private func completeFirst() {
        let first = pending.removeFirst()
        makeDurable(first.write)
        first.done(.success(()))
    }

    /// The process died: writes still in flight are lost, or the first `reached` of them reached
    /// the disk without the process hearing so.
    func crash(reached: Int) {
        for p in pending.prefix(reached) { makeDurable(p.write) }
        pending = []
    }
}

/// The stable log over a `SimulatedStorage`: appends and queued hard states complete when the
/// simulator says their write is done; the calls the runtime waits for are durable on return.
final class SimulatedLog: StableLog, @unchecked Sendable {
    // @unchecked Sendable: one thread (see `SimulatedStorage`).
    let storage: SimulatedStorage
    var closed = false

    init(_ storage: SimulatedStorage) { self.storage = storage }

    var durability: Durability { .fsync }
    var firstIndex: LogIndex { storage.durable.point.index + 1 }
    var lastIndex: LogIndex { storage.writtenLastIndex }
    var durableIndex: LogIndex { storage.durable.lastIndex }
    var snapshot: SnapshotPoint { storage.durable.point }
    var heldBytes: Int { storage.durable.entries.reduce(0) { $0 + $1.payload.count + LogRecord.headerBytes } }
    var capacityBytes: Int? { nil }

    func append(_ entries: [LogEntry], onDurable: @escaping @Sendable (Result<Void, StableLogError>) -> Void) {
        guard !closed else { return onDurable(.failure(.closed(path: "simulated"))) }
        precondition(entries.first.map { $0.index == lastIndex + 1 } ?? true, "simulated log append must be contiguous")
        storage.queue(.append(entries), onDurable)
    }

    func append(_ entries: [LogEntry]) throws {
        storage.completeAll()
        storage.makeDurable(.append(entries))
    }

    func appendInline(_ entries: [LogEntry]) -> Result<Void, StableLogError>? { nil }

    func entries(_ range: ClosedRange<LogIndex>) throws -> [LogEntry] {
        var all = storage.durable.entries
        for p in storage.pending { if case let .append(es) = p.write { all += es } }
        return all.filter { range.contains($0.index) }
    }

    func truncateSuffix(from index: LogIndex) throws {
        precondition(index > storage.durable.point.index, "simulated log truncation at \(index) reaches into the compacted prefix")
        storage.completeAll()
        storage.durable.entries.removeAll { $0.index >= index }
    }

    func compactPrefix(through index: LogIndex, ballot: Ballot) throws {
        // Ordered after every append before it, as the real log's writer orders it.
        storage.completeAll()
        storage.durable.compact(through: index, ballot: ballot)
    }

    func loadHardState() throws -> HardState { storage.durable.hardState }

    func saveHardState(_ state: HardState) throws {
        // Behind the hard states queued before it, as the real log orders it: one of those
        // completing later must not take the promise back.
        storage.completeAll()
        storage.durable.hardState = state
    }

    func saveHardState(_ state: HardState, onDurable: @escaping @Sendable (Result<Void, StableLogError>) -> Void) {
        storage.queue(.hardState(state), onDurable)
    }

    func close() throws { closed = true }

    func spaceShortfall(forBytes bytes: Int) -> String? {
        storage.now < storage.fullUntil ? "the simulated disk is full until tick \(storage.fullUntil)" : nil
    }
}

/// The snapshot store over a `SimulatedStorage`: a save is durable on return.
final class SimulatedSnapshots: SnapshotStore, @unchecked Sendable {
    // @unchecked Sendable: one thread (see `SimulatedStorage`).
    let storage: SimulatedStorage
    init(_ storage: SimulatedStorage) { self.storage = storage }
    func load() throws -> Snapshot? { storage.durable.snapshot }
    func save(_ snapshot: Snapshot) throws { storage.durable.snapshot = snapshot }
}
