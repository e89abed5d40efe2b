// How busy a process is: CPU time consumed per wall-clock time, from /proc. PLOVER runs a
// syncvm when the guest goes idle; an idle TCG guest costs its QEMU little CPU.

#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// Samples a process's CPU time. Uses the per-thread scheduler statistics
/// (`/proc/PID/task/*/schedstat`, nanoseconds) and falls back to `/proc/PID/stat`
/// (utime + stime, in clock ticks) where those are missing.
public struct CPUMeter: Sendable {
    /// The process measured.
    public let pid: pid_t
    private var last: (cpu: [Int: UInt64], at: ContinuousClock.Instant)?

    /// A meter for `pid`; its first `sample()` only sets the starting point.
    public init(pid: pid_t) { self.pid = pid }

    /// CPU time (nanoseconds, all threads) used so far; nil once the process is gone.
    public static func cpuNanoseconds(pid: pid_t) -> UInt64? {
        perThread(pid: pid).map { $0.values.reduce(0, +) }
    }

    /// CPU time (nanoseconds) per live thread id, or the whole process's under the key 0 where
    /// per-thread statistics are missing; nil once the process is gone.
    static func perThread(pid: pid_t) -> [Int: UInt64]? {
        if let tasks = try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task"), !tasks.isEmpty {
            var byThread: [Int: UInt64] = [:]
            for t in tasks {
                guard let tid = Int(t),
                      let s = try? String(contentsOfFile: "/proc/\(pid)/task/\(t)/schedstat", encoding: .utf8),
                      let first = s.split(separator: " ").first, let ns = UInt64(first) else { continue }
                byThread[tid] = ns
            }
            if !byThread.isEmpty { return byThread }
        }
        guard let f = ProcStat.fields(of: pid), f.count > 12, let u = UInt64(f[11]), let k = UInt64(f[12]) else { return nil }
        let hz = UInt64(max(1, sysconf(Int32(_SC_CLK_TCK))))
        return [0: (u + k) * (1_000_000_000 / hz)]
    }

    /// Cores' worth of CPU used since the previous call (0.5 = half a core); nil on the first
    /// call and once the process is gone. Counted per thread, so a thread that exits between
    /// two samples (QEMU's worker threads come and go) does not make the total run backwards;
    /// what such a thread used in its last window is not counted.
    public mutating func sample() -> Double? {
        let now = ContinuousClock.now
        guard let cpu = Self.perThread(pid: pid) else { return nil }
        defer { last = (cpu, now) }
        guard let l = last else { return nil }
        let wall = now - l.at
        let wallNs = wall.inSeconds * 1e9
        guard wallNs > 0 else { return nil }
        return Double(Self.used(from: l.cpu, to: cpu)) / wallNs
    }

    /// CPU nanoseconds used between two per-thread samples: each thread's growth, and all of a
    /// thread that is new (a thread id reused with a smaller count counts as new).
    static func used(from before: [Int: UInt64], to after: [Int: UInt64]) -> UInt64 {
        after.reduce(0) { sum, t in
            let (tid, ns) = t
            guard let was = before[tid], was <= ns else { return sum + ns }
            return sum + (ns - was)
        }
    }

    /// Forgets the previous sample: the next `sample()` starts over and returns nil.
    public mutating func reset() { last = nil }
}
