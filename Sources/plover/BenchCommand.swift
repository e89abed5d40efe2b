import ArgumentParser
import PloverTesting

/// `plover bench …`: runnable benchmarks (benchmarks/README.md lists them and their results).
struct BenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Run a benchmark.",
        subcommands: [StableLogBench.self, ConsensusBench.self, VMBench.self, VMFailoverBench.self, VMTapBench.self, VMCheckpointBytesBench.self, SoakBench.self,
                      StopGapBench.self, FailoverBench.self, RoundTripEcho.self])
}
