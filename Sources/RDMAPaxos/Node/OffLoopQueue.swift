import Dispatch

/// Where a node runs work that must not stall its loop (saving a compaction's snapshot and
/// compacting the log): one item at a time, in the order queued.
package protocol OffLoopQueue: AnyObject, Sendable {
    /// Queues `work` behind everything queued before it.
    func async(_ work: @escaping @Sendable () -> Void)
    /// Runs `work` once everything queued before it is done, and returns its outcome.
    func sync(_ work: () throws -> Void) throws
}

/// The runtime's off-loop queue: a serial dispatch queue.
final class DispatchOffLoopQueue: OffLoopQueue {
    private let queue: DispatchQueue

    init(label: String) { queue = DispatchQueue(label: label) }

    func async(_ work: @escaping @Sendable () -> Void) { queue.async(execute: work) }

    func sync(_ work: () throws -> Void) throws { try queue.sync(execute: work) }
}
