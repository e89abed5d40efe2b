import Foundation
import TOMLKit

/// A replica's configuration file (TOML), as `plover node --config FILE` reads it.
/// See docs/operations.md ("Configuration") for every key.
public struct NodeConfig: Sendable, Equatable {
    /// Which fabric carries replication: RDMA verbs when a device exists (`auto`), verbs only, or
    /// TCP only.
    public enum FabricChoice: String, Sendable, CaseIterable { case auto, verbs, tcp }

    /// One `[[members]]` table: a replica of the cluster.
    public struct MemberConfig: Sendable, Equatable {
        /// The member's node id (nonzero, unique in the cluster).
        public var id: NodeID
        /// host:port of the replica's fabric (peer-to-peer) endpoint.
        public var address: String
        /// host:port where the replica answers clients (`plover kv`, `plover status`).
        public var clientAddress: String
        /// The member's role (`role` key; `voter` by default).
        public var role: MemberRole
        /// Leader preference (`priority` key): 1 by default for voters, 0 otherwise.
        public var priority: UInt8
    }

    /// This replica's node id (`id` key); must be one of `members`.
    public var id: NodeID
    /// Directory of the stable log and snapshot (`data_dir`); relative paths are resolved against
    /// the config file's directory by `load(path:)`.
    public var dataDir: String
    /// How durable an acknowledged write is (`durability`); fsync by default.
    public var durability: Durability = .fsync
    /// Which fabric to use (`fabric`); `auto` by default.
    public var fabric: FabricChoice = .auto
    /// How `VerbsFabric` connects queue pairs (`verbs_connect`): the out-of-band exchange over TCP
    /// (`tcp`, the default: the path `make test` runs over the software RDMA device), or rdma_cm
    /// (`rdma_cm`, hardware only).
    public var verbsConnection: VerbsFabric.Configuration.Connection = .outOfBand
    /// Whether the file set `verbs_connect` (the default was rdma_cm before it became `tcp`).
    public var verbsConnectionSet = false
    /// How the verbs fabric's thread learns of completions (`verbs_poll`): it waits for the
    /// device's events (`event`, the default) or polls in a loop (`busy`, most of a core).
    public var verbsPoll: VerbsFabric.Configuration.Poll = .event
    /// Path of the cluster key file (relative paths are relative to the config file).
    public var clusterKeyFile: String?
    /// host:port of the Prometheus endpoint (`GET /metrics`); nil: none. Meant for loopback.
    public var metricsAddress: String?
    /// Length of one tick in milliseconds (`timing.tick_ms`, 1 to 10,000).
    public var tickMilliseconds = 10
    /// `ReplicaConfig.electionTimeoutTicks` (`timing.election_timeout_ticks`, at least 3).
    public var electionTimeoutTicks = 20
    /// `ReplicaConfig.heartbeatTicks` (`timing.heartbeat_ticks`); must be below the election
    /// timeout.
    public var heartbeatTicks = 2
    /// `ReplicaConfig.diskStallTicks` (`timing.disk_stall_ticks`): 3 s at the default tick. A
    /// group commit with fdatasync took 0.5–4.4 s at times on a healthy but loaded disk shared by
    /// three replicas (benchmarks/failover), and 1 s deposed healthy leaders.
    public var diskStallTicks = NodeConfig.defaultDiskStallTicks
    /// The default `diskStallTicks`.
    public static let defaultDiskStallTicks = 300
    /// Ticks a client request or read may wait for an answer before it fails
    /// (`timing.request_timeout_ticks`).
    public var requestTimeoutTicks = 500
    /// `ReplicaConfig.batchBytesMax` (`limits.batch_bytes_max`, 1 KiB to 256 KiB).
    public var batchBytesMax = 256 << 10
    /// `ReplicaConfig.inflightMessagesMax` (`limits.inflight_messages_max`, 1 to 65,536).
    public var inflightMessagesMax = 64
    /// `ReplicaConfig.inflightBytesMax` (`limits.inflight_bytes_max`, 1 KiB to the ring's 1 MiB).
    public var inflightBytesMax = 768 << 10
    /// `ReplicaConfig.uncommittedBytesMax` (`limits.uncommitted_bytes_max`).
    public var uncommittedBytesMax = 64 << 20
    /// Applied entries held in the log before the node snapshots and compacts
    /// (`limits.compact_every_entries`).
    public var compactEveryEntries = 50_000
    /// `durability = "memory"`: the bytes the in-memory log may hold
    /// (`limits.memory_log_bytes_max`, the `MemoryLog`'s `capacityBytes`). The node compacts at
    /// half of it (log and snapshot together) and warns at three quarters.
    public var memoryLogBytesMax = 512 << 20
    /// `durability = "async"`: milliseconds between flushes of the log to disk
    /// (`limits.async_flush_ms`, `BerkeleyDBLog.Options.asyncFlushInterval`): a power cut loses
    /// at most the writes acknowledged in the last interval (plus one flush). 0 flushes only at
    /// checkpoints, which loses far more (tests use it as a broken variant).
    public var asyncFlushMilliseconds = 100
    /// `NodeOptions.compactEveryBytes` (not a file key): nil derives it from `memoryLogBytesMax`.
    public var compactEveryBytes: Int?
    /// Every replica of the cluster, this one included. Only bootstraps a new cluster: once a
    /// replica's log holds a configuration, that one says who the members are and where.
    public var members: [MemberConfig] = []
    /// Highest node id a member may have (`limits.node_id_max`, 2 to 64; 16 by default). Every
    /// replica's receive region holds one ring per possible peer id, so members can be added at
    /// run time without restarting anyone; all members of a cluster must use the same value.
    public var nodeIDMax = 16

