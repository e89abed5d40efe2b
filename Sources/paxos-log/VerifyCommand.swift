import ArgumentParser
import Foundation
import RDMAPaxos

/// `paxos-log verify DIR`: every checksum, no gaps, ballots never decreasing.
struct VerifyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "verify",
        abstract: "Check every record's checksum, index gaps and ballot order; exit 1 on any problem.")

    @Argument(help: "The node's log directory.") var directory: String
    @Option(help: "Print at most this many problems.") var maxProblems = 1000

    func run() throws {
        let problems = try withStore(directory) { r in try Self.check(r) }
        if problems.isEmpty { return }
        for p in problems.prefix(maxProblems) { Output.line("problem: \(p)") }
        if problems.count > maxProblems { Output.line("... and \(problems.count - maxProblems) more") }
        Output.line("FAILED: \(directory): \(problems.count) problem(s)")
        Output.flush()
        throw ExitCode(Exit.problemsFound)
    }

    /// Walks the whole store and lists what is wrong, in index order.
    static func check(_ r: LogStoreReader) throws -> [String] {
        var problems: [String] = []
        var snapshot = SnapshotPoint.none
        do {
            snapshot = try r.metadata().snapshot
        } catch let e as StableLogError {
            if case .versionMismatch = e { throw e }
            problems.append("metadata: \(e)")
        }
        let total = try r.bounds().map { Int(clamping: $0.last &- $0.first &+ 1) } ?? 0
        let progress = Progress(total: total, enabled: Output.stderrIsTerminal && total >= 10_000)
        var expected = snapshot.index + 1
        var lastBallot = snapshot.ballot
        var lastBallotIndex = snapshot.index
        var count = 0, leftovers = 0
        try r.scan { rec in
            count += 1
            progress.update(count)
            if rec.index <= snapshot.index {
                leftovers += 1 // Compacted entries stay until their segment holds only compacted ones.
                return true
            }
            if rec.index > expected {
                let gap = rec.index - 1 == expected ? "entry \(expected) is missing" : "entries \(expected)...\(rec.index - 1) are missing"
                problems.append(gap)
            }
            expected = rec.index + 1
            switch rec.entry {
            case let .failure(p):
                problems.append(p.description)
            case let .success(e):
                if e.ballot < lastBallot {
                    problems.append("entry \(e.index): ballot \(e.ballot) is lower than \(lastBallot) of entry \(lastBallotIndex)")
                }
                lastBallot = e.ballot
                lastBallotIndex = e.index
            }
            return true
        }
        progress.finish()
        if problems.isEmpty {
            let range = count - leftovers > 0 ? "\(snapshot.index + 1)...\(expected - 1)" : "none"
            var msg = "OK: \(r.path): \(count - leftovers) entries (\(range)), checksums verified, no gaps, ballots non-decreasing"
            if leftovers > 0 { msg += "; \(leftovers) compacted entries still stored (removed with their segment)" }
            Output.line(msg)
            Output.flush()
        }
        return problems
    }
}

/// A progress bar on stderr, only when stderr is a terminal.
final class Progress {
    let total: Int
    let enabled: Bool
    private var shown = -1
    init(total: Int, enabled: Bool) {
        self.total = max(total, 1)
        self.enabled = enabled
    }

    func update(_ done: Int) {
        guard enabled else { return }
        let pct = min(100, done * 100 / total)
        guard pct != shown else { return }
        shown = pct
        let width = 40, filled = pct * width / 100
        let bar = String(repeating: "#", count: filled) + String(repeating: " ", count: width - filled)
        let s = Array("\rverifying [\(bar)] \(pct)% \(done)/\(total)".utf8)
        _ = s.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
    }

    func finish() {
        guard enabled, shown >= 0 else { return }
        let s = Array("\n".utf8)
        _ = s.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
    }
}
