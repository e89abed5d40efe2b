// PLOVER's output rule on the VM primary: what the guest sends out is held until a syncvm that
// covers it has completed, so no client ever sees an answer the backup could not reproduce.

import Foundation

/// Guest output held per checkpoint epoch. The VM driver takes a `cut` while the VM is paused
/// at a checkpoint (everything read so far was produced before the pause) and, once the
/// checkpoint completed, releases exactly the output before the cut.
public final class OutputGuard<Output: Sendable>: @unchecked Sendable {
    // @unchecked Sendable: every field is guarded by `lock`.
    private let lock = NSLock()
    private var held: [(output: Output, at: ContinuousClock.Instant)] = []
    private var base: UInt64 = 0
    /// Outputs released so far, passed-through ones included.
    public private(set) var releasedCount: UInt64 = 0
    /// Outputs dropped so far: never released.
    public private(set) var droppedCount: UInt64 = 0

    /// A guard holding nothing.
    public init() {}

    /// Holds one output of the guest until a `release(through:)` past it.
    public func hold(_ output: Output) { lock.withLock { held.append((output, .now)) } }

    /// Output that will never be released (a backup's, or one that is not leading).
    public func drop() { lock.withLock { droppedCount += 1 } }

    /// Counts output released without holding (a backup that took over and has no backup).
    public func passedThrough() { lock.withLock { releasedCount += 1 } }

    /// Outputs held now.
    public var heldCount: Int { lock.withLock { held.count } }
    /// When the oldest held output arrived; nil when nothing is held.
    public var oldestHeld: ContinuousClock.Instant? { lock.withLock { held.first?.at } }

    /// A position in the held output: everything read before now.
    public func cut() -> UInt64 { lock.withLock { base + UInt64(held.count) } }

    /// Removes and returns the output before `cut`, oldest first.
    public func release(through cut: UInt64) -> [Output] {
        lock.withLock {
            let n = Int(min(UInt64(held.count), cut > base ? cut - base : 0))
            let out = held.prefix(n).map(\.output)
            held.removeFirst(n)
            base += UInt64(n)
            releasedCount += UInt64(n)
            return out
        }
    }

    /// Removes and returns everything held, oldest first (the primary goes on without a backup).
    public func releaseAll() -> [Output] { release(through: cut()) }

    /// Discards everything held (counted as dropped): the VM that produced it is no longer the
    /// one clients see.
    public func dropHeld() {
        lock.withLock {
            droppedCount += UInt64(held.count)
            base += UInt64(held.count)
            held = []
        }
    }
}
