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
    @Option(name: [.customShort("n"), .long], help: "How many of the last entries to print first.") var lines: Int = 10
    @Flag(name: .shortAndLong, help: "Keep following new entries.") var follow = false
    @Option(help: "Milliseconds between polls with -f.") var intervalMs: Int = 200

    func run() throws {
        var next: LogIndex = 0
        try withStore(directory) { r in
            guard let b = try r.bounds() else { return }
            next = b.last >= LogIndex(lines) ? max(b.first, b.last - LogIndex(lines) + 1) : b.first
            next = try printNew(r, from: next)
        }
        Output.flush()
        guard follow else { return }
        // Ctrl-C and SIGTERM end the loop instead of the process, so the follower detaches from the
        // environment cleanly: a reader killed inside a read could leave a lock the node waits for.
        let stop = StopFlag()
        var sources: [DispatchSourceSignal] = []
        for sig in [SIGINT, SIGTERM] {
            signal(sig, SIG_IGN)
            let src = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            src.setEventHandler { stop.set() }
            src.resume()
            sources.append(src)
        }
        var reader: LogStoreReader?
        defer { reader?.close() }
        while !stop.isSet {
            usleep(useconds_t(max(10, intervalMs) * 1000))
            if reader == nil {
                // Attach only to a running node: opening a stopped store takes the writer lock,
                // which would keep a node from starting.
                guard LogStoreReader.isNodeRunning(path: directory),
                      let r = try? LogStoreReader.open(path: directory) else { continue }
                reader = r
            }
            guard let r = reader else { continue }
            let gone = r.nodeGone
            if gone && LogStoreReader.isNodeRunning(path: directory) {
                // Replaced by a new node, which is waiting for us to detach so it can recover.
                r.close()
                reader = nil
                continue
            }
            do {
                if let b = try r.bounds(), b.last + 1 < next {
                    Output.line("# log truncated: last index is now \(b.last)")
                    next = b.last + 1
                }
                next = try printNew(r, from: next)
            } catch {
                if !gone { Output.error("paxos-log: \(error) (attaching again)") }
                r.close()
                reader = nil
            }
            Output.flush()
            // Read once more after the node went away (what it committed last), then let go so
            // the next node can recover the store.
            if gone || !r.live {
                r.close()
                reader = nil
            }
        }
        withExtendedLifetime(sources) {}
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

/// Set from a signal handler's dispatch source, read by the follow loop.
final class StopFlag: @unchecked Sendable {
    // @unchecked Sendable: `value` is guarded by `lock`.
    private let lock = NSLock()
    private var value = false
    func set() { lock.lock(); value = true; lock.unlock() }
    var isSet: Bool { lock.lock(); defer { lock.unlock() }; return value }
}
