// The agent's end of the VM hooks: a Unix socket a patched QEMU connects to through
// libinterpose.so (interpose_vm.h). Through it the agent gets QEMU's dirty log instead of hashing
// all of RAM, and saves and loads the device state in the running QEMU instead of migrating into
// a fresh one. Requests are synchronous: the agent sends one, reads frames until its answer.

#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// A VM hooks request failed, QEMU misbehaved, or the connection is gone. Names the socket.
public struct QEMUHooksError: Error, Equatable, Sendable, CustomStringConvertible {
    /// What went wrong, for callers that react differently (a failed hook leaves the connection up).
    public enum Kind: Equatable, Sendable {
        /// No QEMU connected yet (or `close()` was called).
        case notConnected
        /// The hello was refused: another ABI version, another RAM geometry, not a hello.
        case refused
        /// QEMU closed the connection, or the socket failed.
        case disconnected
        /// QEMU did not answer in time; the connection was closed.
        case timedOut
        /// QEMU sent a frame the protocol does not allow; the connection was closed.
        case protocolViolation
        /// QEMU answered with an error (a missing or failing hook, INTERPOSE_VM_E* `code`).
        /// Only this request failed; the connection stays up.
        case hookFailed(code: Int32)
    }

    /// The Unix socket the endpoint listens on.
    public var socket: String
    /// The category of the failure.
    public var kind: Kind
    /// What happened, in words.
    public var problem: String
    public var description: String { "QEMU hooks socket \(socket): \(problem)" }
}

/// Serves one patched QEMU over a Unix socket (`interpose_vm_connect` on the other side).
///
/// As a `DirtyPageSource`, `collect()` asks QEMU to sync its dirty log and returns the union of
/// every bitmap QEMU handed in since the previous `collect()` (through `dirtyLog`, an
/// `ExternalDirtyLog`). QEMU's log starts when it connects: the first checkpoint after a QEMU
/// connects must still treat every page as a candidate, as the first checkpoint does today.
///
/// One caller at a time (the VM driver), like `QMPClient`. One QEMU per endpoint: once a
/// connection that completed its hello fails, every later call throws that failure (a new QEMU
/// process needs a new endpoint, and a new baseline). A refused hello leaves the endpoint
/// waiting for another QEMU.
public final class QEMUHooksEndpoint: DirtyPageSource, @unchecked Sendable {
    // @unchecked Sendable: every mutable field is touched only under `lock`.

    /// The Unix socket QEMU connects to.
    public let socketPath: String
    /// Bytes per page; QEMU's hello must state the same.
    public let pageSize: Int
    /// Pages of guest RAM; QEMU's hello must state `pageCount * pageSize` bytes.
    public let pageCount: Int
    /// How long one request (or the hello) may take before the connection is given up.
    public let requestTimeout: Duration
    /// The union of the bitmaps QEMU handed in and the agent has not collected yet.
    public let dirtyLog: ExternalDirtyLog

    private let lock = NSLock()
    private var listenFD: Int32
    private var fd: Int32 = -1
    private var failure: QEMUHooksError?
    private var nextSeq: UInt32 = 1

    /// Listens on `socketPath` (an old socket file there is replaced) for a QEMU whose RAM is
    /// `ramBytes` in pages of `pageSize` bytes.
    public init(socketPath: String, ramBytes: Int, pageSize: Int = 4096, requestTimeout: Duration = .seconds(10)) throws {
        precondition(pageSize > 0 && pageSize & (pageSize - 1) == 0, "page size \(pageSize) is not a power of two")
        precondition(ramBytes > 0 && ramBytes % pageSize == 0, "RAM of \(ramBytes) bytes is not a whole number of pages")
        self.socketPath = socketPath
        self.pageSize = pageSize
        self.pageCount = ramBytes / pageSize
        self.requestTimeout = requestTimeout
        self.dirtyLog = ExternalDirtyLog(pageCount: ramBytes / pageSize)
        self.listenFD = try Sockets.listenUnix(socketPath)
    }

    deinit { close() }

    /// True while a QEMU is connected and its connection has not failed.
    public var isConnected: Bool { lock.withLock { fd >= 0 && failure == nil } }

    /// Waits up to `timeout` for QEMU to connect and checks its hello (ABI version, RAM
    /// geometry). A refused hello is answered with the reason (QEMU's `interpose_vm_connect`
    /// returns it) and thrown as `.refused`; the endpoint then waits for the next QEMU.
    public func acceptQEMU(timeout: Duration) throws {
        try lock.withLock {
            if let failure { throw failure }
            guard fd < 0 else { throw error(.refused, "a QEMU is already connected; an endpoint serves one") }
            guard listenFD >= 0 else { throw error(.notConnected, "the endpoint is closed") }
            let deadline = ContinuousClock.now + timeout
            let c: Int32
            do { c = try Sockets.accept(listenFD, timeout: timeout, what: socketPath) } catch let e as SocketError {
                throw error(e.errno == ETIMEDOUT ? .timedOut : .disconnected, "no QEMU connected within \(timeout) (\(e))")
            }
            do {
                try checkHello(c, deadline: min(deadline, ContinuousClock.now + requestTimeout))
                guard Sockets.writeAll(c, HooksFrame.encode(.welcome, [UInt8]().appendingLE32(HooksFrame.abiVersion))) else {
                    throw error(.disconnected, "QEMU closed the connection before the welcome")
                }
            } catch {
                Glibc.close(c)
                throw error
            }
            fd = c
        }
    }

