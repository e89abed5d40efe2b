/// How far "durable" goes when a `StableLog` call returns.
public enum Durability: String, Sendable, CaseIterable {
    /// Returned means on disk: each group commit ends with an fsync of the log. The default.
    case fsync
    /// Returned means in the operating system: survives a crash of the process, not of the host
    /// (Berkeley DB's DB_TXN_WRITE_NOSYNC; what APUS effectively had). Plain DB_TXN_NOSYNC would
    /// not do: it leaves the log in the environment's buffer, which recovery after a crash discards.
    case async
    /// No disk at all: survives nothing. For Mu-style in-memory replication and tests.
    case memory
}

/// The consensus log's stable storage: entries, a prefix that may be compacted into a snapshot,
/// and a small hard state.
///
/// ## Contract
/// - Entries are appended contiguously: the first appended entry's index is `lastIndex + 1`
///   (after a `truncateSuffix`, the truncation point). Anything else is a programming error and
///   traps.
/// - `append(_:onDurable:)` returns at once; `onDurable` runs once the entries are durable in the
///   log's `Durability` mode (or with the error that stopped them). Completions run in append
///   order. Concurrent appends are group-committed: many entries, one transaction, one fsync.
/// - `append(_:)`, `saveHardState(_:)`, `truncateSuffix(from:)` and `compactPrefix(through:ballot:)`
///   are durable (in the log's mode) when they return.
/// - Any thrown `StableLogError` means the log can no longer be trusted to have done what was
///   asked. The node must stop serving, not guess; the error says what to do.
/// - Safe to call from any thread.
public protocol StableLog: AnyObject, Sendable {
    /// The durability mode the log was opened with.
    var durability: Durability { get }

    /// Index of the first entry still held (`snapshot.index + 1`), even when the log is empty.
    var firstIndex: LogIndex { get }
    /// Index of the last entry appended (durable or not); `snapshot.index` when empty.
    var lastIndex: LogIndex { get }
    /// Highest index whose entry is durable in the log's mode.
    var durableIndex: LogIndex { get }
    /// The point the prefix was compacted through: index and ballot of the last removed entry.
    var snapshot: SnapshotPoint { get }
    /// Bytes the durable entries from `firstIndex` on take in the store (an estimate that errs
    /// high): what compacting the prefix gives back, in time (`BerkeleyDBLog` frees compacted
    /// entries a segment at a time).
    var heldBytes: Int { get }
    /// The most bytes the store can hold, when it is bounded (`BerkeleyDBLog` in `.memory` mode:
    /// its cache); nil when only the disk bounds it. Past it appends fail with `.memoryFull`.
    var capacityBytes: Int? { get }

    /// Queues `entries` for the next group commit; `onDurable` runs when they are durable.
    func append(_ entries: [LogEntry], onDurable: @escaping @Sendable (Result<Void, StableLogError>) -> Void)

    /// Appends and waits until durable.
    func append(_ entries: [LogEntry]) throws

    /// Appends on the caller's thread when that is quick and keeps the order of every earlier
    /// call (a log with no sync to wait for, nothing queued before it): the append's result.
    /// Nil when it cannot, and nothing was appended; the caller then uses `append(_:onDurable:)`.
    func appendInline(_ entries: [LogEntry]) -> Result<Void, StableLogError>?

    /// Entries with indexes in `range` (clamped to what is held), in index order.
    func entries(_ range: ClosedRange<LogIndex>) throws -> [LogEntry]

    /// Removes every entry at `index` and above (a conflicting suffix). Waits for pending appends.
    func truncateSuffix(from index: LogIndex) throws

    /// Removes entries up to and including `index`, remembering `ballot` as the ballot of `index`.
    func compactPrefix(through index: LogIndex, ballot: Ballot) throws

    /// The saved hard state (promised ballot, commit index, membership); `HardState()` when none
    /// was saved.
    func loadHardState() throws -> HardState
    /// Replaces the hard state; durable in the log's mode when it returns.
    func saveHardState(_ state: HardState) throws

    /// Saves the hard state in order with the appends around it, without waiting: `onDurable`
    /// runs once it is durable, after every earlier append's.
    func saveHardState(_ state: HardState, onDurable: @escaping @Sendable (Result<Void, StableLogError>) -> Void)

    /// Flushes and releases the store. Further calls throw `StableLogError.closed`.
    func close() throws

    /// Why `bytes` more could not be written now without running the storage out of space (a
    /// message that names the directory and what is free), or nil when there is room. The node
    /// holds its writes while this says no, instead of letting them fail.
    func spaceShortfall(forBytes bytes: Int) -> String?
}

extension StableLog {
    /// Logs with no disk below them never run short.
    public func spaceShortfall(forBytes bytes: Int) -> String? { nil }

    /// Saves at once, on the caller's thread, for logs with no writer of their own.
    public func saveHardState(_ state: HardState, onDurable: @escaping @Sendable (Result<Void, StableLogError>) -> Void) {
        do {
            try saveHardState(state)
            onDurable(.success(()))
        } catch let e as StableLogError {
            onDurable(.failure(e))
        } catch {
            onDurable(.failure(.engine(path: "", code: -1, message: "\(error)")))
        }
    }

    /// Never inline unless a log says how.
    public func appendInline(_ entries: [LogEntry]) -> Result<Void, StableLogError>? { nil }
}

/// Why a stable log could not do what was asked. Every case names the store and says what to do.
public enum StableLogError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The path does not exist, is not a directory, or cannot be created.
    case badPath(path: String, reason: String)
    /// Another process holds the store.
    case locked(path: String)
    /// The device is full.
    case diskFull(path: String)
    /// A `.memory` log's cache (`capacityBytes`) is full.
    case memoryFull(path: String, capacityBytes: Int)
    /// A record failed its checksum or could not be decoded.
    case corrupt(path: String, detail: String)
    /// An entry that should be held is missing.
    case missing(path: String, index: LogIndex)
    /// The store was written by an incompatible format version.
    case versionMismatch(path: String, found: UInt32, expected: UInt32)
    /// The directory does not hold a log store.
    case notAStore(path: String, reason: String)
    /// The store was closed.
    case closed(path: String)
    /// Any other failure of the storage engine, with its code and message.
    case engine(path: String, code: Int32, message: String)

    public var description: String {
        switch self {
        case let .badPath(p, r): "\(p): bad log directory: \(r)"
        case let .locked(p): "\(p): the log store is in use by another process (stop it, or pick another data dir)"
        case let .diskFull(p): "\(p): no space left on device; free space and restart the node"
        case let .memoryFull(p, c): "\(p): the in-memory log is full (memory_log_bytes_max = \(c) bytes): it holds more than compaction can remove (entries not yet applied, or a witness's whole log); raise memory_log_bytes_max or lower uncommitted_bytes_max, then restart the replica (it catches up from its peers)"
        case let .corrupt(p, d): "\(p): corrupt log store: \(d); rebuild this replica from its peers (docs/operations.md)"
        case let .missing(p, i): "\(p): log entry \(i) is missing; rebuild this replica from its peers (docs/operations.md)"
        case let .versionMismatch(p, f, e): "\(p): log format version \(f), this build reads version \(e)" + (e > 1 ? " (and upgrades \((1..<e).map(String.init).joined(separator: " and ")) to \(e))" : "")
        case let .notAStore(p, r): "\(p): not a plover log store: \(r)"
        case let .closed(p): "\(p): the log store is closed"
        case let .engine(p, c, m): "\(p): storage engine error \(c): \(m)"
        }
    }
}
