import Foundation
import Logging
import NIOPosix
import Prometheus

/// A whole replica process as `plover node` runs it, assembled from a `NodeConfig`:
/// Berkeley DB log (in memory mode a `MemoryLog`) + snapshot file, the configured fabric under a
/// `RingTransport`, a timer clock, the `ReplicaNode` with a state machine, the client server,
/// and the metrics endpoint when `metrics_address` is set.
public final class ReplicaServer: Sendable {
    /// The consensus node.
    public let node: ReplicaNode
    /// The server answering clients on the member's `client_address`.
    public let clientServer: ClientServer
    /// Serves `metricsRegistry` on `metrics_address` (nil when none is configured).
    public let metricsEndpoint: MetricsEndpoint?
    /// Which fabric carries the consensus traffic, and why (for logs and `plover status`).
    public let fabricDescription: String
    /// The last log index this replica's stable log held when the process opened it (its
    /// snapshot's index when only a snapshot was left): 0 for a replica with no history, more
    /// after a restart. Entries up to it that the state machine sees again are replays.
    public let recoveredLastIndex: LogIndex
    /// Whether the replica started with a stable log it could trust, and why
    /// (`NodeOptions.stateIntact`; a replica that could not recovers before it votes).
    public let trust: StateTrust
    let durability: Durability
    let dataDir: String
    /// Length of a tick in milliseconds (for the graceful stop's deadline).
    let tickMilliseconds: Int
    /// The replica's one loop: the node's events, its TCP fabric connections and its clients.
    let loop: MultiThreadedEventLoopGroup

    init(node: ReplicaNode, clientServer: ClientServer, metricsEndpoint: MetricsEndpoint?, fabricDescription: String, recoveredLastIndex: LogIndex,
         trust: StateTrust, durability: Durability, dataDir: String, tickMilliseconds: Int, loop: MultiThreadedEventLoopGroup) {
        self.loop = loop
        self.tickMilliseconds = tickMilliseconds
        self.recoveredLastIndex = recoveredLastIndex
        self.trust = trust
        self.durability = durability
        self.dataDir = dataDir
        self.node = node
        self.clientServer = clientServer
        self.metricsEndpoint = metricsEndpoint
        self.fabricDescription = fabricDescription
    }

    /// Starts the replica. Its metrics go to `metricsRegistry` (through
    /// `PloverMetrics.prometheusFactory`), which the endpoint serves; `plover node` passes the
    /// registry it bootstrapped the process-wide `MetricsSystem` with. `override` (`plover node
    /// --assume-intact` or `--recover`) replaces the judgement of whether the stable log lost
    /// acknowledged writes (docs/operations.md, "Recovering from lost state").
    public static func start(config file: NodeConfig, stateMachine: any StateMachine, logger: Logger,
                             metricsRegistry: PrometheusCollectorRegistry = PrometheusCollectorRegistry(),
                             override: StateTrust.Override? = nil,
                             onRemoved: (@Sendable (String) -> Void)? = nil) async throws -> ReplicaServer {
        // One thread runs the replica to completion: the node's loop, the TCP fabric's
        // connections and the client connections share it (docs/design/runtime.md, "One loop
        // per replica").
        let loop = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        do {
            return try await assemble(config: file, stateMachine: stateMachine, logger: logger, metricsRegistry: metricsRegistry,
                                      override: override, onRemoved: onRemoved, loop: loop)
        } catch {
            try? await loop.shutdownGracefully()
            throw error
        }
    }

