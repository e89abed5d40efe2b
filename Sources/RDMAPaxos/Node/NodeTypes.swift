import NIOCore
import Metrics

/// How a `ReplicaNode` runs: the core's limits and timings plus the runtime's own.
public struct NodeOptions: Sendable {
    /// The consensus core's limits and timings, including this node's id.
    public var replica: ReplicaConfig
    /// The initial configuration of a brand-new cluster (ignored once the log records one).
    public var bootstrap: Membership
    /// A proposal or read not answered within this many ticks fails with `NodeError.timedOut`.
    public var requestTimeoutTicks: Int = 500
    /// Compact the log into a snapshot once this many applied entries are held.
    public var compactEveryEntries: Int = 50_000
    /// Compact the log into a snapshot once it holds this many bytes (`StableLog.heldBytes`,
    /// plus the snapshot's bytes when the log has a `capacityBytes`, i.e. lives in memory too).
    /// nil: half the log's `capacityBytes`, or no byte trigger when the log has none.
    public var compactEveryBytes: Int?
    /// Most commands proposed in one batch (one accept message, one group commit).
    public var proposalsPerBatchMax: Int = 4096
    /// Seed of the core's election-timeout randomness (and of the nonce naming this start of the
    /// replica when it recovers lost state: use a different seed at every start).
    public var seed: UInt64
    /// Whether the stable log holds everything this replica ever acknowledged
    /// (`RestoredState.intact`). False after a restart that may have lost acknowledged writes
    /// (memory mode, async mode after the host went down): the replica then recovers from the
    /// leader before it votes (`ReplicaServer` decides; docs/operations.md, "Durability modes
    /// and restarts").
    public var stateIntact = true
    /// Start as intact even when `stateIntact` is false or an earlier start had not finished
    /// recovering (`plover node --assume-intact`; docs/operations.md, "Recovering from lost
    /// state"): the replica votes at once.
    public var assumeIntact = false
    /// Called on the node's thread for role and leader changes (for logs and demos).
    public var onEvent: (@Sendable (Event) -> Void)?
    /// Called on the node's thread with a warning for the operator (a memory-mode log or its
    /// snapshot nearing the log's `capacityBytes`).
    public var onWarning: (@Sendable (String) -> Void)?
    /// Where the node's metrics go (docs/operations.md, "Metrics"); nil: the process-wide
    /// `MetricsSystem.factory` (a no-op until something bootstraps it).
    public var metricsFactory: (any MetricsFactory)?
    /// Read the transport's ring statistics every this many ticks (`ReplicaServer`: about once a second).
    public var metricsSampleEveryTicks: Int = 100
    /// Where the node's loop runs: nil, a thread of its own; an event loop, as tasks on it.
    /// A replica whose fabric connections and client connections are on the same loop runs to
    /// completion on one thread: a landing is read, stepped and answered, and every write goes
    /// to its socket, without handing anything to another thread (`ReplicaServer` does this for
    /// the TCP fabric; docs/design/runtime.md, "One loop per replica").
    public var eventLoop: (any EventLoop)?
    /// Run the node's loop only when the caller calls `step()`, on the caller's thread: no
    /// thread or event loop of its own, and the snapshot saves that normally run off the loop
    /// go to `offLoop` (the simulator drives real nodes this way, deterministically).
    package var steppedByCaller = false
    /// Called on the node's loop with the messages the core asked to send once a persist unit is
    /// durable, as the node holds them (`true`), and with those it drops unsent (`false`, see
    /// `dropAcks`): the simulator notes what each one vouches for while it is held.
    package var onHeldAcks: (@Sendable ([Message], Bool) -> Void)?
    /// Called on the node's loop with the reads the core confirmed (for a caller driving the
    /// core's reads by hand; the node answers its own reads as it always does).
    package var onReadsReady: (@Sendable ([ReadState]) -> Void)?
    /// Where a stepped node's off-loop work (saving a compaction) goes; nil: a serial dispatch queue.
    package var offLoop: (any OffLoopQueue)?
    /// A learner at most this many entries behind the leader's last index may be promoted.
    public var catchUpEntriesMax: LogIndex = 1_000
    /// Highest node id a member may have (`limits.node_id_max`); nil: no limit.
    public var nodeIDMax: NodeID?
    /// Called on the node's thread once a leader said this replica was removed from the cluster,
    /// with a line for the log; the node stops serving requests (`plover node` then exits).
    public var onRemoved: (@Sendable (String) -> Void)?

