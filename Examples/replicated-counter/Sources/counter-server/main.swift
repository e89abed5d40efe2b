import Counter
import Foundation
import Logging
import Metrics
import Prometheus
import RDMAPaxos
import ServiceLifecycle

// counter-server node --config FILE [--join HOST:PORT]: one replica of the counter, until SIGTERM
// or SIGINT. The config is the TOML file `plover node` reads (docs/operations.md,
// "Configuration"); with --join it needs no [[members]]: the replica, added to the cluster first
// (`plover member add`), learns them from the member at HOST:PORT.

func fail(_ message: String, status: Int32 = 1) -> Never {
    FileHandle.standardError.write(Data("counter-server: \(message)\n".utf8))
    exit(status)
}

var arguments = Array(CommandLine.arguments.dropFirst())
guard arguments.first == "node" else { fail("usage: counter-server node --config FILE [--join HOST:PORT]", status: 2) }
arguments.removeFirst()
var options: [String: String] = [:]
while let name = arguments.first {
    guard ["--config", "--join"].contains(name), arguments.count >= 2 else { fail("unknown or incomplete option \"\(name)\"", status: 2) }
    options[name] = arguments[1]
    arguments.removeFirst(2)
}
guard let path = options["--config"] else { fail("--config FILE is required", status: 2) }

let config: NodeConfig
do {
    var c = try NodeConfig.load(path: path, requireMembers: options["--join"] == nil)
    if let address = options["--join"] {
        let reply = try NodeClient.configuration(at: address)
        guard reply.membership.member(c.id) != nil else {
            fail("--join \(address): node \(c.id) is not a member of that cluster; add it first (plover member add)")
        }
        c.adoptMembers(reply.membership)
        try c.validate(file: path)
    }
    config = c
} catch {
    fail("\(path): \(error)")
}

// Once per process, before anything logs or records a metric: swift-log's handler, and
// swift-metrics' backend writing to the Prometheus registry the replica's metrics endpoint serves.
LoggingSystem.bootstrap { StreamLogHandler.standardError(label: $0) }
let registry = PrometheusCollectorRegistry()
MetricsSystem.bootstrap(PloverMetrics.prometheusFactory(registry: registry))
var logger = Logger(label: "counter.replica.\(config.id)")
logger.logLevel = .info

// The replica is the group's one service: SIGTERM or SIGINT shuts the group down gracefully.
let group = ServiceGroup(configuration: .init(
    services: [.init(service: ReplicaService(config: config, registry: registry, logger: logger))],
    gracefulShutdownSignals: [.sigterm, .sigint],
    logger: logger))
do {
    try await group.run()
} catch {
    logger.error("counter replica stopped: \(error)")
    exit(1)
}