    /// The node ids that have a ring in every replica's region: 1 through `nodeIDMax`.
    public var ringSlots: [NodeID] { Array(1...NodeID(nodeIDMax)) }

    /// This replica's entry in `members` (validated to exist).
    public var me: MemberConfig { members.first { $0.id == id }! }
    /// One line for the log when this file may rely on the old `verbs_connect` default (rdma_cm):
    /// it leaves the key out and may run verbs (`fabric` is `auto` or `verbs`), so members'
    /// `address`es written as RDMA interface addresses for rdma_cm are now reached over TCP for
    /// the out-of-band exchange. Nil otherwise.
    public var verbsConnectWarning: String? {
        guard !verbsConnectionSet, fabric != .tcp else { return nil }
        return "verbs_connect is not set: verbs queue pairs connect out of band over TCP to each member's address (the default was rdma_cm before); if these addresses are for rdma_cm on RDMA interfaces, make sure TCP reaches them, or set verbs_connect = \"rdma_cm\" (hardware only, not run by make test); set verbs_connect = \"tcp\" to silence this"
    }

    /// The initial cluster configuration described by `members`.
    public var membership: Membership {
        Membership(members.map { Member(id: $0.id, role: $0.role, priority: $0.priority, peerAddress: $0.address, clientAddress: $0.clientAddress) })
    }

    /// `members` taken from a configuration (a cluster this replica joins): its addresses must be
    /// known.
    public mutating func adoptMembers(_ m: Membership) {
        members = m.members.map { MemberConfig(id: $0.id, address: $0.peerAddress, clientAddress: $0.clientAddress, role: $0.role, priority: $0.priority) }
    }

    /// The consensus core's configuration: this file's timings and limits, the other fields at
    /// their defaults.
    public var replicaConfig: ReplicaConfig {
        var c = ReplicaConfig(id: id)
        c.electionTimeoutTicks = electionTimeoutTicks
        c.heartbeatTicks = heartbeatTicks
        c.diskStallTicks = diskStallTicks
        c.batchBytesMax = batchBytesMax
        c.inflightMessagesMax = inflightMessagesMax
        c.inflightBytesMax = inflightBytesMax
        c.uncommittedBytesMax = uncommittedBytesMax
        return c
    }

    /// A configuration with the given identity and members and every other key at its default; not
    /// validated.
    public init(id: NodeID, dataDir: String, members: [MemberConfig]) {
        self.id = id
        self.dataDir = dataDir
        self.members = members
    }

