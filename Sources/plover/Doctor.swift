import ArgumentParser
import PloverTesting
import RDMAPaxos
import VMReplica

/// `plover doctor`: which fabrics can run on this machine, and why not when they cannot.
struct Doctor: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Report which fabrics (verbs, tcp) are usable here, the memlock limit verbs needs, and the Berkeley DB version.",
        discussion: """
            With --config, the memlock check uses that node's members (and its [vm] table, if any) \
            instead of a 3-member cluster with the defaults. Exits 0 when at least one fabric is \
            usable, 1 otherwise.
            """)

    @Option(help: "Address the TCP fabric would listen on.") var host = "127.0.0.1"
    @Option(help: "A node's config file (docs/operations.md, \"Configuration\"): check what it pins.") var config: String?

    func run() throws {
        var usable: [String] = []
        var node: NodeConfig?
        if let config {
            do { node = try NodeConfig.load(path: config) } catch { throw CLIError(error.description) }
        }

        var device = false
        do {
            let devices = try VerbsProbe.deviceNames()
            device = true
            print("verbs: devices: \(devices.joined(separator: ", "))")
        } catch {
            print("verbs: unusable: \(error)")
        }
        do {
            try VerbsProbe.connectionManager()
            print("verbs: rdma_cm event channel: ok\(device ? "" : " (but no device)")")
        } catch {
            print("verbs: \(error)")
        }
        print(Self.connectLine(node))
        let memlockOK = Self.memlock(node, configPath: config)
        if device && memlockOK { usable.append("verbs") }

        do {
            let port = try TCPFabric.probeListening(host: host)
            print("tcp: usable: can listen on \(host) (got port \(port))")
            usable.append("tcp")
        } catch {
            print("tcp: unusable: cannot listen on \(host): \(error)")
        }

        print("stable log: \(BerkeleyDBLibrary.versionString)")
        if usable.isEmpty {
            print("no usable fabric")
            throw ExitCode(1)
        }
        print("usable fabrics: \(usable.joined(separator: ", "))")
    }

    /// How verbs queue pairs connect, and which way is tested.
    static func connectLine(_ node: NodeConfig?) -> String {
        let how = "verbs_connect: tcp (the default: an out-of-band exchange over TCP, the path make test runs over a software RDMA device); rdma_cm: hardware only, never run by make test (make test-rdma with PLOVER_RDMA_ADDRESS runs it)"
        guard let node else { return how }
        return "verbs_connect: node \(node.id) uses \(node.verbsConnection.rawValue)" + (node.verbsConnectWarning.map { "; \($0)" } ?? "") + "\n" + how
    }

    /// Prints the memlock limit against what a verbs node pins (with a [vm] table in its config,
    /// its syncvm endpoint too: the backup registers its guest RAM); false when it is too low.
    static func memlock(_ node: NodeConfig?, configPath: String?) -> Bool {
        let limit = MemlockLimit.current()
        print("memlock: this process may pin \(limit)")
        if let node, node.fabric == .tcp {
            print("memlock: node \(node.id) uses fabric = tcp, which pins nothing")
            return true
        }
        let members = node?.members.map(\.id) ?? [1, 2, 3]
        let who = node.map { "node \($0.id) (\($0.members.count) members)" } ?? "a replica of 3 members with the defaults"
        var budgets: [VerbsMemoryBudget] = []
        do {
            budgets.append(try VerbsMemoryBudget.replica(members: members, ringBytes: RingTransport.Configuration.defaultRingBytes,
                                                         configuration: VerbsFabric.Configuration(clusterKey: [], members: Set(members)),
                                                         ringSlots: node?.ringSlots ?? Array(1...16)))
        } catch {
            print("memlock: cannot size \(who): \(error)")
            return false
        }
        let (replicaOK, line) = budgets[0].check(against: limit)
        print("memlock: \(who) on verbs \(line)")
        guard let configPath, (try? TableReader.section("vm", ofFile: configPath)) != nil else { return replicaOK }
        do {
            let vm = try VMConfig.load(path: configPath)
            budgets.append(SyncLink.verbsMemoryBudget(guestBytes: vm.qemu.memoryMiB << 20, backup: true))
            let total = budgets.map(\.totalBytes).reduce(0, +)
            let ok = limit.allows(total)
            print("memlock: its syncvm endpoint on verbs (a backup registers its \(vm.qemu.memoryMiB) MiB of guest RAM) pins \(budgets[1])")
            print("memlock: together \(MemlockLimit.format(total)): "
                + (ok ? "within the memlock limit \(limit)" : "more than the memlock limit \(limit): \(MemlockLimit.advice)"))
            return ok
        } catch {
            print("memlock: cannot read the [vm] table: \(error)")
            return replicaOK
        }
    }
}
