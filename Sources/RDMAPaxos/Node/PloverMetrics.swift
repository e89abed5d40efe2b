import Prometheus

/// Names and Prometheus set-up of the metrics a replica exports (docs/operations.md, "Metrics").
public enum PloverMetrics {
    public static let commitLatency = "plover_commit_latency_seconds"
    public static let proposalsPerBatch = "plover_proposals_per_batch"
    public static let entriesApplied = "plover_entries_applied_total"
    public static let electionsStarted = "plover_elections_started_total"
    public static let electionsWon = "plover_elections_won_total"
    public static let leaderChanges = "plover_leader_changes_total"
    public static let role = "plover_role"
    public static let commitIndex = "plover_commit_index"
    public static let appliedIndex = "plover_applied_index"
    public static let lastIndex = "plover_last_index"
    public static let durableIndex = "plover_durable_index"
    public static let pendingProposals = "plover_pending_proposals"
    public static let pendingReads = "plover_pending_reads"
    public static let storageFailures = "plover_storage_failures_total"
    public static let ringMessagesSent = "plover_ring_messages_sent_total"
    public static let ringMessagesDelivered = "plover_ring_messages_delivered_total"
    public static let ringMessagesDropped = "plover_ring_messages_dropped_total"
    public static let ringTornRecords = "plover_ring_torn_records_total"
    public static let ringUndecodable = "plover_ring_undecodable_total"
    public static let ringConnects = "plover_ring_connects_total"
    public static let ringOccupancy = "plover_ring_occupancy_bytes"
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
        f.valueHistogramBuckets[proposalsPerBatch] = (0...12).map { Double(1 << $0) }
        return f
    }
}
