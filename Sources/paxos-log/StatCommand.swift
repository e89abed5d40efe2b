import ArgumentParser
import Foundation
import RDMAPaxos

/// `paxos-log stat DIR`: what the store holds, at a glance.
struct StatCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "stat",
        abstract: "First/last index, entry count, bytes, hard state, durability mode, format version.")

    @Argument(help: "The node's log directory.") var directory: String

    func run() throws {
        try withStore(directory) { r in
            let meta = try r.metadata()
            var count = 0, valueBytes = 0, compacted = 0
            var first: LogIndex?, last: LogIndex?
            try r.scan { rec in
                // Compacted entries stay until their segment holds only compacted ones.
                if rec.index <= meta.snapshot.index {
                    compacted += 1
                    return true
                }
                if first == nil { first = rec.index }
                last = rec.index
                count += 1
                valueBytes += rec.value.count
                return true
            }
            let files = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
            let diskBytes = files.reduce(0) { sum, f in
                let size = (try? FileManager.default.attributesOfItem(atPath: directory + "/" + f)[.size] as? Int) ?? 0
                return sum + size
            }
            let hs = meta.hardState
            let rows: [(String, String)] = [
                ("store", directory),
                ("node", r.live ? "running (paxos-log attached read-only)" : "not running"),
                ("format version", "\(meta.formatVersion)"),
                ("durability", "\(meta.durability) (mode the store was last opened with)"),
                ("snapshot", "index \(meta.snapshot.index), ballot \(meta.snapshot.ballot)"),
                ("first index", first.map { "\($0)" } ?? "none (empty; next is \(meta.snapshot.index + 1))"),
                ("last index", last.map { "\($0)" } ?? "none"),
                ("entries", "\(count)"),
                ("compacted", "\(compacted) entries kept until their segment is removed"),
                ("segments", "\(meta.segments.count) (first indexes \(meta.segments.map(String.init).joined(separator: ", ")))"),
                ("entry bytes", "\(valueBytes) (records incl. 25-byte headers)"),
                ("disk bytes", "\(diskBytes) (all files in the directory)"),
                ("promised", "\(hs.promised)"),
                ("commit index", "\(hs.commitIndex)"),
                ("membership", Formatting.membership(hs.membership)),
            ]
            for (k, v) in rows { Output.line(k.padding(toLength: 15, withPad: " ", startingAt: 0) + v) }
            Output.flush()
        }
    }
}
