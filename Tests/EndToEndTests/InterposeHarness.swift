import Foundation
@testable import PloverTesting
import RDMAPaxos

/// What the libinterpose.so tests need: the built library, the C driver compiled against the
/// header alone, replica configs, and a minimal Redis (RESP) client.
enum InterposeHarness {
    /// The package root (this file is Tests/EndToEndTests/InterposeHarness.swift).
    static let packageRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path

    /// libinterpose.so next to the test bundle (`swift build` builds it; `make test` runs that first).
    static func library() throws -> String {
        let bundleDir = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        let candidates = [bundleDir.appendingPathComponent("libinterpose.so").path,
                          bundleDir.deletingLastPathComponent().appendingPathComponent("libinterpose.so").path]
        guard let found = candidates.first(where: { FileManager.default.fileExists(atPath: $0) }) else {
            throw CLIError("libinterpose.so is not built next to the tests (looked at \(candidates.joined(separator: ", "))); run `swift build` first (make test does)")
        }
        return found
    }

    /// Compiles the C driver with the system C compiler, against include/interpose.h and the library only.
    static func compileDriver(into dir: String) throws -> String {
        try compileC("replica_driver", into: dir)
    }

    /// Compiles `interpose-c/NAME.c` into `dir/NAME` with the system C compiler, warnings as
    /// errors, against Sources/Interpose/include and libinterpose.so only.
    /// `linkLibrary: false` compiles the program alone (a harness that includes a C file of the
    /// library itself); `flags` are added (sanitizers, say).
    static func compileC(_ name: String, into dir: String, linkLibrary: Bool = true, flags: [String] = []) throws -> String {
        let lib = linkLibrary ? try library() : ""
        let out = dir + "/" + name
        let link = linkLibrary ? [lib, "-Wl,-rpath," + (lib as NSString).deletingLastPathComponent] : []
        let (status, output) = try run("/usr/bin/cc", ["-std=c11", "-Wall", "-Wextra", "-Werror"] + flags + ["-o", out,
                                                   packageRoot + "/Tests/EndToEndTests/interpose-c/\(name).c",
                                                   "-I", packageRoot + "/Sources/Interpose/include"] + link + ["-lpthread"])
        guard status == 0 else { throw CLIError("cc failed (\(status)):\n\(output)") }
        return out
    }

    /// Runs a program to completion and returns its exit status and output.
    static func run(_ path: String, _ args: [String]) throws -> (Int32, String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: path)
        p.arguments = args
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = pipe
        try p.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: data, as: UTF8.self))
    }

    /// Starts `path args` with its output appended to `log` and extra environment.
    static func spawn(_ path: String, _ args: [String], log: String, environment: [String: String] = [:], cwd: String? = nil) throws -> Process {
        try ChildProcesses.spawn(path, args, log: log, environment: environment, cwd: cwd)
    }

    static func kill9(_ p: Process) {
        Glibc.kill(p.processIdentifier, SIGKILL)
        p.waitUntilExit()
        ChildProcesses.unregister(p.processIdentifier)
    }

    /// The leader among `ids` per the replicas' client ports, or nil.
    static func leader(_ endpoints: [NodeID: String], among ids: [NodeID]) -> NodeID? {
        let c = NodeClient(endpoints: endpoints, timeout: .milliseconds(300))
        for id in ids {
            if let s = try? c.status(of: id), s.contains("role=leader") { return id }
        }
        return nil
    }

    static func waitForLeader(_ endpoints: [NodeID: String], among ids: [NodeID], timeout: Duration = .seconds(30)) throws -> NodeID {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if let l = leader(endpoints, among: ids) { return l }
            Thread.sleep(forTimeInterval: 0.05)
        }
        throw CLIError("no leader among \(ids) within \(timeout)")
    }

    /// A connected TCP socket to 127.0.0.1:`port` (the test clients' one connect path).
    static func connect(port: Int) throws -> Int32 {
        try SocketDescriptor.connect(to: HostPort(host: "127.0.0.1", port: port)).rawValue
    }

    /// A connected stream socket to the unix socket at `unixPath`.
    static func connect(unixPath: String) throws -> Int32 {
        try SocketDescriptor.connect(unixPath: unixPath).rawValue
    }

    static func waitUntil(_ timeout: Duration, _ condition: () -> Bool) -> Bool {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if condition() { return true }
            Thread.sleep(forTimeInterval: 0.05)
        }
        return condition()
    }
}

/// A blocking RESP client for one Redis connection (TCP on loopback or a unix socket): enough
/// to send a command and read its reply.
final class RespClient {
    enum Reply: Equatable { case simple(String), error(String), integer(Int), bulk(String?), array([Reply]) }

    let fd: Int32
    private var buffer: [UInt8] = []

    init(port: Int) throws {
        fd = try InterposeHarness.connect(port: port)
        try setTimeout()
    }

    init(unixPath: String) throws {
        fd = try InterposeHarness.connect(unixPath: unixPath)
        try setTimeout()
    }

    private func setTimeout() throws {
        var tv = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    deinit { Glibc.close(fd) }

    /// Sends one command and returns its reply; throws if the connection fails.
    func call(_ args: String...) throws -> Reply { try call(args) }

    func call(_ args: [String]) throws -> Reply { try pipeline([args])[0] }

    /// Sends several commands in one write (a pipeline) and returns their replies in order.
    func pipeline(_ commands: [[String]]) throws -> [Reply] {
        try send(commands)
        return try commands.map { _ in try reply() }
    }

    /// Sends several commands in one write without reading the replies.
    func send(_ commands: [[String]]) throws {
        var out = ""
        for args in commands {
            out += "*\(args.count)\r\n"
            for a in args { out += "$\(a.utf8.count)\r\n\(a)\r\n" }
        }
        let bytes = Array(out.utf8)
        var sent = 0
        while sent < bytes.count {
            let n = bytes[sent...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            guard n > 0 else { throw CLIError("send failed: \(String(cString: strerror(errno)))") }
            sent += n
        }
    }

    private func line() throws -> String {
        while true {
            if let i = buffer.firstIndex(of: 10), i > 0, buffer[i - 1] == 13 {
                let s = String(decoding: buffer[..<(i - 1)], as: UTF8.self)
                buffer.removeFirst(i + 1)
                return s
            }
            try fill()
        }
    }

    private func fill() throws {
        var chunk = [UInt8](repeating: 0, count: 65536)
        let n = chunk.withUnsafeMutableBytes { Glibc.recv(fd, $0.baseAddress, $0.count, 0) }
        guard n > 0 else { throw CLIError(n == 0 ? "the server closed the connection" : "recv failed: \(String(cString: strerror(errno)))") }
        buffer += chunk[..<n]
    }

    /// Reads the next reply (of commands sent with `send`).
    func reply() throws -> Reply {
        let l = try line()
        let rest = String(l.dropFirst())
        switch l.first {
        case "+": return .simple(rest)
        case "-": return .error(rest)
        case ":": return .integer(Int(rest) ?? 0)
        case "$":
            let n = Int(rest) ?? -1
            if n < 0 { return .bulk(nil) }
            while buffer.count < n + 2 { try fill() }
            let s = String(decoding: buffer[..<n], as: UTF8.self)
            buffer.removeFirst(n + 2)
            return .bulk(s)
        case "*":
            let n = Int(rest) ?? -1
            return .array(try (0..<max(0, n)).map { _ in try reply() })
        default: throw CLIError("not a RESP reply: \(l)")
        }
    }
}
