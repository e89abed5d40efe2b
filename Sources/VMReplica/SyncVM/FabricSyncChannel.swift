// `SyncChannel` over RDMAPaxos's `Fabric` (verbs, or TCP / in-memory with the same semantics).
//
// Control frames travel as checksummed, sequenced records in a credit ring in the peer's
// registered region (RDMAPaxos's `CreditRingWriter`/`CreditRingReader`; one-sided
// WRITE_WITH_IMM, the immediate only wakes the peer), with credit flowing back through a cell
// in the sender's region. Page batches are one-sided WRITEs straight into the backup's guest
// RAM at guest-physical offsets: the backup registers its `GuestMemory` mapping itself, mailbox
// included (`GuestMemory.trailingBytes`). Layout and rules: docs/design/syncvm.md, "Transport
// over a Fabric". The endpoints: FabricSyncEndpoint.swift; the receiving thread:
// FabricSyncChannelReceiving.swift.

import Foundation
import RDMAPaxos
import Synchronization

/// One end of a syncvm link over a `Fabric`. Create an `Endpoint` on each side (it registers the
/// region and listens), exchange addresses, then `connect` each to the other.
///
/// The channel needs a fabric of its own: it consumes the fabric's completion queue on a
/// thread of its own until it is closed. `close()` it when done (a failed sync does that).
public final class FabricSyncChannel: SyncChannel {
    let endpoint: Endpoint
    let qp: any QueuePair
    let layout: MailboxLayout
    let peerMailboxOffset: Int
    let configuration: Configuration
    let state: Mutex<State>
    /// Work-request ids, assigned in posting order (a completion covers every lower id), from a
    /// random base of this channel's own: the fabric's completion queue outlives a channel, and
    /// a queue pair an earlier channel dropped flushes its outstanding writes there (unsignalled
    /// ones too), so a completion outside this channel's ids says nothing about its link.
    let idBase: UInt64
    let posting: Mutex<UInt64>

    struct State {
        /// Set once the link is down; every later call throws it.
        var failure: (any Error)?
        /// `close()` asked for a goodbye: drop the connection once this write completed.
        var closingAfter: UInt64?
        var closeDeadline: ContinuousClock.Instant?
        var stopped = false
        /// Appends records to the peer's ring.
        var writer: CreditRingWriter
        var sending = false
        var creditWaiter: CheckedContinuation<Void, any Error>?
        /// Takes records from this side's ring.
        var reader: CreditRingReader
        var assembly: [UInt8] = []
        var assemblyBytes = 0
        var inbox = FrameQueue()
        /// Frames the endpoint's `divert` selected, handed to it after the scan.
        var diverted: [[UInt8]] = []
        var receiveWaiter: CheckedContinuation<[UInt8], any Error>?
        // write completions
        var completed: UInt64 = 0
        var writeWaiters: [(id: UInt64, waiter: CheckedContinuation<Void, any Error>)] = []
        var lastKeepalive = ContinuousClock.now
        var counters = Counters()
    }

    init(endpoint: Endpoint, qp: any QueuePair, peerMailboxOffset: Int) {
        self.endpoint = endpoint
        self.qp = qp
        let base = UInt64.random(in: 1...(1 << 62))
        self.idBase = base
        self.posting = Mutex(base)
        self.layout = endpoint.layout
        self.peerMailboxOffset = peerMailboxOffset
        self.configuration = endpoint.configuration
        self.state = Mutex(State(writer: CreditRingWriter(ring: layout.ring), reader: CreditRingReader(ring: layout.ring)))
    }

    /// What this end has put on the link and taken off it so far.
    public var counters: Counters { state.withLock { $0.counters } }
    /// Whether this is the primary's end, the one that writes pages.
    public var isPrimary: Bool { endpoint.isPrimary }
    /// The link failed or was closed: every call throws. Connect the endpoint again for a new one.
    public var isDown: Bool { state.withLock { $0.failure != nil } }
    var region: MemoryRegion { endpoint.region }
    var fabric: any Fabric { endpoint.fabric }

