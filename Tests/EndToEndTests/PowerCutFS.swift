import Foundation
@testable import PloverTesting

/// `powercutfs` (powercut-fs/powercutfs.c) mounted for a test: a FUSE file system that keeps
/// every write in its own memory until the file is fsynced, and loses what was not synced when
/// its process is killed: `cut()` is a power cut, `mount()` the power coming back, showing what
/// the disk held. With `fsyncLies` fsync writes nothing, a broken disk the tests must catch.
final class PowerCutFS {
    let backing: String
    let mountPoint: String
    let fsyncLies: Bool
    /// `NAME:N`: the file system cuts its own power at the Nth fsync of the file NAME (see
    /// powercutfs.c); `faultOptions` may make it `--torn` (halfway through that sync's pages) or
    /// `--eio` (that sync fails, no cut).
    let cutAtSync: String?
    let faultOptions: [String]
    private(set) var process: Process?
    private let log: String

    /// Compiles the file system once per test run (needs libfuse3-dev and pkg-config, which
    /// scripts/install-deps.sh installs).
    static let executable: Result<String, CLIError> = {
        // One place for every run, replaced atomically: a run never leaves a copy behind, and
        // a file system still mounted by another run keeps the binary it started from.
        let dir = FileManager.default.temporaryDirectory.path + "/plover-powercutfs"
        try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let out = dir + "/powercutfs"
        let source = InterposeHarness.packageRoot + "/Tests/EndToEndTests/powercut-fs/powercutfs.c"
        let command = "cc -std=c11 -Wall -Wextra -Werror -O2 -o '\(out).\(getpid())' '\(source)' $(pkg-config --cflags --libs fuse3)"
            + " && mv -f '\(out).\(getpid())' '\(out)'"
        guard let (status, output) = try? InterposeHarness.run("/bin/sh", ["-c", command]), status == 0 else {
            return .failure(CLIError("cannot build powercutfs (needs libfuse3-dev and pkg-config: make deps): \(command)"))
        }
        _ = output
        return .success(out)
    }()

    /// Makes `root/disk` (the backing "platters") and mounts the file system on `root/mnt`.
    convenience init(root: String, fsyncLies: Bool = false, cutAtSync: String? = nil, faultOptions: [String] = []) throws {
        try self.init(backing: root + "/disk", mountPoint: root + "/mnt", log: root + "/powercutfs.log",
                      fsyncLies: fsyncLies, cutAtSync: cutAtSync, faultOptions: faultOptions)
    }

    /// Mounts the file system on `mountPoint`, keeping what is synced in `backing`.
    init(backing: String, mountPoint: String, log: String, fsyncLies: Bool = false, cutAtSync: String? = nil,
         faultOptions: [String] = []) throws {
        self.backing = backing
        self.mountPoint = mountPoint
        self.log = log
        self.fsyncLies = fsyncLies
        self.cutAtSync = cutAtSync
        self.faultOptions = faultOptions
        for d in [backing, mountPoint] { try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true) }
        try mount()
    }

    var isMounted: Bool {
        let mounts = (try? String(contentsOfFile: "/proc/self/mounts", encoding: .utf8)) ?? ""
        return mounts.split(separator: "\n").contains { $0.split(separator: " ").dropFirst().first.map(String.init) == mountPoint }
    }

    /// Starts the file system on the backing directory; returns once it is mounted. A planned
    /// cut (`cutAtSync`) applies to the first mount only: the power comes back for good.
    func mount() throws {
        let exe = try Self.executable.get()
        var options = fsyncLies ? ["--fsync-lies"] : []
        if !cutDone, let at = cutAtSync { options += ["--cut-at-sync", at] + faultOptions }
        process = try ChildProcesses.spawn(exe, [backing, mountPoint] + options, log: log)
        let deadline = Date().addingTimeInterval(10)
        while !isMounted {
            guard Date() < deadline, process?.isRunning == true else {
                throw CLIError("powercutfs did not mount \(mountPoint): " + ((try? String(contentsOfFile: log, encoding: .utf8)) ?? ""))
            }
            usleep(10_000)
        }
    }

    private var cutDone = false

    /// Whether the file system cut its own power (`cutAtSync`); waits up to `seconds` for it.
    func cutItself(within seconds: Double) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while process?.isRunning == true && Date() < deadline { usleep(5_000) }
        return process?.isRunning == false
    }

    /// What the file system wrote to its log (its power-cut message among it).
    var output: String { (try? String(contentsOfFile: log, encoding: .utf8)) ?? "" }

    /// The power cut: the file system's process dies with every unsynced write; then the mount
    /// point is detached (programs still using it get errors, as a dead machine's would).
    func cut() {
        cutDone = true
        if let p = process {
            kill(p.processIdentifier, SIGKILL)
            p.waitUntilExit()
            ChildProcesses.unregister(p.processIdentifier)
        }
        process = nil
        _ = try? InterposeHarness.run("/bin/umount", ["-l", mountPoint])
        let deadline = Date().addingTimeInterval(10)
        while isMounted && Date() < deadline { usleep(10_000) }
    }

    /// Cuts the power for good and removes everything under `root`.
    func remove(root: String) {
        cut()
        try? FileManager.default.removeItem(atPath: root)
    }
}

/// CLOCK_MONOTONIC in nanoseconds, the clock `plover _stablelog-writer --timestamps` prints.
func monotonicNanoseconds() -> UInt64 { StableLogWriter.monotonicNanoseconds() }