    /// Reads QEMU's first frame: a hello of this ABI version and this geometry, or a refusal.
    private func checkHello(_ c: Int32, deadline: ContinuousClock.Instant) throws {
        let frame: RawHooksFrame
        switch HooksFrame.read(c, deadline: deadline) {
        case .success(let f): frame = f
        case .failure(let f): throw readError(f, while: "waiting for QEMU's hello")
        }
        func refuse(_ reason: String) -> QEMUHooksError {
            Sockets.writeAll(c, HooksFrame.encode(.refuse, Array(reason.utf8)))
            return error(.refused, "refused QEMU's hello: \(reason)")
        }
        guard frame.type == HooksFrame.hello.rawValue, frame.body.count == 16 else {
            throw refuse("the first frame must be a hello (type 0x01, 16 bytes), not type \(hex(frame.type)) of \(frame.body.count) bytes")
        }
        let version = frame.body.le32(at: 0), page = Int(frame.body.le32(at: 4)), ram = frame.body.le64(at: 8)
        guard version == HooksFrame.abiVersion else {
            throw refuse("QEMU speaks VM hooks ABI version \(version); this agent speaks version \(HooksFrame.abiVersion)")
        }
        guard page == pageSize, ram == UInt64(pageCount) * UInt64(pageSize) else {
            throw refuse("QEMU has \(ram) bytes of RAM in \(page)-byte pages; this replica's RAM is \(pageCount * pageSize) bytes in \(pageSize)-byte pages")
        }
    }

    /// Asks QEMU to sync its dirty log (the VM should be stopped) and returns every page it
    /// reported dirty since the previous call. On failure the pages received so far stay in
    /// `dirtyLog`, and the caller must treat every page as a candidate.
    public func collect() throws -> DirtyBitmap {
        try lock.withLock {
            var words = [UInt64](repeating: 0, count: DirtyBitmap.wordCount(forPages: pageCount))
            _ = try exchange(.syncDirty, dirtyWords: &words)
            do { try dirtyLog.record(words: words) } catch {
                throw fail(.protocolViolation, "the dirty log does not fit the RAM: \(error)")
            }
            return dirtyLog.collect()
        }
    }

    /// QEMU never logs the agent's own writes into the RAM file, so there is nothing to undo.
    public func syncCompleted(rewrote pages: DirtyBitmap) {}

    /// Primary, VM stopped: QEMU's device state (its `save_device_state` hook).
    public func saveDeviceState() throws -> [UInt8] {
        try lock.withLock {
            var none: [UInt64] = []
            return try exchange(.save, dirtyWords: &none)
        }
    }

    /// Backup, VM stopped: QEMU loads `bytes` (saved by the primary) in place (its
    /// `load_device_state` hook). At most 64 MiB minus 4 bytes.
    public func loadDeviceState(_ bytes: [UInt8]) throws {
        try lock.withLock {
            guard bytes.count <= HooksFrame.maxBody - 4 else {
                throw error(.protocolViolation, "device state of \(bytes.count) bytes exceeds the frame limit of \(HooksFrame.maxBody - 4)")
            }
            var none: [UInt64] = []
            _ = try exchange(.load, payload: bytes, dirtyWords: &none)
        }
    }

    /// Stops the VM through QEMU's `stop` hook.
    public func stopVM() throws {
        try lock.withLock {
            var none: [UInt64] = []
            _ = try exchange(.stop, dirtyWords: &none)
        }
    }

    /// Lets the VM run again through QEMU's `cont` hook.
    public func continueVM() throws {
        try lock.withLock {
            var none: [UInt64] = []
            _ = try exchange(.cont, dirtyWords: &none)
        }
    }

    /// Closes the connection and the listening socket and removes the socket file.
    public func close() {
        lock.withLock {
            if fd >= 0 { Glibc.close(fd); fd = -1 }
            if listenFD >= 0 { Glibc.close(listenFD); listenFD = -1; unlink(socketPath) }
            if failure == nil { failure = error(.notConnected, "the endpoint is closed") }
        }
    }

    // MARK: - Requests (under `lock`)

