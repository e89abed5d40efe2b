import Foundation
import RDMAPaxos

/// PLOVER's shape on loopback: `plover vm primary` (node 1), `plover vm backup` (node 2) and
/// `plover vm witness` (node 3), each with its own config, run directory and log file. Used by
/// the VM end-to-end test and `plover bench vm`.
final class VMCluster {
    let root: String
    let executable: String
    let kernel: String
    let initrd: String
    /// Distinguishes this cluster's RAM files in /dev/shm.
    let tag = String(UInt32.random(in: 0...UInt32.max), radix: 16)
    var peers: [NodeID: String] = [:]
    var clients: [NodeID: String] = [:]
    var fronts: [NodeID: String] = [:]
    var syncs: [NodeID: String] = [:]
    var migrations: [NodeID: String] = [:]
    var processes: [NodeID: Process] = [:]
    /// Extra lines for both VM replicas' [vm] tables (e.g. "record_ram_digest = true"); `{id}`
    /// in them becomes the replica's node id (`disk_image = "disk-{id}.img"`).
    let vmExtra: String
    /// Each VM replica's tap device (`network = "tap"`; no fronts then), or nil for the line fronts.
    let taps: [NodeID: String]?

    init(root: String, kernel: String, initrd: String, vmExtra: String = "", taps: [NodeID: String]? = nil,
         executable: String = selfExecutable()) throws {
        self.taps = taps
        self.root = root
        self.kernel = kernel
        self.initrd = initrd
        self.executable = executable
        self.vmExtra = vmExtra
        let fm = FileManager.default
        try fm.createDirectory(atPath: root, withIntermediateDirectories: true)
        writeFreshClusterKey(to: root + "/cluster.key")
        for id: NodeID in [1, 2, 3] {
            peers[id] = "127.0.0.1:\(try freePort())"
            clients[id] = "127.0.0.1:\(try freePort())"
        }
        for id: NodeID in [1, 2] {
            if taps == nil { fronts[id] = "127.0.0.1:\(try freePort())" }
            syncs[id] = "127.0.0.1:\(try freePort())"
            migrations[id] = "127.0.0.1:\(try freePort())"
        }
        for id: NodeID in [1, 2, 3] { try config(for: id).write(toFile: configPath(id), atomically: true, encoding: .utf8) }
    }

    func configPath(_ id: NodeID) -> String { root + "/vm-\(id).toml" }
    func logPath(_ id: NodeID) -> String { root + "/vm-\(id).log" }
    func runDir(_ id: NodeID) -> String { root + "/run-\(id)" }
    func ramFile(_ id: NodeID) -> String { "/dev/shm/plover-vm-\(tag)-\(id).ram" }
    static let roles: [NodeID: String] = [1: "primary", 2: "backup", 3: "witness"]

    func config(for id: NodeID) -> String {
        var s = """
            # VM replica \(id) (\(Self.roles[id]!)) of a plover VM cluster.
            id = \(id)
            data_dir = "data-\(id)"
            durability = "async"
            fabric = "tcp"
            cluster_key_file = "cluster.key"

            [timing]
            tick_ms = 10
            election_timeout_ticks = 60
            heartbeat_ticks = 2

            """
        for m: NodeID in [1, 2, 3] {
            s += """
                [[members]]
                id = \(m)
                address = "\(peers[m]!)"
                client_address = "\(clients[m]!)"
                role = "\(m == 3 ? "witness" : "voter")"
                priority = \(m == 3 ? 0 : 1)

                """
        }
        if id != 3 {
            let peer: NodeID = id == 1 ? 2 : 1
            let network = taps.map { "network = \"tap\"\ntap_name = \"\($0[id]!)\"" }
                ?? "front_address = \"\(fronts[id]!)\"\npeer_front_address = \"\(fronts[peer]!)\""
            s += """
                [vm]
                kernel = "\(kernel)"
                initrd = "\(initrd)"
                ram_file = "\(ramFile(id))"
                run_dir = "run-\(id)"
                \(network)
                sync_address = "\(syncs[id]!)"
                migration_address = "\(migrations[id]!)"
                peer = \(peer)
                peer_sync_address = "\(syncs[peer]!)"
                peer_migration_address = "\(migrations[peer]!)"
                \(vmExtra.replacingOccurrences(of: "{id}", with: "\(id)"))

                """
        }
        return s
    }

