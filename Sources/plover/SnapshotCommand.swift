import ArgumentParser
import Foundation
import PloverTesting
import RDMAPaxos

/// `plover snapshot save|restore`: back up the replicated state and configuration, and start a
/// new cluster from a backup (docs/operations.md, "Back up and restore").
struct SnapshotCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "snapshot", abstract: "Back up a running cluster's state, or restore a backup into a new cluster.",
        subcommands: [Save.self, Restore.self])

    struct Save: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Write the state machine and configuration of a replica (the leader by default) to FILE.")
        @OptionGroup var cluster: ClusterOptions
        @Option(help: "Back up this replica instead of the leader (a follower's copy may lag; for a survivor after a majority was lost).") var node: NodeID?
        @Argument(help: "The backup file to write (replaced atomically).") var file: String
        func run() throws {
            let (client, reply) = try discover(cluster)
            guard let target = node ?? reply.leader else { throw CLIError("no leader known; name a replica with --node N") }
            let s: Snapshot
            do { s = try client.backup(of: target) } catch { throw CLIError("\(error)") }
            let bytes = FileSnapshotStore.encode(s)
            let tmp = file + ".tmp"
            guard FileManager.default.createFile(atPath: tmp, contents: Data(bytes), attributes: [.posixPermissions: 0o600]) else {
                throw CLIError("\(file): cannot write \(tmp)")
            }
            guard rename(tmp, file) == 0 else { throw CLIError("\(file): rename failed: \(String(cString: strerror(errno)))") }
            print("saved node \(target)'s state through index \(s.index) (\(s.data.count) bytes; members \(s.membership.members.map { String($0.id) }.joined(separator: ", "))) to \(file)")
        }
    }

    struct Restore: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Prepare a new member's empty data directory from a backup; run it for every member of the new cluster, then start them.")
        @Option(help: "The new member's config file: its [[members]] become the new cluster's configuration.") var config: String
        @Argument(help: "A backup written by plover snapshot save.") var file: String
        func run() throws {
            let c: NodeConfig
            do { c = try NodeConfig.load(path: config) } catch { throw CLIError(error.description) }
            guard let data = FileManager.default.contents(atPath: file) else { throw CLIError("\(file): cannot be read") }
            do {
                let s = try FileSnapshotStore.decode([UInt8](data), path: file)
                try BackupRestore.restore(s, into: c)
                print("restored \(file) (state through index \(s.index), \(s.data.count) bytes) into \(c.dataDir) for node \(c.id); new configuration: \(c.members.map { "\($0.id)@\($0.address)" }.joined(separator: ", "))")
            } catch {
                throw CLIError("\(error)")
            }
        }
    }
}
