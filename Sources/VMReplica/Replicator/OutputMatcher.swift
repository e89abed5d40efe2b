// The primary's release decision as a value: which held guest frames may go to clients now.
// A frame goes when a completed checkpoint covers it (PLOVER's rule), or — with release on match —
// as soon as the backup's guest, running the same inputs from the same checkpoint, sent the same
// frame. A mismatch asks for a checkpoint. No I/O: `OutputGuard` runs it under its lock and hands
// the released frames to the attachment in the order returned. A connection whose two guests
// differ only by another initial sequence number or a lagging timestamp clock is matched with
// an offset instead, once a log entry told the backup that offset. Rules and the safety
// argument: docs/design/vmreplica.md, "Release on match" and "Connection offsets".

/// Held output and the matching state of one primary.
struct OutputMatcher {
    struct Held {
        var frame: [UInt8]
        var digest: OutputDigest
        var at: ContinuousClock.Instant
        var matched = false
        /// Matched with an offset whose log entry (this ticket) the primary has not applied yet.
        var waitsFor: UInt64?
    }

    /// A frame to deliver now, and whether a match (not a checkpoint or the lack of a backup) let it go.
    struct Release: Equatable {
        var frame: [UInt8]
        var digest: OutputDigest
        var byMatch: Bool
    }

    /// What was released, and how, so far.
    struct Counters: Equatable {
        /// Released because the backup produced the same frame.
        var releasedByMatch: UInt64 = 0
        /// Released by a completed checkpoint.
        var releasedByCheckpoint: UInt64 = 0
        /// Released with no backup to wait for (unprotected, passed through or held until then).
        var releasedUnprotected: UInt64 = 0
        /// Never released (a backup's, or held by a primary that was taken over).
        var dropped: UInt64 = 0
        /// Frames of the backup that differed from the primary's.
        var mismatches: UInt64 = 0
        /// Backup frames the primary did not send and that promise nothing (pure ACKs, ARP): skipped.
        var backupOnlySkipped: UInt64 = 0
        /// Backup digests that could not be used (another generation, matching off).
        var staleDigests: UInt64 = 0
        /// Frames matched, and their total and longest wait from being held to being matched.
        var matchWaits: UInt64 = 0
        var matchWaitTotal = Duration.zero
        var matchWaitMax = Duration.zero
        /// Mismatches by the first field that differed (`OutputDigest.difference`).
        var causes: [String: UInt64] = [:]
        /// Frames matched only with their connection's offset (sequence or timestamp).
        var matchedByOffset: UInt64 = 0
        /// Connection offsets learnt (each a `connectionOffset` entry proposed).
        var offsetsLearnt: UInt64 = 0
        /// Of those, entries applied while their generation was still the matching one.
        var offsetsApplied: UInt64 = 0
        var released: UInt64 { releasedByMatch + releasedByCheckpoint + releasedUnprotected }
    }

    /// Release on match is configured (`release_on_match`); without it only checkpoints release.
    let releaseOnMatch: Bool
    /// Most backup digests kept waiting for the primary's frames; past it matching stops until
    /// the next checkpoint (a backup far ahead, or one that sends what the primary never does).
    static let pendingMax = 16_384

    private(set) var held: [Held] = []
    private(set) var base: UInt64 = 0
    /// The checkpoint whose backup VM's frames may match held ones; nil while no completed
    /// checkpoint says which VM the backup runs (none yet, one in flight past its cut, one that
    /// failed past its cut, unprotected).
    private(set) var generation: UInt64?
    /// A checkpoint took its cut and has not ended: nothing is matched meanwhile.
    private(set) var cutInFlight = false
    /// Why a checkpoint is needed: the first mismatch since the last completed checkpoint.
    private(set) var mismatch: String?
    /// The two digests of that first mismatch, for the checkpoint log.
    private(set) var mismatchDetail: String?
    private(set) var counters = Counters()
    /// Frames released by a match since the last completed checkpoint.
    private(set) var matchedSinceCheckpoint: UInt64 = 0
    /// Per stream, the positions (base-relative, absolute) of held frames not matched yet, in order.
    private var unmatched: [UInt64: [UInt64]] = [:]
    /// Per stream, the backup's digests of the current generation not paired yet, in its order.
    private var pending: [UInt64: [OutputDigest]] = [:]
    private var pendingCount = 0
    /// Digests of a later generation, which the backup sent before this side saw that checkpoint end.
    private var early: (generation: UInt64, digests: [OutputDigest])?
    /// Per TCP stream, the highest timestamp of a frame released (or matched, to be released).
    private var promisedTimestamp: [UInt64: UInt32] = [:]
    /// Per TCP stream, the offset of this generation's backup VM: its digest's numbers plus this
    /// are the primary's. Learnt from its frames, void at the next checkpoint.
    private var offsets: [UInt64: (key: TCPConnectionKey, offset: ConnectionOffset)] = [:]
    /// The next `connectionOffset` entry's ticket (never reused, across generations).
    private var nextTicket: UInt64 = 1
    /// Entries to propose, in order (`takeProposals`); their proposer is filled in by the caller.
    private var proposals: [LearntOffset] = []
    /// Added to a timestamp offset the backup needs, so that a clock that keeps drifting asks
    /// for a new entry less often (a TSval on the wire that jumps forward harms no client).
    static let timestampSlack: UInt32 = 16
    /// The time of the event being handled (for the match waits).
    private var now = ContinuousClock.now

