import ArgumentParser
import Foundation
import Logging
import Metrics
import Prometheus
import PloverTesting
import RDMAPaxos

/// `plover node --config FILE`: one replica with the key-value state machine, until SIGTERM/SIGINT.
struct NodeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "node", abstract: "Run one replica of the key-value store.")

    @Option(help: "The replica's TOML config file (docs/operations.md, \"Configuration\").") var config: String
    @Flag(help: ArgumentHelp("Start as if the stable log had lost nothing, even if the durability mode says it may have (memory mode, async after the host went down). Risky: entries and promises it lost are lost to the cluster unless a quorum of other members holds them. Only to bring back a cluster whose majority lost state (docs/operations.md, \"Recovering from lost state\").")) var assumeIntact = false
    @Flag(help: ArgumentHelp("Start as a replica that lost its state: it recovers from the leader before it votes. For a replica rebuilt from its peers with an empty data directory (docs/operations.md, \"Rebuilding a replica\").")) var recover = false
    @Option(help: ArgumentHelp("Join a running cluster: HOST:PORT is any member's client address. The replica learns the configuration from it (it must have been added first with plover member add) and the state from the leader (snapshot, then log). The config file then needs no [[members]].", valueName: "host:port")) var join: String?
    @Option(help: "This replica's node id (overrides the config file's id; required with --join when the file has none).") var id: NodeID?

    func validate() throws {
        if assumeIntact && recover { throw ValidationError("--assume-intact and --recover contradict each other") }
        if let j = join, HostPort(parsing: j) == nil { throw ValidationError("--join: \"\(j)\" is not host:port (a member's client address)") }
    }

    func run() async throws {
        var c: NodeConfig
        do { c = try NodeConfig.load(path: config, requireMembers: join == nil) } catch { throw CLIError(error.description) }
        if let id { c.id = id }
        if let join { c = try joinedConfig(c, at: join) }
        LoggingSystem.bootstrap { StreamLogHandler.standardError(label: $0) }
        var logger = Logger(label: "plover.node.\(c.id)")
        logger.logLevel = .info
        // Once per process: everything that reports through swift-metrics lands in the registry
        // the node's endpoint serves.
        let registry = PrometheusCollectorRegistry()
        MetricsSystem.bootstrap(PloverMetrics.prometheusFactory(registry: registry))
        let server: ReplicaServer
        let stopRequest = StopRequest()
        do {
            server = try await ReplicaServer.start(config: c, stateMachine: KeyValueStateMachine(), logger: logger, metricsRegistry: registry,
                                                   override: assumeIntact ? .assumeIntact : recover ? .recover : nil,
                                                   onRemoved: { _ in stopRequest.fire(.removed) })
        } catch let e as ConfigError {
            throw CLIError(e.description)
        }
        let me = server.node.status.membership.member(c.id)
        logger.info("node \(c.id) serving: peers on \(me?.peerAddress ?? c.me.address) over \(server.fabricDescription), clients on \(me?.clientAddress ?? c.me.clientAddress), durability \(c.durability.rawValue), data in \(c.dataDir)")
        if let a = c.metricsAddress { logger.info("node \(c.id) metrics: http://\(a)/metrics") }
        switch await stopRequest.wait() {
        case .removed:
            logger.notice("node \(c.id) stopping: removed from the cluster")
            server.stop()
        case .signal:
            logger.info("node \(c.id) stopping")
            if let l = await server.stopGracefully() { logger.info("node \(c.id) handed leadership to node \(l) before stopping") }
        }
    }

    /// The config file completed with the configuration of the cluster at `address`; refused when
    /// that configuration does not hold this replica's id.
    func joinedConfig(_ file: NodeConfig, at address: String) throws -> NodeConfig {
        guard file.id != 0 else { throw CLIError("--join needs this replica's id: --id N (or id in \(config))") }
        let reply: ConfigurationReply
        do { reply = try NodeClient.configuration(at: address) } catch {
            throw CLIError("--join \(address): cannot read the cluster's configuration: \(error)")
        }
        let ids = reply.membership.members.map { String($0.id) }.joined(separator: ", ")
        guard let m = reply.membership.member(file.id) else {
            throw CLIError("--join \(address): node \(file.id) is not a member of that cluster (members \(ids)); add it first: plover member add --id \(file.id) --address HOST:PORT --client-address HOST:PORT --endpoints ID=\(address)")
        }
        guard !m.peerAddress.isEmpty, !m.clientAddress.isEmpty else {
            throw CLIError("--join \(address): the cluster's configuration holds no addresses for node \(file.id) (a build that did not record them wrote it)")
        }
        var c = file
        c.adoptMembers(reply.membership)
        do { try c.validate(file: config) } catch { throw CLIError(error.description) }
        return c
    }
}

/// Why `plover node` stops: a signal, or the cluster removed it.
final class StopRequest: @unchecked Sendable {
    // @unchecked Sendable: `reason` and `waiter` are only touched under `lock`.
    enum Reason { case signal, removed }
    private let lock = NSLock()
    private var reason: Reason?
    private var waiter: CheckedContinuation<Reason, Never>?

    init() {
        signal(SIGTERM, SIG_IGN)
        signal(SIGINT, SIG_IGN)
        for sig in [SIGTERM, SIGINT] {
            let s = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            s.setEventHandler { [weak self] in self?.fire(.signal) }
            s.resume()
            retainedSignalSources.append(s)
        }
    }

    func fire(_ r: Reason) {
        let w: CheckedContinuation<Reason, Never>? = lock.withLock {
            guard reason == nil else { return nil }
            reason = r
            defer { waiter = nil }
            return waiter
        }
        w?.resume(returning: r)
    }

    func wait() async -> Reason {
        await withCheckedContinuation { c in
            let now: Reason? = lock.withLock {
                if let r = reason { return r }
                waiter = c
                return nil
            }
            if let now { c.resume(returning: now) }
        }
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

final class OnceFlag: @unchecked Sendable {
    // @unchecked Sendable: `done` is only touched under `lock`.
    private let lock = NSLock()
    private var done = false
    func take() -> Bool { lock.withLock { defer { done = true }; return !done } }
}
