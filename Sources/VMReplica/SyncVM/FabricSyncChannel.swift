// `SyncChannel` over RDMAPaxos's `Fabric` (verbs, or TCP / in-memory with the same semantics).
//
// Control frames travel as checksummed, sequenced records in a bounded ring in the peer's
// registered region (one-sided WRITE_WITH_IMM; the immediate only wakes the peer), with credit
// flowing back through a cell in the sender's region. Page batches are one-sided WRITEs straight
// into the backup's guest RAM at guest-physical offsets: the backup registers its `GuestMemory`
// mapping itself, mailbox included (`GuestMemory.trailingBytes`). Layout and rules:
// docs/design/syncvm.md, "Transport over a Fabric".

import Foundation
import RDMAPaxos
import Synchronization

/// One end of a syncvm link over a `Fabric`. Create an `Endpoint` on each side (it registers the
/// region and listens), exchange addresses, then `connect` each to the other.
///
/// The channel needs a fabric of its own: it consumes the fabric's completion queue on a
/// thread of its own until it is closed. `close()` it when done (a failed sync does that).
public final class FabricSyncChannel: SyncChannel {
    /// One side before the link is up: its region is registered and the fabric listens.
    public final class Endpoint: Sendable {
        /// The fabric this side's region is registered with; a channel consumes its completion queue.
        public let fabric: any Fabric
        /// Where the peer connects (the bound port when asked for port 0).
        public let address: PeerAddress
        /// Ring size, write batching, timings and faults of the channels it connects.
        public let configuration: Configuration
        let region: MemoryRegion
        let mailboxOffset: Int
        let isPrimary: Bool
        let layout: MailboxLayout
        let divert: Divert?

        private init(fabric: any Fabric, address: PeerAddress, configuration: Configuration, region: MemoryRegion,
                     mailboxOffset: Int, isPrimary: Bool, layout: MailboxLayout, divert: Divert? = nil) {
            self.divert = divert
            self.fabric = fabric
            self.address = address
            self.configuration = configuration
            self.region = region
            self.mailboxOffset = mailboxOffset
            self.isPrimary = isPrimary
            self.layout = layout
        }

        /// The primary's side: a region holding one mailbox (for the backup's frames).
        /// `divert` takes the frames it selects aside as they arrive (never seen by `receive`).
        public static func primary(fabric: any Fabric, listenAt address: PeerAddress,
                                   configuration: Configuration = Configuration(), divert: Divert? = nil) async throws -> Endpoint {
            let layout = try MailboxLayout(ringBytes: configuration.ringBytes)
            try check(configuration)
            let region = try fabric.registerRegion(lengthBytes: layout.bytes)
            let bound = try await fabric.listen(at: address, exporting: region)
            return Endpoint(fabric: fabric, address: bound, configuration: configuration, region: region,
                            mailboxOffset: 0, isPrimary: true, layout: layout, divert: divert)
        }

        /// The backup's side: registers `memory`'s own mapping — guest RAM at guest-physical
        /// offsets, then the mailbox in its trailer — so page batches land in the guest directly.
        public static func backup(memory: GuestMemory, fabric: any Fabric, listenAt address: PeerAddress,
                                  configuration: Configuration = Configuration()) async throws -> Endpoint {
            let layout = try MailboxLayout(ringBytes: configuration.ringBytes)
            try check(configuration)
            guard memory.isWritable else { throw SyncError.backupNotWritable(path: memory.path ?? "(anonymous)") }
            guard memory.trailingBytes >= layout.bytes else {
                throw FabricSyncChannelError.noMailboxRoom(trailingBytes: memory.trailingBytes, needed: layout.bytes)
            }
            // A mailbox from an earlier channel must not be read as this one's.
            memset(memory.base + memory.trailerOffset, 0, layout.bytes)
            let range = UnsafeMutableRawBufferPointer(start: memory.base, count: memory.trailerOffset + layout.bytes)
            let region = try fabric.registerRegion(wrapping: range, retaining: memory)
            let bound = try await fabric.listen(at: address, exporting: region)
            return Endpoint(fabric: fabric, address: bound, configuration: configuration, region: region,
                            mailboxOffset: memory.trailerOffset, isPrimary: false, layout: layout)
        }

