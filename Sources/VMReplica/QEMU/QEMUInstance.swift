// Starting one QEMU for a VM replica: guest RAM in a shared file, QMP on a Unix socket, the
// NIC's backend a `-netdev stream` connection to the replica process (docs/design/vmreplica.md).

#if canImport(Glibc)
import Glibc
#endif
import Foundation
import RDMAPaxos

/// What every QEMU of one VM shares: the same machine, so device state migrates between them.
public struct QEMUSettings: Sendable, Equatable {
    /// The QEMU executable: an absolute path, or a name looked up on `PATH`.
    public var binary = "qemu-system-x86_64"
    /// The guest's kernel image (`-kernel`).
    public var kernel: String
    /// The guest's initial RAM disk (`-initrd`).
    public var initrd: String
    /// The guest kernel's command line (`-append`).
    public var append = "console=ttyS0 quiet panic=-1"
    /// Guest RAM in MiB (`-m`, and the size of the RAM file's memory backend).
    public var memoryMiB = 128
    /// The guest RAM file (`memory-backend-file,share=on`); syncvm maps it too.
    public var ramFile: String
    /// The MAC address of the guest's virtio NIC.
    public var guestMAC = "52:54:00:12:34:56"
    /// The accelerator (`-machine accel=`). Both replicas must use the same one: device state
    /// migrates between their QEMUs.
    public var accel = QEMUAccel.tcg
    /// Virtual CPUs (`-smp`).
    public var cpus = 1
    /// Arguments appended to QEMU's command line as they are (`qemu_args`).
    public var extraArguments: [String] = []
    /// The guest's disk, a raw image (`disk_image`), as a `virtio-blk-pci` device on node
    /// `diskNodeName`; nil: no disk. Each replica has its own image; checkpoints sync it
    /// (QEMU's migration never carries it).
    public var diskImage: String?
    /// The disk's block-graph node name, which the dirty bitmap and the NBD export name.
    public static let diskNodeName = "plover-disk0"

    /// Settings for a VM booting `kernel` and `initrd` with its RAM in `ramFile`; defaults for the rest.
    public init(kernel: String, initrd: String, ramFile: String) {
        self.kernel = kernel
        self.initrd = initrd
        self.ramFile = ramFile
    }

    /// QEMU's command line.
    func arguments(nicSocket: String, qmpSocket: String, serialLog: String, pidFile: String, incoming: Bool) -> [String] {
        var a = [
            "-machine", "q35,accel=\(accel.rawValue),memory-backend=mem", "-m", "\(memoryMiB)", "-smp", "\(cpus)",
            "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none",
            "-serial", "file:\(serialLog)",
            "-kernel", kernel, "-initrd", initrd, "-append", append,
            "-object", "memory-backend-file,id=mem,size=\(memoryMiB)M,mem-path=\(ramFile),share=on",
            "-netdev", "stream,id=n0,server=off,addr.type=unix,addr.path=\(nicSocket)",
            "-device", "virtio-net-pci,netdev=n0,mac=\(guestMAC)",
            "-qmp", "unix:\(qmpSocket),server=on,wait=off",
            "-pidfile", pidFile,
        ]
        if let disk = diskImage {
            // locking=off: the backup's standby QEMU (inactive until its migration arrives) opens
            // the image its running QEMU has open, and the replica process writes it between them.
            a += ["-blockdev", "driver=raw,node-name=\(Self.diskNodeName),file.driver=file,file.filename=\(disk.replacingOccurrences(of: ",", with: ",,")),file.locking=off",
                  "-device", "virtio-blk-pci,drive=\(Self.diskNodeName)"]
        }
        if incoming { a += ["-incoming", "defer"] }
        return a + extraArguments
    }
}

/// QEMU's accelerator for a VM replica's QEMUs.
public enum QEMUAccel: String, Sendable, Equatable, CaseIterable {
    /// Software emulation: works everywhere, slowly.
    case tcg
    /// The kernel's hypervisor (/dev/kvm).
    case kvm
}

/// One running QEMU process with its QMP connection and its NIC stream.
public final class QEMUInstance: @unchecked Sendable {
    // @unchecked Sendable: `qmp` is used by the VM driver thread only; the rest is immutable
    // apart from `Process`, which is thread-safe for what is used here.
    /// The instance's name; its files in the run directory are `NAME.qmp`, `NAME.log`, `NAME.pid`, ...
    public let name: String
    /// The QEMU process.
    public let process: Process
    /// QEMU's QMP connection, for the VM driver thread only.
    public let qmp: QMPClient
    /// The replica process's end of the guest NIC's `-netdev stream` connection.
    public let nic: NICStream
    /// Path of the file QEMU writes the guest's serial console to.
    public let serialLog: String
    /// QEMU's `-pidfile`: removed when this instance is killed, so nobody kills a reused pid later.
    public let pidFile: String
    /// QEMU's process id.
    public var pid: pid_t { process.processIdentifier }

    init(name: String, process: Process, qmp: QMPClient, nic: NICStream, serialLog: String, pidFile: String) {
        self.pidFile = pidFile
        self.name = name
        self.process = process
        self.qmp = qmp
        self.nic = nic
        self.serialLog = serialLog
    }

