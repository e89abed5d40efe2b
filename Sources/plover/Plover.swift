import ArgumentParser
import RDMAPaxos

@main
struct Plover: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "plover",
        abstract: "RDMA Paxos replicated log and VM replication.",
        subcommands: [
            Simulate.self,
            BenchCommand.self,
            StableLogWriterCommand.self,
            Doctor.self,
        ])
}
