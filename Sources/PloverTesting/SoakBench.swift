import ArgumentParser
import Foundation
import RDMAPaxos

/// `plover bench soak`: a long closed-loop load on one 3-replica cluster, sampled every few
/// seconds: throughput, p99, client errors, leader changes, each node's RSS and data-dir size.
/// It shows what a short benchmark cannot: whether compaction, snapshots and memory keep up.
package struct SoakBench: ParsableCommand {
    package static let configuration = CommandConfiguration(
        commandName: "soak",
        abstract: "Sustained load on a 3-replica cluster, sampled over time (benchmarks/soak).")

    @Option(help: "Measured seconds.") var seconds: Double = 600
    @Option(help: "Seconds per sample.") var sample: Double = 10
    @Option(help: "Client threads.") var clients: Int = 16
    @Option(help: "Value size in bytes.") var values: Int = 4096
    @Option(help: "Keys cycled over (a fresh key per put would grow the state without bound).") var keySpace: Int = 100_000
    @Option(help: "Durability of the replicas' logs: fsync, async or memory.") var durability: String = "fsync"
    @Option(help: "memory_log_bytes_max of each replica with --durability memory (above twice the state).") var memoryLogBytesMax: Int = 2 << 30
    @Option(help: "Directory for the data dirs (default: a new temporary directory; deleted afterwards).") var dir: String?
    @Option(help: "Write the markdown results here as well as to stdout.") var out: String?

    package func validate() throws {
        guard seconds >= sample, sample >= 1 else { throw ValidationError("--seconds must be at least --sample, and --sample at least 1") }
        guard clients >= 1, values >= 1, keySpace >= 1 else { throw ValidationError("--clients, --values and --key-space must be positive") }
        guard ["fsync", "async", "memory"].contains(durability) else { throw ValidationError("--durability must be fsync, async or memory, not \(durability)") }
    }

    package init() {}

    package func run() throws {
        let root = dir ?? NSTemporaryDirectory() + "plover-soak-\(getpid())"
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
        defer { if dir == nil { try? FileManager.default.removeItem(atPath: root) } }
        let machine = MachineDescription.current(dataDir: root)
        // Memory mode counts the state (as its snapshot) with the log against memory_log_bytes_max
        // and compacts at half of it: a ~400 MB state needs the cap above twice that, or the
        // replicas stop with "the state machine's snapshot ... cannot fit beside the log".
        let limits = durability == "memory" ? "[limits]\nmemory_log_bytes_max = \(memoryLogBytesMax)\n" : ""
        let cluster = try DemoCluster(root: root, durability: durability, timing: ConsensusBench.ploverTiming, extraConfig: limits)
        defer { cluster.stopAll() }
        try cluster.startAll()
        _ = try cluster.waitForLeader(excluding: nil)
        let endpoints = cluster.endpoints
        let start = ClosedLoopLoad.now()
        let end = start + UInt64(seconds * 1e9)
        let load = SoakLoad(clients: clients, valueBytes: values, keySpace: keySpace, end: end) { PloverPutClient(endpoints: endpoints) }
        load.start()
        var samples: [SoakSample] = []
        var leader: NodeID?
        var leaderChanges = 0
        var next = start
        while next < end {
            next += UInt64(sample * 1e9)
            while ClosedLoopLoad.now() < min(next, end) {
                if let l = Self.leader(of: cluster), l != leader {
                    if leader != nil { leaderChanges += 1 }
                    leader = l
                }
                Thread.sleep(forTimeInterval: 0.25)
            }
            let s = SoakSample(second: Double(min(next, end) - start) / 1e9, leaderChanges: leaderChanges,
                               rssBytes: cluster.processes.values.map { Self.rss($0.processIdentifier) }.reduce(0, +),
                               diskBytes: cluster.ids.map { Self.du(cluster.dataDir($0)) }.reduce(0, +))
            samples.append(s)
            print(String(format: "  %5.0f s  leader changes %d  RSS %.0f MB  disk %.0f MB", s.second, s.leaderChanges,
                         Double(s.rssBytes) / 1e6, Double(s.diskBytes) / 1e6))
        }
        let results = load.finish()
        let report = SoakReport(command: CommandLine.arguments.dropFirst().joined(separator: " "), machine: machine, durability: durability,
                                clients: clients, valueBytes: values, keySpace: keySpace, sampleSeconds: sample, seconds: seconds,
                                start: start, samples: samples, puts: results)
        let text = report.markdown()
        print(text)
        if let out { try text.write(toFile: out, atomically: true, encoding: .utf8) }
    }

    static func leader(of cluster: DemoCluster) -> NodeID? {
        cluster.ids.first { cluster.status($0)["role"] == "leader" }
    }

    /// Resident set of a process in bytes (VmRSS), 0 if it is gone.
    static func rss(_ pid: Int32) -> Int {
        guard let text = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
              let line = text.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") }),
              let kb = Int(line.split(separator: " ").dropFirst().first ?? "") else { return 0 }
        return kb * 1024
    }

    /// Bytes allocated under a directory (`du -sb`), 0 if it cannot be read.
    static func du(_ path: String) -> Int { Int(MachineDescription.shell("du -sb '\(path)' 2>/dev/null | cut -f1")) ?? 0 }
}

/// One sample of the cluster's state over time.
struct SoakSample {
    var second: Double
    var leaderChanges: Int
    var rssBytes: Int
    var diskBytes: Int
}

/// The soak's clients: each thread puts over the key space until `end`, recording when each
/// put finished, how long it took, and failures (a put that failed or timed out).
final class SoakLoad: @unchecked Sendable {
    // @unchecked Sendable: each ThreadLog is written by its own thread only and read after `finish`
    // has waited for every thread.
    /// One thread's record. @unchecked Sendable: written by its own load thread, read after
    /// `finish` waited for that thread.
    final class ThreadLog: @unchecked Sendable { var finishedAt: [UInt64] = []; var latency: [UInt64] = []; var failedAt: [UInt64] = []; var firstError: String? }
    let clients: Int, valueBytes: Int, keySpace: Int, end: UInt64
    let makeClient: @Sendable () -> any PutClient
    private var logs: [ThreadLog] = []
    private let done = DispatchGroup()

    init(clients: Int, valueBytes: Int, keySpace: Int, end: UInt64, makeClient: @escaping @Sendable () -> any PutClient) {
        (self.clients, self.valueBytes, self.keySpace, self.end, self.makeClient) = (clients, valueBytes, keySpace, end, makeClient)
        logs = (0..<clients).map { _ in ThreadLog() }
    }

    func start() {
        for t in 0..<clients {
            done.enter()
            let log = logs[t]
            let th = Thread(named: "soak-load-\(t)") { [self] in
                defer { done.leave() }
                let client = makeClient()
                let value = [UInt8](repeating: UInt8(ascii: "v"), count: valueBytes)
                var i = t
                while true {
                    let t0 = ClosedLoopLoad.now()
                    if t0 >= end { break }
                    let key = Array("soak/\(i % keySpace)".utf8)
                    i += clients
                    do {
                        try client.put(key: key, value: value)
                        let t1 = ClosedLoopLoad.now()
                        log.finishedAt.append(t1)
                        log.latency.append(t1 - t0)
                    } catch {
                        log.failedAt.append(ClosedLoopLoad.now())
                        if log.firstError == nil { log.firstError = "\(error)" }
                        Thread.sleep(forTimeInterval: 0.01)
                    }
                }
            }
            th.stackSize = 1 << 20
            th.start()
        }
    }

    func finish() -> [ThreadLog] {
        done.wait()
        return logs
    }
}