    init(releaseOnMatch: Bool) { self.releaseOnMatch = releaseOnMatch }

    var heldCount: Int { held.count }
    var oldestHeldAt: ContinuousClock.Instant? { held.first?.at }
    /// Whether held frames may be released by a match now.
    var matching: Bool { releaseOnMatch && generation != nil && !cutInFlight && mismatch == nil }

    /// Holds one frame of the guest; returns what may go now (in order).
    mutating func hold(_ frame: [UInt8], digest: OutputDigest, at now: ContinuousClock.Instant) -> [Release] {
        self.now = now
        let position = base + UInt64(held.count)
        held.append(Held(frame: frame, digest: digest, at: now))
        guard matching else { return [] }
        if digest.kind == .arp {
            held[held.count - 1].matched = true
        } else {
            unmatched[digest.stream, default: []].append(position)
            pair(digest.stream)
        }
        return releaseMatchedPrefix()
    }

    /// The backup's digests of `generation`, in its guest's order; returns what may go now.
    mutating func backup(generation g: UInt64, digests: [OutputDigest], at now: ContinuousClock.Instant = .now) -> [Release] {
        self.now = now
        guard releaseOnMatch else { counters.staleDigests += UInt64(digests.count); return [] }
        if let current = generation, g == current, !cutInFlight {
            guard mismatch == nil else { return [] }
            var streams: [UInt64] = []
            for d in digests where d.kind != .arp {
                if pending[d.stream] == nil { streams.append(d.stream) }
                pending[d.stream, default: []].append(d)
                pendingCount += 1
            }
            counters.backupOnlySkipped += UInt64(digests.count(where: { $0.kind == .arp }))
            if pendingCount > Self.pendingMax {
                noteMismatch("backup-far-ahead")
                return []
            }
            for s in Set(streams) { pair(s) }
            return releaseMatchedPrefix()
        }
        // A checkpoint the backup completed before this side saw it end: keep them for it.
        if generation.map({ g > $0 }) ?? true, cutInFlight || generation == nil {
            if early?.generation != g { early = (g, []) }
            if early!.digests.count + digests.count <= Self.pendingMax { early!.digests += digests; return [] }
        }
        counters.staleDigests += UInt64(digests.count)
        return []
    }

    /// Pairs the stream's unmatched held frames with the backup's digests, oldest first.
    private mutating func pair(_ s: UInt64) {
        while mismatch == nil, let position = unmatched[s]?.first, let b = pending[s]?.first {
            let i = Int(position - base)
            let p = held[i].digest
            let known = offsets[s]?.offset ?? .zero
            var off = known
            // A new connection whose two SYNs differ only by the initial sequence number.
            if !p.sameFrame(as: b, sequenceOffset: off.sequence), p.differsOnlyInInitialSequence(from: b) {
                off.sequence = p.sequence &- b.sequence
            }
            if p.sameFrame(as: b, sequenceOffset: off.sequence)
                || p.isPureAcknowledgement && b.kind == .tcp && !b.isPureAcknowledgement && b.sequence &+ off.sequence == p.sequence
                && !Self.precedes(b.acknowledgement, p.acknowledgement) {
                // Equal; or the primary's pure ACK promises bytes up to its acknowledgement
                // number and the backup's frame at the same sequence number acknowledges at
                // least as much.
                guard let ts = timestampOffset(p, b, stream: s, known: off.timestamp) else {
                    noteMismatch("tcp-timestamp-below-released", p, b, released: promisedTimestamp[s])
                    return
                }
                off.timestamp = ts
                var ticket: UInt64?
                if off != known {
                    guard let t = learn(off, stream: s, frame: held[i].frame) else {
                        noteMismatch(off.sequence != known.sequence ? p.difference(from: b, sequenceOffset: known.sequence) : "tcp-timestamp-below-released", p, b)
                        return
                    }
                    ticket = t
                }
                if off != .zero { counters.matchedByOffset += 1 }
                markMatched(i, stream: s, waitsFor: ticket)
                unmatched[s]!.removeFirst()
                if !p.isPureAcknowledgement || b.isPureAcknowledgement || p.sameFrame(as: b, sequenceOffset: off.sequence) {
                    pending[s]!.removeFirst()
                    pendingCount -= 1
                }
            } else if b.isPureAcknowledgement {
                // The backup acknowledged something the primary did not (yet) say it received:
                // a client that never sees it loses nothing.
                pending[s]!.removeFirst()
                pendingCount -= 1
                counters.backupOnlySkipped += 1
            } else {
                noteMismatch(p.difference(from: b, sequenceOffset: known.sequence), p, b)
                return
            }
            if unmatched[s]!.isEmpty { unmatched[s] = nil }
            if pending[s]?.isEmpty == true { pending[s] = nil }
        }
    }

