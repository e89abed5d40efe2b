import ArgumentParser
import Foundation
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
    @Flag(help: "Print each durable index with the CLOCK_MONOTONIC nanoseconds at which it was reported.")
    var timestamps = false

    /// The payload of entry `index`: derived from the index so a reader can check it.
    static func payload(index: LogIndex, bytes: Int) -> [UInt8] {
        (0..<bytes).map { UInt8(truncatingIfNeeded: index &* 31 &+ UInt64($0)) }
    }

    func run() throws {
        guard let mode = Durability(rawValue: durability) else {
            throw ValidationError("unknown durability '\(durability)' (fsync, async, memory)")
        }
        var options = BerkeleyDBLog.Options()
        options.asyncFlushInterval = .milliseconds(asyncFlushMs)
        if checkpointEveryMb > 0 { options.checkpointEveryBytes = checkpointEveryMb << 20 }
        let log = try BerkeleyDBLog.open(path: directory, durability: mode, options: options)
        let timestamps = timestamps
        let window = DispatchSemaphore(value: max(1, inflight))
        let start = log.lastIndex
        var index = start
        while count == 0 || index < start + LogIndex(count) {
            window.wait()
            if paceUs > 0 { usleep(UInt32(paceUs)) }
            index += 1
            let i = index
            let e = LogEntry(index: i, ballot: Ballot(term: 1, node: 1), kind: .command,
                             payload: Self.payload(index: i, bytes: payloadBytes))
            log.append([e]) { result in
                switch result {
                case .success:
                    let line = Array((timestamps ? "\(i) \(Self.monotonicNanoseconds())\n" : "\(i)\n").utf8)
                    _ = line.withUnsafeBytes { write(1, $0.baseAddress, $0.count) }
                case let .failure(error):
                    let line = Array("error: \(error)\n".utf8)
                    _ = line.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
                    Foundation.exit(1)
                }
                window.signal()
            }
        }
        try log.close()
    }

    /// CLOCK_MONOTONIC in nanoseconds: one clock for this process and a test reading its output.
    static func monotonicNanoseconds() -> UInt64 {
        var t = timespec()
        clock_gettime(CLOCK_MONOTONIC, &t)
        return UInt64(t.tv_sec) * 1_000_000_000 + UInt64(t.tv_nsec)
    }
}
