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

    /// The payload of entry `index`: derived from the index so a reader can check it.
    static func payload(index: LogIndex, bytes: Int) -> [UInt8] {
        (0..<bytes).map { UInt8(truncatingIfNeeded: index &* 31 &+ UInt64($0)) }
    }

    func run() throws {
        guard let mode = Durability(rawValue: durability) else {
            throw ValidationError("unknown durability '\(durability)' (fsync, async, memory)")
        }
        let log = try BerkeleyDBLog.open(path: directory, durability: mode)
        let window = DispatchSemaphore(value: max(1, inflight))
        let start = log.lastIndex
        var index = start
        while count == 0 || index < start + LogIndex(count) {
            window.wait()
            index += 1
            let i = index
            let e = LogEntry(index: i, ballot: Ballot(term: 1, node: 1), kind: .command,
                             payload: Self.payload(index: i, bytes: payloadBytes))
            log.append([e]) { result in
                switch result {
                case .success:
                    let line = Array("\(i)\n".utf8)
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
}