    /// Options with the runtime's defaults; `seed` drives the core's randomized election timeouts.
    public init(replica: ReplicaConfig, bootstrap: Membership, seed: UInt64 = 1) {
        self.replica = replica
        self.bootstrap = bootstrap
        self.seed = seed
    }
}

/// Why a request to a node failed.
public enum NodeError: Error, Sendable, Equatable, CustomStringConvertible {
    /// This replica is not the leader; retry at `leader` if known.
    case notLeader(leader: NodeID?)
    /// The leader refused the request (overloaded, transfer or membership change in progress).
    case refused(ProposalRefusal)
    /// A membership change was refused; the refusal names the member and the reason.
    case membershipRefused(MembershipRefusal)
    /// Not answered in time; a proposal may or may not have committed.
    case timedOut
    /// Leadership changed and another entry took the proposal's place: it did not commit.
    case superseded
    /// The replica jumped ahead by installing a snapshot; the proposal's outcome is unknown.
    case outcomeUnknown
    /// The node is stopped. A proposal it was replicating when it stopped may still commit.
    case stopped
    /// The stable log failed; the node stopped serving (see the message for what to do). A
    /// proposal pending when it failed may already be on other replicas and still commit there:
    /// its outcome is unknown.
    case storage(String)

    /// Whether a proposal that failed with this error may still take effect (`timedOut`,
    /// `outcomeUnknown`, `stopped`, `storage`): read before proposing it again. The other cases
    /// say it did not.
    public var leavesProposalOutcomeUnknown: Bool {
        switch self {
        case .timedOut, .outcomeUnknown, .stopped, .storage: true
        case .notLeader, .refused, .membershipRefused, .superseded: false
        }
    }

    public var description: String {
        switch self {
        case let .notLeader(l): "not the leader" + (l.map { "; the leader is node \($0)" } ?? "; no leader known yet")
        case let .refused(r): "refused: \(r)"
        case let .membershipRefused(r): "refused: \(r)"
        case .timedOut: "timed out; the request may or may not have taken effect"
        case .superseded: "leadership changed before the command committed; it did not take effect"
        case .outcomeUnknown: "the replica installed a snapshot; the command's outcome is unknown"
        case .stopped: "the node is stopped"
        case let .storage(m): "storage failed, node stopped serving: \(m)"
        }
    }
}

/// A consistent view of one node, for `plover status` and metrics.
public struct NodeStatus: Sendable, Equatable {
    /// The node's id.
    public var id: NodeID
    /// The node's role (`follower` once it stopped serving).
    public var role: Role
    /// Whether the node is a witness.
    public var isWitness: Bool
    /// The highest ballot promised; the leader's own ballot when leading.
    public var ballot: Ballot
    /// The leader the node knows of, if any.
    public var leader: NodeID?
    /// Index of the first entry still in the log.
    public var firstIndex: LogIndex
    /// Index of the last entry in the log.
    public var lastIndex: LogIndex
    /// Highest index durable in the stable log.
    public var durableIndex: LogIndex
    /// Highest index known committed.
    public var commitIndex: LogIndex
    /// Highest index applied to the state machine.
    public var appliedIndex: LogIndex
    /// The configuration in force.
    public var membership: Membership
    /// Followers' match indexes as seen by the leader (empty elsewhere).
    public var followerMatch: [NodeID: LogIndex]
    /// Set once the node stopped serving because of a storage failure.
    public var failure: String?
    /// Set while the node holds writes because its log's disk has no room for them (it serves
    /// status and local reads, and neither leads nor acknowledges, until space is freed).
    public var storageWarning: String? = nil
    /// Set while the replica recovers state it may have lost: why it does not vote yet.
    public var recovery: String?
    /// Set once a leader said this replica was removed from the cluster (it stopped serving).
    public var removed: String? = nil
}
