import ArgumentParser
import Foundation
import PloverTesting
import RDMAPaxos

/// `plover _stablelog-writer DIR`: appends to a stable log until killed, printing each index once
/// it is durable. Hidden: it exists so crash tests can SIGKILL a real process mid-append and then
/// check that everything it reported durable is still there.
struct StableLogWriterCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "_stablelog-writer",
        abstract: "Append to a stable log until killed, printing each durable index (for crash tests).",
        shouldDisplay: false)

    @Argument(help: "Log directory.") var directory: String
    @Option(help: "fsync, async or memory.") var durability: String = "fsync"
    @Option(help: "Payload bytes per entry.") var payloadBytes: Int = 64
    @Option(help: "Appends in flight at once.") var inflight: Int = 16
    @Option(help: "Stop after this many entries (0: never).") var count: Int = 0
    @Option(help: "async mode: milliseconds between log flushes (0: none between checkpoints, a broken variant for tests).")
    var asyncFlushMs: Int = 100
    @Option(help: "Microseconds to wait between appends (0: as fast as the window allows).") var paceUs: Int = 0
    @Option(help: "Megabytes of entries between Berkeley DB checkpoints (0: the default, 64).")
    var checkpointEveryMb: Int = 0
    @Option(help: "KiB of entries per segment (0: the default, 64 MiB).") var segmentKib: Int = 0
    @Option(help: "Compact the log through the entry this many appends back, every this many appends (0: never).")
    var compactEvery: Int = 0
    @Flag(help: "After --count entries: compact through the last but one, print 'held' and wait to be killed.")
    var hold = false
    @Flag(help: "Print each durable index with the CLOCK_MONOTONIC nanoseconds at which it was reported.")
    var timestamps = false

    func validate() throws {
        if hold && count <= 0 { throw ValidationError("--hold needs --count") }
    }

    func run() throws {
        guard let mode = Durability(rawValue: durability) else {
            throw ValidationError("unknown durability '\(durability)' (fsync, async, memory)")
        }
        var options = BerkeleyDBLog.Options()
        options.asyncFlushInterval = .milliseconds(asyncFlushMs)
        if checkpointEveryMb > 0 { options.checkpointEveryBytes = checkpointEveryMb << 20 }
        if segmentKib > 0 { options.segmentBytes = segmentKib << 10 }
        let log = try BerkeleyDBLog.open(path: directory, durability: mode, options: options)
        StableLogWriter.append(to: log, payloadBytes: payloadBytes, inflight: inflight, count: count,
                               paceMicroseconds: paceUs, timestamps: timestamps, compactEvery: compactEvery)
        if hold {
            // Every append is durable once the queued compaction behind them is done.
            try log.compactPrefix(through: log.lastIndex - 1, ballot: Ballot(term: 1, node: 1))
            let line = Array("held\n".utf8)
            _ = line.withUnsafeBytes { write(1, $0.baseAddress, $0.count) }
            while true { sleep(60) }
        }
        try log.close()
    }
}
