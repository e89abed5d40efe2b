import ArgumentParser
import Foundation
import RDMAPaxos

/// `plover bench stable-log`: appends/s and append→durable latency of `BerkeleyDBLog` for each
/// durability mode, payload size and number of concurrent appenders, next to a baseline that
/// commits (and fsyncs) one transaction per record. See benchmarks/stable-log/README.md.
package struct StableLogBench: ParsableCommand {
    package static let configuration = CommandConfiguration(
        commandName: "stable-log",
        abstract: "Benchmark the Berkeley DB stable log's group commit against one fsync per record.")

    @Option(help: "Directory for the stores (created; each run's store is deleted afterwards).")
    var dir: String = "benchmarks/stable-log/out"
    @Option(help: "Seconds per configuration.") var seconds: Double = 1.5
    @Option(help: "Payload sizes in bytes, comma-separated.") var payloads: String = "64,4096"
    @Option(help: "Concurrent appender counts, comma-separated.") var appenders: String = "1,8,64"
    @Option(help: "Write the markdown results here as well as to stdout.") var out: String?

    struct Row {
        var mode: String
        var payload: Int
        var appenders: Int
        var entries: Int
        var perSecond: Double
        var p50Micros: Double
        var p99Micros: Double
    }

    package init() {}

    package func run() throws {
        let sizes = payloads.split(separator: ",").compactMap { Int($0) }
        let counts = appenders.split(separator: ",").compactMap { Int($0) }
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        var rows: [Row] = []
        for size in sizes {
            for n in counts {
                for mode in ["per-record fsync (baseline)", "fsync", "async", "memory"] {
                    let row = try measure(mode: mode, payload: size, appenders: n)
                    rows.append(row)
                    FileHandle.standardError.write(Data("\(mode) \(size) B x\(n): \(Int(row.perSecond)) appends/s\n".utf8))
                }
            }
        }
        let report = Self.markdown(rows, storeDir: dir)
        print(report)
        if let out { try report.write(toFile: out, atomically: true, encoding: .utf8) }
    }

    private func measure(mode: String, payload: Int, appenders n: Int) throws -> Row {
        let path = dir + "/store-\(getpid())"
        try? FileManager.default.removeItem(atPath: path)
        defer { try? FileManager.default.removeItem(atPath: path) }
        var options = BerkeleyDBLog.Options()
        let durability: Durability
        switch mode {
        case "fsync", "async", "memory": durability = Durability(rawValue: mode)!
        default:
            durability = .fsync
            options.batchBytesMax = 1 // every commit takes exactly one append: no group commit
        }
        let log = try BerkeleyDBLog.open(path: path, durability: durability, options: options)
        let shared = Shared(payload: payload)
        let start = DispatchTime.now().uptimeNanoseconds
        let deadline = start + UInt64(seconds * 1e9)
        let latencies = (0..<n).map { _ in Latencies() }
        // One thread per appender (concurrentPerform would run only as many as there are cores).
        let finished = DispatchGroup()
        for t in 0..<n {
            finished.enter()
            let mine = latencies[t]
            Thread {
                Self.appendLoop(log, shared, mine, deadline: deadline)
                finished.leave()
            }.start()
        }
        // Memory mode holds the log in a bounded cache: compact it as a node does, at half.
        let compactor = DispatchGroup()
        if let cap = log.capacityBytes {
            compactor.enter()
            Thread {
                Self.compactLoop(log, atBytes: cap / 2, until: finished)
                compactor.leave()
            }.start()
        }
        finished.wait()
        compactor.wait()
        let elapsed = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
        try log.close()
        var all = latencies.flatMap(\.values)
        all.sort()
        func pct(_ p: Double) -> Double {
            all.isEmpty ? 0 : Double(all[min(all.count - 1, Int(Double(all.count) * p))]) / 1000
        }
        return Row(mode: mode, payload: payload, appenders: n, entries: all.count,
                   perSecond: Double(all.count) / elapsed, p50Micros: pct(0.50), p99Micros: pct(0.99))
    }

    /// One closed-loop appender: append, wait until durable, repeat.
    private static func appendLoop(_ log: BerkeleyDBLog, _ shared: Shared, _ mine: Latencies, deadline: UInt64) {
        let sem = DispatchSemaphore(value: 0)
        while DispatchTime.now().uptimeNanoseconds < deadline {
            let t0 = DispatchTime.now().uptimeNanoseconds
            shared.appendNext(log) { result in
                if case let .failure(e) = result { fatalError("append failed: \(e)") }
                mine.values.append(DispatchTime.now().uptimeNanoseconds - t0)
                sem.signal()
            }
            sem.wait()
        }
    }

    /// Compacts the durable prefix whenever the log holds `atBytes`, until the appenders finish.
    private static func compactLoop(_ log: BerkeleyDBLog, atBytes: Int, until appenders: DispatchGroup) {
        while appenders.wait(timeout: .now() + .milliseconds(1)) == .timedOut {
            guard log.heldBytes >= atBytes else { continue }
            do {
                try log.compactPrefix(through: log.durableIndex, ballot: Ballot(term: 1, node: 1))
            } catch {
                fatalError("compaction failed: \(error)")
            }
        }
    }

    static func markdown(_ rows: [Row], storeDir: String) -> String {
        func sh(_ cmd: String) -> String {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: "/bin/sh")
            p.arguments = ["-c", cmd]
            let pipe = Pipe()
            p.standardOutput = pipe
            try? p.run()
            p.waitUntilExit()
            return String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
                .trimmingCharacters(in: .whitespacesAndNewlines)
        }
        var s = "# Stable log benchmark results\n\n"
        s += "Command: `make bench-stable-log` (`plover bench stable-log`, release build).\n\n"
        s += "Machine: \(sh("nproc")) cores, \(sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'")), "
        s += "kernel \(sh("uname -r")), store on \(sh("df -T \(storeDir) | awk 'NR==2 {print $2}'")), \(sh("date -u '+%Y-%m-%d %H:%M UTC'")).\n\n"
        s += "Each appender appends one entry and waits until it is durable, then appends the next.\n"
        s += "Latency is append call → durable completion.\n\n"
        s += "| mode | payload | appenders | appends/s | p50 µs | p99 µs | entries | × baseline (1 appender) |\n"
        s += "|---|---:|---:|---:|---:|---:|---:|---:|\n"
        for r in rows {
            let base = rows.first { $0.mode.hasPrefix("per-record") && $0.payload == r.payload && $0.appenders == 1 }?.perSecond ?? 0
            let ratio = base > 0 ? String(format: "%.1f", r.perSecond / base) : "–"
            s += "| \(r.mode) | \(r.payload) B | \(r.appenders) | \(Int(r.perSecond)) | "
            s += String(format: "%.0f | %.0f", r.p50Micros, r.p99Micros)
            s += " | \(r.entries) | \(ratio) |\n"
        }
        return s
    }
}

/// Hands out contiguous indexes: taking the next index and queueing it happen under one lock,
/// so the log sees appends in index order whatever the threads do.
private final class Shared: @unchecked Sendable {
    // @unchecked Sendable: `next` is only touched under `lock`.
    private let lock = NSLock()
    private var next: LogIndex = 1
    private let payload: [UInt8]
    init(payload: Int) { self.payload = [UInt8](repeating: 0xAB, count: payload) }

    func appendNext(_ log: BerkeleyDBLog, _ done: @escaping @Sendable (Result<Void, StableLogError>) -> Void) {
        lock.lock()
        defer { lock.unlock() }
        log.append([LogEntry(index: next, ballot: Ballot(term: 1, node: 1), kind: .command, payload: payload)], onDurable: done)
        next += 1
    }
}

/// One appender's latencies in nanoseconds.
private final class Latencies: @unchecked Sendable {
    // @unchecked Sendable: appended to only by the writer thread's completion for this appender,
    // read after all appenders finished (the semaphore orders the accesses).
    var values: [UInt64] = []
    init() { values.reserveCapacity(1 << 16) }
}
