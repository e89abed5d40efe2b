import ArgumentParser
import Foundation
import RDMAPaxos

/// `paxos-log tail DIR [-f]`: the newest entries, and with -f every new one as the node writes it.
struct TailCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tail",
        abstract: "Print the last entries; with -f keep following new entries while a node runs.",
        discussion: """
            With -f, paxos-log attaches read-only to the running node's environment and polls it.
            When the node stops it detaches (so the next node can recover the store) and waits
            for one to start. Stop with Ctrl-C.
            """)

    @Argument(help: "The node's log directory.") var directory: String
    @Option(name: .shortAndLong, help: "How many of the last entries to print first.") var lines: Int = 10
    @Flag(name: .shortAndLong, help: "Keep following new entries.") var follow = false
    @Option(help: "Milliseconds between polls with -f.") var intervalMs: Int = 200

    /// Set by SIGINT/SIGTERM so the follower detaches from the environment cleanly: a reader killed
    /// inside a read could leave a lock behind that the node would wait for.
    nonisolated(unsafe) static var stop: sig_atomic_t = 0

    func run() throws {
        var next: LogIndex = 0
        try withStore(directory) { r in
            guard let b = try r.bounds() else { return }
            next = b.last >= LogIndex(lines) ? max(b.first, b.last - LogIndex(lines) + 1) : b.first
            next = try printNew(r, from: next)
        }
        Output.flush()
        guard follow else { return }
        signal(SIGINT) { _ in TailCommand.stop = 1 }
        signal(SIGTERM) { _ in TailCommand.stop = 1 }
        var reader: LogStoreReader?
        defer { reader?.close() }
        while Self.stop == 0 {
            usleep(useconds_t(max(10, intervalMs) * 1000))
            if let r = reader, r.nodeGone { r.close(); reader = nil }
            if reader == nil {
                // A stopped store is read and let go at once, so a node can start on it.
                guard let r = try? LogStoreReader.open(path: directory) else { continue }
                reader = r
            }
            guard let r = reader else { continue }
            do {
                if let b = try r.bounds(), b.last + 1 < next {
                    Output.line("# log truncated: last index is now \(b.last)")
                    next = b.last + 1
                }
                next = try printNew(r, from: next)
            } catch {
                Output.error("paxos-log: \(error) (retrying)")
                r.close()
                reader = nil
            }
            if !r.live { r.close(); reader = nil }
            Output.flush()
        }
    }

    /// Prints entries from `from` on and returns the index after the last one printed.
    private func printNew(_ r: LogStoreReader, from: LogIndex) throws -> LogIndex {
        var next = from
        try r.scan(from: from) { rec in
            Output.line(Formatting.text(rec))
            next = rec.index + 1
            return true
        }
        return next
    }
}
