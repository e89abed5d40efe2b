import Foundation
import Synchronization
import RDMAPaxos

/// `plover node` processes on loopback (three by default), each with its own config, data dir
/// and log file. Used by `plover demo`, `plover bench consensus` and the end-to-end tests.
///
/// Any executable that takes `node --config FILE` and reads a replica config (`NodeConfig`) can
/// run the replicas: `plover` itself, or a service's own server built on `ReplicaServer`. Not
/// thread-safe: drive one cluster from one thread.
public final class DemoCluster {
    /// The `[timing]` table of every replica's config.
    public struct Timing: Sendable {
        /// Milliseconds per tick (`tick_ms`).
        public var tickMilliseconds = 10
        /// Ticks without a leader's heartbeat before a follower stands for election.
        public var electionTimeoutTicks = 15
        /// Ticks between a leader's heartbeats.
        public var heartbeatTicks = 2
        /// Ticks a stable-log write may take before the replica counts its disk as stalled.
        public var diskStallTicks = 100

        /// A timing table; the defaults are 10 ms ticks, election after 15 ticks, heartbeats every
        /// 2 and a disk stall after 100.
        public init(tickMilliseconds: Int = 10, electionTimeoutTicks: Int = 15, heartbeatTicks: Int = 2, diskStallTicks: Int = 100) {
            self.tickMilliseconds = tickMilliseconds
            self.electionTimeoutTicks = electionTimeoutTicks
            self.heartbeatTicks = heartbeatTicks
            self.diskStallTicks = diskStallTicks
        }
    }

    /// The directory holding every replica's config (`node-N.toml`), log (`node-N.log`) and data (`data/N`).
    public let root: String
    /// The replicas' durability: `fsync`, `async` or `memory`.
    public let durability: String
    /// The `[timing]` table every replica gets.
    public let timing: Timing
    /// Each member's client address (`host:port`), for `NodeClient`.
    public internal(set) var endpoints: [NodeID: String] = [:]
    /// Each member's peer (replication) address.
    public internal(set) var peers: [NodeID: String] = [:]
    var processes: [NodeID: Process] = [:]
    /// The members, in id order (1...replicas, plus joiners).
    public internal(set) var ids: [NodeID]
    /// When set, node 3 of three is a witness (PLOVER's shape: primary 1, backup 2, witness 3).
    let witness: Bool

    /// The `plover` executable that runs the replicas.
    let executable: String
    /// TOML tables appended to every replica's config (e.g. a `[limits]` table for a test).
    let extraConfig: String
    /// Words put before `plover node …` when starting a replica, e.g. `ip netns exec NAME`
    /// (which execs in place, so the process started is the replica itself).
    let launchPrefix: (NodeID) -> [String]
    /// Replicas started from now on get a disk-stall failpoint (`stallDisk`), for tests.
    var diskStallFailpoints = false

    /// Writes a config for each of `replicas` members (ids 1...replicas, free loopback ports, a
    /// fresh cluster key) under `root`; starts nothing. `executable node --config FILE` runs a
    /// replica; `extraConfig` is appended to every config.
    public init(root: String, durability: String, witness: Bool = false, replicas: Int = 3, timing: Timing = Timing(),
         executable: String = selfExecutable(), extraConfig: String = "",
         hosts: [NodeID: String] = [:], launchPrefix: @escaping (NodeID) -> [String] = { _ in [] }) throws {
        precondition(replicas >= 1 && replicas <= 9, "a demo cluster has 1 to 9 replicas")
        precondition(!witness || replicas == 3, "the witness shape has exactly three replicas")
        self.ids = (1...replicas).map { NodeID($0) }
        self.executable = executable
        self.root = root
        self.durability = durability
        self.witness = witness
        self.timing = timing
        self.extraConfig = extraConfig
        self.launchPrefix = launchPrefix
        let fm = FileManager.default
        try fm.createDirectory(atPath: root + "/data", withIntermediateDirectories: true)
        writeFreshClusterKey(to: root + "/cluster.key")
        for id in ids {
            // Ports are picked free on this host's loopback; in a namespace of its own a replica's
            // address is unused anyway.
            let host = hosts[id] ?? "127.0.0.1"
            peers[id] = "\(host):\(try freePort())"
            endpoints[id] = "\(host):\(try freePort())"
        }
        for id in ids { try config(for: id).write(toFile: configPath(id), atomically: true, encoding: .utf8) }
    }