    /// Sends one request and reads until its answer. DIRTY_LOG frames of a SYNC_DIRTY request
    /// are ORed into `dirtyWords`; returns the STATE bytes of a SAVE (empty otherwise).
    private func exchange(_ type: HooksFrame, payload: [UInt8] = [], dirtyWords: inout [UInt64]) throws -> [UInt8] {
        if let failure { throw failure }
        guard fd >= 0 else { throw error(.notConnected, "no QEMU is connected") }
        let seq = nextSeq
        nextSeq &+= 1
        let what = "\(type.name) request \(seq)"
        let deadline = ContinuousClock.now + requestTimeout
        guard Sockets.writeAll(fd, HooksFrame.request(type, seq: seq, payload)) else {
            throw fail(.disconnected, "QEMU closed the connection before the \(what) was sent")
        }
        while true {
            let frame: RawHooksFrame
            switch HooksFrame.read(fd, deadline: deadline) {
            case .success(let f): frame = f
            case .failure(let f): throw failConnection(readError(f, while: "waiting for the answer to the \(what)"))
            }
            guard let kind = HooksFrame(rawValue: frame.type), [.dirtyLog, .ok, .state, .error].contains(kind) else {
                throw fail(.protocolViolation, "QEMU sent unknown frame type \(hex(frame.type)) (\(frame.body.count) bytes) while the agent waited for the \(what)")
            }
            guard frame.body.count >= 4, frame.body.le32(at: 0) == seq else {
                throw fail(.protocolViolation, "QEMU sent a \(kind.name) frame of \(frame.body.count) bytes that does not answer the \(what)")
            }
            switch kind {
            case .dirtyLog where type == .syncDirty:
                try addDirty(frame.body, to: &dirtyWords)
            case .ok where type != .save && frame.body.count == 4:
                return []
            case .state where type == .save:
                return Array(frame.body[4...])
            case .error where frame.body.count >= 8:
                let code = Int32(bitPattern: frame.body.le32(at: 4))
                let message = String(decoding: frame.body[8...], as: UTF8.self)
                let name = HooksFrame.codeNames[code].map { "INTERPOSE_VM_\($0)" } ?? "code \(code)"
                throw error(.hookFailed(code: code), "QEMU failed the \(what) (\(name)): \(message)")
            default:
                throw fail(.protocolViolation, "QEMU answered the \(what) with a \(kind.name) frame of \(frame.body.count) bytes")
            }
        }
    }

    /// Checks one DIRTY_LOG frame (seq, first word, words) against the bitmap and ORs it in.
    private func addDirty(_ body: [UInt8], to words: inout [UInt64]) throws {
        guard body.count >= 12, (body.count - 12) % 8 == 0 else {
            throw fail(.protocolViolation, "dirty log frame of \(body.count) bytes is not a request number, a first word and whole 64-bit words")
        }
        let first = body.le64(at: 4), n = (body.count - 12) / 8
        guard first <= UInt64(words.count), n <= words.count - Int(first) else {
            throw fail(.protocolViolation, "dirty log words \(first)..<\(first + UInt64(n)) lie outside the \(words.count)-word bitmap of \(pageCount) pages")
        }
        for i in 0..<n { words[Int(first) + i] |= body.le64(at: 12 + 8 * i) }
        if n > 0, Int(first) + n == words.count, words[words.count - 1] & ~DirtyBitmap.tailMask(pageCount) != 0 {
            throw fail(.protocolViolation, "dirty log sets bits past the last page (\(pageCount - 1))")
        }
    }

    private func error(_ kind: QEMUHooksError.Kind, _ problem: String) -> QEMUHooksError {
        QEMUHooksError(socket: socketPath, kind: kind, problem: problem)
    }

    /// A read failure as an error of the right kind.
    private func readError(_ f: HooksReadFailure, while doing: String) -> QEMUHooksError {
        switch f {
        case .closed: return error(.disconnected, "QEMU closed the connection \(doing)")
        case .timedOut: return error(.timedOut, "no answer within \(requestTimeout) \(doing)")
        case .failed(let e): return error(.disconnected, "reading failed \(doing): \(String(cString: strerror(e)))")
        case .tooLarge(let n, let type):
            return error(.protocolViolation, "QEMU sent a frame of \(n) bytes (type \(hex(type))) \(doing); the limit is \(HooksFrame.maxBody)")
        }
    }

    /// Ends the connection for good with `kind`/`problem` (QEMU is told why when it broke the
    /// protocol) and returns the error to throw.
    private func fail(_ kind: QEMUHooksError.Kind, _ problem: String) -> QEMUHooksError {
        failConnection(error(kind, problem))
    }

    private func failConnection(_ e: QEMUHooksError) -> QEMUHooksError {
        if fd >= 0 {
            if e.kind == .protocolViolation { Sockets.writeAll(fd, HooksFrame.encode(.refuse, Array(e.problem.utf8))) }
            Glibc.close(fd)
            fd = -1
        }
        failure = e
        return e
    }

    private func hex(_ b: UInt8) -> String { "0x" + String(b, radix: 16, uppercase: false).leftPadded(to: 2) }
}

extension [UInt8] {
    fileprivate func appendingLE32(_ v: UInt32) -> [UInt8] {
        var c = self
        c.le32(v)
        return c
    }
}

extension String {
    fileprivate func leftPadded(to n: Int) -> String { count >= n ? self : String(repeating: "0", count: n - count) + self }
}
