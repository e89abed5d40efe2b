// A per-frame timing trace of the path an input and its answer take through both replicas
// (docs/design/vmreplica.md, "Where a matched frame waits"): with `PLOVER_VM_TRACE=1`, each
// replica appends one line per stage to `run_dir/stages.log` — CLOCK_MONOTONIC nanoseconds, the
// stage, and the frame's key — so the lines of both replicas on one host can be joined.

#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// Stage timestamps of inputs (keyed by a hash of the frame) and outputs (keyed by their
/// digest's content hash), written as text lines; nil unless enabled.
final class StageTrace: @unchecked Sendable {
    // @unchecked Sendable: `fd` is set once; each line goes out in one `write` (O_APPEND).
    private let fd: Int32

    init?(runDir: String, environment: [String: String] = ProcessInfo.processInfo.environment) {
        guard environment["PLOVER_VM_TRACE"] == "1" else { return nil }
        try? FileManager.default.createDirectory(atPath: runDir, withIntermediateDirectories: true)
        fd = open(runDir + "/stages.log", O_WRONLY | O_CREAT | O_APPEND, 0o644)
        guard fd >= 0 else { return nil }
    }

    deinit { close(fd) }

    /// Now on CLOCK_MONOTONIC, in nanoseconds (comparable between processes on one host).
    static var now: UInt64 {
        var t = timespec()
        clock_gettime(CLOCK_MONOTONIC, &t)
        return UInt64(t.tv_sec) * 1_000_000_000 + UInt64(t.tv_nsec)
    }

    /// The key of an input frame: FNV-1a over its bytes.
    static func key(input frame: [UInt8]) -> UInt64 {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for b in frame { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 }
        return h
    }

    /// Records `stage` for the frame `key` now.
    func note(_ stage: String, _ key: UInt64, at t: UInt64 = StageTrace.now) {
        let line = "\(t) \(stage) \(String(key, radix: 16))\n"
        _ = line.utf8CString.withUnsafeBufferPointer { write(fd, $0.baseAddress, $0.count - 1) }
    }
}
