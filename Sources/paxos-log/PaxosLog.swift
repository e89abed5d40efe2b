import ArgumentParser
import RDMAPaxos

@main
struct PaxosLog: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "paxos-log",
        abstract: "Inspect a plover replica's Berkeley DB log store.")
}
