import Logging
import Prometheus
import RDMAPaxos
import ServiceLifecycle

/// One replica of the counter as a ServiceLifecycle `Service`: `run()` starts a `ReplicaServer`
/// (stable log, fabric, consensus node, client server, metrics endpoint) from a replica config and
/// serves until the service group shuts down.
///
/// On a graceful shutdown (SIGTERM through the group's `gracefulShutdownSignals`) a leader first
/// hands leadership to a caught-up voter, so writes go on without waiting for an election; on
/// cancellation the replica stops at once.
public struct ReplicaService: Service {
    /// The replica's config (`NodeConfig.load(path:)` reads the TOML file `plover node` takes).
    public let config: NodeConfig
    /// Where the replica's metrics go; the metrics endpoint (`metrics_address`) serves it.
    public let registry: PrometheusCollectorRegistry
    /// The replica's logger.
    public let logger: Logger

    /// A service for the replica `config` describes; starts nothing until `run()`.
    public init(config: NodeConfig, registry: PrometheusCollectorRegistry = PrometheusCollectorRegistry(), logger: Logger) {
        self.config = config
        self.registry = registry
        self.logger = logger
    }

    /// Starts the replica with a fresh counter (the log and the latest snapshot bring it back to
    /// its state), serves until graceful shutdown or cancellation, then stops it.
    public func run() async throws {
        let server = try await ReplicaServer.start(config: config, stateMachine: CounterStateMachine(), logger: logger,
                                                   metricsRegistry: registry)
        logger.info("counter replica \(config.id) serving clients on \(config.me.clientAddress) over \(server.fabricDescription)")
        do {
            try await gracefulShutdown()
        } catch {
            // Cancelled: the group is going down without waiting for anyone.
            logger.info("counter replica \(config.id) cancelled: stopping now")
            server.stop()
            return
        }
        logger.info("counter replica \(config.id) shutting down gracefully")
        if let l = await server.stopGracefully() {
            logger.info("counter replica \(config.id) handed leadership to node \(l)")
        }
    }
}
