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
    private var last: (cpu: UInt64, at: ContinuousClock.Instant)?

    /// A meter for `pid`; its first `sample()` only sets the starting point.
    public init(pid: pid_t) { self.pid = pid }

    /// CPU time (nanoseconds, all threads) used so far; nil once the process is gone.
    public static func cpuNanoseconds(pid: pid_t) -> UInt64? {
        if let tasks = try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task"), !tasks.isEmpty {
            var sum: UInt64 = 0
            var any = false
            for t in tasks {
                guard let s = try? String(contentsOfFile: "/proc/\(pid)/task/\(t)/schedstat", encoding: .utf8),
                      let first = s.split(separator: " ").first, let ns = UInt64(first) else { continue }
                sum += ns
                any = true
            }
            if any { return sum }
        }
        guard let s = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = s.lastIndex(of: ")") else { return nil }
        // Fields after "(comm)": state is field 3, utime 14, stime 15.
        let f = s[s.index(after: close)...].split(separator: " ")
        guard f.count > 12, let u = UInt64(f[11]), let k = UInt64(f[12]) else { return nil }
        let hz = UInt64(max(1, sysconf(Int32(_SC_CLK_TCK))))
        return (u + k) * (1_000_000_000 / hz)
    }

    /// Cores' worth of CPU used since the previous call (0.5 = half a core); nil on the first
    /// call and once the process is gone.
    public mutating func sample() -> Double? {
        let now = ContinuousClock.now
        guard let cpu = Self.cpuNanoseconds(pid: pid) else { return nil }
        defer { last = (cpu, now) }
        guard let l = last else { return nil }
        let wall = now - l.at
        let wallNs = Double(wall.components.seconds) * 1e9 + Double(wall.components.attoseconds) / 1e9
        guard wallNs > 0 else { return nil }
        return Double(cpu &- l.cpu) / wallNs
    }

    /// Forgets the previous sample: the next `sample()` starts over and returns nil.
    public mutating func reset() { last = nil }
}
