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
/// primary wrote, and RAM and disk together. `--runs` adds runs with other client counts and
/// requests in flight per client (`redis-benchmark -c C -P P`), i.e. other writes per
/// checkpoint. The backup lists the pages each sync rewrote (`log_divergent_pages`), so the report
/// splits the divergent pages into those that diverge at most checkpoints of a run (the guest
/// kernel's own) and the rest.
package struct VMCheckpointBytesBench: ParsableCommand {
    package static let configuration = CommandConfiguration(commandName: "vm-bytes", abstract: "Bytes per VM checkpoint under redis-benchmark SET over a tap (needs root).")

    @Option(help: "redis-benchmark requests per client in each run.") var requests = 40
    @Option(help: "redis-benchmark runs as CxP (C clients, P requests in flight per client), comma-separated; the issue's workload is 16x1.") var runs = "16x1,16x16,1x1"
    @Option(help: "Disk image per VM, MiB.") var diskMb = 64
    @Option(help: "redis-server settings to apply with CONFIG SET before the runs, as NAME VALUE pairs separated by commas (e.g. \"hz 1\").") var redisConfig = ""
    @Option(help: "Scratch directory (deleted afterwards unless --keep).") var dir = "benchmarks/vm-bytes/out"
    @Flag(help: "Keep the scratch directory (replica logs, checkpoints.log).") var keep = false
    @Option(help: "Write the markdown results here as well as to stdout.") var out: String?

    var runList: [(clients: Int, pipeline: Int)] {
        runs.split(separator: ",").compactMap { r in
            let f = r.split(separator: "x").compactMap { Int($0) }
            return f.count == 2 && f[0] > 0 && f[1] > 0 ? (f[0], f[1]) : nil
        }
    }
    var absoluteDir: String { (dir as NSString).isAbsolutePath ? dir : FileManager.default.currentDirectoryPath + "/" + dir }
    /// The test guest's RAM in pages (128 MiB, VMCluster's default): a checkpoint whose union is
    /// all of them compared every page.
    static let guestPages = (128 << 20) / 4096

    package init() {}

    /// One checkpoint's numbers, from a `checkpoints.log` line of the primary.
    struct Checkpoint {
        var fields: [String: String]
        func n(_ k: String) -> Int { Int(fields[k] ?? "") ?? 0 }
        var ramSent: Int { n("page_bytes") + n("control_bytes") }
        var ramAllDirty: Int { n("all_dirty_bytes") }
        var identical: Int { n("union") - n("divergent") }
        var diskSent: Int { n("disk_bytes") + n("disk_control_bytes") }
        var diskAllDirty: Int { n("disk_all_dirty_bytes") }
    }

    /// One redis-benchmark run, the checkpoints the primary completed during it, and the pages
    /// the backup's sync rewrote at each of them (by log index).
    struct Run {
        var clients: Int
        var pipeline: Int
        var rps: Double
        var checkpoints: [Checkpoint]
        var divergentPages: [String: Set<Int>]

        /// Pages that diverged in at least half of the run's checkpoints.
        var recurring: Set<Int> {
            var seen: [Int: Int] = [:]
            for set in divergentPages.values { for p in set { seen[p, default: 0] += 1 } }
            return Set(seen.filter { $0.value * 2 >= max(1, divergentPages.count) }.keys)
        }
    }

    /// The pages in a `divergent_pages=` field ("3,7-9").
    static func pages(_ ranges: String) -> Set<Int> {
        var out = Set<Int>()
        for part in ranges.split(separator: ",") {
            let ends = part.split(separator: "-").compactMap { Int($0) }
            if ends.count == 1 { out.insert(ends[0]) } else if ends.count == 2, ends[0] <= ends[1] { out.formUnion(ends[0]...ends[1]) }
        }
        return out
    }

    package func run() throws {
        guard getuid() == 0 else { throw CLIError("plover bench vm-bytes makes a bridge, taps and a network namespace: run it as root") }
        guard runList.count == runs.split(separator: ",").count, !runList.isEmpty else { throw CLIError("--runs \(runs): give runs as CxP (clients x requests in flight per client), comma-separated, e.g. 16x1,16x16") }
        guard diskMb > 0 else { throw CLIError("--disk-mb \(diskMb): the benchmark needs a disk per VM (redis-server's AOF lives there)") }
        let guest = try buildVMGuest()
        let machine = MachineDescription.current(dataDir: FileManager.default.currentDirectoryPath)
        let qemu = MachineDescription.shell("qemu-system-x86_64 --version | head -1")
        try? FileManager.default.removeItem(atPath: absoluteDir)
        try FileManager.default.createDirectory(atPath: absoluteDir, withIntermediateDirectories: true)
        defer { if !keep { try? FileManager.default.removeItem(atPath: absoluteDir) } }
        let lab = try TapLab()
        defer { lab.tearDown() }

        say("replicated VM (primary, backup, witness) on taps \(lab.taps[1]!), \(lab.taps[2]!), \(diskMb) MiB disk each, default checkpoint gap")
        let cluster = try VMCluster(root: absoluteDir + "/cluster", kernel: guest + "/vmlinuz", initrd: guest + "/initrd.gz",
                                    vmExtra: "disk_image = \"disk-{id}.img\"\ndisk_size_mb = \(diskMb)\nlog_divergent_pages = true", taps: lab.taps)
        defer { cluster.stopAll() }
        let leftovers = [1, 2].map { (cluster.runDir(NodeID($0)), cluster.ramFile(NodeID($0))) }
        ChildProcesses.killOnInterrupt { VMCluster.killQEMUs(leftovers) }
        try cluster.startAll()
        let probe = try RedisConnection(socket: lab.clientSocket, host: "10.99.0.2", port: 6379, timeout: .seconds(120))
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

        var results: [Run] = []
        for (c, p) in runList {
            let before = cluster.checkpoints(1).count
            say("  redis-benchmark -t set -d 1024 -r 1000000 -c \(c) -P \(p) -n \(requests * c * p)")
            let rps = try benchmark(lab, clients: c, pipeline: p)
            // A checkpoint that compared every page or block (none of this run's, normally) is no steady state.
            let done = cluster.checkpoints(1).dropFirst(before)
                .filter { $0["ok"] == "true" && $0["role"] == "primary" && $0["union"] != nil }
                .map(Checkpoint.init)
                .filter { $0.fields["disk_all_blocks"] == nil && $0.n("union") < Self.guestPages }
            let indices = Set(done.compactMap { $0.fields["index"] })
            var divergent: [String: Set<Int>] = [:]
            for b in cluster.checkpoints(2) where b["ok"] == "true" && b["role"] == "backup" {
                if let i = b["index"], indices.contains(i) { divergent[i] = Self.pages(b["divergent_pages"] ?? "") }
            }
            results.append(Run(clients: c, pipeline: p, rps: rps, checkpoints: done, divergentPages: divergent))
        }
        let report = Self.report(results, diskMb: diskMb, machine: vmMachineLine(machine, qemu: qemu),
                                 command: "plover bench vm-bytes --requests \(requests) --runs \(runs) --disk-mb \(diskMb)" + (redisConfig.isEmpty ? "" : " --redis-config '\(redisConfig)'"))
        print(report)
        if let out { try report.write(toFile: out, atomically: true, encoding: .utf8) }
    }

    /// redis-benchmark SET of 1 KiB values from the client namespace; its requests per second.
    func benchmark(_ lab: TapLab, clients c: Int, pipeline p: Int) throws -> Double {
        let proc = Process()
        proc.executableURL = URL(fileURLWithPath: TapLab.ipPath)
        proc.arguments = ["netns", "exec", lab.clientNamespace, "redis-benchmark", "-h", "10.99.0.2", "-p", "6379", "-t", "set",
                          "-d", "1024", "-r", "1000000", "-c", "\(c)", "-P", "\(p)", "-n", "\(requests * c * p)", "--csv"]
        let pipe = Pipe()
        proc.standardOutput = pipe
        proc.standardError = FileHandle.nullDevice
        try proc.run()
        let text = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        proc.waitUntilExit()
        guard proc.terminationStatus == 0 else { throw CLIError("redis-benchmark -c \(c) -P \(p) failed (\(proc.terminationStatus)): \(text)") }
        let row = text.split(separator: "\n").dropFirst().first.map { $0.split(separator: ",").map { $0.trimmingCharacters(in: CharacterSet(charactersIn: "\"")) } }
        guard let row, row.count >= 2, let rps = Double(row[1]) else { throw CLIError("redis-benchmark -c \(c) -P \(p): no CSV result in \(text.prefix(200).debugDescription)") }
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

    static func report(_ runs: [Run], diskMb: Int, machine: String, command: String) -> String {
        func f(_ x: Double) -> String { String(format: "%.1f", x) }
        func ratio(_ all: Int, _ sent: Int) -> String { sent == 0 ? "-" : String(format: "%.2f×", Double(all) / Double(sent)) }
        func mean(_ v: [Int]) -> Double { v.isEmpty ? .nan : Double(v.reduce(0, +)) / Double(v.count) }
        func p50(_ v: [Int]) -> Int { let s = v.sorted(); return s.isEmpty ? 0 : s[(s.count - 1) / 2] }
        var s = "# Bytes per VM checkpoint under redis-benchmark SET\n\n" + machine
        s += "`\(command)`; 128 MiB guest under TCG with a \(diskMb) MiB disk per VM, Debian's redis-server 7 in it with its AOF on the disk "
        s += "(`appendfsync everysec`), `redis-benchmark -t set -d 1024 -r 1000000 -c C -P P` from a client network namespace over "
        s += "the tap path, `checkpoint_min_gap_ms = 0` (the default). Per checkpoint, from the primary's `checkpoints.log`: syncvm's RAM "
        s += "bytes (divergent pages + control frames) against a Remus-style transfer of every page the primary dirtied (hash-diff: pages whose "
        s += "contents changed since the last checkpoint), the union's pages that hashed equal (identical-dirty) and those that differed "
        s += "(divergent), the disk step's bytes against every block the primary wrote (QEMU's dirty bitmap), and both together. "
        s += "The device state migrated at each checkpoint (about 320 KB, the same for both schemes) is in neither column. "
        s += "Divergent pages are split by the backup's list of the pages each sync rewrote: *recurring* ones diverged in at least half "
        s += "of the run's checkpoints (the same page numbers again and again: the guest kernel's timers, statistics and per-CPU data), "
        s += "*other* ones did not.\n\n"
        s += "## Summary per run (steady-state checkpoints while redis-benchmark ran)\n\n"
        s += "| C×P | SET/s | checkpoints | primary dirty pages (mean) | identical-dirty (mean) | divergent (mean) | divergent recurring / other (mean) | RAM sent (mean B) | RAM all-dirty (mean B) | RAM all-dirty / sent | disk sent (mean B) | disk all-dirty (mean B) | disk all-dirty / sent | RAM+disk all-dirty / sent |\n"
        s += "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
        for r in runs {
            let c = r.checkpoints
            let rec = r.recurring
            let split = c.compactMap { r.divergentPages[$0.fields["index"] ?? ""] }.map { set in (set.intersection(rec).count, set.subtracting(rec).count) }
            let ramSent = c.map(\.ramSent).reduce(0, +), ramAll = c.map(\.ramAllDirty).reduce(0, +)
            let diskSent = c.map(\.diskSent).reduce(0, +), diskAll = c.map(\.diskAllDirty).reduce(0, +)
            s += "| \(r.clients)×\(r.pipeline) | \(f(r.rps)) | \(c.count) | \(f(mean(c.map { $0.n("primary_dirty") }))) | \(f(mean(c.map(\.identical)))) | \(f(mean(c.map { $0.n("divergent") }))) | "
            s += "\(f(mean(split.map(\.0)))) / \(f(mean(split.map(\.1)))) | "
            s += "\(Int(mean(c.map(\.ramSent)))) | \(Int(mean(c.map(\.ramAllDirty)))) | **\(ratio(ramAll, ramSent))** | "
            s += "\(Int(mean(c.map(\.diskSent)))) | \(Int(mean(c.map(\.diskAllDirty)))) | **\(ratio(diskAll, diskSent))** | **\(ratio(ramAll + diskAll, ramSent + diskSent))** |\n"
        }
        s += "\nGoal: all-dirty / sent ≥ 9 (bytes per checkpoint ≤ 1/9 of the all-dirty transfer; PLOVER reports 9.2×) for 16×1 (the issue's workload).\n"
        for r in runs {
            s += "\n## Per checkpoint, \(r.clients) clients × \(r.pipeline) in flight\n\n"
            s += "| # | epoch | primary dirty | backup dirty | union | identical-dirty | divergent | RAM sent B | RAM all-dirty B | disk dirty (primary) | disk union | disk divergent | disk sent B | disk all-dirty B | RAM+disk all-dirty / sent |\n"
            s += "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
            for (i, c) in r.checkpoints.enumerated() {
                s += "| \(i + 1) | \(c.fields["epoch"] ?? "?") | \(c.n("primary_dirty")) | \(c.n("backup_dirty")) | \(c.n("union")) | \(c.identical) | \(c.n("divergent")) | "
                s += "\(c.ramSent) | \(c.ramAllDirty) | \(c.n("disk_primary_dirty")) | \(c.n("disk_union")) | \(c.n("disk_divergent")) | \(c.diskSent) | \(c.diskAllDirty) | "
                s += "\(ratio(c.ramAllDirty + c.diskAllDirty, c.ramSent + c.diskSent)) |\n"
            }
            let div = r.checkpoints.map { $0.n("divergent") }
            s += "\nDivergent pages per checkpoint: p50 \(p50(div)), min \(div.min() ?? 0), max \(div.max() ?? 0).\n"
        }
        return s
    }
}
