import Foundation
import Testing
@testable import RDMAPaxos

/// A fresh directory under the system temp dir, removed by `remove()`.
struct TempDir {
    let path: String
    init(_ label: String = "store") {
        path = FileManager.default.temporaryDirectory.path + "/plover-test-\(label)-\(UUID().uuidString.prefix(8))"
    }
    func remove() { try? FileManager.default.removeItem(atPath: path) }
}

func entry(_ index: LogIndex, term: UInt64 = 1, bytes: Int = 16) -> LogEntry {
    LogEntry(index: index, ballot: Ballot(term: term, node: 1), kind: .command,
             payload: (0..<bytes).map { UInt8(truncatingIfNeeded: index &* 31 &+ UInt64($0)) })
}

func entries(_ range: ClosedRange<LogIndex>, term: UInt64 = 1) -> [LogEntry] {
    range.map { entry($0, term: term) }
}

/// Executables built next to the test bundle (`swift build` puts plover and paxos-log there).
func builtExecutable(_ name: String) throws -> String {
    let dir = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().deletingLastPathComponent()
    let path = dir.appendingPathComponent(name).path
    guard FileManager.default.isExecutableFile(atPath: path) else {
        throw CommandError("\(path) not found: run `swift build` before `swift test`")
    }
    return path
}

struct CommandError: Error, CustomStringConvertible {
    var description: String
    init(_ d: String) { description = d }
}

/// What a finished command printed and how it exited.
struct CommandResult {
    var status: Int32
    var stdout: String
    var stderr: String
}

/// Runs `executable` to completion (a whole `paxos-log` or `db5.3_*` invocation), in this
/// process's environment or in `environment`.
func runCommand(_ executable: String, _ args: [String], environment: [String: String]? = nil) throws -> CommandResult {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: executable)
    p.arguments = args
    if let environment { p.environment = environment }
    let out = Pipe(), err = Pipe()
    p.standardOutput = out
    p.standardError = err
    try p.run()
    // Read both pipes before waiting, so a chatty child cannot fill one and block.
    let errData = LockedBytes()
    let t = Thread { errData.set(err.fileHandleForReading.readDataToEndOfFile()) }
    t.start()
    let o = out.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    while !errData.isSet { usleep(1000) }
    return CommandResult(status: p.terminationStatus, stdout: String(decoding: o, as: UTF8.self),
                         stderr: String(decoding: errData.get(), as: UTF8.self))
}

final class LockedBytes: @unchecked Sendable {
    // @unchecked Sendable: guarded by `lock`.
    private let lock = NSLock()
    private var data = Data()
    private var done = false
    func set(_ d: Data) { lock.lock(); data = d; done = true; lock.unlock() }
    func get() -> Data { lock.lock(); defer { lock.unlock() }; return data }
    var isSet: Bool { lock.lock(); defer { lock.unlock() }; return done }
}

/// A long-running child whose stdout lines are collected as they arrive.
final class Child: @unchecked Sendable {
    // @unchecked Sendable: `lines` and `partial` are guarded by `lock`.
    let process = Process()
    private let lock = NSLock()
    private var lines: [String] = []
    private var partial = ""
    /// The child's standard input, when it was asked for (`send`).
    private let input: Pipe?

    init(_ executable: String, _ args: [String], withInput: Bool = false) throws {
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = args
        input = withInput ? Pipe() : nil
        if let input { process.standardInput = input }
        let out = Pipe()
        process.standardOutput = out
        process.standardError = FileHandle.nullDevice
        out.fileHandleForReading.readabilityHandler = { [self] h in
            let d = h.availableData
            lock.lock()
            partial += String(decoding: d, as: UTF8.self)
            while let nl = partial.firstIndex(of: "\n") {
                lines.append(String(partial[..<nl]))
                partial = String(partial[partial.index(after: nl)...])
            }
            lock.unlock()
            if d.isEmpty { h.readabilityHandler = nil }
        }
        try process.run()
    }

    var output: [String] { lock.lock(); defer { lock.unlock() }; return lines }

    /// Writes `line` and a newline to the child's standard input.
    func send(_ line: String) { input?.fileHandleForWriting.write(Data((line + "\n").utf8)) }

    /// Output line `index` (0-based), once it arrived; nil after `seconds`.
    func line(_ index: Int, seconds: Double = 20) -> String? {
        waitForLine(seconds: seconds) { _ in output.count > index } ? output[index] : nil
    }

    /// Waits until a line satisfies `match` (or `seconds` pass); returns whether one did.
    func waitForLine(seconds: Double = 20, _ match: (String) -> Bool) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if output.contains(where: match) { return true }
            usleep(5_000)
        }
        return false
    }

    /// Sends `signal`; if the child has not exited after `seconds`, kills it for good.
    func kill(_ signal: Int32, seconds: Double = 5) {
        Glibc.kill(process.processIdentifier, signal)
        let deadline = Date().addingTimeInterval(seconds)
        while process.isRunning && Date() < deadline { usleep(5_000) }
        if process.isRunning { Glibc.kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
    }
}