    /// Reads and validates a config file. Every problem names the file, the key and what is wrong.
    public static func load(path: String, requireMembers: Bool = true) throws(ConfigError) -> NodeConfig {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw ConfigError(file: path, key: nil, problem: "cannot be read (missing or not permitted)")
        }
        guard let text = String(data: data, encoding: .utf8) else {
            throw ConfigError(file: path, key: nil, problem: "is not UTF-8 text")
        }
        var c = try parse(text, file: path, requireMembers: requireMembers)
        let base = (path as NSString).deletingLastPathComponent
        if let k = c.clusterKeyFile, !k.hasPrefix("/") { c.clusterKeyFile = base.isEmpty ? k : base + "/" + k }
        if !c.dataDir.hasPrefix("/") { c.dataDir = base.isEmpty ? c.dataDir : base + "/" + c.dataDir }
        return c
    }

    /// Parses config text (`file` only names it in errors). `requireMembers: false` (a replica
    /// joining a running cluster, `plover node --join`) allows a file without `id` and
    /// `[[members]]`, and leaves validation to `validate(file:)` once they are known.
    public static func parse(_ text: String, file: String, requireMembers: Bool = true) throws(ConfigError) -> NodeConfig {
        try checkTableHeaders(text, file: file)
        let table: TOMLTable
        do {
            table = try TOMLTable(string: text)
        } catch let e as TOMLParseError {
            throw ConfigError(file: file, key: nil, problem: "not valid TOML at line \(e.source.begin.line), column \(e.source.begin.column): \(e.description)")
        } catch {
            throw ConfigError(file: file, key: nil, problem: "not valid TOML: \(error)")
        }
        var r = TableReader(table, file: file, path: "")
        var c = NodeConfig(id: 0, dataDir: "", members: [])
        c.id = requireMembers || r.value("id") != nil ? try r.nodeID("id") : 0
        c.dataDir = try r.string("data_dir")
        c.durability = try r.choice("durability", default: .fsync)
        c.fabric = try r.choice("fabric", default: .auto)
        c.verbsConnectionSet = r.value("verbs_connect") != nil
        c.verbsConnection = try r.choice("verbs_connect", default: .outOfBand)
        c.verbsPoll = try r.choice("verbs_poll", default: .event)
        c.clusterKeyFile = try r.optionalString("cluster_key_file")
        if let a = try r.optionalString("metrics_address") { c.metricsAddress = try r.address(a, key: "metrics_address") }
        if var t = try r.subtable("timing") {
            c.tickMilliseconds = try t.int("tick_ms", default: c.tickMilliseconds, range: 1...10_000)
            c.electionTimeoutTicks = try t.int("election_timeout_ticks", default: c.electionTimeoutTicks, range: 3...1_000_000)
            c.heartbeatTicks = try t.int("heartbeat_ticks", default: c.heartbeatTicks, range: 1...1_000_000)
            c.diskStallTicks = try t.int("disk_stall_ticks", default: c.diskStallTicks, range: 1...1_000_000)
            c.requestTimeoutTicks = try t.int("request_timeout_ticks", default: c.requestTimeoutTicks, range: 1...100_000_000)
            try t.finish()
            guard c.heartbeatTicks < c.electionTimeoutTicks else {
                throw ConfigError(file: file, key: "timing.heartbeat_ticks", problem: "must be below timing.election_timeout_ticks (\(c.electionTimeoutTicks))")
            }
        }
        if var t = try r.subtable("limits") {
            c.batchBytesMax = try t.int("batch_bytes_max", default: c.batchBytesMax, range: 1024...(256 << 10))
            c.inflightMessagesMax = try t.int("inflight_messages_max", default: c.inflightMessagesMax, range: 1...65_536)
            c.inflightBytesMax = try t.int("inflight_bytes_max", default: c.inflightBytesMax, range: 1024...RingTransport.Configuration.defaultRingBytes)
            c.uncommittedBytesMax = try t.int("uncommitted_bytes_max", default: c.uncommittedBytesMax, range: 1024...(1 << 40))
            c.compactEveryEntries = try t.int("compact_every_entries", default: c.compactEveryEntries, range: 2...(1 << 40))
            c.memoryLogBytesMax = try t.int("memory_log_bytes_max", default: c.memoryLogBytesMax, range: (16 << 20)...(1 << 40))
            c.nodeIDMax = try t.int("node_id_max", default: c.nodeIDMax, range: 2...64)
            c.asyncFlushMilliseconds = try t.int("async_flush_ms", default: c.asyncFlushMilliseconds, range: 0...60_000)
            try t.finish()
        }
        for var m in try requireMembers || r.value("members") != nil ? r.tableArray("members") : [] {
            let id = try m.nodeID("id")
            let role: MemberRole = try m.choice("role", default: .voter, names: MemberRole.allCases.map(\.description)) { name in
                MemberRole.allCases.first { $0.description == name }
            }
            let defaultPriority = role == .voter ? 1 : 0
            c.members.append(MemberConfig(
                id: id, address: try m.address(try m.string("address"), key: "address"),
                clientAddress: try m.address(try m.string("client_address"), key: "client_address"),
                role: role, priority: UInt8(try m.int("priority", default: defaultPriority, range: 0...255))))
            try m.finish()
        }
        // [vm] belongs to `plover vm` (VMReplica's VMConfig reads it).
        _ = r.value("vm")
        try r.finish()
        if requireMembers || !c.members.isEmpty { try c.validate(file: file) }
        return c
    }

    /// The TOML parser (toml++ inside TOMLKit) aborts the process on a table header whose name
    /// starts with anything but a key character or a quote (`[`, `[=]`, `[.a]`, `[é]`), so those
    /// are refused here first. Lines inside multi-line arrays that start with `[` followed by
    /// such a character are refused too; no plover key takes an array.
    static func checkTableHeaders(_ text: String, file: String) throws(ConfigError) {
        for (n, line) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            var rest = line.drop { $0 == " " || $0 == "\t" }
            guard rest.first == "[" else { continue }
            rest = rest.dropFirst()
            if rest.first == "[" { rest = rest.dropFirst() }
            rest = rest.drop { $0 == " " || $0 == "\t" }
            if let c = rest.unicodeScalars.first, c.isASCII,
               c.properties.isAlphabetic || ("0"..."9").contains(c) || "_-\"']".unicodeScalars.contains(c) { continue }
            throw ConfigError(file: file, key: nil, problem: "not valid TOML at line \(n + 1): a table header needs a name ([name] or [[name]])")
        }
    }

    /// Checks the whole configuration; every problem names the file and the key.
    public func validate(file: String) throws(ConfigError) {
        guard !members.isEmpty else { throw ConfigError(file: file, key: "members", problem: "at least one [[members]] table is required") }
        var seen: Set<NodeID> = []
        var addresses: Set<String> = []
        for (i, m) in members.enumerated() {
            guard m.id <= nodeIDMax else {
                throw ConfigError(file: file, key: "members[\(i)].id", problem: "node id \(m.id) is above limits.node_id_max (\(nodeIDMax)); raise it on every member or use a smaller id")
            }
            guard !m.address.isEmpty, !m.clientAddress.isEmpty else {
                throw ConfigError(file: file, key: "members[\(i)]", problem: "node \(m.id) has no address or client_address")
            }
            guard seen.insert(m.id).inserted else { throw ConfigError(file: file, key: "members[\(i)].id", problem: "node id \(m.id) appears twice") }
            guard addresses.insert(m.address).inserted else { throw ConfigError(file: file, key: "members[\(i)].address", problem: "\(m.address) is used by two members") }
            guard addresses.insert(m.clientAddress).inserted else { throw ConfigError(file: file, key: "members[\(i)].client_address", problem: "\(m.clientAddress) is used twice") }
        }
        guard seen.contains(id) else { throw ConfigError(file: file, key: "id", problem: "node \(id) is not one of the [[members]] (\(seen.sorted().map(String.init).joined(separator: ", ")))") }
        if let a = metricsAddress, a == me.address || a == me.clientAddress {
            throw ConfigError(file: file, key: "metrics_address", problem: "\(a) is already this member's \(a == me.address ? "address" : "client_address")")
        }
        guard members.contains(where: { $0.role == .voter }) else { throw ConfigError(file: file, key: "members", problem: "at least one member must have role = \"voter\"") }
        guard !dataDir.isEmpty || durability == .memory else { throw ConfigError(file: file, key: "data_dir", problem: "must not be empty") }
        // Compaction starts at half the cap; the other half holds what it cannot remove: entries
        // not yet applied, up to uncommitted_bytes_max of payload, with room for what arrives
        // while a compaction is being saved.
        if durability == .memory && memoryLogBytesMax / 8 < uncommittedBytesMax {
            throw ConfigError(file: file, key: "limits.memory_log_bytes_max", problem: "must be at least 8 × limits.uncommitted_bytes_max (\(uncommittedBytesMax)) with durability = \"memory\": compaction starts at half of it, and the other half must hold the uncommitted entries and what arrives while a compaction is saved")
        }
    }
}

/// A configuration problem: which file, which key, what is wrong.
public struct ConfigError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The configuration file.
    public var file: String
    /// The offending key as a dotted path (`timing.heartbeat_ticks`, `members[1].id`); nil for the
    /// whole file.
    public var key: String?
    /// What is wrong with it.
    public var problem: String
    /// An error about `key` (nil: the file as a whole) of `file`.
    public init(file: String, key: String?, problem: String) {
        self.file = file
        self.key = key
        self.problem = problem
    }
    public var description: String { "\(file): " + (key.map { "\($0): " } ?? "") + problem }
}
