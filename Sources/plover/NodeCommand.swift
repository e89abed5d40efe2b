import ArgumentParser
import Foundation
import Logging
import Metrics
import Prometheus
import RDMAPaxos

/// `plover node --config FILE`: one replica with the key-value state machine, until SIGTERM/SIGINT.
struct NodeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "node", abstract: "Run one replica of the key-value store.")

    @Option(help: "The replica's TOML config file (docs/operations.md, \"Configuration\").") var config: String
    @Flag(help: ArgumentHelp("Start as if the stable log had lost nothing, even if the durability mode says it may have (memory mode, async after the host went down). Risky: entries and promises it lost are lost to the cluster unless a quorum of other members holds them. Only to bring back a cluster whose majority lost state (docs/operations.md, \"Recovering from lost state\").")) var assumeIntact = false
    @Flag(help: ArgumentHelp("Start as a replica that lost its state: it recovers from the leader before it votes. For a replica rebuilt from its peers with an empty data directory (docs/operations.md, \"Rebuilding a replica\").")) var recover = false

    func validate() throws {
        if assumeIntact && recover { throw ValidationError("--assume-intact and --recover contradict each other") }
    }

    func run() async throws {
        let c: NodeConfig
        do { c = try NodeConfig.load(path: config) } catch { throw CLIError(error.description) }
        LoggingSystem.bootstrap { StreamLogHandler.standardError(label: $0) }
        var logger = Logger(label: "plover.node.\(c.id)")
        logger.logLevel = .info
        // Once per process: everything that reports through swift-metrics lands in the registry
        // the node's endpoint serves.
        let registry = PrometheusCollectorRegistry()
        MetricsSystem.bootstrap(PloverMetrics.prometheusFactory(registry: registry))
        let server: ReplicaServer
        do {
            server = try await ReplicaServer.start(config: c, stateMachine: KeyValueStateMachine(), logger: logger, metricsRegistry: registry,
                                                   override: assumeIntact ? .assumeIntact : recover ? .recover : nil)
        } catch let e as ConfigError {
            throw CLIError(e.description)
        }
        logger.info("node \(c.id) serving: peers on \(c.me.address) over \(server.fabricDescription), clients on \(c.me.clientAddress), durability \(c.durability.rawValue), data in \(c.dataDir)")
        if let a = c.metricsAddress { logger.info("node \(c.id) metrics: http://\(a)/metrics") }
        await waitForTermination()
        logger.info("node \(c.id) stopping")
        server.stop()
    }
}

/// Returns once SIGTERM or SIGINT arrives.
func waitForTermination() async {
    signal(SIGTERM, SIG_IGN)
    signal(SIGINT, SIG_IGN)
    await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
        let once = OnceFlag()
        for sig in [SIGTERM, SIGINT] {
            let s = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            s.setEventHandler { if once.take() { c.resume() } }
            s.resume()
            retainedSignalSources.append(s)
        }
    }
}

/// Signal sources must outlive the call that installed them.
nonisolated(unsafe) var retainedSignalSources: [any DispatchSourceSignal] = []

final class OnceFlag: @unchecked Sendable {
    // @unchecked Sendable: `done` is only touched under `lock`.
    private let lock = NSLock()
    private var done = false
    func take() -> Bool { lock.withLock { defer { done = true }; return !done } }
}
