import Foundation

/// A 3-member etcd cluster on loopback that the consensus benchmark starts and stops itself:
/// the `etcd` binary from Debian's etcd-server, one data directory per member under `root`,
/// ports handed out by the kernel, output in `root/eN.log`.
final class EtcdCluster {
    let binary: String
    let root: String
    let names = ["e1", "e2", "e3"]
    private(set) var clientPorts: [Int] = []
    private(set) var peerPorts: [Int] = []
    private var processes: [Process] = []

    /// The etcd executable on PATH, or an error that says how to get it.
    static func locate() throws -> String {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"
        for dir in path.split(separator: ":") where FileManager.default.isExecutableFile(atPath: "\(dir)/etcd") {
            return "\(dir)/etcd"
        }
        throw CLIError("""
            etcd not found on PATH. The consensus benchmark compares against etcd from Debian's \
            etcd-server package: run `./scripts/install-deps.sh etcd-server etcd-client` \
            (or `make bench-consensus`, which does), or pass --systems plover-fsync,plover-memory.
            """)
    }

    /// "3.4.23", from `etcd --version`.
    static func version(of binary: String) -> String {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: binary)
        p.arguments = ["--version"]
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = FileHandle.nullDevice
        guard (try? p.run()) != nil else { return "unknown" }
        let text = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        let line = text.split(separator: "\n").first { $0.hasPrefix("etcd Version:") }
        return line.map { $0.dropFirst("etcd Version:".count).trimmingCharacters(in: .whitespaces) } ?? "unknown"
    }

    init(binary: String, root: String) throws {
        self.binary = binary
        self.root = root
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
        for _ in names {
            clientPorts.append(try freePort())
            peerPorts.append(try freePort())
        }
    }

    func start() throws {
        let cluster = names.indices.map { "\(names[$0])=http://127.0.0.1:\(peerPorts[$0])" }.joined(separator: ",")
        for i in names.indices {
            let arguments = [
                "--name", names[i], "--data-dir", "\(root)/\(names[i]).etcd",
                "--listen-client-urls", "http://127.0.0.1:\(clientPorts[i])",
                "--advertise-client-urls", "http://127.0.0.1:\(clientPorts[i])",
                "--listen-peer-urls", "http://127.0.0.1:\(peerPorts[i])",
                "--initial-advertise-peer-urls", "http://127.0.0.1:\(peerPorts[i])",
                "--initial-cluster", cluster, "--initial-cluster-token", "plover-bench-\(getpid())",
                "--initial-cluster-state", "new", "--logger", "zap", "--log-level", "warn",
            ]
            let p = try ChildProcesses.spawn(binary, arguments, log: "\(root)/\(names[i]).log", truncate: true)
            processes.append(p)
        }
    }

    /// Polls `/v3/maintenance/status` on every member until one says it is the leader; returns
    /// that member's client port.
    func waitForLeader(timeout: Duration = .seconds(30)) throws -> Int {
        let deadline = ContinuousClock.now + timeout
        var last = "no answer yet"
        while ContinuousClock.now < deadline {
            if let dead = processes.firstIndex(where: { !$0.isRunning }) {
                throw CLIError("etcd member \(names[dead]) exited (status \(processes[dead].terminationStatus)); see \(root)/\(names[dead]).log")
            }
            for i in names.indices {
                let c = HTTPConnection(host: "127.0.0.1", port: clientPorts[i], timeout: .seconds(1))
                do {
                    let (status, body) = try c.post("/v3/maintenance/status", body: Array("{}".utf8))
                    let json = try JSONSerialization.jsonObject(with: Data(body)) as? [String: Any]
                    let header = json?["header"] as? [String: Any]
                    // uint64 fields come as JSON strings from the gateway.
                    let me = header?["member_id"].map { "\($0)" }
                    let leader = json?["leader"].map { "\($0)" }
                    if status == 200, let me, let leader, leader == me { return clientPorts[i] }
                    last = "member \(names[i]): HTTP \(status), leader \(leader ?? "none")"
                } catch {
                    last = "member \(names[i]): \(error)"
                }
            }
            Thread.sleep(forTimeInterval: 0.1)
        }
        throw CLIError("etcd elected no leader within \(timeout) (\(last)); see \(root)/eN.log")
    }

    func stop() {
        for p in processes where p.isRunning { p.terminate() }
        for p in processes { ChildProcesses.stop(p) }
        processes = []
    }
}