    private static func assemble(config file: NodeConfig, stateMachine: any StateMachine, logger: Logger,
                                 metricsRegistry: PrometheusCollectorRegistry, override: StateTrust.Override?,
                                 onRemoved: (@Sendable (String) -> Void)?, loop: MultiThreadedEventLoopGroup) async throws -> ReplicaServer {
        var c = file
        guard let keyPath = c.clusterKeyFile else {
            throw ConfigError(file: "config", key: "cluster_key_file", problem: "is required: peers authenticate with the cluster key")
        }
        let key = try ClusterKey.load(path: keyPath)
        if c.durability != .memory || !c.dataDir.isEmpty {
            try FileManager.default.createDirectory(atPath: c.dataDir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        }
        var trust = StateTrust.assess(durability: c.durability, dataDir: c.dataDir)
        if override == .assumeIntact {
            logger.warning("--assume-intact: this replica votes at once (\(trust.reason)); entries and promises it lost are lost to the cluster if no quorum of other members holds them")
            trust = StateTrust(intact: true, reason: "--assume-intact (\(trust.reason))")
        } else if override == .recover {
            trust = StateTrust(intact: false, reason: "--recover (\(trust.reason))")
            logger.warning("--recover: this replica recovers from the leader before it votes (status role=recovering)")
        } else if trust.intact {
            logger.info("stable log trusted: \(trust.reason)")
        } else {
            logger.warning("stable log may have lost acknowledged writes (\(trust.reason)): this replica recovers from the leader before it votes (status role=recovering)")
        }
        if c.durability == .memory && c.dataDir.isEmpty { logger.warning("\(trust.reason)") }
        var logOptions = BerkeleyDBLog.Options()
        // Fault injection for stalled-disk tests (docs/reliability.md); unset in normal use.
        logOptions.stallWhileFileExists = ProcessInfo.processInfo.environment["PLOVER_FAULT_DISK_STALL_FILE"]
        logOptions.memoryBytesMax = c.memoryLogBytesMax
        logOptions.asyncFlushInterval = .milliseconds(c.asyncFlushMilliseconds)
        logOptions.onSlowWrite = { logger.warning("\($0)") }
        // Memory mode holds the entries the core hands it as they are (their payloads shared with
        // the core's own copy), with no storage engine under them (docs/design/stable-log.md).
        let log: any StableLog = c.durability == .memory
            ? try MemoryLog(name: "node \(c.id)'s in-memory log", capacityBytes: c.memoryLogBytesMax)
            : try BerkeleyDBLog.open(path: c.dataDir, durability: c.durability, options: logOptions)
        let recovered = log.lastIndex
        do {
            c = try followRecordedConfiguration(c, recorded: try log.loadHardState().membership, logger: logger)
        } catch {
            try? log.close()
            throw error
        }
        let snapshots: any SnapshotStore = c.durability == .memory
            ? MemorySnapshotStore() : FileSnapshotStore(directory: c.dataDir, sync: c.durability != .memory)

        // A ring for every possible id, so members added later need no restart (`limits.node_id_max`).
        let members = Set(c.ringSlots)
        let peers = c.members.filter { $0.id != c.id }.map { PeerAddress(node: $0.id, checkedAddress($0.address)) }
        let rings = RingTransport.Configuration(listenAddress: PeerAddress(node: c.id, checkedAddress(c.me.address)),
                                                cluster: c.ringSlots, peerAddresses: peers)
        let (fabric, why) = try makeFabric(c, key: key, members: members, ringBytes: rings.ringBytes, loop: loop, logger: logger)
        let transport = try await RingTransport.open(fabric: fabric, configuration: rings)

        var options = NodeOptions(replica: c.replicaConfig, bootstrap: c.membership,
                                  seed: UInt64(c.id) &* 0x9E37_79B9_7F4A_7C15 ^ UInt64(getpid()) ^ UInt64.random(in: 0...UInt64.max))
        options.stateIntact = trust.intact
        options.assumeIntact = override == .assumeIntact
        options.requestTimeoutTicks = c.requestTimeoutTicks
        options.compactEveryEntries = c.compactEveryEntries
        options.compactEveryBytes = c.compactEveryBytes
        options.onEvent = { e in logger.info("\(e)") }
        options.onWarning = { w in logger.warning("\(w)") }
        options.metricsFactory = PloverMetrics.prometheusFactory(registry: metricsRegistry)
        options.metricsSampleEveryTicks = max(1, 1000 / c.tickMilliseconds)
        options.nodeIDMax = NodeID(c.nodeIDMax)
        options.eventLoop = loop.next()
        options.onRemoved = { why in
            logger.warning("\(why)")
            onRemoved?(why)
        }
        let node = ReplicaNode(options: options, stateMachine: stateMachine, log: log, snapshots: snapshots,
                               transport: transport, ticks: TimerTickSource(interval: .milliseconds(c.tickMilliseconds)))
        do {
            try node.start()
        } catch {
            transport.stop()
            try? log.close()
            throw error
        }
        do {
            // The next start judges from this record of the run; written once the replica saved
            // that it is recovering, if it is (`ReplicaNode.start`).
            if !c.dataDir.isEmpty { try StateTrust.writeMarker(c.dataDir, clean: c.durability == .fsync) }
        } catch {
            node.stop()
            throw error
        }
        let client: ClientServer
        do {
            let clientAddress = checkedAddress(c.me.clientAddress)
            client = try ClientServer.start(node: node, host: clientAddress.host, port: clientAddress.port)
        } catch {
            node.stop()
            throw ConfigError(file: "config", key: "members[\(c.id)].client_address", problem: "cannot listen on \(c.me.clientAddress): \(error)")
        }
        var endpoint: MetricsEndpoint?
        if let a = c.metricsAddress {
            let metrics = checkedAddress(a)
            if !MetricsEndpoint.isLoopback(host: metrics.host) {
                logger.warning("metrics_address \(a) is not a loopback address: whoever reaches it can read this node's metrics (unauthenticated HTTP)")
            }
            do {
                endpoint = try MetricsEndpoint.start(host: metrics.host, port: metrics.port, registry: metricsRegistry)
            } catch {
                client.stop()
                node.stop()
                throw ConfigError(file: "config", key: "metrics_address", problem: "cannot listen on \(a): \(error)")
            }
        }
        return ReplicaServer(node: node, clientServer: client, metricsEndpoint: endpoint, fabricDescription: why, recoveredLastIndex: recovered,
                             trust: trust, durability: c.durability, dataDir: c.dataDir, tickMilliseconds: c.tickMilliseconds, loop: loop)
    }

    /// `fabric = auto` takes verbs when a device exists and says why it fell back to TCP otherwise.
    /// A verbs fabric whose memlock limit cannot cover what the node pins (rings and staging
    /// buffers) fails the start with the numbers and how to raise it, `auto` included: the device
    /// is there, the limit is what to fix.
    static func makeFabric(_ c: NodeConfig, key: ClusterKey, members: Set<NodeID>, ringBytes: Int,
                           loop: MultiThreadedEventLoopGroup, logger: Logger) throws -> (any Fabric, String) {
        func tcp() throws -> any Fabric {
            try TCPFabric(node: c.id, configuration: TCPFabric.Configuration(clusterKey: key.bytes, members: members), group: loop)
        }
        func verbs() throws -> VerbsFabric {
            try VerbsFabric(node: c.id, configuration: VerbsFabric.Configuration(clusterKey: key.bytes, connection: c.verbsConnection,
                                                                              members: members, poll: c.verbsPoll))
        }
        let fabric: VerbsFabric
        switch c.fabric {
        case .tcp:
            return (try tcp(), "tcp (configured)")
        case .verbs:
            fabric = try verbs()
        case .auto:
            do {
                fabric = try verbs()
            } catch {
                logger.notice("fabric auto: RDMA unavailable (\(error)); using tcp")
                return (try tcp(), "tcp (auto: \(error))")
            }
        }
        do {
            try fabric.checkMemlock(try VerbsMemoryBudget.replica(members: c.members.map(\.id), ringBytes: ringBytes,
                                                                   configuration: fabric.configuration, ringSlots: c.ringSlots))
        } catch {
            fabric.close()
            throw error
        }
        if let warning = c.verbsConnectWarning { logger.warning("\(warning)") }
        return (fabric, "verbs (\(c.fabric == .auto ? "auto" : "configured"), connect \(c.verbsConnection.rawValue), poll \(c.verbsPoll.rawValue))")
    }

    /// A graceful stop: a leader first hands leadership to a caught-up voter (at most `handOver`,
    /// a few election timeouts by default), so that writes move on without waiting for an
    /// election; then `stop()`. Returns the new leader when there was a hand-over.
    @discardableResult
    public func stopGracefully(handOver: Duration? = nil) async -> NodeID? {
        let ticks = node.options.replica.electionTimeoutTicks * 3
        let moved = await node.handOverLeadership(timeout: handOver ?? .milliseconds(ticks * tickMilliseconds))
        stop()
        return moved
    }

    /// Stops the metrics endpoint, the client server, the node and the replica's loop, in that order. In async mode
    /// the log is then synced to disk and the stop recorded, so the next start trusts it.
    public func stop() {
        metricsEndpoint?.stop()
        clientServer.stop()
        node.stop()
        // Last: the node and its transport were stopped on it; it closes the client connections.
        try? loop.syncShutdownGracefully()
        if durability == .async {
            sync()
            try? StateTrust.writeMarker(dataDir, clean: true)
        }
    }
}

extension ReplicaServer {
    /// The configuration file's `[[members]]` only bootstrap a new cluster: once the log records a
    /// configuration, its members and addresses are the ones this replica uses (the file's address
    /// fills in for a member recorded without one, by a build that did not record addresses). A
    /// replica its own log leaves out was removed: it does not start.
    static func followRecordedConfiguration(_ file: NodeConfig, recorded: Membership, logger: Logger) throws -> NodeConfig {
        guard !recorded.members.isEmpty else { return file }
        guard recorded.contains(file.id) else {
            throw ConfigError(file: "config", key: "id", problem: "node \(file.id) is not a member of the configuration recorded in \(file.dataDir) (members \(recorded.members.map { String($0.id) }.joined(separator: ", "))): it was removed from the cluster; to bring this machine back, delete the data directory, add it again (plover member add) and start it with --join")
        }
        var c = file
        let fromFile = Dictionary(file.members.map { ($0.id, $0) }, uniquingKeysWith: { a, _ in a })
        var merged: [NodeConfig.MemberConfig] = []
        for m in recorded.members {
            let f = fromFile[m.id]
            let address = m.peerAddress.isEmpty ? f?.address : m.peerAddress
            let client = m.clientAddress.isEmpty ? f?.clientAddress : m.clientAddress
            guard let address, let client else {
                logger.warning("node \(m.id) is a member but neither the recorded configuration nor the config file gives its addresses: it is not reached until a configuration with them commits")
                continue
            }
            merged.append(.init(id: m.id, address: address, clientAddress: client, role: m.role, priority: m.priority))
        }
        c.members = merged
        if Set(merged.map(\.id)) != Set(file.members.map(\.id)) || merged.contains(where: { fromFile[$0.id]?.address != $0.address }) {
            logger.info("members from the configuration recorded in the log, not the config file: \(merged.map { "\($0.id)@\($0.address)" }.joined(separator: ", "))")
        }
        return c
    }
}

/// An address the config reader already checked (`TableReader.address`), parsed once.
func checkedAddress(_ address: String) -> HostPort { HostPort(parsing: address, allowingPortZero: true)! }