    func start() {
        // Announce this side (and its ring size) so the peer can check the configurations match.
        _ = state.withLock { s in postCell(MailboxFormat.cell(MailboxFormat.Status.open.rawValue, UInt64(layout.ringBytes)),
                                       at: MailboxLayout.statusOffset, immediate: .status, &s) }
        let thread = Thread(named: "plover-syncvm-\(fabric.localNode)") { [self] in receiveLoop() }
        thread.start()
    }

    // MARK: SyncChannel

    public func send(_ frame: [UInt8]) async throws {
        guard frame.count <= SyncWire.frameBytesMax else { throw SyncChannelError.frameTooLarge(bytes: frame.count) }
        try state.withLock { s in
            if let e = s.failure { throw e }
            precondition(!s.sending, "two concurrent sends on one sync channel end")
            s.sending = true
        }
        defer { state.withLock { $0.sending = false } }
        if let limit = configuration.faults.cutAfterFrames,
           !configuration.faults.tally.take(limit: limit) {
            cut()
            throw SyncChannelError.closed
        }
        var offset = 0
        repeat {
            let n = min(layout.payloadBytesMax, frame.count - offset)
            let last = offset + n == frame.count
            try await postRecord(.fragment, flags: last ? MailboxFormat.lastFragment : 0, frameBytes: frame.count,
                                 fragmentOffset: offset, payload: frame[offset..<offset + n])
            offset += n
        } while offset < frame.count
        state.withLock { s in
            s.counters.framesSent += 1
            s.counters.controlBytesSent += frame.count
        }
    }

    public func receive() async throws -> [UInt8] {
        try await withCheckedThrowingContinuation { (c: CheckedContinuation<[UInt8], any Error>) in
            let ready: Result<[UInt8], any Error>? = state.withLock { s in
                // Frames that arrived before the link went down are still delivered.
                if let f = s.inbox.popFirst() { return .success(f) }
                if let e = s.failure { return .failure(e) }
                precondition(s.receiveWaiter == nil, "two concurrent receives on one sync channel end")
                s.receiveWaiter = c
                return nil
            }
            if let ready { c.resume(with: ready) }
        }
    }

    public func writePages(_ pages: ArraySlice<UInt32>, from memory: GuestMemory) async throws {
        precondition(isPrimary, "only the primary writes pages")
        let pageSize = memory.pageSize
        let peerPages = peerMailboxOffset / pageSize
        let allowed: Int = try state.withLock { s in
            if let e = s.failure { throw e }
            guard let limit = configuration.faults.cutAfterPages else { return pages.count }
            return max(0, min(pages.count, limit - s.counters.pagesWritten))
        }
        let todo = pages.prefix(allowed)
        for p in todo where Int(p) >= min(peerPages, memory.pageCount) {
            throw SyncChannelError.pageOutOfRange(page: Int(p), pageCount: min(peerPages, memory.pageCount))
        }
        // Contiguous pages go as one WRITE. A signalled write every `signalEveryWrites`; waiting
        // for the previous one keeps at most two windows outstanding.
        let runPagesMax = max(1, configuration.writeBytesMax / pageSize)
        var previous: UInt64?
        var inWindow = 0
        var writes = 0
        var i = todo.startIndex
        while i < todo.endIndex {
            var j = i + 1
            while j < todo.endIndex, todo[j] == todo[j - 1] &+ 1, j - i < runPagesMax { j += 1 }
            let first = Int(todo[i])
            let bytes = Array(UnsafeRawBufferPointer(start: memory.pointer(toPage: first), count: (j - i) * pageSize))
            inWindow += 1
            let signal = j == todo.endIndex || inWindow == configuration.signalEveryWrites
            let id = try postOrFail(bytes, at: first * pageSize, immediate: nil, signaled: signal)
            writes += 1
            if signal {
                if let previous { try await awaitWrite(previous) }
                previous = id
                inWindow = 0
            }
            i = j
        }
        if let previous { try await awaitWrite(previous) }
        let total: Int = state.withLock { s in
            s.counters.pagesWritten += allowed
            s.counters.pageBytesWritten += allowed * pageSize
            s.counters.pageWrites += writes
            return s.counters.pagesWritten
        }
        if allowed < pages.count {
            cut()
            throw SyncChannelError.closed
        }
        // Every page WRITE completed, so it landed; the record after them says so, with counts.
        var w = ByteWriter(capacity: 16)
        w.u64(UInt64(allowed)); w.u64(UInt64(total))
        try await postRecord(.pagesDone, payload: w.bytes[...])
    }

