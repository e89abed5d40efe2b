import Foundation

extension Thread {
    /// A thread that runs `body` under `name`, cut to the 15 bytes Linux allows, as `top -H`,
    /// `perf` and `/proc/PID/task/TID/comm` show it. Foundation's `Thread.name` set before
    /// `start()` is not applied to the system thread on Linux: the thread keeps the name of the
    /// thread that started it (a node loop's encoder showed as `NIO-ELT-1-#1`, the log writer as
    /// a pool thread's `oot.default-qos`), so the new thread writes its name to
    /// `/proc/thread-self/comm` itself (`pthread_setname_np` is not in Swift's Glibc module).
    package convenience init(named name: String, _ body: @escaping @Sendable () -> Void) {
        // At most 15 bytes, cut at a character's start (never inside a multi-byte one).
        let bytes = Array(name.utf8)
        var cut = min(15, bytes.count)
        while cut < bytes.count && cut > 0 && bytes[cut] & 0xC0 == 0x80 { cut -= 1 }
        let short = String(decoding: bytes[..<cut], as: UTF8.self)
        self.init {
            #if os(Linux)
            let fd = open("/proc/thread-self/comm", O_WRONLY | O_CLOEXEC)
            if fd >= 0 {
                _ = short.utf8CString.withUnsafeBufferPointer { write(fd, $0.baseAddress, $0.count - 1) }
                close(fd)
            }
            #endif
            body()
        }
        self.name = short
    }
}
