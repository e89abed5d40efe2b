import ArgumentParser
import Foundation
import RDMAPaxos

/// The floor for any request/response over loopback: a fixed-size ping-pong over one TCP
/// connection on 127.0.0.1 (blocking sockets, TCP_NODELAY, `send`/`recv` as the TCP fabric and
/// the client use them), between two threads of this process or between this process and a child
/// (`plover bench echo`), as a replica and its peer or client are.
enum LoopbackRoundTrip {
    /// Who answers the ping.
    enum Peer { case thread, process }

    static func measure(_ peer: Peer, messageBytes: Int = 64, seconds: Double = 2, warmupRounds: Int = 1000) throws -> LatencySummary {
        let port: UInt16
        var echo: Process?
        let echoDone = DispatchSemaphore(value: 0)
        switch peer {
        case .thread:
            let listener = try SocketDescriptor.listen(on: HostPort(host: "127.0.0.1", port: 0), backlog: 1)
            port = UInt16(listener.localPort)
            Thread {
                serveOne(listener, messageBytes: messageBytes)
                listener.close()
                echoDone.signal()
            }.start()
        case .process:
            let dir = FileManager.default.temporaryDirectory.appendingPathComponent("plover-echo-\(getpid())").path
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            defer { try? FileManager.default.removeItem(atPath: dir) }
            let portFile = dir + "/port"
            let exe = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")
            let child = try ChildProcesses.spawn(exe, ["bench", "echo", "--port-file", portFile, "--bytes", "\(messageBytes)"], log: dir + "/echo.log")
            echo = child
            let deadline = ContinuousClock.now + .seconds(10)
            var found: UInt16?
            while found == nil && ContinuousClock.now < deadline && child.isRunning {
                found = (try? String(contentsOfFile: portFile, encoding: .utf8)).flatMap { UInt16($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
                if found == nil { Thread.sleep(forTimeInterval: 0.01) }
            }
            guard let f = found else {
                ChildProcesses.stop(child)
                throw CLIError("the echo process (\(exe) bench echo) did not report its port: \((try? String(contentsOfFile: dir + "/echo.log", encoding: .utf8)) ?? "")")
            }
            port = f
        }
        defer {
            if let echo {
                echo.waitUntilExit()
                ChildProcesses.unregister(echo.processIdentifier)
            }
        }

        let c = try SocketDescriptor.connect(to: HostPort(host: "127.0.0.1", port: Int(port)))
        var buf = [UInt8](repeating: 0x5A, count: messageBytes)
        var samples: [UInt64] = []
        samples.reserveCapacity(1 << 16)
        for _ in 0..<warmupRounds { _ = exchange(c, &buf, receiveFirst: false) }
        let end = ClosedLoopLoad.now() + UInt64(seconds * 1e9)
        while true {
            let t0 = ClosedLoopLoad.now()
            if t0 >= end { break }
            guard exchange(c, &buf, receiveFirst: false) else { break }
            samples.append(ClosedLoopLoad.now() - t0)
        }
        c.close()
        if peer == .thread { echoDone.wait() }
        guard !samples.isEmpty else { throw CLIError("loopback round trip: the echo side went away") }
        return LatencySummary(nanoseconds: samples)
    }

    /// Accepts one connection and sends every message back until the peer closes.
    static func serveOne(_ listener: SocketDescriptor, messageBytes: Int) {
        guard let s = try? listener.accept() else { return }
        var buf = [UInt8](repeating: 0, count: messageBytes)
        while exchange(s, &buf, receiveFirst: true) {}
        s.close()
    }

    /// Sends then receives `buf` (or receives then sends it back); false once the peer is gone.
    private static func exchange(_ s: SocketDescriptor, _ buf: inout [UInt8], receiveFirst: Bool) -> Bool {
        do {
            if receiveFirst {
                guard let got = try s.receive(exactly: buf.count) else { return false }
                buf = got
                try s.send(buf)
            } else {
                try s.send(buf)
                guard let got = try s.receive(exactly: buf.count) else { return false }
                buf = got
            }
            return true
        } catch {
            return false
        }
    }
}

/// `plover bench echo` (hidden): the other process of the two-process loopback round trip.
/// Listens on 127.0.0.1, writes its port to `--port-file`, echoes one connection, exits.
package struct RoundTripEcho: ParsableCommand {
    package static let configuration = CommandConfiguration(
        commandName: "echo", abstract: "Echo one loopback connection (the benchmarks' round-trip peer).", shouldDisplay: false)

    @Option(help: "Where to write the port.") var portFile: String
    @Option(help: "Message size in bytes.") var bytes: Int = 64

    package init() {}

    package func validate() throws {
        guard (1...(1 << 20)).contains(bytes) else { throw ValidationError("--bytes: a size in 1...1048576") }
    }

    package func run() throws {
        let listener = try SocketDescriptor.listen(on: HostPort(host: "127.0.0.1", port: 0), backlog: 1)
        defer { listener.close() }
        try "\(listener.localPort)\n".write(toFile: portFile + ".tmp", atomically: false, encoding: .utf8)
        guard rename(portFile + ".tmp", portFile) == 0 else { throw CLIError("\(portFile): \(String(cString: strerror(errno)))") }
        LoopbackRoundTrip.serveOne(listener, messageBytes: bytes)
    }
}