    /// Where replica `id`'s config is.
    public func configPath(_ id: NodeID) -> String { root + "/node-\(id).toml" }

    /// A replica's config up to its `[timing]` table (`what` says whose replica it is).
    func configHead(for id: NodeID, _ what: String) -> String {
        """
            # Replica \(id) \(what).
            id = \(id)
            data_dir = "data/\(id)"
            durability = "\(durability)"
            fabric = "auto"
            cluster_key_file = "cluster.key"

            [timing]
            tick_ms = \(timing.tickMilliseconds)
            election_timeout_ticks = \(timing.electionTimeoutTicks)
            heartbeat_ticks = \(timing.heartbeatTicks)
            disk_stall_ticks = \(timing.diskStallTicks)

            """
    }

    func config(for id: NodeID) -> String {
        var s = configHead(for: id, "of the plover demo cluster")
        for m in ids {
            s += """

                [[members]]
                id = \(m)
                address = "\(peers[m]!)"
                client_address = "\(endpoints[m]!)"
                role = "\(witness && m == 3 ? "witness" : "voter")"
                priority = \(witness ? [1: 2, 2: 1, 3: 0][m]! : 1)

                """
        }
        return s + (extraConfig.isEmpty ? "" : "\n" + extraConfig)
    }

    /// Starts every member's process.
    public func startAll() throws { for id in ids { try start(id) } }

    /// Starts replica `id`; `arguments` go to `plover node` after its config (`--recover`, say).
    public func start(_ id: NodeID, arguments: [String] = []) throws {
        let command = launchPrefix(id) + [executable, "node", "--config", configPath(id)] + arguments
        let p = try ChildProcesses.spawn(command[0], Array(command.dropFirst()), log: logPath(id),
                                         environment: diskStallFailpoints ? ["PLOVER_FAULT_DISK_STALL_FILE": stallFile(id)] : [:])
        processes[id] = p
    }

    /// Pauses (SIGSTOP) or resumes (SIGCONT) a replica process: an isolated, then returning, node.
    public func pause(_ id: NodeID, _ paused: Bool) {
        if let p = processes[id] { Glibc.kill(p.processIdentifier, paused ? SIGSTOP : SIGCONT) }
    }

    /// One replica's status as key/value pairs (empty if unreachable).
    public func status(_ id: NodeID) -> [String: String] {
        guard let text = try? NodeClient(endpoints: endpoints, timeout: .milliseconds(500)).status(of: id) else { return [:] }
        return Dictionary(text.split(separator: "\n").compactMap { line in
            line.firstIndex(of: "=").map { (String(line[..<$0]), String(line[line.index(after: $0)...])) }
        }, uniquingKeysWith: { a, _ in a })
    }

    /// Stops a replica the clean way (SIGTERM) and waits for it to exit.
    public func stop(_ id: NodeID) {
        guard let p = processes.removeValue(forKey: id) else { return }
        if p.isRunning {
            p.terminate()
            Glibc.kill(p.processIdentifier, SIGCONT)
        }
        p.waitUntilExit()
    }

    /// Replica `id`'s data directory (its stable log, for `paxos-log`).
    public func dataDir(_ id: NodeID) -> String { root + "/data/\(id)" }
    func stallFile(_ id: NodeID) -> String { root + "/stall-disk-\(id)" }

    /// Stalls (or releases) replica `id`'s stable log: no write completes while stalled. Needs
    /// `diskStallFailpoints` set before the replica started.
    func stallDisk(_ id: NodeID, _ stalled: Bool) {
        if stalled {
            _ = FileManager.default.createFile(atPath: stallFile(id), contents: nil)
        } else {
            try? FileManager.default.removeItem(atPath: stallFile(id))
        }
    }
    /// Where replica `id`'s standard output and error go.
    public func logPath(_ id: NodeID) -> String { root + "/node-\(id).log" }

