import ArgumentParser
import RDMAPaxos

/// `paxos-log dump DIR [--from N] [--to M] [--json]`: the entries themselves.
struct DumpCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dump",
        abstract: "Print entries: index, ballot, kind, size, payload as hex and a printable preview.",
        discussion: "--json prints one JSON object per line with the full payload in base64.")

    @Argument(help: "The node's log directory.") var directory: String
    @Option(help: "First index to print.") var from: LogIndex = 0
    @Option(help: "Last index to print.") var to: LogIndex = .max
    @Flag(help: "JSON Lines output with full payloads (base64).") var json = false

    func validate() throws {
        guard from <= to else { throw ValidationError("--from \(from) is after --to \(to)") }
    }

    func run() throws {
        try withStore(directory) { r in
            if !json { Output.line("# index\tballot\tkind\tsize\tpayload (hex)\t|preview|") }
            try r.scan(from: from, through: to) { rec in
                Output.line(json ? Formatting.json(rec) : Formatting.text(rec))
                return true
            }
            Output.flush()
        }
    }
}
