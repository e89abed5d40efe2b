// The operator's QMP socket (`run_dir/qmp.sock`). QEMU's own QMP session belongs to the replica,
// so a tool that opens QEMU's socket hangs; this one speaks QMP to the operator, answers the
// read-only `query-*` commands from the VM clients see, and refuses everything else with an
// error naming the command: `stop`, `cont`, `migrate`, `system_reset`, `quit` and the like would
// break the VM's protection or its replication.

#if canImport(Glibc)
import Glibc
#endif
import Foundation
import RDMAPaxos

/// A QMP server for operators in front of the replica's current QEMU.
final class QMPOperatorSocket: @unchecked Sendable {
    // @unchecked Sendable: `listener` is immutable; each connection is served by its own thread.
    let path: String
    private let listener: Int32
    /// The QMP client of the QEMU that is the VM now (nil: none running).
    private let current: @Sendable () -> QMPClient?

    init(path: String, current: @escaping @Sendable () -> QMPClient?) throws {
        self.path = path
        self.current = current
        unlink(path)
        listener = try Sockets.listenUnix(path)
        Sockets.serve(listener, name: "plover-vm-qmp") { [self] fd in serve(fd) }
    }

    func stop() {
        shutdown(listener, Int32(SHUT_RDWR))
        unlink(path)
    }

    /// The answer to one request object, as QMP would give it.
    func answer(_ request: [String: Any]) -> [String: Any] {
        let id = request["id"]
        func reply(_ body: [String: Any]) -> [String: Any] {
            var r = body
            if let id { r["id"] = id }
            return r
        }
        func failure(_ text: String) -> [String: Any] { reply(["error": ["class": "GenericError", "desc": text]]) }
        guard let command = request["execute"] as? String else { return failure("plover: a request needs \"execute\"") }
        if command == "qmp_capabilities" { return reply(["return": [String: Any]()]) }
        guard command.hasPrefix("query-") else {
            return failure("plover: '\(command)' is refused: the VM replica drives this QEMU, and only read-only query-* commands are allowed here (stopping, resuming, migrating or resetting it would break replication; use `plover vm switchover` to move the VM)")
        }
        guard let qmp = current() else { return failure("plover: no QEMU is running in this replica right now") }
        do {
            return reply(["return": try qmp.execute(command, request["arguments"] as? [String: Any] ?? [:])])
        } catch let e as QMPError {
            return failure(e.problem)
        } catch {
            return failure("\(error)")
        }
    }

    private func serve(_ fd: Int32) {
        defer { close(fd) }
        let greeting: [String: Any] = ["QMP": ["version": ["package": "plover VM replica"], "capabilities": [String]()]]
        guard send(greeting, to: fd) else { return }
        var pending: [UInt8] = []
        let client = SocketDescriptor(rawValue: fd, peer: "a client of \(path)")
        while let chunk = try? client.receive(upTo: 4096), !chunk.isEmpty {
            pending += chunk
            guard pending.count <= 1 << 20 else {
                _ = send(["error": ["class": "GenericError", "desc": "plover: request longer than 1 MiB"]], to: fd)
                return
            }
            while let nl = pending.firstIndex(of: 10) {
                let line = Array(pending[..<nl])
                pending.removeSubrange(...nl)
                if line.allSatisfy({ $0 == 32 || $0 == 13 || $0 == 9 }) { continue }
                let object = (try? JSONSerialization.jsonObject(with: Data(line))) as? [String: Any]
                let out = object.map(answer) ?? ["error": ["class": "GenericError", "desc": "plover: not a JSON object"]]
                guard send(out, to: fd) else { return }
            }
        }
    }

    private func send(_ object: [String: Any], to fd: Int32) -> Bool {
        guard let data = try? JSONSerialization.data(withJSONObject: object) else { return false }
        return Sockets.writeAll(fd, Array(data) + [10])
    }
}