    /// Starts QEMU `name` in `runDir`. `nicListener` is the replica process's listening socket at
    /// `nicSocket`; QEMU connects to it while it starts, before QMP answers. With `incoming`,
    /// QEMU waits for a migration (`-incoming defer`) instead of booting.
    public static func launch(_ s: QEMUSettings, name: String, runDir: String, nicListener: Int32, nicSocket: String,
                              incoming: Bool) throws -> QEMUInstance {
        let qmpPath = "\(runDir)/\(name).qmp"
        let serial = "\(runDir)/\(name).serial.log"
        let p = Process()
        p.executableURL = URL(fileURLWithPath: s.binary.hasPrefix("/") ? s.binary : try which(s.binary))
        p.arguments = s.arguments(nicSocket: nicSocket, qmpSocket: qmpPath, serialLog: serial,
                                  pidFile: "\(runDir)/\(name).pid", incoming: incoming)
        _ = FileManager.default.createFile(atPath: "\(runDir)/\(name).log", contents: nil)
        let log = FileHandle(forWritingAtPath: "\(runDir)/\(name).log")
        p.standardOutput = log
        p.standardError = log
        p.standardInput = FileHandle.nullDevice
        try p.run()
        var nicFD: Int32 = -1
        do {
            nicFD = try Sockets.accept(nicListener, timeout: .seconds(30), what: nicSocket)
            let qmp = try QMPClient(path: qmpPath, timeout: .seconds(30))
            return QEMUInstance(name: name, process: p, qmp: qmp, nic: NICStream(fd: nicFD), serialLog: serial, pidFile: "\(runDir)/\(name).pid")
        } catch {
            Glibc.kill(p.processIdentifier, SIGKILL)
            p.waitUntilExit()
            if nicFD >= 0 { close(nicFD) }
            unlink("\(runDir)/\(name).pid")
            let tail = (try? String(contentsOfFile: "\(runDir)/\(name).log", encoding: .utf8)).map { String($0.suffix(600)) } ?? ""
            throw QMPError(socket: qmpPath, problem: "QEMU \(name) did not come up: \(error)" + (tail.isEmpty ? "" : "; its output: \(tail)"))
        }
    }

    /// SIGKILL; returns once the process is dead, then removes its pid file and closes the NIC.
    /// Death is read from /proc (a zombie counts as dead): Foundation's `Process` notices an exit
    /// tens of milliseconds to seconds late (measured in the VM benchmark: QEMU dead within
    /// 25 ms of SIGKILL, `waitUntilExit` back after up to 5 s), and Foundation reaps the zombie
    /// on its own. After 10 s of a still-living process, falls back to `waitUntilExit`.
    public func kill() {
        let pid = process.processIdentifier
        if process.isRunning {
            Glibc.kill(pid, SIGKILL)
            let deadline = ContinuousClock.now + .seconds(10)
            while Self.alive(pid), ContinuousClock.now < deadline { usleep(1000) }
            if Self.alive(pid) { process.waitUntilExit() }
        }
        unlink(pidFile)
        unlink(qmp.path)
        nic.close()
    }

    /// `kill()` on another thread, for a QEMU that is already paused and replaced: the
    /// checkpoint's pause need not wait for it. `reaped` gets how long the death took.
    public func killDetached(reaped: @escaping @Sendable (Duration) -> Void = { _ in }) {
        let start = ContinuousClock.now
        // Signalled here, so that the caller's next step (resuming another QEMU on the same
        // RAM) comes after it; only the wait is on the other thread.
        if process.isRunning { Glibc.kill(process.processIdentifier, SIGKILL) }
        let t = Thread(named: "vm-reap-\(name)") { [self] in
            kill()
            reaped(ContinuousClock.now - start)
        }
        t.start()
    }

    /// Whether `pid` is running: it exists and is not a zombie.
    static func alive(_ pid: Int32) -> Bool {
        guard let state = ProcStat.fields(of: pid)?.first else { return false }
        return state != "Z" && state != "X"
    }

    static func which(_ name: String) throws -> String {
        for dir in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":") {
            let p = "\(dir)/\(name)"
            if access(p, X_OK) == 0 { return p }
        }
        throw QMPError(socket: "-", problem: "\(name) not found on PATH (install qemu-system-x86: scripts/install-deps.sh)")
    }
}

/// The replica process's end of a `-netdev stream` connection: each frame is a 4-byte big-endian
/// length and the raw Ethernet frame, both ways.
public final class NICStream: @unchecked Sendable {
    // @unchecked Sendable: `fd` is immutable; writes are serialized by `lock`, reads come from
    // one reader thread.
    let fd: Int32
    private let lock = NSLock()
    private var closed = false

    init(fd: Int32) { self.fd = fd }

    /// Listens at `path` for QEMUs' `-netdev stream` connections; pass the descriptor to
    /// `QEMUInstance.launch` (QEMU needs the listener before it starts).
    public static func listen(path: String) throws -> Int32 { try Sockets.listenUnix(path) }

    /// Sends one frame to the guest; false once QEMU is gone.
    @discardableResult
    public func write(frame: [UInt8]) -> Bool {
        let n = UInt32(frame.count)
        let header: [UInt8] = [UInt8(n >> 24), UInt8(n >> 16 & 0xff), UInt8(n >> 8 & 0xff), UInt8(n & 0xff)]
        return lock.withLock { !closed && Sockets.writeAll(fd, header + frame) }
    }

    /// The next frame from the guest; nil once QEMU is gone.
    public func readFrame() -> [UInt8]? {
        guard let h = Sockets.readExactly(fd, 4) else { return nil }
        let n = Int(h[0]) << 24 | Int(h[1]) << 16 | Int(h[2]) << 8 | Int(h[3])
        guard n > 0, n <= 65_536 else { return nil }
        return Sockets.readExactly(fd, n)
    }

    /// Shuts the connection down and closes it; later writes return false. Calling it again does nothing.
    public func close() {
        lock.withLock {
            guard !closed else { return }
            closed = true
            shutdown(fd, Int32(SHUT_RDWR))
            Glibc.close(fd)
        }
    }
}
