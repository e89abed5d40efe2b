import Foundation
import Synchronization

/// Every child process the demo or a benchmark started (replicas, etcd members), so that normal
/// exits, thrown errors and Ctrl-C all leave none of them running.
enum ChildProcesses {
    private static let pids = Mutex<Set<pid_t>>([])

    /// Starts `executable args` with stdout and stderr going to the file `log` (appended to, or
    /// emptied first when `truncate`), no standard input, `environment` added to this process's,
    /// in `cwd` if given; registers it so that it is killed with the others.
    static func spawn(_ executable: String, _ args: [String], log: String, truncate: Bool = false,
                      environment: [String: String] = [:], cwd: String? = nil) throws -> Process {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: executable)
        p.arguments = args
        if let cwd { p.currentDirectoryURL = URL(fileURLWithPath: cwd) }
        if !environment.isEmpty { p.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 } }
        if truncate || !FileManager.default.fileExists(atPath: log) { _ = FileManager.default.createFile(atPath: log, contents: nil) }
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
        handle.seekToEndOfFile()
        p.standardOutput = handle
        p.standardError = handle
        p.standardInput = FileHandle.nullDevice
        try p.run()
        register(p.processIdentifier)
        return p
    }

    static func register(_ pid: pid_t) { _ = pids.withLock { $0.insert(pid) } }
    static func unregister(_ pid: pid_t) { _ = pids.withLock { $0.remove(pid) } }

    /// SIGKILLs every registered child that is still registered.
    static func killAll() {
        for pid in pids.withLock({ $0 }) { kill(pid, SIGKILL) }
    }

    /// SIGTERM, then SIGKILL if the process is still there after `grace`; returns once it exited.
    static func stop(_ p: Process, grace: Duration = .seconds(5)) {
        if p.isRunning {
            p.terminate()
            let deadline = ContinuousClock.now + grace
            while p.isRunning && ContinuousClock.now < deadline { Thread.sleep(forTimeInterval: 0.01) }
            if p.isRunning { kill(p.processIdentifier, SIGKILL) }
        }
        p.waitUntilExit()
        unregister(p.processIdentifier)
    }

    /// On SIGINT or SIGTERM: kill every child, run `cleanup`, exit with 128 + the signal.
    static func killOnInterrupt(cleanup: @escaping @Sendable () -> Void) {
        for sig in [SIGINT, SIGTERM] {
            signal(sig, SIG_IGN)
            let s = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            s.setEventHandler {
                killAll()
                cleanup()
                say("interrupted: stopped every child process")
                exit(128 + sig)
            }
            s.resume()
            retainedSignalSources.append(s)
        }
    }
}
