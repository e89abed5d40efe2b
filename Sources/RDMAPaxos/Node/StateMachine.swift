/// The replicated service. Every replica applies the same committed commands in the same order,
/// so a deterministic `apply` gives every replica the same state.
///
/// The node calls these methods from its own single thread, never concurrently.
public protocol StateMachine: AnyObject {
    /// Applies one committed command and returns the result for the client that proposed it.
    /// Must be deterministic: the same state and command always give the same result.
    func apply(_ command: [UInt8], index: LogIndex) -> [UInt8]
    /// Answers a read-only query against the current state (used by linearizable reads).
    func query(_ query: [UInt8]) -> [UInt8]
    /// The whole state, for compaction and for catching up lagging replicas.
    func snapshot() -> [UInt8]
    /// Replaces the whole state with a snapshot taken at `index`.
    func restore(_ snapshot: [UInt8], index: LogIndex) throws
}

/// A state machine that hands out a point-in-time copy of its state cheaply, so the node can
/// serialize and save a snapshot on another thread while it goes on applying commands (a node
/// whose state machine is only a `StateMachine` serializes on its own thread, and stalls for as
/// long as that takes).
public protocol SnapshotCapturing: StateMachine {
    /// Returns a closure that serializes the state as it is now, the same bytes `snapshot()`
    /// would return now. The node calls this on its own thread and runs the closure on another,
    /// concurrently with `apply`: the closure must read only what it captured (a copy-on-write
    /// value such as a `Dictionary`), never `self`.
    func captureSnapshot() -> @Sendable () -> [UInt8]
}
