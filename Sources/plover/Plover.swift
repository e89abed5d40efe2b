import ArgumentParser
import RDMAPaxos

@main
struct Plover: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "plover",
        abstract: "RDMA Paxos replicated log and VM replication.",
        subcommands: [
            NodeCommand.self,
            KV.self,
            Demo.self,
            Status.self,
            MemberCommand.self,
            SnapshotCommand.self,
            Simulate.self,
            BenchCommand.self,
            StableLogWriterCommand.self,
            Doctor.self,
            VMCommand.self,
            ProxyCommand.self,
        ])
}