        private static func check(_ c: Configuration) throws {
            guard c.writeBytesMax >= 1, c.signalEveryWrites >= 1 else {
                throw FabricSyncChannelError.badConfiguration("writeBytesMax and signalEveryWrites must be positive")
            }
        }

        /// Clears this side's mailbox. An endpoint may connect again after its channel went
        /// down; call this once the old channel is closed and before connecting, so nothing the
        /// old peer wrote is read as the new one's.
        public func resetMailbox() {
            region.store([UInt8](repeating: 0, count: layout.bytes), at: mailboxOffset)
        }

        /// Connects a queue pair to the peer's endpoint and starts receiving.
        public func connect(to peer: PeerAddress) async throws -> FabricSyncChannel {
            let qp = try await fabric.connect(to: peer, exporting: region)
            let remote = qp.remote.lengthBytes
            let peerMailbox = remote - layout.bytes
            // The primary's region is exactly one mailbox; the backup's is page-aligned RAM plus one.
            let fits = isPrimary ? peerMailbox > 0 && peerMailbox % 4096 == 0 : peerMailbox == 0
            guard fits else {
                qp.moveToError()
                throw FabricSyncChannelError.peerRegionMismatch(
                    "node \(peer.node) exports \(remote) bytes, which does not fit a \(layout.bytes)-byte mailbox"
                    + (isPrimary ? " after page-aligned RAM" : " alone") + "; do both sides use the same ringBytes?")
            }
            let channel = FabricSyncChannel(endpoint: self, qp: qp, peerMailboxOffset: peerMailbox)
            channel.start()
            return channel
        }
    }

    let endpoint: Endpoint
    let qp: any QueuePair
    private let layout: MailboxLayout
    private let peerMailboxOffset: Int
    private let configuration: Configuration
    private let state: Mutex<State>
    /// Work-request ids, assigned in posting order (a completion covers every lower id), from a
    /// random base of this channel's own: the fabric's completion queue outlives a channel, and
    /// a queue pair an earlier channel dropped flushes its outstanding writes there (unsignalled
    /// ones too), so a completion outside this channel's ids says nothing about its link.
    private let idBase: UInt64
    private let posting: Mutex<UInt64>

    private struct State {
        /// Set once the link is down; every later call throws it.
        var failure: (any Error)?
        /// `close()` asked for a goodbye: drop the connection once this write completed.
        var closingAfter: UInt64?
        var closeDeadline: ContinuousClock.Instant?
        var stopped = false
        // sending into the peer's ring (unwrapped byte positions)
        var writePos: UInt64 = 0
        var creditPos: UInt64 = 0
        var sendSequence: UInt64 = 1
        var sending = false
        var creditWaiter: CheckedContinuation<Void, any Error>?
        // receiving from this side's ring
        var readPos: UInt64 = 0
        var receiveSequence: UInt64 = 1
        var creditSent: UInt64 = 0
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

    private init(endpoint: Endpoint, qp: any QueuePair, peerMailboxOffset: Int) {
        self.endpoint = endpoint
        self.qp = qp
        let base = UInt64.random(in: 1...(1 << 62))
        self.idBase = base
        self.posting = Mutex(base)
        self.layout = endpoint.layout
        self.peerMailboxOffset = peerMailboxOffset
        self.configuration = endpoint.configuration
        self.state = Mutex(State())
    }

    /// What this end has put on the link and taken off it so far.
    public var counters: Counters { state.withLock { $0.counters } }
    /// Whether this is the primary's end, the one that writes pages.
    public var isPrimary: Bool { endpoint.isPrimary }
    /// The link failed or was closed: every call throws. Connect the endpoint again for a new one.
    public var isDown: Bool { state.withLock { $0.failure != nil } }
    private var region: MemoryRegion { endpoint.region }
    private var fabric: any Fabric { endpoint.fabric }

