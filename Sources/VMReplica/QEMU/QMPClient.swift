// QEMU's machine protocol (QMP) over its Unix socket: JSON objects one per line. Commands are
// answered in order; asynchronous events may arrive in between and are skipped.

#if canImport(Glibc)
import Glibc
#endif
import Foundation
import RDMAPaxos

/// A QMP command failed, QEMU answered something unexpected, or the socket broke.
public struct QMPError: Error, Sendable, CustomStringConvertible {
    /// Path of the QMP socket ("-" when QEMU itself was not found).
    public var socket: String
    /// What went wrong; for a failed command, QEMU's own description.
    public var problem: String
    public var description: String { "QMP \(socket): \(problem)" }
}

/// A blocking QMP client for one QEMU process. Commands from several threads run one at a time
/// (the VM driver's, and the operator's queries through the replica's QMP socket).
public final class QMPClient: @unchecked Sendable {
    // @unchecked Sendable: `buffer` and the socket are only used under `lock` (the initializer
    // runs before anyone else has the client).
    /// Path of QEMU's QMP socket.
    public let path: String
    private let fd: Int32
    private var buffer: [UInt8] = []
    private let lock = NSLock()

    /// Connects (retrying until `timeout`: QEMU creates the socket while it starts), reads the
    /// greeting and leaves capabilities negotiation mode.
    public init(path: String, timeout: Duration = .seconds(10)) throws {
        self.path = path
        let deadline = ContinuousClock.now + timeout
        var last: any Error = QMPError(socket: path, problem: "never tried")
        var connected: Int32 = -1
        while connected < 0 {
            do { connected = try Sockets.connectUnix(path) } catch {
                last = error
                guard ContinuousClock.now < deadline else { throw QMPError(socket: path, problem: "cannot connect within \(timeout): \(last)") }
                usleep(10_000)
            }
        }
        fd = connected
        SocketDescriptor(rawValue: fd, peer: path).setReceiveTimeout(.seconds(30))
        let greeting = try readObject()
        guard greeting["QMP"] != nil else { throw QMPError(socket: path, problem: "no QMP greeting: \(greeting)") }
        _ = try execute("qmp_capabilities")
    }

    deinit { close(fd) }

    /// Runs `command` with `arguments`; returns its "return" value. A QMP error is thrown with
    /// QEMU's own description.
    @discardableResult
    public func execute(_ command: String, _ arguments: [String: Any] = [:]) throws -> Any {
        lock.lock()
        defer { lock.unlock() }
        var request: [String: Any] = ["execute": command]
        if !arguments.isEmpty { request["arguments"] = arguments }
        let data = try JSONSerialization.data(withJSONObject: request)
        guard Sockets.writeAll(fd, Array(data) + [10]) else { throw QMPError(socket: path, problem: "connection lost sending \(command)") }
        while true {
            let o = try readObject()
            if o["event"] != nil { continue }
            if let e = o["error"] as? [String: Any] {
                throw QMPError(socket: path, problem: "\(command) failed: \(e["desc"] ?? e)")
            }
            if let r = o["return"] { return r }
            throw QMPError(socket: path, problem: "unexpected answer to \(command): \(o)")
        }
    }

    /// The run state ("running", "paused", "inmigrate", "postmigrate", ...).
    public func status() throws -> String {
        guard let r = try execute("query-status") as? [String: Any], let s = r["status"] as? String else {
            throw QMPError(socket: path, problem: "query-status answered without a status")
        }
        return s
    }

    /// The migration state ("active", "completed", "failed", ... or "none").
    public func migrationStatus() throws -> (status: String, info: [String: Any]) {
        let r = try execute("query-migrate") as? [String: Any] ?? [:]
        return ((r["status"] as? String) ?? "none", r)
    }

    private func readObject() throws -> [String: Any] {
        while true {
            if let nl = buffer.firstIndex(of: 10) {
                let line = Array(buffer[..<nl])
                buffer.removeSubrange(...nl)
                if line.isEmpty { continue }
                guard let o = try? JSONSerialization.jsonObject(with: Data(line)) as? [String: Any] else {
                    throw QMPError(socket: path, problem: "not a JSON object: \(String(decoding: line, as: UTF8.self))")
                }
                return o
            }
            let chunk: [UInt8]
            do { chunk = try SocketDescriptor(rawValue: fd, peer: path).receive(upTo: 4096) } catch {
                throw QMPError(socket: path, problem: "read failed: \(String(cString: strerror(error.errno)))")
            }
            guard !chunk.isEmpty else { throw QMPError(socket: path, problem: "QEMU closed the socket") }
            buffer += chunk
        }
    }
}
