import RDMAPaxosCore

/// One simulated cluster run: topology, fault mix and durations. Everything random derives
/// from `seed`, so a seed replays exactly.
public struct SimulationOptions: Sendable, Hashable {
    public var seed: UInt64
    /// Members that vote (including the witness, if any).
    public var voters: Int = 3
    /// Make the last voting member a witness (persists and votes, never applies or leads).
    public var witness: Bool = false
    /// Add one non-voting learner.
    public var learner: Bool = false
    /// Ticks with faults injected, then ticks allowed for the healed cluster to converge.
    public var faultTicks: Int = 300
    public var healTicksMax: Int = 300

    // Per-message faults while faults are on.
    public var dropRate: Double = 0.05
    public var duplicateRate: Double = 0.02
    public var delayTicksMax: Int = 3
    // Per-tick faults while faults are on.
    public var crashRate: Double = 0.01
    public var partitionRate: Double = 0.01
    public var diskStallRate: Double = 0.005
    public var compactRate: Double = 0.02
    public var proposeRate: Double = 0.5
    public var readRate: Double = 0.1
    /// Slowest a disk write takes, in ticks.
    public var diskDelayTicksMax: Int = 2

    public init(seed: UInt64) { self.seed = seed }

    /// The fault mixes the test suite and `plover simulate` rotate through, by seed.
    public static func standard(seed: UInt64) -> SimulationOptions {
        var o = SimulationOptions(seed: seed)
        switch seed % 4 {
        case 0: o.voters = 3
        case 1: o.voters = 5
        case 2: o.voters = 3; o.witness = true
        default: o.voters = 5; o.witness = true; o.learner = true
        }
        return o
    }
}

/// What a passing run did.
public struct SimulationReport: Sendable, Hashable, CustomStringConvertible {
    public var seed: UInt64
    public var ticks = 0
    public var committed = 0
    public var acknowledged = 0
    public var readsConfirmed = 0
    public var messagesDelivered = 0
    public var messagesDropped = 0
    public var messagesDuplicated = 0
    public var crashes = 0
    public var partitions = 0
    public var diskStalls = 0
    public var compactions = 0
    public var snapshotsInstalled = 0
    public var elections = 0

    public var description: String {
        "seed \(seed): \(ticks) ticks, \(committed) committed, \(acknowledged) acked, \(readsConfirmed) reads, "
            + "\(elections) leaders, \(crashes) crashes, \(partitions) partitions, \(diskStalls) disk stalls, "
            + "\(compactions) compactions, \(snapshotsInstalled) snapshot installs, "
            + "\(messagesDelivered) delivered / \(messagesDropped) dropped / \(messagesDuplicated) duplicated"
    }
}

/// A checker found a violation. `seed` replays it.
public struct SimulationFailure: Error, Sendable, CustomStringConvertible {
    public var seed: UInt64
    public var tick: Int
    public var message: String
    public var trace: [String]

    public var description: String {
        "simulation seed \(seed) failed at tick \(tick): \(message)\n"
            + "replay: swift run plover simulate --seed \(seed) --trace\n"
            + trace.suffix(40).joined(separator: "\n")
    }
}