    private func start() {
        // Announce this side (and its ring size) so the peer can check the configurations match.
        _ = state.withLock { s in postCell(MailboxFormat.cell(MailboxFormat.Status.open.rawValue, UInt64(layout.ringBytes)),
                                       at: MailboxLayout.statusOffset, immediate: .status, &s) }
        let thread = Thread { [self] in receiveLoop() }
        thread.name = "plover-syncvm-\(fabric.localNode)"
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
    private func post(_ bytes: [UInt8], at offset: Int, immediate: UInt32?, signaled: Bool) throws(FabricError) -> UInt64 {
        try posting.withLock { next throws(FabricError) in
            next += 1
            let signal = signaled || next % UInt64(configuration.signalEveryWrites) == 0
            try qp.postWrite(bytes, remoteOffset: offset, key: qp.remote.key, immediate: immediate,
                             workRequestID: next, signaled: signal)
            return next
        }
    }

    /// `post`, turning a refused post into a dropped link (`closed`).
    private func postOrFail(_ bytes: [UInt8], at offset: Int, immediate: UInt32?, signaled: Bool) throws -> UInt64 {
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
    private func postCell(_ cell: [UInt8], at offset: Int, immediate: MailboxFormat.Immediate?,
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
        let ring = UInt64(layout.ringBytes)
        let stride = UInt64(MailboxLayout.stride(MailboxLayout.recordHeaderBytes + payload.count))
        func needed(_ s: State) -> UInt64 {
            let phys = s.writePos % ring
            return phys + stride > ring ? ring - phys + stride : stride
        }
        while true {
            let posted: Bool = try state.withLock { s in
                if let e = s.failure { throw e }
                refreshCredit(&s)
                guard s.writePos + needed(s) - s.creditPos <= ring else { return false }
                let ringAt = peerMailboxOffset + MailboxLayout.ringOffset
                let phys = s.writePos % ring
                if phys + stride > ring {
                    let marker = MailboxFormat.record(.wrap, sequence: s.sendSequence, payload: [])
                    _ = try postOrFailLocked(marker, at: ringAt + Int(phys), immediate: nil, &s)
                    s.writePos += ring - phys
                    s.sendSequence += 1
                    s.counters.recordsPosted += 1
                    s.counters.recordOverheadBytes += marker.count
                }
                let record = MailboxFormat.record(kind, flags: flags, sequence: s.sendSequence, frameBytes: UInt32(frameBytes),
                                                  fragmentOffset: UInt32(fragmentOffset), payload: payload)
                _ = try postOrFailLocked(record, at: ringAt + Int(s.writePos % ring),
                                         immediate: MailboxFormat.Immediate.record.rawValue, &s)
                s.writePos += stride
                s.sendSequence += 1
                s.counters.recordsPosted += 1
                s.counters.recordOverheadBytes += record.count - (kind == .fragment ? payload.count : 0)
                return true
            }
            if posted { return }
            // Full: wait until the receiving thread sees new credit (or the link goes down).
            try await withCheckedThrowingContinuation { (c: CheckedContinuation<Void, any Error>) in
                let ready: Result<Void, any Error>? = state.withLock { s in
                    if let e = s.failure { return .failure(e) }
                    refreshCredit(&s)
                    if s.writePos + needed(s) - s.creditPos <= ring { return .success(()) }
                    s.creditWaiter = c
                    return nil
                }
                if let ready { c.resume(with: ready) }
            }
        }
    }

    private func postOrFailLocked(_ bytes: [UInt8], at offset: Int, immediate: UInt32?, _ s: inout State) throws -> UInt64 {
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
    private func refreshCredit(_ s: inout State) {
        let consumed = region.withBytes(offset: endpoint.mailboxOffset + MailboxLayout.creditOffset, count: 24) {
            MailboxFormat.cell($0)?.0
        }
        if let consumed, consumed <= s.writePos, consumed > s.creditPos { s.creditPos = consumed }
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
    private func fail(_ error: any Error, _ s: inout State) -> Wake? {
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
    private func dropConnection() {
        qp.moveToError()
        fabric.revokeAccess(from: qp.peer)
    }

    /// An injected cut: the link fails here at once and the peer finds out on its own.
    private func cut() {
        let wake = state.withLock { fail(SyncChannelError.closed, &$0) }
        wake?.resume()
        dropConnection()
        fabric.completions.interrupt()
    }

    // MARK: receiving thread

    private func receiveLoop() {
        while true {
            let completions = fabric.completions.wait(max: 1024, timeout: configuration.pollInterval)
            var linkBroken = false
            var wakeWriters: [CheckedContinuation<Void, any Error>] = []
            var delivered: (CheckedContinuation<[UInt8], any Error>, [UInt8])?
            var diverted: [[UInt8]] = []
            var wakeSender: CheckedContinuation<Void, any Error>?
            var wake: Wake?
            let stop: Bool = state.withLock { s in
                let newest = posting.withLock { $0 }
                for c in completions where c.kind == .write && c.workRequestID > idBase && c.workRequestID <= newest {
                    if c.status == .success { s.completed = max(s.completed, c.workRequestID) } else { linkBroken = true }
                }
                // Look at the link before the ring: whatever landed before the peer's goodbye (or
                // before its connection dropped) is then in the ring, and is delivered first.
                let usable = qp.isUsable
                let peerStatus = region.withBytes(offset: endpoint.mailboxOffset + MailboxLayout.statusOffset, count: 24) {
                    MailboxFormat.cell($0)
                }
                var violation: String?
                if s.failure == nil || s.closingAfter != nil { violation = scan(&s) }
                if !s.diverted.isEmpty { swap(&diverted, &s.diverted) }
                if let c = s.receiveWaiter, let f = s.inbox.popFirst() {
                    s.receiveWaiter = nil
                    delivered = (c, f)
                }
                let ready = s.writeWaiters.filter { $0.id <= s.completed }
                if !ready.isEmpty {
                    s.writeWaiters.removeAll { $0.id <= s.completed }
                    wakeWriters = ready.map(\.waiter)
                }
                refreshCredit(&s)
                if let c = s.creditWaiter { s.creditWaiter = nil; wakeSender = c }  // it re-checks the room
                if let closing = s.closingAfter {
                    // A local close: drop the connection once the goodbye landed (or failed, or waited enough).
                    if s.completed >= closing || linkBroken || !usable || ContinuousClock.now >= s.closeDeadline! {
                        s.stopped = true
                    }
                    return s.stopped
                }
                if s.failure != nil { s.stopped = true; return true }
                if let ringBytes = peerStatus?.1, ringBytes != UInt64(layout.ringBytes) {
                    violation = violation ?? "peer's ring is \(ringBytes) bytes, this side's \(layout.ringBytes)"
                }
                if let violation {
                    wake = fail(FabricSyncChannelError.protocolViolation(violation), &s)
                } else if linkBroken || !usable || peerStatus?.0 == MailboxFormat.Status.closed.rawValue {
                    wake = fail(SyncChannelError.closed, &s)
                }
                if s.failure != nil { s.stopped = true; return true }
                returnCredit(&s)
                if ContinuousClock.now - s.lastKeepalive >= configuration.keepaliveInterval {
                    s.lastKeepalive = .now
                    postCell(MailboxFormat.cell(MailboxFormat.Status.open.rawValue, UInt64(layout.ringBytes)),
                             at: MailboxLayout.statusOffset, immediate: nil, &s)
                }
                return false
            }
            if let (c, f) = delivered { c.resume(returning: f) }
            if !diverted.isEmpty { endpoint.divert?.handle(diverted) }
            for w in wakeWriters { w.resume() }
            wakeSender?.resume()
            wake?.resume()
            if stop {
                dropConnection()
                return
            }
        }
    }

    /// Tells the peer how far its ring here was consumed (one write per scan that consumed any).
    private func returnCredit(_ s: inout State) {
        guard s.readPos != s.creditSent else { return }
        if postCell(MailboxFormat.cell(s.readPos, 0), at: MailboxLayout.creditOffset, immediate: .credit, &s) != nil {
            s.creditSent = s.readPos
        }
    }

    /// Consumes every complete record in this side's ring, in sequence order. Returns why the
    /// ring broke the rules, if it did.
    private func scan(_ s: inout State) -> String? {
        let ring = layout.ringBytes
        let ringAt = endpoint.mailboxOffset + MailboxLayout.ringOffset
        while true {
            let phys = Int(s.readPos % UInt64(ring))
            guard ring - phys >= MailboxLayout.recordHeaderBytes else { return "read position \(phys) leaves no room for a header" }
            let h = region.withBytes(offset: ringAt + phys, count: MailboxLayout.recordHeaderBytes) { MailboxFormat.header($0) }
            // Anything else at this position is an older lap or not written yet.
            guard h.sequence == s.receiveSequence else { return nil }
            let payloadBytes = h.totalBytes - MailboxLayout.recordHeaderBytes
            guard payloadBytes >= 0, payloadBytes <= layout.payloadBytesMax,
                  phys + MailboxLayout.stride(h.totalBytes) <= ring else { return nil }
            let record: [UInt8]? = region.withBytes(offset: ringAt + phys, count: h.totalBytes) { b in
                guard RingFormat.unsealed(b) != nil else { return nil }
                return Array(b[MailboxLayout.recordHeaderBytes...])
            }
            // Still landing, or torn: look again next scan.
            guard let payload = record else { return nil }
            s.receiveSequence += 1
            guard h.reserved == 0 else { return "record \(h.sequence) has reserved bits set" }
            switch MailboxFormat.Kind(rawValue: h.kind) {
            case .wrap?:
                guard payloadBytes == 0 else { return "wrap marker \(h.sequence) carries a payload" }
                s.readPos += UInt64(ring - phys)
                continue
            case .fragment?:
                guard h.frameBytes <= SyncWire.frameBytesMax, h.fragmentOffset == s.assembly.count,
                      s.assembly.isEmpty || h.frameBytes == s.assemblyBytes,
                      h.fragmentOffset + payloadBytes <= h.frameBytes,
                      (h.flags == MailboxFormat.lastFragment) == (h.fragmentOffset + payloadBytes == h.frameBytes),
                      h.flags & ~MailboxFormat.lastFragment == 0 else {
                    return "fragment \(h.sequence) (\(h.fragmentOffset)+\(payloadBytes) of \(h.frameBytes)) does not continue the frame"
                }
                if s.assembly.isEmpty { s.assemblyBytes = h.frameBytes; s.assembly.reserveCapacity(h.frameBytes) }
                s.assembly += payload
                if h.flags == MailboxFormat.lastFragment {
                    if let d = endpoint.divert, d.selects(s.assembly) { s.diverted.append(s.assembly) } else { s.inbox.append(s.assembly) }
                    s.counters.framesReceived += 1
                    s.counters.controlBytesReceived += s.assembly.count
                    s.assembly = []
                }
            case .pagesDone?:
                guard payloadBytes == 16, s.assembly.isEmpty else { return "malformed pages-done record \(h.sequence)" }
                let (batch, total) = payload.withUnsafeBytes { (RingFormat.readU64($0, 0), RingFormat.readU64($0, 8)) }
                guard total == UInt64(s.counters.pagesLanded) + batch else {
                    return "pages-done says \(total) pages in total, \(s.counters.pagesLanded) + \(batch) expected"
                }
                s.counters.pagesLanded = Int(total)
            case nil:
                return "record \(h.sequence) of unknown kind \(h.kind)"
            }
            s.readPos += UInt64(MailboxLayout.stride(h.totalBytes))
        }
    }
}