    /// Takes the link down: a "closed" mark goes to the peer, and the connection is dropped once
    /// it landed (or after `closeLinger`). Pending and later calls throw `closed`.
    public func close() {
        let wake: Wake? = state.withLock { s in
            guard s.failure == nil else { return nil }
            let id = postCell(MailboxFormat.cell(MailboxFormat.Status.closed.rawValue, UInt64(layout.ringBytes)),
                              at: MailboxLayout.statusOffset, immediate: .status, signaled: true, &s)
            s.closingAfter = id ?? 0
            s.closeDeadline = .now + configuration.closeLinger
            return fail(SyncChannelError.closed, &s)
        }
        wake?.resume()
        fabric.completions.interrupt()
    }

    // MARK: posting

    /// Posts one write with the next work-request id, in id order; returns the id.
    func post(_ bytes: [UInt8], at offset: Int, immediate: UInt32?, signaled: Bool) throws(FabricError) -> UInt64 {
        try posting.withLock { next throws(FabricError) in
            next += 1
            let signal = signaled || next % UInt64(configuration.signalEveryWrites) == 0
            try qp.postWrite(bytes, remoteOffset: offset, key: qp.remote.key, immediate: immediate,
                             workRequestID: next, signaled: signal)
            return next
        }
    }

    /// `post`, turning a refused post into a dropped link (`closed`).
    func postOrFail(_ bytes: [UInt8], at offset: Int, immediate: UInt32?, signaled: Bool) throws -> UInt64 {
        do {
            return try post(bytes, at: offset, immediate: immediate, signaled: signaled)
        } catch {
            let wake = state.withLock { fail(SyncChannelError.closed, &$0) }
            wake?.resume()
            cut()
            throw SyncChannelError.closed
        }
    }

    /// Writes a cell into the peer's mailbox; nil if the post was refused (the thread notices).
    @discardableResult
    func postCell(_ cell: [UInt8], at offset: Int, immediate: MailboxFormat.Immediate?,
                          signaled: Bool = false, _ s: inout State) -> UInt64? {
        guard let id = try? post(cell, at: peerMailboxOffset + offset, immediate: immediate?.rawValue, signaled: signaled) else {
            return nil
        }
        s.counters.cellWrites += 1
        s.counters.cellBytes += cell.count
        return id
    }

