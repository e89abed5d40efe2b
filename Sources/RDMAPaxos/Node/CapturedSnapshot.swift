import Dispatch
import Synchronization

/// A state machine's captured state (`SnapshotCapturing.captureSnapshot`): serialized on the
/// encoder thread at the lowest CPU priority, let go of on `releaseQueue` at normal priority
/// (queued by the loop: a dispatch worker started by the encoder's call would inherit nice 19).
///
/// The capture shares storage the loop allocated (a copy-on-write map's shards); by the time the
/// encoding ends the loop has copied the parts it changed since, so dropping the capture frees
/// them, and each `free` takes the lock of the loop's allocator arena. Dropped on the encoder
/// thread, those thousands of `free`s came from a thread of nice 19, which lost its core while
/// holding that lock again and again; the loop then waited in `malloc` as long as that thread
/// waited for a core (docs/design/runtime.md, "Memory freed where the loop can wait for it").
/// Dropped on the loop instead, it cost the loop 60–110 ms of CPU per compaction at 1.5 million
/// keys (a reference count decrement for every key and value), measured. The box holds the
/// closure, so whichever thread drops the box, `release()` is where the state goes.
final class CapturedSnapshot: Sendable {
    /// Where captures are dropped: a thread of normal priority, off the loop.
    static let releaseQueue = DispatchQueue(label: "plover.capture-release")

    private let serialize: Mutex<(@Sendable () -> [UInt8])?>

    init(_ serialize: @escaping @Sendable () -> [UInt8]) { self.serialize = Mutex(serialize) }

    /// Serializes the captured state on the calling thread; empty once released.
    func encode() -> [UInt8] {
        guard let s = serialize.withLock({ $0 }) else { return [] }
        return s()
    }

    /// Drops the captured state, on the calling thread.
    func release() { serialize.withLock { $0 = nil } }
}
