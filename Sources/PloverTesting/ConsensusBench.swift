import ArgumentParser
import Foundation
import RDMAPaxos
import Synchronization

/// `plover bench consensus`: puts/s and put latency of a 3-replica plover cluster (fsync and
/// memory durability) next to a 3-member etcd cluster, all on loopback, driven by the same
/// closed-loop client; plus one loopback TCP round trip as the floor. See
/// benchmarks/consensus/README.md.
package struct ConsensusBench: ParsableCommand {
    package static let configuration = CommandConfiguration(
        commandName: "consensus",
        abstract: "Benchmark 3 plover replicas against a 3-member etcd cluster on loopback.")

    @Option(help: "Systems to measure, comma-separated: \(BenchSystem.allCases.map(\.rawValue).joined(separator: ", ")).")
    var systems: String = BenchSystem.allCases.map(\.rawValue).joined(separator: ",")
    @Option(help: "Client thread counts, comma-separated.") var clients: String = "1,4,16,64"
    @Option(help: "Value sizes in bytes, comma-separated.") var values: String = "64,4096"
    @Option(help: "Measured seconds per point.") var seconds: Double = 4
    @Option(help: "Cycle over this many keys instead of a fresh key per put (bounds the state for long runs).") var keySpace: Int?
    @Option(help: "Unmeasured seconds before each point.") var warmup: Double = 0.5
    @Option(help: "Directory for the disk-backed data dirs (default: a new temporary directory; deleted afterwards).")
    var dir: String?
    @Option(help: "Where tmpfs-backed etcd data goes (etcd-tmpfs).") var tmpfs: String = "/dev/shm"
    @Option(help: "Write the markdown results here as well as to stdout.") var out: String?
    @Option(help: "Write an SVG plot here.") var svg: String?
    @Flag(help: "Keep data dirs and node/etcd logs.") var keep = false
    @Option(help: "How plover's clients reach the cluster: pipelined (one async PipelinedNodeClient shared by every client task, one connection) or threads (a blocking NodeClient and a connection per client thread, as etcd's clients get).")
    var ploverClient: PloverClientKind = .pipelined

    package func validate() throws {
        for s in list(systems) where BenchSystem(rawValue: s) == nil {
            throw ValidationError("unknown system \(s); known: \(BenchSystem.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        guard !ints(clients).isEmpty, ints(clients).allSatisfy({ (1...512).contains($0) }) else { throw ValidationError("--clients: counts in 1...512") }
        guard !ints(values).isEmpty, ints(values).allSatisfy({ (1...(1 << 20)).contains($0) }) else { throw ValidationError("--values: sizes in 1...1048576") }
        guard seconds > 0, warmup >= 0 else { throw ValidationError("--seconds must be > 0 and --warmup >= 0") }
    }

    package init() {}

    package func run() throws {
        let chosen = list(systems).compactMap(BenchSystem.init(rawValue:))
        // Missing etcd is a clear error before anything starts.
        let etcd = chosen.contains(where: \.isEtcd) ? try EtcdCluster.locate() : nil
        let etcdVersion = etcd.map(EtcdCluster.version(of:)) ?? "–"
        let root = dir ?? FileManager.default.temporaryDirectory.appendingPathComponent("plover-consensus-\(getpid())").path
        let tmpfsRoot = "\(tmpfs)/plover-consensus-\(getpid())"
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
        let keep = self.keep
        let cleanup: @Sendable () -> Void = {
            guard !keep else { return }
            try? FileManager.default.removeItem(atPath: root)
            try? FileManager.default.removeItem(atPath: tmpfsRoot)
        }
        ChildProcesses.killOnInterrupt(cleanup: cleanup)
        defer {
            ChildProcesses.killAll()
            cleanup()
        }
        let machine = MachineDescription.current(dataDir: root)

        say("loopback TCP round trip (64 B ping-pong between two processes, and between two threads)")
        let rtt = try LoopbackRoundTrip.measure(.process)
        let rttThreads = try LoopbackRoundTrip.measure(.thread)
        say(String(format: "  processes: p50 %.1f µs, p99 %.1f µs; threads: p50 %.1f µs", rtt.p50Micros, rtt.p99Micros, rttThreads.p50Micros))
        say("64 B append + fdatasync, three writers in the data directory")
        let fsync = try FdatasyncProbe.measure(dir: root + "/fdatasync-probe")
        say(String(format: "  p50 %.1f µs, p99 %.1f µs (%d syncs)", fsync.p50Micros, fsync.p99Micros, fsync.count))

        var rows: [ConsensusRow] = []
        var probes: PloverProbes?
        for system in chosen {
            let dataRoot = system == .etcdTmpfs ? tmpfsRoot : "\(root)/\(system.rawValue)"
            rows += try measure(system, dataRoot: dataRoot, etcdBinary: etcd, probes: &probes)
            if !keep { try? FileManager.default.removeItem(atPath: dataRoot) }
        }

        let report = ConsensusReport(rows: rows, roundTrip: rtt, roundTripThreads: rttThreads, fdatasync: fsync, probes: probes, machine: machine, etcdVersion: etcdVersion,
                                     timing: Self.ploverTiming, seconds: seconds, warmup: warmup, command: commandLine(), ploverClient: ploverClient)
        let text = report.markdown()
        print(text)
        if let out { try text.write(toFile: out, atomically: true, encoding: .utf8) }
        if let svg { try report.svg().write(toFile: svg, atomically: true, encoding: .utf8) }
    }

    /// Replica timing for the benchmark: the same heartbeat (100 ms) and election timeout (1 s)
    /// as etcd's defaults, so neither side gets a more nervous failure detector.
    static let ploverTiming = DemoCluster.Timing(tickMilliseconds: 10, electionTimeoutTicks: 100, heartbeatTicks: 10, diskStallTicks: 200)

    /// Runs every (value size, clients) point of one system, each on a fresh cluster: no point
    /// inherits the previous one's data (etcd's growing database, plover memory mode's cache).
    private func measure(_ system: BenchSystem, dataRoot: String, etcdBinary: String?, probes: inout PloverProbes?) throws -> [ConsensusRow] {
        say("\(system.label): a fresh 3-member cluster on loopback for each point (data under \(dataRoot))")
        var rows: [ConsensusRow] = []
        var point = 0
        for value in ints(values) {
            for n in ints(clients) {
                point += 1
                let pointRoot = "\(dataRoot)/point-\(point)"
                let (makeClient, stop) = try start(system, root: pointRoot, etcdBinary: etcdBinary)
                defer {
                    stop()
                    if !keep { try? FileManager.default.removeItem(atPath: pointRoot) }
                }
                if system == .ploverMemory && probes == nil, case let .plover(endpoints, leader) = makeClient.target {
                    probes = try Self.probe(endpoints: endpoints, leader: leader)
                }
                let firstBefore = makeClient.firstIndexes()
                let r: ClosedLoopLoad.Result
                if case let .plover(endpoints, _) = makeClient.target, ploverClient == .pipelined {
                    r = Self.pipelinedLoad(endpoints: endpoints, clients: n, valueBytes: value, warmup: warmup, seconds: seconds,
                                           keyPrefix: "bench/\(value)/\(n)", keySpace: keySpace)
                } else {
                    r = ClosedLoopLoad.run(clients: n, valueBytes: value, warmup: warmup, seconds: seconds,
                                           keyPrefix: "bench/\(value)/\(n)", keySpace: keySpace, makeClient: makeClient.make)
                }
                var compacted: (Int, of: Int)?
                if let before = firstBefore, let after = makeClient.firstIndexes(), after.count == before.count {
                    compacted = (zip(before, after).filter { $0.1 > $0.0 }.count, of: before.count)
                }
                rows.append(ConsensusRow(system: system, valueBytes: value, clients: n, result: r, replicasCompacted: compacted))
                say(String(format: "  %5d B x%-3d %8.0f puts/s  p50 %8.0f µs  p99 %8.0f µs", value, n, r.putsPerSecond, r.latency.p50Micros, r.latency.p99Micros)
                    + (r.errors > 0 ? "  (\(r.errors) errors; first: \(r.firstError ?? ""))" : ""))
            }
        }
        return rows
    }

    /// The closed-loop load as `clients` tasks over one `PipelinedNodeClient` (this thread waits).
    static func pipelinedLoad(endpoints: [NodeID: String], clients: Int, valueBytes: Int, warmup: Double, seconds: Double,
                              keyPrefix: String, keySpace: Int?) -> ClosedLoopLoad.Result {
        let client = PipelinedNodeClient(endpoints: endpoints, timeout: .seconds(10))
        defer { client.close() }
        let result = Mutex<ClosedLoopLoad.Result?>(nil)
        let done = DispatchSemaphore(value: 0)
        Task {
            let r = await ClosedLoopLoad.runTasks(clients: clients, valueBytes: valueBytes, warmup: warmup, seconds: seconds, keyPrefix: keyPrefix,
                                                  keySpace: keySpace, executor: client.executor) { key, value in
                _ = try await client.propose(KeyValueStateMachine.Command.put(key: key, value: value).encoded())
            }
            result.withLock { $0 = r }
            done.signal()
        }
        done.wait()
        return result.withLock { $0! }
    }

    /// What the load needs to reach a started cluster.
    struct ClusterClients {
        enum Target { case plover([NodeID: String], leader: NodeID), etcd(port: Int) }
        var target: Target
        var make: @Sendable () -> any PutClient
        /// Each plover replica's first log index, in node order (nil for etcd, or when a status
        /// request fails): it moves when the replica compacts.
        var firstIndexes: () -> [UInt64]? = { nil }
    }

    /// Starts a 3-member cluster of `system` under `root`; returns how to reach it and how to stop it.
    private func start(_ system: BenchSystem, root: String, etcdBinary: String?) throws -> (ClusterClients, () -> Void) {
        switch system {
        case .ploverFsync, .ploverMemory:
            // Every put writes a fresh key, so the state grows by a value per put, and memory mode
            // counts it (as the snapshot) with the log against memory_log_bytes_max: 4 KiB puts
            // at ~7k/s make ~0.9 GB in 30 s, under the 1 GiB at which a 2 GiB budget would stop.
            let limits = system == .ploverMemory ? "[limits]\nmemory_log_bytes_max = \(2 << 30)\n" : ""
            let cluster = try DemoCluster(root: root, durability: system == .ploverFsync ? "fsync" : "memory", timing: Self.ploverTiming,
                                          extraConfig: limits)
            do {
                try cluster.startAll()
                let leader = try cluster.waitForLeader(excluding: nil)
                let endpoints = cluster.endpoints
                let firstIndexes = { () -> [UInt64]? in
                    let found = cluster.ids.sorted().compactMap { cluster.status($0)["first_index"].flatMap { UInt64($0) } }
                    return found.count == cluster.ids.count ? found : nil
                }
                return (ClusterClients(target: .plover(endpoints, leader: leader), make: { PloverPutClient(endpoints: endpoints) },
                                       firstIndexes: firstIndexes),
                        { cluster.stopAll() })
            } catch {
                cluster.stopAll()
                throw error
            }
        case .etcdFsync, .etcdTmpfs:
            let cluster = try EtcdCluster(binary: etcdBinary!, root: root)
            do {
                try cluster.start()
                let port = try cluster.waitForLeader()
                return (ClusterClients(target: .etcd(port: port), make: { EtcdPutClient(port: port) }), { cluster.stop() })
            } catch {
                cluster.stop()
                throw error
            }
        }
    }

    /// Where one unloaded plover request spends its time, without consensus: `status` is answered
    /// by the client server's event loop; a local read also goes through the node thread.
    static func probe(endpoints: [NodeID: String], leader: NodeID) throws -> PloverProbes {
        let c = NodeClient(endpoints: endpoints)
        func time(_ op: () throws -> Void) throws -> LatencySummary {
            for _ in 0..<200 { try op() }
            var samples: [UInt64] = []
            let end = ClosedLoopLoad.now() + 1_000_000_000
            while ClosedLoopLoad.now() < end {
                let t0 = ClosedLoopLoad.now()
                try op()
                samples.append(ClosedLoopLoad.now() - t0)
            }
            return LatencySummary(nanoseconds: samples)
        }
        let key = Array("probe".utf8)
        let status = try time { _ = try c.status(of: leader) }
        let localRead = try time { _ = try c.localRead(key, at: leader) }
        say(String(format: "  probes: status p50 %.0f µs, local read p50 %.0f µs", status.p50Micros, localRead.p50Micros))
        return PloverProbes(status: status, localRead: localRead)
    }

    private func commandLine() -> String {
        "plover bench consensus " + CommandLine.arguments.dropFirst(3).joined(separator: " ")
    }
}

private func list(_ s: String) -> [String] { s.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) } }
private func ints(_ s: String) -> [Int] { list(s).compactMap { Int($0) } }

