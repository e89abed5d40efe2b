import ArgumentParser
import Foundation
import RDMAPaxos

/// Exit codes (also in `paxos-log --help` and docs/operations.md).
enum Exit {
    static let problemsFound: Int32 = 1
    static let notAStore: Int32 = 2
    static let locked: Int32 = 3
    static let versionMismatch: Int32 = 4
    static let unreadable: Int32 = 5
}

@main
struct PaxosLog: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "paxos-log",
        abstract: "Inspect a plover replica's Berkeley DB log store.",
        discussion: """
            Works on a stopped store and on one a running node has open (it attaches read-only).
            Exit codes: 0 success; 1 verify found problems; 2 bad path or not a log store;
            3 store locked; 4 format version mismatch; 5 corrupt or unreadable store;
            64 usage error.
            """,
        subcommands: [StatCommand.self, DumpCommand.self, VerifyCommand.self, TailCommand.self])
}

/// Opens `dir` read-only for `body`; on failure prints what is wrong with which directory and
/// exits with the documented code.
func withStore<T>(_ dir: String, _ body: (LogStoreReader) throws -> T) throws -> T {
    let reader: LogStoreReader
    do {
        reader = try LogStoreReader.open(path: dir)
    } catch {
        throw fail(error)
    }
    defer { reader.close() }
    do {
        return try body(reader)
    } catch let e as ExitCode {
        throw e
    } catch {
        throw fail(error)
    }
}

/// Prints `error` on stderr and returns the exit code for it.
func fail(_ error: Error) -> ExitCode {
    Output.error("paxos-log: \(error)")
    guard let e = error as? StableLogError else { return ExitCode(Exit.unreadable) }
    switch e {
    case .badPath, .notAStore: return ExitCode(Exit.notAStore)
    case .locked: return ExitCode(Exit.locked)
    case .versionMismatch: return ExitCode(Exit.versionMismatch)
    case .corrupt, .missing, .diskFull, .memoryFull, .closed, .engine: return ExitCode(Exit.unreadable)
    }
}

/// Unbuffered-by-line output through write(2): `print` buffers when piped, and a follower (tail -f)
/// must show each entry at once.
enum Output {
    nonisolated(unsafe) static var buffer: [UInt8] = [] // Used from the main thread only.

    static func line(_ s: String) {
        buffer.append(contentsOf: s.utf8)
        buffer.append(10)
        if buffer.count >= 1 << 16 { flush() }
    }

    static func flush() {
        var off = 0
        while off < buffer.count {
            let n = buffer[off...].withUnsafeBytes { write(1, $0.baseAddress, $0.count) }
            if n <= 0 { break }
            off += n
        }
        buffer.removeAll(keepingCapacity: true)
    }

    static func error(_ s: String) {
        flush()
        let bytes = Array((s + "\n").utf8)
        _ = bytes.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
    }

    static var stderrIsTerminal: Bool { isatty(2) == 1 }
}
