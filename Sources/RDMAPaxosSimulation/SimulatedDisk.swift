import RDMAPaxosCore

/// A replica's stable log as the simulator models it: what is durable survives a crash,
/// what is still being written does not. Public so users can drive `Replica` in their own tests.
public struct SimulatedDisk: Sendable {
    /// The hard state last made durable.
    public internal(set) var hardState = HardState()
    /// The durable snapshot, if any.
    public internal(set) var snapshot: Snapshot?
    /// Durable entries after the snapshot, in index order.
    public internal(set) var entries: [LogEntry] = []
    /// Persists issued but not yet durable, in order, with the acks waiting on them.
    var pending: [(persist: Persist, acks: [(Message, Ballot?)], dueAt: UInt64)] = []
    /// While set, nothing completes before this time (a stalled disk).
    var stalledUntil: UInt64 = 0

    /// An empty disk.
    public init() {}

    /// Index of the last durable entry; the snapshot's index (or 0) when there is none.
    public var lastIndex: LogIndex { entries.last?.index ?? snapshot?.index ?? 0 }

    /// Ballot of the entry (or snapshot point) at `index`; nil when the disk does not hold it.
    public func ballot(at index: LogIndex) -> Ballot? {
        if let s = snapshot, s.index == index { return s.ballot }
        guard let first = entries.first, index >= first.index, index <= lastIndex else { return nil }
        return entries[Int(index - first.index)].ballot
    }

    /// Makes one persist durable, in the order `Actions` documents.
    public mutating func apply(_ p: Persist) {
        if let t = p.truncateFrom { entries.removeAll { $0.index >= t } }
        if let s = p.snapshot {
            if ballot(at: s.index) == s.ballot {
                entries.removeAll { $0.index <= s.index }
            } else {
                entries = []
            }
            snapshot = s
        }
        for e in p.entries {
            precondition(e.index == lastIndex + 1, "simulated disk append must be contiguous (got \(e.index) after \(lastIndex))")
            entries.append(e)
        }
        if let h = p.hardState { hardState = h }
    }

    /// What a restarting replica loads from this disk.
    public var restored: RestoredState { RestoredState(hardState: hardState, snapshot: snapshot, entries: entries) }
}