    /// Kills replica `id` with SIGKILL (a crash) and waits for it to exit.
    public func kill(_ id: NodeID) {
        guard let p = processes.removeValue(forKey: id) else { return }
        Glibc.kill(p.processIdentifier, SIGKILL)
        p.waitUntilExit()
        ChildProcesses.unregister(p.processIdentifier)
    }

    /// Stops every running replica (SIGTERM, then SIGKILL after 5 s) and waits for them.
    public func stopAll() {
        for (_, p) in processes where p.isRunning {
            p.terminate()
            Glibc.kill(p.processIdentifier, SIGCONT)  // a paused replica must run to see SIGTERM
        }
        for (_, p) in processes { ChildProcesses.stop(p) }
        processes = [:]
    }

    /// Polls the running replicas until one reports itself leader (other than `excluding`) and
    /// returns it; throws after `timeout`, with each replica's last log lines.
    public func waitForLeader(excluding: NodeID?, timeout: Duration = .seconds(20)) throws -> NodeID {
        let deadline = ContinuousClock.now + timeout
        let c = NodeClient(endpoints: endpoints, timeout: .milliseconds(500))
        while ContinuousClock.now < deadline {
            for id in processes.keys.sorted() where id != excluding {
                if let s = try? c.status(of: id), s.contains("role=leader") { return id }
            }
            Thread.sleep(forTimeInterval: 0.02)
        }
        throw CLIError("no leader elected within \(timeout); see \(root)/node-N.log\n" + logTails())
    }

    /// The last lines of each replica's log, for failure messages.
    public func logTails(lines: Int = 6) -> String {
        ids.map { id in
            let text = (try? String(contentsOfFile: root + "/node-\(id).log", encoding: .utf8)) ?? "(no log)"
            return "node \(id) (\(processes[id].map { $0.isRunning ? "running" : "exited \($0.terminationStatus)" } ?? "not started")):\n"
                + text.split(separator: "\n").suffix(lines).map { "  " + $0 }.joined(separator: "\n")
        }.joined(separator: "\n")
    }

    /// Waits until every running replica applied everything the leader committed.
    public func waitConverged(timeout: Duration = .seconds(30)) throws {
        let deadline = ContinuousClock.now + timeout
        let c = NodeClient(endpoints: endpoints, timeout: .milliseconds(500))
        while ContinuousClock.now < deadline {
            // A witness applies nothing: it has converged when it holds the whole log.
            // A replica still recovering lost state has not converged either.
            let applied = processes.keys.compactMap { id -> String? in
                guard let s = try? c.status(of: id), !s.contains("role=recovering") else { return nil }
                let key = s.contains("role=witness") ? "last_index=" : "applied_index="
                return s.split(separator: "\n").first { $0.hasPrefix(key) }.map { String($0.dropFirst(key.count)) }
            }
            if applied.count == processes.count, Set(applied).count == 1 { return }
            Thread.sleep(forTimeInterval: 0.05)
        }
        throw CLIError("replicas did not converge within \(timeout)")
    }
}

/// Writes a fresh random cluster key (32 bytes as hex), readable by the owner only.
func writeFreshClusterKey(to path: String) {
    let hex = (0..<32).map { _ in String(format: "%02x", UInt8.random(in: 0...255)) }.joined()
    _ = FileManager.default.createFile(atPath: path, contents: Data((hex + "\n").utf8), attributes: [.posixPermissions: 0o600])
}

/// Ports `freePort()` already returned in this process: the kernel may hand a just-released
/// port out again at once, and two members of one cluster must not get the same one.
private let portsHandedOut = Mutex<Set<Int>>([])

/// A loopback port that was free when we looked and that this process has not handed out before.
public func freePort() throws -> Int {
    for _ in 0..<64 {
        let port = try kernelPickedPort()
        if portsHandedOut.withLock({ $0.insert(port).inserted }) { return port }
    }
    throw CLIError("cannot find a free loopback port that was not handed out already")
}

private func kernelPickedPort() throws -> Int {
    let s = try SocketDescriptor.listen(on: HostPort(host: "127.0.0.1", port: 0))
    defer { s.close() }
    return s.localPort
}

/// This executable's path, so the demo can start replicas of itself.
@usableFromInline func selfExecutable() -> String {
    (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
}