    /// The timestamp offset the backup needs so that, after a failover, its TSvals on this
    /// connection never fall below one a client has seen: the released ones and this frame's
    /// (its later TSvals are at least `b`'s). `known` when it suffices, a larger one (with
    /// slack) when not, nil when the backup's frame has no timestamp while the primary's has
    /// (the options differ then, so this does not happen for equal frames).
    private func timestampOffset(_ p: OutputDigest, _ b: OutputDigest, stream s: UInt64, known: UInt32) -> UInt32? {
        guard let pts = p.timestamp else { return known }
        guard let bts = b.timestamp else { return nil }
        var promised = pts
        if let r = promisedTimestamp[s], Self.precedes(pts, r) { promised = r }
        guard Self.precedes(bts &+ known, promised) else { return known }
        return promised &- bts &+ Self.timestampSlack
    }

    /// Records a new offset for stream `s` of the frame `frame` (the primary's, as clients will
    /// see it) and queues its log entry; nil when the table is full or the frame names no
    /// connection.
    private mutating func learn(_ off: ConnectionOffset, stream s: UInt64, frame: [UInt8]) -> UInt64? {
        guard let generation, let key = offsets[s]?.key ?? TCPConnectionKey(frame: frame, fromGuest: true),
              offsets[s] != nil || offsets.count < ConnectionTable.connectionsMax else { return nil }
        offsets[s] = (key, off)
        let ticket = nextTicket
        nextTicket += 1
        counters.offsetsLearnt += 1
        proposals.append(LearntOffset(generation: generation, proposer: 0, ticket: ticket, key: key, offset: off))
        return ticket
    }

    /// The `connectionOffset` entries to propose since the last call, in the order learnt.
    mutating func takeProposals() -> [LearntOffset] {
        defer { proposals = [] }
        return proposals
    }

    /// This primary applied its `connectionOffset` entry of `generation` with `ticket`: from
    /// that log position the backup rewrites the connection by it, so what waited for it may
    /// go — unless the backup's VM may no longer be that generation's (a checkpoint took its
    /// cut since, or ended), in which case those frames wait for a checkpoint.
    mutating func offsetApplied(generation g: UInt64, ticket: UInt64, at now: ContinuousClock.Instant = .now) -> [Release] {
        self.now = now
        guard releaseOnMatch, generation == g, !cutInFlight else { return [] }
        counters.offsetsApplied += 1
        for i in held.indices where held[i].waitsFor == ticket { held[i].waitsFor = nil }
        return releaseMatchedPrefix()
    }

    private mutating func markMatched(_ i: Int, stream s: UInt64, waitsFor ticket: UInt64? = nil) {
        held[i].matched = true
        held[i].waitsFor = ticket
        let wait = now - held[i].at
        counters.matchWaits += 1
        counters.matchWaitTotal += wait
        counters.matchWaitMax = max(counters.matchWaitMax, wait)
        if let ts = held[i].digest.timestamp { promise(ts, on: s) }
    }

    private mutating func promise(_ ts: UInt32, on s: UInt64) {
        if let old = promisedTimestamp[s], Self.precedes(ts, old) { return }
        promisedTimestamp[s] = ts
    }

