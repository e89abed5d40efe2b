/// The core's view of the log: a snapshot point followed by contiguous entries.
/// Mirrors what the stable log holds (durable or on its way there).
struct InMemoryLog: Sendable {
    private(set) var snapshot: SnapshotPoint
    private(set) var entries: [LogEntry]

    init(snapshot: SnapshotPoint, entries: [LogEntry]) {
        precondition(entries.first.map { $0.index == snapshot.index + 1 } ?? true, "log entries must follow the snapshot")
        self.snapshot = snapshot
        self.entries = entries
    }

    var firstIndex: LogIndex { snapshot.index + 1 }
    var lastIndex: LogIndex { snapshot.index + LogIndex(entries.count) }
    var lastBallot: Ballot { entries.last?.ballot ?? snapshot.ballot }

    /// Ballot of the entry at `index`, or nil if not held (compacted entries only at the snapshot point).
    func ballot(at index: LogIndex) -> Ballot? {
        if index == snapshot.index { return snapshot.ballot }
        guard index > snapshot.index, index <= lastIndex else { return nil }
        return entries[Int(index - snapshot.index - 1)].ballot
    }

    func entry(at index: LogIndex) -> LogEntry? {
        guard index > snapshot.index, index <= lastIndex else { return nil }
        return entries[Int(index - snapshot.index - 1)]
    }

    /// Bytes an entry adds to a message besides its payload (index, ballot, kind, length).
    static let entryOverheadBytes = 32

    /// Bytes an entry takes in a message, as `slice` and the in-flight window count them.
    static func wireBytes(_ e: LogEntry) -> Int { e.payload.count + entryOverheadBytes }

    /// Bytes `entries` take in a message.
    static func wireBytes(_ entries: some Sequence<LogEntry>) -> Int { entries.reduce(0) { $0 + wireBytes($1) } }

    /// Entries from `from` on, at most `bytesMax` on the wire (always at least one if any).
    func slice(from: LogIndex, bytesMax: Int) -> [LogEntry] {
        guard from > snapshot.index, from <= lastIndex else { return [] }
        var out: [LogEntry] = []
        var bytes = 0
        for e in entries[Int(from - snapshot.index - 1)...] {
            let size = Self.wireBytes(e)
            if !out.isEmpty && bytes + size > bytesMax { break }
            bytes += size
            out.append(e)
        }
        return out
    }

    func entries(_ from: LogIndex, through: LogIndex) -> [LogEntry] {
        guard from <= through, from > snapshot.index, through <= lastIndex else { return [] }
        return Array(entries[Int(from - snapshot.index - 1)..<Int(through - snapshot.index)])
    }

    mutating func append(_ e: LogEntry) {
        precondition(e.index == lastIndex + 1, "log append must be contiguous")
        entries.append(e)
    }

    mutating func truncate(from index: LogIndex) {
        precondition(index > snapshot.index, "cannot truncate into the snapshot")
        if index <= lastIndex { entries.removeSubrange(Int(index - snapshot.index - 1)...) }
    }

    /// Drops entries through `point.index`; keeps the rest only if they follow it. Returns the
    /// storage the dropped entries were in (nil when nothing was dropped), so that the caller
    /// decides where they are freed: the kept entries are copied out, the old storage is not
    /// touched entry by entry here.
    mutating func compact(to point: SnapshotPoint) -> ReleasedEntries? {
        if point.index <= snapshot.index { return nil }
        let old = entries
        entries = ballot(at: point.index) == point.ballot ? Array(old[Int(point.index - snapshot.index)...]) : []
        snapshot = point
        return old.isEmpty ? nil : ReleasedEntries(old)
    }

    /// The last membership entry's configuration, if any entry is one.
    func lastMembership() -> (index: LogIndex, membership: Membership)? { lastMembership(through: lastIndex) }

    /// The configuration of the last membership entry at or below `index` (one that decodes).
    func lastMembership(through index: LogIndex) -> (index: LogIndex, membership: Membership)? {
        guard index > snapshot.index else { return nil }
        for e in entries[..<Int(min(index, lastIndex) - snapshot.index)].reversed() where e.kind == .membership {
            if let m = try? Membership(decoding: e.payload) { return (e.index, m) }
        }
        return nil
    }
}