/// How `plover bench consensus` drives a plover cluster.
enum PloverClientKind: String, ExpressibleByArgument, CaseIterable {
    case pipelined, threads
}

/// What `plover bench consensus` can measure.
enum BenchSystem: String, CaseIterable {
    case ploverFsync = "plover-fsync"
    case ploverMemory = "plover-memory"
    case etcdFsync = "etcd-fsync"
    case etcdTmpfs = "etcd-tmpfs"

    var isEtcd: Bool { self == .etcdFsync || self == .etcdTmpfs }

    var label: String {
        switch self {
        case .ploverFsync: "plover fsync"
        case .ploverMemory: "plover memory"
        case .etcdFsync: "etcd (disk)"
        case .etcdTmpfs: "etcd (tmpfs)"
        }
    }
}

/// Unloaded plover round trips that skip consensus (see `ConsensusBench.probe`).
struct PloverProbes {
    var status: LatencySummary
    var localRead: LatencySummary
}

/// One measured point.
struct ConsensusRow {
    var system: BenchSystem
    var valueBytes: Int
    var clients: Int
    var result: ClosedLoopLoad.Result
    /// Plover: how many of the replicas finished a compaction during the point (warm-up
    /// included), of how many; nil for etcd, or when a replica's status could not be read.
    var replicasCompacted: (Int, of: Int)? = nil
}
