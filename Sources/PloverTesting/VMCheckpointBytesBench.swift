import ArgumentParser
import Foundation
import RDMAPaxos
import VMReplica

/// `plover bench vm-bytes` (benchmarks/vm-bytes/README.md): the bytes one checkpoint sends while
/// `redis-benchmark -t set -d 1024 -r 1000000 -c 16` writes to Debian's redis-server in the
/// replicated guest (AOF on the guest's disk) over the tap path, at the default checkpoint gap.
/// Per checkpoint, from the primary's `checkpoints.log`: the RAM bytes syncvm sent (divergent
/// pages and control frames) against a Remus-style transfer of every page the primary dirtied,
/// the identical-dirty and divergent page counts, the disk bytes sent against every block the
/// primary wrote, RAM and disk together, and the pause (primary stopped → resumed) with its parts.
/// `--runs` adds runs with other client counts and requests in flight per client
/// (`redis-benchmark -c C -P P`), i.e. other writes per checkpoint; `--release-on-match` runs them
/// with every guest frame released by a checkpoint, with release on match, or both (one cluster
/// each). The backup lists the pages each sync rewrote (`log_divergent_pages`), so the report
/// splits the divergent pages into those that diverge at most checkpoints of a run (the guest
/// kernel's own) and the rest.
package struct VMCheckpointBytesBench: ParsableCommand {
    package static let configuration = CommandConfiguration(commandName: "vm-bytes", abstract: "Bytes per VM checkpoint under redis-benchmark SET over a tap (needs root).")

    @Option(help: "redis-benchmark requests per client and request in flight, for runs given without a count (-n = requests·C·P).") var requests = 40
    @Option(help: "redis-benchmark runs as CxP (C clients, P requests in flight per client) or CxP:N (N SETs in all), comma-separated; the issue's workload is 16x1.") var runs = "16x1:3200,16x16:10240,1x1:240"
    @Option(help: "How the primary releases the guest's frames: off (every frame waits for a checkpoint), on (release on match), or both (one cluster each, off first).") var releaseOnMatch = "both"
    @Option(help: "Disk image per VM, MiB.") var diskMb = 64
    @Option(help: "redis-server settings to apply with CONFIG SET before the runs, as NAME VALUE pairs separated by commas (e.g. \"hz 1\").") var redisConfig = ""
    @Option(help: "Scratch directory (deleted afterwards unless --keep).") var dir = "benchmarks/vm-bytes/out"
    @Flag(help: "Keep the scratch directory (replica logs, checkpoints.log).") var keep = false
    @Option(help: "Write the markdown results here as well as to stdout.") var out: String?

    /// One redis-benchmark run as given to `--runs`.
    struct RunSpec: Equatable {
        var clients: Int
        var pipeline: Int
        /// SETs in all (`-n`).
        var requests: Int
    }

    /// The runs of `--runs` ("16x1,16x16:4096"), or nil when one of them is malformed.
    static func parseRuns(_ text: String, requests: Int) -> [RunSpec]? {
        var out: [RunSpec] = []
        for item in text.split(separator: ",", omittingEmptySubsequences: false) {
            let parts = item.split(separator: ":", omittingEmptySubsequences: false)
            guard parts.count <= 2 else { return nil }
            let f = parts[0].split(separator: "x", omittingEmptySubsequences: false).map { Int($0) }
            guard f.count == 2, let c = f[0], let p = f[1], c > 0, p > 0 else { return nil }
            var n = requests * c * p
            if parts.count == 2 {
                guard let given = Int(parts[1]), given > 0 else { return nil }
                n = given
            }
            out.append(RunSpec(clients: c, pipeline: p, requests: n))
        }
        return out.isEmpty ? nil : out
    }

    /// The release modes of `--release-on-match`: a name for the report and the `[vm]` line.
    static func parseModes(_ text: String) -> [(name: String, key: String)]? {
        let off: (name: String, key: String) = ("checkpoint release", "release_on_match = false")
        let on: (name: String, key: String) = ("release on match", "release_on_match = true")
        switch text {
        case "off": return [off]
        case "on": return [on]
        case "both": return [off, on]
        default: return nil
        }
    }

    var absoluteDir: String { (dir as NSString).isAbsolutePath ? dir : FileManager.default.currentDirectoryPath + "/" + dir }
    /// The test guest's RAM in pages (128 MiB, VMCluster's default): a checkpoint whose union is
    /// all of them compared every page.
    static let guestPages = (128 << 20) / 4096

    package init() {}

    package func run() throws {
        guard getuid() == 0 else { throw CLIError("plover bench vm-bytes makes a bridge, taps and a network namespace: run it as root") }
        guard requests > 0 else { throw CLIError("--requests \(requests): give a positive count of requests per client and request in flight") }
        guard let runList = Self.parseRuns(runs, requests: requests) else {
            throw CLIError("--runs \(runs): give runs as CxP or CxP:N (C clients x P requests in flight per client, N SETs in all), comma-separated, e.g. 16x1,16x16:4096")
        }
        guard let modes = Self.parseModes(releaseOnMatch) else { throw CLIError("--release-on-match \(releaseOnMatch): give off, on or both") }
        guard diskMb > 0 else { throw CLIError("--disk-mb \(diskMb): the benchmark needs a disk per VM (redis-server's AOF lives there)") }
        try TapLab.benchmark(workDir: absoluteDir, keep: keep) { guest, machineLine, lab in
            try measure(runList, modes: modes, guest: guest, machineLine: machineLine, lab: lab)
        }
    }

    /// The runs, in a fresh cluster per release rule, then the report.
    func measure(_ runList: [RunSpec], modes: [(name: String, key: String)], guest: String, machineLine: String, lab: TapLab) throws {
        var results: [Run] = []
        var cluster: VMCluster?
        defer { cluster?.stopAll() }
        for (n, mode) in modes.enumerated() {
            // A fresh cluster (fresh disks, a fresh redis-server) per mode.
            cluster?.stopAll()
            say("replicated VM (primary, backup, witness; \(mode.key)) on taps \(lab.taps[1]!), \(lab.taps[2]!), \(diskMb) MiB disk each, default checkpoint gap")
            let c = try VMCluster(root: absoluteDir + "/cluster-\(n)", kernel: guest + "/vmlinuz", initrd: guest + "/initrd.gz",
                                  vmExtra: "disk_image = \"disk-{id}.img\"\ndisk_size_mb = \(diskMb)\nlog_divergent_pages = true\n\(mode.key)", taps: lab.taps)
            cluster = c
            let leftovers = [1, 2].map { (c.runDir(NodeID($0)), c.ramFile(NodeID($0))) }
            ChildProcesses.killOnInterrupt { VMCluster.killQEMUs(leftovers) }
            try c.startAll()
            try prepare(c, lab)
            for spec in runList {
                let before = c.checkpoints(1).count
                say("  \(mode.name): redis-benchmark -t set -d 1024 -r 1000000 -c \(spec.clients) -P \(spec.pipeline) -n \(spec.requests)")
                let rps = try benchmark(lab, spec)
                results.append(Self.collect(c, since: before, mode: mode.name, spec: spec, rps: rps))
            }
        }
        var command = "plover bench vm-bytes --runs \(runs)"
        if runList.contains(where: { $0.requests == requests * $0.clients * $0.pipeline }) { command += " --requests \(requests)" }
        command += " --release-on-match \(releaseOnMatch) --disk-mb \(diskMb)" + (redisConfig.isEmpty ? "" : " --redis-config '\(redisConfig)'")
        let report = Self.report(results, diskMb: diskMb, machine: machineLine, command: command)
        print(report)
        if let out { try report.write(toFile: out, atomically: true, encoding: .utf8) }
    }

    /// Waits for the guest's redis-server and a protected backup, checks the AOF, applies `--redis-config`.
    func prepare(_ cluster: VMCluster, _ lab: TapLab) throws {
        let probe = try RedisConnection(connect: lab.clientConnect, host: "10.99.0.2", port: 6379, timeout: .seconds(120))
        _ = try probe.command(["PING"], timeout: .seconds(60))
        guard waitFor(.seconds(60), { ((try? String(contentsOfFile: cluster.logPath(2), encoding: .utf8)) ?? "").contains("vm: protected:") }) else {
            throw CLIError("the backup was never protected; see \(absoluteDir) (--keep)")
        }
        let persistence = try probe.command(["INFO", "persistence"], timeout: .seconds(60))
        guard persistence.contains("aof_enabled:1") else { throw CLIError("redis-server in the guest keeps no AOF on its disk: \(persistence.prefix(200))") }
        for setting in redisConfig.split(separator: ",") {
            let words = setting.split(separator: " ").map(String.init)
            guard words.count == 2 else { throw CLIError("--redis-config \(redisConfig): \"\(setting)\" is not NAME VALUE") }
            let answer = try probe.command(["CONFIG", "SET"] + words, timeout: .seconds(60))
            guard answer == "+OK" else { throw CLIError("--redis-config: CONFIG SET \(setting) answered \(answer)") }
        }
    }

    /// The primary's steady-state checkpoints from its `checkpoints.log` line `before` on, and the
    /// pages the backup's sync rewrote at each.
    static func collect(_ cluster: VMCluster, since before: Int, mode: String, spec: RunSpec, rps: Double) -> Run {
        let lines = cluster.checkpoints(1)
        // The output guard's counters at the run's last checkpoint, less those at the last one before it.
        let counters = { (l: ArraySlice<[String: String]>) -> ReleaseCounters? in l.reversed().lazy.compactMap { ReleaseCounters($0) }.first }
        let released = counters(lines.dropFirst(before)).map { $0 - (counters(lines.prefix(before)) ?? ReleaseCounters()) } ?? ReleaseCounters()
        // A checkpoint that compared every page or block (none of this run's, normally) is no steady state.
        let done = lines.dropFirst(before)
            .filter { $0["ok"] == "true" && $0["role"] == "primary" && $0["union"] != nil }
            .map(Checkpoint.init)
            .filter { $0.fields["disk_all_blocks"] == nil && $0.n("union") < guestPages }
        let indices = Set(done.compactMap { $0.fields["index"] })
        var divergent: [String: Set<Int>] = [:]
        for b in cluster.checkpoints(2) where b["ok"] == "true" && b["role"] == "backup" {
            if let i = b["index"], indices.contains(i) { divergent[i] = pages(b["divergent_pages"] ?? "") }
        }
        return Run(mode: mode, clients: spec.clients, pipeline: spec.pipeline, requests: spec.requests, rps: rps, checkpoints: done, divergentPages: divergent, released: released)
    }

    /// redis-benchmark SET of 1 KiB values from the client namespace; its requests per second.
    func benchmark(_ lab: TapLab, _ spec: RunSpec) throws -> Double {
        let (c, p) = (spec.clients, spec.pipeline)
        let (rows, text) = try lab.redisBenchmark(["-t", "set", "-d", "1024", "-r", "1000000", "-c", "\(c)", "-P", "\(p)", "-n", "\(spec.requests)"],
                                                  what: "-c \(c) -P \(p)")
        guard let row = rows.first, row.count >= 2, let rps = Double(row[1]) else { throw CLIError("redis-benchmark -c \(c) -P \(p): no CSV result in \(text.prefix(200).debugDescription)") }
        return rps
    }

    func waitFor(_ timeout: Duration, _ condition: () -> Bool) -> Bool {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if condition() { return true }
            Thread.sleep(forTimeInterval: 0.05)
        }
        return condition()
    }
}
