#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Foundation

/// Cross-process exclusion for one log directory, kept in `<dir>/plover.lock`.
///
/// Berkeley DB lets several processes share an environment but does not stop two of them from
/// both writing a log, nor from running recovery under a process that is still attached. So the
/// lock file carries two open-file-description (OFD) byte-range locks:
///
/// - byte 0, the **writer** lock: exclusive, held by the one node that owns the log for its whole
///   life (or briefly by an inspector reading a stopped store).
/// - byte 1, the **environment** lock: exclusive while someone creates or recovers the Berkeley DB
///   environment, shared by every process attached to a live environment (the node after
///   recovery, and inspectors following it).
///
/// OFD locks (unlike `fcntl` process locks) belong to the open file, so two opens in one process
/// exclude each other too, and the kernel drops them when the process dies, however it dies.
/// The writer also writes an owner line (pid and a random nonce) into the file so an attached
/// inspector notices when the node it follows was replaced.
final class StoreLock {
    static let fileName = "plover.lock"

    enum Byte: Int64 { case writer = 0, environment = 1 }
    enum Mode { case shared, exclusive, unlocked }

    let path: String
    private let fd: Int32

    /// Opens (creating when asked) the lock file of `directory`.
    init(directory: String, create: Bool) throws(StableLogError) {
        path = directory + "/" + Self.fileName
        let flags = O_RDWR | O_CLOEXEC | (create ? O_CREAT : 0)
        let fd = Glibc.open(path, flags, 0o644)
        guard fd >= 0 else {
            let e = errno
            if e == ENOENT { throw .notAStore(path: directory, reason: "no \(Self.fileName)") }
            throw .badPath(path: directory, reason: "cannot open \(Self.fileName): \(String(cString: strerror(e)))")
        }
        self.fd = fd
    }

    deinit { Glibc.close(fd) }

    // Linux values; Glibc does not export them to Swift without _GNU_SOURCE.
    private static let ofdGetLock: Int32 = 36
    private static let ofdSetLock: Int32 = 37

    private func request(_ byte: Byte, _ mode: Mode, test: Bool = false) -> (ok: Bool, errno: Int32, free: Bool) {
        var lk = Glibc.flock()
        switch mode {
        case .shared: lk.l_type = Int16(F_RDLCK)
        case .exclusive: lk.l_type = Int16(F_WRLCK)
        case .unlocked: lk.l_type = Int16(F_UNLCK)
        }
        lk.l_whence = Int16(SEEK_SET)
        lk.l_start = off_t(byte.rawValue)
        lk.l_len = 1
        lk.l_pid = 0
        let rc = fcntl(fd, test ? Self.ofdGetLock : Self.ofdSetLock, &lk)
        return (rc == 0, rc == 0 ? 0 : errno, test && lk.l_type == Int16(F_UNLCK))
    }

    /// Takes or changes the lock on `byte` without waiting; false when another open file holds a
    /// conflicting lock.
    func tryLock(_ byte: Byte, _ mode: Mode) throws(StableLogError) -> Bool {
        let r = request(byte, mode)
        if r.ok { return true }
        if r.errno == EAGAIN || r.errno == EACCES { return false }
        throw .engine(path: path, code: r.errno, message: "lock: \(String(cString: strerror(r.errno)))")
    }

    /// Retries `tryLock` until `seconds` have passed: processes that merely look at the lock, or
    /// inspectors that are detaching, hold it for a moment only.
    func lock(_ byte: Byte, _ mode: Mode, waitingUpTo seconds: Double) throws(StableLogError) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while true {
            if try tryLock(byte, mode) { return true }
            if Date() >= deadline { return false }
            usleep(10_000)
        }
    }

    func unlock(_ byte: Byte) { _ = request(byte, .unlocked) }

    /// Whether some other open file holds a lock on `byte` that would conflict with an exclusive one.
    func isHeldElsewhere(_ byte: Byte) -> Bool {
        let r = request(byte, .exclusive, test: true)
        return r.ok && !r.free
    }

    /// Records who owns the log (the writer does this once it holds the writer lock).
    func writeOwner(_ line: String) {
        let bytes = Array(line.utf8) + [10]
        _ = ftruncate(fd, 0)
        _ = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) }
        _ = fsync(fd)
    }

    /// The owner line last written, or "" when none.
    func readOwner() -> String {
        var buf = [UInt8](repeating: 0, count: 256)
        let n = buf.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, 0) }
        guard n > 0 else { return "" }
        return String(decoding: buf[0..<n], as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
    }
}