    /// Starts replica `id`; `environment` adds variables (a checkpoint failpoint, say).
    func start(_ id: NodeID, environment: [String: String] = [:]) throws {
        let p = try ChildProcesses.spawn(executable, ["vm", Self.roles[id]!, "--config", configPath(id)], log: logPath(id), truncate: true,
                                         environment: environment)
        processes[id] = p
    }

    /// Whether replica `id`'s process has exited (a failpoint killed it, say); reaps it if so.
    func hasExited(_ id: NodeID) -> Bool {
        guard let p = processes[id] else { return true }
        guard !p.isRunning else { return false }
        processes[id] = nil
        ChildProcesses.unregister(p.processIdentifier)
        killQEMUs(of: id)
        return true
    }

    /// Starts replica `id` again after `kill(id)`: same config, data dir and run dir; its log
    /// file is appended to.
    func restart(_ id: NodeID, environment: [String: String] = [:]) throws {
        let p = try ChildProcesses.spawn(executable, ["vm", Self.roles[id]!, "--config", configPath(id)], log: logPath(id), truncate: false,
                                         environment: environment)
        processes[id] = p
    }

    func startAll() throws { for id: NodeID in [1, 2, 3] { try start(id) } }

    /// The pids of the QEMUs replica `id` started (from their -pidfile files), which are
    /// removed as they are read: each QEMU is killed once, never a later process with its pid.
    func takeQEMUPIDs(_ id: NodeID) -> [pid_t] {
        let dir = runDir(id)
        let files = (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []
        return files.filter { $0.hasSuffix(".pid") }.compactMap { f in
            defer { unlink(dir + "/" + f) }
            return (try? String(contentsOfFile: dir + "/" + f, encoding: .utf8)).flatMap { pid_t($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
        }
    }

    /// Stops replica `id` as an operator would (SIGTERM, then SIGKILL after 5 s).
    func stop(_ id: NodeID) {
        if let p = processes.removeValue(forKey: id) { ChildProcesses.stop(p) }
    }

    /// kill -9 the replica and every QEMU it started.
    func kill(_ id: NodeID) {
        if let p = processes.removeValue(forKey: id) {
            Glibc.kill(p.processIdentifier, SIGKILL)
            p.waitUntilExit()
            ChildProcesses.unregister(p.processIdentifier)
        }
        killQEMUs(of: id)
    }

    /// kill -9 every QEMU replica `id` started; the replica process lives on.
    func killQEMUs(of id: NodeID) {
        for pid in takeQEMUPIDs(id) { Glibc.kill(pid, SIGKILL) }
    }

    /// Sends `signal` to replica `id` and every QEMU it runs (SIGSTOP/SIGCONT: a paused host).
    func signal(_ id: NodeID, _ signal: Int32) {
        if let p = processes[id] { Glibc.kill(p.processIdentifier, signal) }
        let dir = runDir(id)
        for f in (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? [] where f.hasSuffix(".pid") {
            if let text = try? String(contentsOfFile: dir + "/" + f, encoding: .utf8), let pid = pid_t(text.trimmingCharacters(in: .whitespacesAndNewlines)) {
                Glibc.kill(pid, signal)
            }
        }
    }

    /// Stops everything (SIGTERM, then SIGKILL), kills leftover QEMUs, removes the RAM files.
    func stopAll() {
        for (_, p) in processes { ChildProcesses.stop(p) }
        processes = [:]
        for id: NodeID in [1, 2] {
            for pid in takeQEMUPIDs(id) { Glibc.kill(pid, SIGKILL) }
            unlink(ramFile(id))
        }
    }

    /// Kills the QEMUs recorded in each run directory and removes the RAM files (for an
    /// interrupt handler, which cannot hold the cluster).
    static func killQEMUs(_ dirsAndRAM: [(String, String)]) {
        for (dir, ram) in dirsAndRAM {
            for f in (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? [] where f.hasSuffix(".pid") {
                if let s = try? String(contentsOfFile: dir + "/" + f, encoding: .utf8), let pid = pid_t(s.trimmingCharacters(in: .whitespacesAndNewlines)) {
                    Glibc.kill(pid, SIGKILL)
                }
                unlink(dir + "/" + f)
            }
            unlink(ram)
        }
    }

    /// Parsed lines of replica `id`'s checkpoints.log.
    func checkpoints(_ id: NodeID) -> [[String: String]] {
        let text = (try? String(contentsOfFile: runDir(id) + "/checkpoints.log", encoding: .utf8)) ?? ""
        return text.split(separator: "\n").map { whole -> [String: String] in
            var d: [String: String] = [:]
            // The error, quoted and holding spaces, is the last field.
            var line = whole[...]
            if let e = line.range(of: " error=\"") {
                d["error"] = String(line[e.upperBound...].dropLast(line.hasSuffix("\"") ? 1 : 0))
                line = line[..<e.lowerBound]
            }
            for f in line.split(separator: " ") {
                guard let eq = f.firstIndex(of: "=") else { continue }
                d[String(f[..<eq])] = String(f[eq...].dropFirst())
            }
            return d
        }
    }

    func logTails(lines: Int = 8) -> String {
        [1, 2, 3].map { (id: NodeID) in
            let text = (try? String(contentsOfFile: logPath(id), encoding: .utf8)) ?? "(no log)"
            return "vm \(id):\n" + text.split(separator: "\n").suffix(lines).map { "  " + $0 }.joined(separator: "\n")
        }.joined(separator: "\n")
    }
}

/// A client of the VM's counter service through the replicas' fronts: sends "INC|GET name seq",
/// waits for the answer "name seq value", resends (same seq) on silence and moves to the next
/// front when one refuses or disappears.
final class CounterClient {
    let name: String
    let fronts: [String]
    /// `fronts`, parsed once.
    let addresses: [HostPort]
    var current = 0
    var socket: SocketDescriptor?
    var buffer: [UInt8] = []
    var seq: UInt64 = 0
    /// Resends that were needed (silence or a refused front).
    var retries = 0

    init(name: String, fronts: [String]) {
        self.name = name
        self.fronts = fronts
        addresses = fronts.map { a in
            guard let hp = HostPort(parsing: a) else { preconditionFailure("front address \"\(a)\" is not host:port") }
            return hp
        }
    }

    deinit { socket?.close() }

    /// Sends the next request and returns the counter value in its answer.
    /// `extra` follows the sequence number (PUT's size in KiB).
    func request(_ op: String = "INC", extra: String = "", timeout: Duration = .seconds(60), resendAfter: Duration = .seconds(3)) throws -> UInt64 {
        seq += 1
        let line = "\(op) \(name) \(seq)\(extra)"
        let deadline = ContinuousClock.now + timeout
        var silent = 0
        while ContinuousClock.now < deadline {
            if socket == nil { connectNext() }
            let wasConnected = socket != nil
            if socket != nil, write(line + "\n"), let v = awaitAnswer(until: min(deadline, ContinuousClock.now + resendAfter)) { return v }
            retries += 1
            // A front that neither answers nor hangs up (its host paused) is left after two tries.
            if wasConnected && socket != nil {
                silent += 1
                if silent >= 2 {
                    silent = 0
                    dropConnection()
                }
            } else {
                silent = 0
            }
        }
        throw CLIError("no answer to \"\(line)\" within \(timeout) from fronts \(fronts)")
    }

    func connectNext() {
        for _ in fronts.indices {
            if let s = try? SocketDescriptor.connect(to: addresses[current]) {
                socket = s
                buffer = []
                return
            }
            current = (current + 1) % fronts.count
        }
        Thread.sleep(forTimeInterval: 0.2)
    }

    func dropConnection() {
        socket?.close()
        socket = nil
        current = (current + 1) % fronts.count
    }

    func write(_ s: String) -> Bool {
        let ok = (try? socket?.send(Array(s.utf8))) != nil
        if !ok { dropConnection() }
        return ok
    }

    /// The value in this request's answer; nil on silence until `until`, on an error line
    /// (then the next front is tried) or when the front disappears.
    func awaitAnswer(until: ContinuousClock.Instant) -> UInt64? {
        let prefix = "\(name) \(seq) "
        while true {
            while let nl = buffer.firstIndex(of: 10) {
                let line = String(decoding: buffer[..<nl], as: UTF8.self)
                buffer.removeSubrange(...nl)
                if line.hasPrefix("ERR") {
                    dropConnection()
                    Thread.sleep(forTimeInterval: 0.2)
                    return nil
                }
                if line.hasPrefix(prefix), let v = UInt64(line.dropFirst(prefix.count)) { return v }
            }
            guard let socket, until > ContinuousClock.now else { return nil }
            let chunk: [UInt8]
            do { chunk = try socket.receive(upTo: 4096, until: until) } catch {
                if error.errno != ETIMEDOUT { dropConnection() }
                return nil
            }
            guard !chunk.isEmpty else { dropConnection(); return nil }
            buffer += chunk
        }
    }
}
