import NIOCore

/// The writes a queue pair posted and has not seen complete, in posting order, each numbered:
/// the bookkeeping the TCP and verbs queue pairs share. A completion of one write completes
/// every earlier one too (a reliable connection runs them in order), and only failures and
/// signalled writes are reported, as a device does.
struct OutstandingWrites {
    struct Write { var sequence: UInt64; var workRequestID: UInt64; var signaled: Bool }

    /// The number the next write gets.
    private(set) var nextSequence: UInt64 = 1
    private var writes = CircularBuffer<Write>()

    var count: Int { writes.count }

    /// Throws unless another write fits under `limit`.
    func checkRoom(limit: Int, peer: NodeID) throws(FabricError) {
        guard writes.count < limit else { throw FabricError.tooManyOutstandingWrites(peer: peer, limit: limit) }
    }

    /// Records a posted write under `nextSequence`, and returns that number.
    @discardableResult
    mutating func append(workRequestID: UInt64, signaled: Bool) -> UInt64 {
        let seq = nextSequence
        nextSequence += 1
        writes.append(Write(sequence: seq, workRequestID: workRequestID, signaled: signaled))
        return seq
    }

    /// Whether write `sequence` is outstanding.
    func contains(_ sequence: UInt64) -> Bool {
        guard let first = writes.first, let last = writes.last else { return false }
        return first.sequence <= sequence && sequence <= last.sequence
    }

    /// Write `sequence` finished with `status`, and every earlier one with success: each is
    /// removed, and `report` gets those a device reports (a failure, or a signalled write).
    mutating func complete(through sequence: UInt64, status: CompletionStatus, _ report: (Write, CompletionStatus) -> Void) {
        while let w = writes.first, w.sequence <= sequence {
            writes.removeFirst()
            let s: CompletionStatus = w.sequence == sequence ? status : .success
            if s != .success || w.signaled { report(w, s) }
        }
    }

    /// The queue pair failed: every write is removed and reported, the first with `firstStatus`,
    /// the rest as flushed.
    mutating func flush(firstStatus: CompletionStatus, _ report: (Write, CompletionStatus) -> Void) {
        var status = firstStatus
        while let w = writes.popFirst() {
            report(w, status)
            status = .flushed
        }
    }
}
