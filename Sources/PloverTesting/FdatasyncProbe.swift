import Foundation
import Synchronization

/// The disk's floor for a durable write: `writers` threads, each appending `bytes` to a file of
/// its own in `dir` and calling fdatasync, as three replicas sharing one disk do. Returns the
/// latency of append + fdatasync over every writer's samples.
enum FdatasyncProbe {
    static func measure(dir: String, writers: Int = 3, bytes: Int = 64, seconds: Double = 2) throws -> LatencySummary {
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        var fds: [Int32] = []
        defer { fds.forEach { close($0) } }
        for w in 0..<writers {
            let path = "\(dir)/fdatasync-probe-\(w)"
            let fd = open(path, O_CREAT | O_WRONLY | O_TRUNC | O_APPEND, 0o600)
            guard fd >= 0 else { throw CLIError("\(path): \(String(cString: strerror(errno)))") }
            fds.append(fd)
        }
        defer { for w in 0..<writers { unlink("\(dir)/fdatasync-probe-\(w)") } }
        let samples = Mutex<[UInt64]>([])
        let failure = Mutex<String?>(nil)
        let end = ClosedLoopLoad.now() + UInt64(seconds * 1e9)
        let group = DispatchGroup()
        for fd in fds {
            group.enter()
            Thread {
                defer { group.leave() }
                let buf = [UInt8](repeating: 0x5A, count: bytes)
                var mine: [UInt64] = []
                while true {
                    let t0 = ClosedLoopLoad.now()
                    if t0 >= end { break }
                    let n = buf.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
                    guard n == bytes, fdatasync(fd) == 0 else {
                        failure.withLock { $0 = $0 ?? "append + fdatasync in \(dir): \(String(cString: strerror(errno)))" }
                        return
                    }
                    mine.append(ClosedLoopLoad.now() - t0)
                }
                samples.withLock { $0 += mine }
            }.start()
        }
        group.wait()
        if let f = failure.withLock({ $0 }) { throw CLIError(f) }
        return LatencySummary(nanoseconds: samples.withLock { $0 })
    }
}