    private mutating func noteMismatch(_ cause: String, _ p: OutputDigest? = nil, _ b: OutputDigest? = nil, released: UInt32? = nil) {
        counters.mismatches += 1
        counters.causes[cause, default: 0] += 1
        guard mismatch == nil else { return }
        mismatch = cause
        func text(_ d: OutputDigest) -> String {
            "seq=\(d.sequence) ack=\(d.acknowledgement) flags=0x\(String(d.flags, radix: 16)) bytes=\(d.payloadBytes) ts=\(d.timestamp.map(String.init) ?? "-")"
        }
        mismatchDetail = "\(cause): primary \(p.map(text) ?? "-"); backup \(b.map(text) ?? "-")" + (released.map { "; released ts=\($0)" } ?? "")
    }

    private mutating func releaseMatchedPrefix() -> [Release] {
        var n = 0
        while n < held.count, held[n].matched, held[n].waitsFor == nil { n += 1 }
        guard n > 0 else { return [] }
        counters.releasedByMatch += UInt64(n)
        matchedSinceCheckpoint += UInt64(n)
        return popFront(n)
    }

    private mutating func popFront(_ n: Int) -> [Release] {
        let out = held.prefix(n).map { Release(frame: $0.frame, digest: $0.digest, byMatch: $0.matched) }
        held.removeFirst(n)
        base += UInt64(n)
        return out
    }

    /// A checkpoint's cut: everything held so far was produced before the pause. Matching stops
    /// until the checkpoint ends (the backup's VM is then either the old one or the new copy).
    mutating func cut() -> UInt64 {
        cutInFlight = true
        return base + UInt64(held.count)
    }

    /// The checkpoint of `epoch` ended. Completed: the output before `cut` goes, the backup's
    /// VM is the copy made at the cut, and the frames held after the cut are matched against its
    /// output. Failed after its cut: the backup may run either VM, so nothing is matched until a
    /// checkpoint completes. Failed before any cut: nothing changes.
    mutating func checkpointEnded(epoch: UInt64, completed: Bool, cut: UInt64?) -> [Release] {
        defer { cutInFlight = false }
        guard completed, let cut else {
            if cut != nil { forgetMatching(); generation = nil }
            return []
        }
        let n = Int(min(UInt64(held.count), cut > base ? cut - base : 0))
        for h in held.prefix(n) {
            if h.digest.kind == .tcp, let ts = h.digest.timestamp { promise(ts, on: h.digest.stream) }
            if h.matched { counters.releasedByMatch += 1 } else { counters.releasedByCheckpoint += 1 }
        }
        let out = popFront(n)
        forgetMatching()
        matchedSinceCheckpoint = 0
        generation = epoch
        mismatch = nil
        mismatchDetail = nil
        if releaseOnMatch {
            for (k, h) in held.enumerated() where !h.matched {
                if h.digest.kind == .arp { held[k].matched = true } else { unmatched[h.digest.stream, default: []].append(base + UInt64(k)) }
            }
        }
        cutInFlight = false
        if let e = early, e.generation == epoch {
            early = nil
            return out + backup(generation: epoch, digests: e.digests)
        }
        early = nil
        return out + (releaseOnMatch ? releaseMatchedPrefix() : [])
    }

    private mutating func forgetMatching() {
        unmatched = [:]
        pending = [:]
        pendingCount = 0
        offsets = [:]
    }

    /// Releases everything held (the primary goes on without a backup); matching stops until
    /// a checkpoint completes again.
    mutating func releaseAll() -> [Release] {
        counters.releasedUnprotected += UInt64(held.count)
        let out = popFront(held.count)
        forgetMatching()
        generation = nil
        mismatch = nil
        early = nil
        return out
    }

    /// Counts a frame released without holding (a primary without a protected backup).
    mutating func passedThrough() { counters.releasedUnprotected += 1 }

    /// Counts a frame that will never be released.
    mutating func drop() { counters.dropped += 1 }

    /// Discards everything held (counted as dropped): the VM that produced it is no longer the
    /// one clients see. Matching stops until a checkpoint completes.
    mutating func dropHeld() {
        counters.dropped += UInt64(held.count)
        base += UInt64(held.count)
        held = []
        forgetMatching()
        generation = nil
        mismatch = nil
        early = nil
        promisedTimestamp = [:]
    }

    /// `a` comes before `b` in 32-bit serial-number order (RFC 1982), as TCP compares.
    static func precedes(_ a: UInt32, _ b: UInt32) -> Bool { Int32(bitPattern: a &- b) < 0 }
}
