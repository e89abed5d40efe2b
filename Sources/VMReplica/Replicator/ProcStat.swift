// /proc/PID/stat, read by the CPU meter (utime, stime) and by QEMUInstance.kill (the state).

#if canImport(Glibc)
import Glibc
#endif
import Foundation

enum ProcStat {
    /// The fields of /proc/`pid`/stat after "(comm)" (which may hold spaces and parentheses):
    /// [0] is the state (field 3 of proc(5)), [11] utime, [12] stime. Nil once the process is
    /// gone from /proc.
    static func fields(of pid: pid_t) -> [Substring]? {
        guard let s = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = s.lastIndex(of: ")") else { return nil }
        return s[s.index(after: close)...].split(separator: " ")
    }
}
