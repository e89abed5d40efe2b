import Foundation

/// What the node's loop did lately, for the warnings that explain an election: when it last heard
/// from its leader, and which of its passes took long and where the time went.
struct LoopWatch {
    /// Uptime (ns, the ticks' clock) at which this thread last handled a message from the leader
    /// it followed then (also read by `runTicks`).
    var leaderHeardAt: UInt64 = 0
    /// Uptime (ns) at which the current pass started.
    var passStartedAt: UInt64 = 0
    /// Nanoseconds the current pass spent applying entries (state machine and answers).
    var applyNanos: UInt64 = 0
    /// Entries the current pass applied.
    var applied = 0
    /// Nanoseconds the current pass spent compacting (the core dropping the snapshot's prefix).
    var compactNanos: UInt64 = 0
    /// Events the current pass held.
    var events = 0
    /// The longest pass that ended within the last `window` (ns), and when it ended.
    var longestPass: (nanos: UInt64, endedAt: UInt64) = (0, 0)
    /// When a slow pass was last reported (at most one warning a second).
    var lastSlowWarning: UInt64 = 0
    /// The thread's CPU time (ns) and the uptime when it was read, at the start of a pass at most
    /// once a millisecond (a system call of about half a microsecond): a slow pass reports how
    /// much of the time since then the thread ran, which tells a pass that worked from one whose
    /// thread waited or was not scheduled.
    var cpuSample: (cpu: UInt64, at: UInt64) = (0, 0)

    /// Passes this long or longer are reported.
    static let slowPassNanos: UInt64 = 20_000_000
    /// How far back `campaignNote` looks for the longest pass.
    static let windowNanos: UInt64 = 2_000_000_000

    static func now() -> UInt64 { DispatchTime.now().uptimeNanoseconds }

    /// Nanoseconds `body` took.
    static func timed(_ body: () -> Void) -> UInt64 {
        let start = now()
        body()
        return now() &- start
    }

    /// CPU time (ns) the calling thread has used.
    static func threadCPU() -> UInt64 {
        var t = timespec()
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t)
        return UInt64(t.tv_sec) &* 1_000_000_000 &+ UInt64(t.tv_nsec)
    }

    mutating func startPass(events n: Int) {
        passStartedAt = Self.now()
        if passStartedAt &- cpuSample.at >= 1_000_000 { cpuSample = (Self.threadCPU(), passStartedAt) }
        applyNanos = 0
        applied = 0
        compactNanos = 0
        events = n
    }

    /// Ends a pass; returns a description when it took at least `slowNanos` (rate limited).
    mutating func endPass() -> String? {
        let end = Self.now()
        let took = end &- passStartedAt
        if took >= longestPass.nanos || end &- longestPass.endedAt > Self.windowNanos { longestPass = (took, end) }
        guard took >= Self.slowPassNanos, end &- lastSlowWarning >= 1_000_000_000 else { return nil }
        lastSlowWarning = end
        var note = "node loop: one pass of \(events) events took \(took / 1_000_000) ms (applying \(applied) entries: \(applyNanos / 1_000_000) ms; compacting: \(compactNanos / 1_000_000) ms)"
        let ran = Self.threadCPU() &- cpuSample.cpu
        note += "; the thread ran \(ran / 1_000_000) ms of CPU in the \((end &- cpuSample.at) / 1_000_000) ms since the pass started"
        return note
    }

    /// Why a replica campaigns: how long it has not heard from its leader, against its loop.
    func campaignNote() -> String {
        let now = Self.now()
        let heard = leaderHeardAt == 0 ? "never" : "\((now &- leaderHeardAt) / 1_000_000) ms ago"
        let longest = now &- longestPass.endedAt <= Self.windowNanos ? longestPass.nanos / 1_000_000 : 0
        return "campaigning: last message from the leader \(heard); longest loop pass in the last 2 s \(longest) ms"
    }
}

extension ReplicaNode {
    /// Ticks that arrived together: counts them and, at most every 10 s, warns once the delay
    /// reached half an election timeout (the point where starvation starts to cost elections).
    func noteLateTicks(count: Int, oldest: UInt64) {
        metrics.lateTicks.increment(by: count - 1)
        let now = DispatchTime.now().uptimeNanoseconds
        let late = now &- oldest
        metrics.tickDelay.recordNanoseconds(Int64(clamping: late))
        guard count >= max(2, options.replica.electionTimeoutTicks / 2) else { return }
        if let last = lastLateTickWarning, now &- last < 10_000_000_000 { return }
        lastLateTickWarning = now
        options.onWarning?("node thread fell behind: \(count) ticks ran together, the oldest \(late / 1_000_000) ms late (election timeout: \(options.replica.electionTimeoutTicks) ticks); the machine is overloaded and elections may follow (docs/operations.md, \"Timing profiles\")")
    }

    /// Ends a loop pass: a pass of `LoopWatch.slowPassNanos` or more is reported (at most once a
    /// second) with where its time went.
    func endPass() {
        if let slow = loopWatch.endPass() { options.onWarning?(slow) }
    }
}

/// Gives the calling thread the lowest CPU priority (nice 19): it runs only when the threads
/// of normal priority (the replicas' loops) leave a core idle. On Linux the nice value belongs
/// to the thread, not the process. Failure leaves the priority as it was.
func lowestCPUPriorityForThisThread() {
    #if os(Linux)
    _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0, 19)
    #else
    _ = setpriority(PRIO_PROCESS, 0, 19)
    #endif
}
