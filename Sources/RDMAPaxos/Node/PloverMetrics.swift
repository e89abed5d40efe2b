import Prometheus

/// Names and Prometheus set-up of the metrics a replica exports (docs/operations.md, "Metrics").
public enum PloverMetrics {
    /// Timer: time from a proposal being queued at the leader until it is committed and applied.
    public static let commitLatency = "plover_commit_latency_seconds"
    /// Histogram: commands proposed together in one batch.
    public static let proposalsPerBatch = "plover_proposals_per_batch"
    /// Counter: log entries applied to the state machine.
    public static let entriesApplied = "plover_entries_applied_total"
    /// Counter: elections started, labelled `kind` = `election` or `pre_vote`.
    public static let electionsStarted = "plover_elections_started_total"
    /// Counter: ticks that reached the node thread together with an earlier one, because the
    /// thread fell behind its clock (a starved or overloaded machine).
    public static let lateTicks = "plover_late_ticks_total"
    /// Timer: how late the oldest of several ticks that ran together was.
    public static let tickDelay = "plover_tick_delay_seconds"
    /// Counter: elections this node won.
    public static let electionsWon = "plover_elections_won_total"
    /// Counter: changes of the leader this node knows of.
    public static let leaderChanges = "plover_leader_changes_total"
    /// Gauge per `role` label: 1 for the node's current role, 0 for the others.
    public static let role = "plover_role"
    /// Gauge: the commit index.
    public static let commitIndex = "plover_commit_index"
    /// Gauge: the applied index.
    public static let appliedIndex = "plover_applied_index"
    /// Gauge: index of the last entry in the log.
    public static let lastIndex = "plover_last_index"
    /// Gauge: highest index durable in the stable log.
    public static let durableIndex = "plover_durable_index"
    /// Gauge: proposals waiting to be committed and applied.
    public static let pendingProposals = "plover_pending_proposals"
    /// Gauge: linearizable reads waiting for an answer.
    public static let pendingReads = "plover_pending_reads"
    /// Gauge: bytes the stable log's entries take (`StableLog.heldBytes`).
    public static let logBytes = "plover_log_bytes"
    /// Gauge: bytes of the latest snapshot this replica holds.
    public static let snapshotBytes = "plover_snapshot_bytes"
    /// Gauge: the stable log's `capacityBytes` (memory mode); not exported when unbounded.
    public static let logCapacity = "plover_log_capacity_bytes"
    /// Counter: stable-log failures that stopped the node serving.
    public static let storageFailures = "plover_storage_failures_total"
    /// Counter: messages the ring transport queued for a peer.
    public static let ringMessagesSent = "plover_ring_messages_sent_total"
    /// Counter: messages the ring transport received and delivered.
    public static let ringMessagesDelivered = "plover_ring_messages_delivered_total"
    /// Counter: messages the ring transport dropped, labelled by `reason`.
    public static let ringMessagesDropped = "plover_ring_messages_dropped_total"
    /// Counter: incoming ring records that failed their check (torn writes).
    public static let ringTornRecords = "plover_ring_torn_records_total"
    /// Counter: incoming ring records that did not decode as a message.
    public static let ringUndecodable = "plover_ring_undecodable_total"
    /// Counter: queue-pair connections the ring transport made.
    public static let ringConnects = "plover_ring_connects_total"
    /// Gauge per `peer`: bytes queued in the outgoing ring to that peer.
    public static let ringOccupancy = "plover_ring_occupancy_bytes"
    /// Gauge: size of one ring in bytes.
    public static let ringCapacity = "plover_ring_capacity_bytes"

    /// A swift-metrics factory over `registry` with histogram buckets that fit a replicated log:
    /// commit latency from 50 µs (RDMA, no fsync) to 5 s, batch sizes in powers of two up to
    /// the default `proposalsPerBatchMax`.
    public static func prometheusFactory(registry: PrometheusCollectorRegistry) -> PrometheusMetricsFactory {
        var f = PrometheusMetricsFactory(registry: registry)
        f.durationHistogramBuckets[commitLatency] = [
            .microseconds(50), .microseconds(100), .microseconds(250), .microseconds(500),
            .milliseconds(1), .milliseconds(2), .milliseconds(5), .milliseconds(10), .milliseconds(25),
            .milliseconds(50), .milliseconds(100), .milliseconds(250), .milliseconds(500),
            .seconds(1), .seconds(5),
        ]
        f.durationHistogramBuckets[tickDelay] = [
            .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(50), .milliseconds(100),
            .milliseconds(250), .milliseconds(500), .seconds(1), .seconds(5),
        ]
        f.valueHistogramBuckets[proposalsPerBatch] = (0...12).map { Double(1 << $0) }
        return f
    }
}
