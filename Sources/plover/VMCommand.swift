import ArgumentParser
import Foundation
import Logging
import Metrics
import Prometheus
import PloverTesting
import RDMAPaxos
import VMReplica

/// `plover vm primary|backup|witness --config FILE`: one VM replica (docs/operations.md,
/// "VM replication").
struct VMCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vm", abstract: "Run one replica of a replicated QEMU VM (PLOVER: primary, backup, witness).",
        subcommands: [VMPrimary.self, VMBackup.self, VMWitness.self, VMStatus.self, VMSwitchover.self])
}

struct VMStatus: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status", abstract: "Show a running VM replica's role, protection, link, held output and last checkpoint.")
    @Option(help: "The replica's TOML config file with a [vm] table.") var config: String
    func run() throws { print(try vmControl(configPath: config, "status")) }
}

struct VMSwitchover: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "switchover",
        abstract: "Planned switchover: the primary checkpoints, then hands the VM to its backup (host maintenance).")
    @Option(help: "The config file of the replica that is the primary now.") var config: String
    func run() throws {
        let answer = try vmControl(configPath: config, "switchover")
        guard answer.hasPrefix("OK") else { throw CLIError(answer) }
        print(answer)
    }
}

/// Sends `request` to the running replica's control socket (`run_dir/control.sock`) and returns
/// its answer; an `ERR` status answer or no replica is an error.
func vmControl(configPath: String, _ request: String) throws -> String {
    let vm: VMConfig
    do { vm = try VMConfig.load(path: configPath) } catch { throw CLIError(error.description) }
    let path = vm.runDir + "/control.sock"
    let socket: SocketDescriptor
    do { socket = try SocketDescriptor.connect(unixPath: path) } catch {
        throw CLIError("no VM replica answers at \(path) (\(String(cString: strerror(error.errno)))): is `plover vm primary|backup --config \(configPath)` running?")
    }
    defer { socket.close() }
    do { try socket.send(Array((request + "\n").utf8)) } catch { throw CLIError("\(path): \(error)") }
    var out: [UInt8] = []
    while let chunk = try? socket.receive(upTo: 4096), !chunk.isEmpty { out += chunk }
    let text = String(decoding: out, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
    guard !text.isEmpty else { throw CLIError("\(path): the replica closed the connection without an answer") }
    return text
}

struct VMPrimary: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "primary", abstract: "The VM primary: leads, serves the front, runs checkpoints.")
    @Option(help: "The replica's TOML config file with a [vm] table.") var config: String
    func run() async throws { try await runVMReplica(.primary, configPath: config) }
}

struct VMBackup: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "backup", abstract: "The VM backup: replays inputs, receives checkpoints, takes over.")
    @Option(help: "The replica's TOML config file with a [vm] table.") var config: String
    func run() async throws { try await runVMReplica(.backup, configPath: config) }
}

struct VMWitness: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "witness", abstract: "The witness: logs and acknowledges inputs, runs no VM, never leads.")
    @Option(help: "The replica's TOML config file.") var config: String
    func run() async throws { try await runVMReplica(nil, configPath: config) }
}

/// Runs a VM replica (`role` nil: the witness) until SIGTERM/SIGINT.
func runVMReplica(_ role: VMReplicator.Role?, configPath: String) async throws {
    let c: NodeConfig
    do { c = try NodeConfig.load(path: configPath) } catch { throw CLIError(error.description) }
    let expected: MemberRole = role == nil ? .witness : .voter
    guard c.me.role == expected else {
        throw CLIError("\(configPath): members[\(c.id)].role is \(c.me.role) but `plover vm \(role?.rawValue ?? "witness")` needs role = \"\(expected)\"")
    }
    // Leadership follows the VM (a backup that takes over keeps leading; a restarted replica
    // must not be handed it back): no voter may outrank another.
    let voters = c.members.filter { $0.role == .voter }
    if let top = voters.max(by: { $0.priority < $1.priority }), let low = voters.first(where: { $0.priority != top.priority }) {
        throw CLIError("\(configPath): members[\(top.id)].priority is \(top.priority) but members[\(low.id)].priority is \(low.priority); the VM replicas must have equal priority (leadership follows the VM, see docs/operations.md, \"VM replication\")")
    }
    LoggingSystem.bootstrap { StreamLogHandler.standardError(label: $0) }
    var logger = Logger(label: "plover.vm.\(c.id)")
    logger.logLevel = ProcessInfo.processInfo.environment["PLOVER_VM_DEBUG"] != nil ? .debug : .info
    let registry = PrometheusCollectorRegistry()
    MetricsSystem.bootstrap(PloverMetrics.prometheusFactory(registry: registry))
    var replicator: VMReplicator?
    let machine: VMInputLog
    if let role {
        let vm: VMConfig
        do { vm = try VMConfig.load(path: configPath) } catch { throw CLIError(error.description) }
        guard let keyPath = c.clusterKeyFile else { throw CLIError("\(configPath): cluster_key_file is required") }
        let key: ClusterKey
        do { key = try ClusterKey.load(path: keyPath) } catch { throw CLIError(error.description) }
        let link = SyncLink.configured(c, clusterKey: key, logger: logger)
        let a = VMReplicator(role: role, me: c.id, config: vm, clusterKey: key, logger: logger, syncLink: link)
        replicator = a
        machine = a.inputLog
    } else {
        machine = VMInputLog()
    }
    let server: ReplicaServer
    do {
        server = try await ReplicaServer.start(config: c, stateMachine: machine, logger: logger, metricsRegistry: registry)
    } catch {
        replicator?.stop()
        throw CLIError("\(error)")
    }
    if let replicator {
        // After the server: whether this process restarts an existing replica decides the VM's
        // role. Committed entries wait in the replicator's queue until it runs.
        do { try await replicator.start(recoveredThrough: server.recoveredLastIndex) } catch {
            replicator.stop()
            server.stop()
            throw CLIError("VM replica \(c.id) did not start: \(error)")
        }
        do { try replicator.attach(server.node) } catch {
            replicator.stop()
            server.stop()
            throw CLIError("VM replica \(c.id): cannot open the front: \(error)")
        }
        logger.info("vm \(replicator.role.rawValue) \(c.id) serving: \(replicator.config.network.summary), syncvm on \(replicator.config.syncAddress) over \(replicator.syncLink.kind), peers on \(c.me.address)")
    } else {
        logger.info("vm witness \(c.id) serving: peers on \(c.me.address)")
    }
    await waitForTermination()
    logger.info("vm replica \(c.id) stopping: \(replicator?.summary ?? "witness")")
    replicator?.stop()
    server.stop()
}
