import ArgumentParser
import RDMAPaxos

@main
struct Plover: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "plover",
        abstract: "RDMA Paxos replicated log and VM replication.",
        subcommands: [
            KV.self,
            Status.self,
            Simulate.self,
            BenchCommand.self,
            StableLogWriterCommand.self,
            Doctor.self,
        ])
}