    /// Appends one record to the peer's ring, waiting for credit when it is full.
    private func postRecord(_ kind: MailboxFormat.Kind, flags: UInt8 = 0, frameBytes: Int = 0, fragmentOffset: Int = 0,
                            payload: ArraySlice<UInt8>) async throws {
        let ringAt = peerMailboxOffset + MailboxLayout.ringOffset
        while true {
            let posted: Bool = try state.withLock { s in
                if let e = s.failure { throw e }
                refreshCredit(&s)
                guard let append = s.writer.append(kind: MailboxFormat.kindWord(kind, flags: flags),
                                                   word: MailboxFormat.word(frameBytes: frameBytes, fragmentOffset: fragmentOffset),
                                                   payload: payload) else { return false }
                if let marker = append.wrapMarker {
                    _ = try postOrFailLocked(marker.bytes, at: ringAt + marker.offset, immediate: nil, &s)
                    s.writer.posted(marker)
                    s.counters.recordsPosted += 1
                    s.counters.recordOverheadBytes += marker.bytes.count
                }
                let record = append.record
                _ = try postOrFailLocked(record.bytes, at: ringAt + record.offset,
                                         immediate: MailboxFormat.Immediate.record.rawValue, &s)
                s.writer.posted(record)
                s.counters.recordsPosted += 1
                s.counters.recordOverheadBytes += record.bytes.count - (kind == .fragment ? payload.count : 0)
                return true
            }
            if posted { return }
            // Full: wait until the receiving thread sees new credit (or the link goes down).
            try await withCheckedThrowingContinuation { (c: CheckedContinuation<Void, any Error>) in
                let ready: Result<Void, any Error>? = state.withLock { s in
                    if let e = s.failure { return .failure(e) }
                    refreshCredit(&s)
                    if s.writer.fits(payloadBytes: payload.count) { return .success(()) }
                    s.creditWaiter = c
                    return nil
                }
                if let ready { c.resume(with: ready) }
            }
        }
    }

    func postOrFailLocked(_ bytes: [UInt8], at offset: Int, immediate: UInt32?, _ s: inout State) throws -> UInt64 {
        do {
            return try post(bytes, at: offset, immediate: immediate, signaled: false)
        } catch {
            let wake = fail(SyncChannelError.closed, &s)
            // Resumed while the caller still holds the lock: resuming only schedules a waiter,
            // and whatever it does next with this channel waits for the lock.
            wake?.resume()
            dropConnection()
            throw SyncChannelError.closed
        }
    }

    /// Waits until write `id` (signalled) completed, which means it and every earlier write landed.
    private func awaitWrite(_ id: UInt64) async throws {
        try await withCheckedThrowingContinuation { (c: CheckedContinuation<Void, any Error>) in
            let ready: Result<Void, any Error>? = state.withLock { s in
                if s.completed >= id { return .success(()) }
                if let e = s.failure { return .failure(e) }
                s.writeWaiters.append((id, c))
                return nil
            }
            if let ready { c.resume(with: ready) }
        }
    }

    /// Reads the credit cell the peer writes into this side's mailbox.
    func refreshCredit(_ s: inout State) {
        region.withBytes(offset: endpoint.mailboxOffset + MailboxLayout.creditOffset, count: CreditRing.cellBytes) {
            _ = s.writer.takeCredit(cell: $0)
        }
    }

    // MARK: failure

    /// Continuations to resume once the lock is released.
    struct Wake {
        var waiters: [CheckedContinuation<Void, any Error>] = []
        var receiver: CheckedContinuation<[UInt8], any Error>?
        var error: any Error
        func resume() {
            for w in waiters { w.resume(throwing: error) }
            receiver?.resume(throwing: error)
        }
    }

    /// Marks the link down with `error` (first reason wins) and hands back every waiter to fail.
    func fail(_ error: any Error, _ s: inout State) -> Wake? {
        guard s.failure == nil else { return nil }
        s.failure = error
        var wake = Wake(error: error)
        wake.waiters = s.writeWaiters.map(\.waiter)
        s.writeWaiters = []
        if let c = s.creditWaiter { wake.waiters.append(c); s.creditWaiter = nil }
        // A receiver waits only while the inbox is empty, so it gets the error.
        wake.receiver = s.receiveWaiter
        s.receiveWaiter = nil
        return wake
    }

    /// Drops the connection without a goodbye: this side's writes stop, and the peer's writes
    /// into this side are refused, so its queue pair fails and it notices.
    func dropConnection() {
        qp.moveToError()
        fabric.revokeAccess(from: qp.peer)
    }

    /// An injected cut: the link fails here at once and the peer finds out on its own.
    func cut() {
        let wake = state.withLock { fail(SyncChannelError.closed, &$0) }
        wake?.resume()
        dropConnection()
        fabric.completions.interrupt()
    }
}
