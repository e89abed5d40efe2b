// `FabricSyncChannel`'s receiving thread: consumes the fabric's completions, takes the peer's
// records from this side's ring (`CreditRingReader`), returns credit, keeps the link alive and
// notices when it goes down (the channel itself: FabricSyncChannel.swift).

import Foundation
import RDMAPaxos

extension FabricSyncChannel {
    // MARK: receiving thread

    func receiveLoop() {
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
        guard s.reader.creditDue else { return }
        let position = s.reader.readPosition
        if postCell(s.reader.creditCell(), at: MailboxLayout.creditOffset, immediate: .credit, &s) != nil {
            s.reader.returnedCredit(at: position)
        }
    }

    /// Consumes every complete record in this side's ring, in sequence order. Returns why the
    /// ring broke the rules, if it did.
    private func scan(_ s: inout State) -> String? {
        let ringAt = endpoint.mailboxOffset + MailboxLayout.ringOffset
        while true {
            let record: CreditRingReader.Record
            switch s.reader.next(in: region, at: ringAt) {
            // Nothing new (an older lap or not written yet), or still landing (or torn): look again next scan.
            case .empty, .landing: return nil
            case .malformed(let why): return why
            case .record(let r): record = r
            }
            let h = MailboxFormat.Header(record)
            let payload = record.payload
            guard h.reserved == 0 else { return "record \(h.sequence) has reserved bits set" }
            switch MailboxFormat.Kind(rawValue: h.kind) {
            case .wrap?:
                // The ring skips wrap markers itself; one with flags set is not one.
                return "wrap marker \(h.sequence) has flags \(h.flags)"
            case .fragment?:
                guard h.frameBytes <= SyncWire.frameBytesMax, h.fragmentOffset == s.assembly.count,
                      s.assembly.isEmpty || h.frameBytes == s.assemblyBytes,
                      h.fragmentOffset + payload.count <= h.frameBytes,
                      (h.flags == MailboxFormat.lastFragment) == (h.fragmentOffset + payload.count == h.frameBytes),
                      h.flags & ~MailboxFormat.lastFragment == 0 else {
                    return "fragment \(h.sequence) (\(h.fragmentOffset)+\(payload.count) of \(h.frameBytes)) does not continue the frame"
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
                guard payload.count == 16, s.assembly.isEmpty else { return "malformed pages-done record \(h.sequence)" }
                var r = ByteReader(payload, what: "pages-done record")
                guard let batch = try? r.u64(), let total = try? r.u64() else { return "malformed pages-done record \(h.sequence)" }
                guard total == UInt64(s.counters.pagesLanded) + batch else {
                    return "pages-done says \(total) pages in total, \(s.counters.pagesLanded) + \(batch) expected"
                }
                s.counters.pagesLanded = Int(total)
            case nil:
                return "record \(h.sequence) of unknown kind \(h.kind)"
            }
        }
    }
}
