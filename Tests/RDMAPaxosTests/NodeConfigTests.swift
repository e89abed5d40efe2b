import Foundation
import Testing
import RDMAPaxos

@Suite struct NodeConfigTests {
    static let good = """
        id = 2
        data_dir = "data/2"
        durability = "async"
        fabric = "tcp"
        cluster_key_file = "cluster.key"

        [timing]
        tick_ms = 5
        election_timeout_ticks = 30

        [[members]]
        id = 1
        address = "127.0.0.1:7001"
        client_address = "127.0.0.1:7101"
        priority = 2

        [[members]]
        id = 2
        address = "127.0.0.1:7002"
        client_address = "127.0.0.1:7102"

        [[members]]
        id = 3
        address = "127.0.0.1:7003"
        client_address = "127.0.0.1:7103"
        role = "witness"
        """

    @Test func goodConfigParses() throws {
        let c = try NodeConfig.parse(Self.good, file: "c.toml")
        #expect(c.id == 2 && c.durability == .async && c.fabric == .tcp && c.tickMilliseconds == 5)
        #expect(c.electionTimeoutTicks == 30 && c.heartbeatTicks == 2)
        #expect(c.membership.voting == [1, 2, 3])
        #expect(c.membership.member(3)?.role == .witness && c.membership.member(3)?.priority == 0)
        #expect(c.membership.member(1)?.priority == 2)
        #expect(c.verbsConnection == .outOfBand && !c.verbsConnectionSet)
        let outOfBand = try NodeConfig.parse(Self.good.replacingOccurrences(of: "fabric = \"tcp\"", with: "fabric = \"verbs\"\nverbs_connect = \"tcp\""),
                                             file: "c.toml")
        #expect(outOfBand.fabric == .verbs && outOfBand.verbsConnection == .outOfBand)
        let cm = try NodeConfig.parse(Self.good.replacingOccurrences(of: "fabric = \"tcp\"", with: "verbs_connect = \"rdma_cm\""), file: "c.toml")
        #expect(cm.fabric == .auto && cm.verbsConnection == .connectionManager)
        #expect(c.verbsPoll == .event)
        let busy = try NodeConfig.parse(Self.good.replacingOccurrences(of: "fabric = \"tcp\"", with: "fabric = \"verbs\"\nverbs_poll = \"busy\""), file: "c.toml")
        #expect(busy.verbsPoll == .busy)
    }

    /// A file that may run verbs and leaves `verbs_connect` out relied on the old default (rdma_cm):
    /// one warning line. Setting the key either way, or `fabric = "tcp"`, silences it.
    @Test func relyingOnTheOldVerbsConnectDefaultWarnsOnce() throws {
        func parse(_ fabricLines: String) throws -> NodeConfig {
            try NodeConfig.parse(Self.good.replacingOccurrences(of: "fabric = \"tcp\"", with: fabricLines), file: "c.toml")
        }
        for lines in ["fabric = \"auto\"", "fabric = \"verbs\"", ""] {
            let warning = try #require(try parse(lines).verbsConnectWarning, "no warning for \(lines)")
            #expect(!warning.contains("\n"))
            #expect(warning.hasPrefix("verbs_connect is not set: verbs queue pairs connect out of band over TCP"))
            #expect(warning.contains("verbs_connect = \"rdma_cm\" (hardware only"))
        }
        for lines in ["fabric = \"tcp\"", "fabric = \"auto\"\nverbs_connect = \"tcp\"", "fabric = \"verbs\"\nverbs_connect = \"rdma_cm\""] {
            #expect(try parse(lines).verbsConnectWarning == nil, "a warning for \(lines)")
        }
    }

    @Test(arguments: [
        ("id = 2", "id = \"two\"", "c.toml: id: must be an integer (got string)"),
        ("durability = \"async\"", "durability = \"sometimes\"", "c.toml: durability: must be one of fsync, async, memory (got \"sometimes\")"),
        ("role = \"witness\"", "role = \"boss\"", "c.toml: members[2].role: must be one of voter, witness, learner (got \"boss\")"),
        ("tick_ms = 5", "tick_ms = 0", "c.toml: timing.tick_ms: must be between 1 and 10000 (got 0)"),
        ("tick_ms = 5", "tick_ms = 5\nheartbeat_ticks = 40", "c.toml: timing.heartbeat_ticks: must be below timing.election_timeout_ticks (30)"),
        ("fabric = \"tcp\"", "fabirc = \"tcp\"", "c.toml: fabirc: unknown key (misspelt?)"),
        ("fabric = \"tcp\"", "fabric = \"tcp\"\nverbs_connect = \"udp\"", "c.toml: verbs_connect: must be one of rdma_cm, tcp (got \"udp\")"),
        ("fabric = \"tcp\"", "fabric = \"tcp\"\nverbs_poll = \"spin\"", "c.toml: verbs_poll: must be one of event, busy (got \"spin\")"),
        ("address = \"127.0.0.1:7002\"", "address = \"127.0.0.1\"", "c.toml: members[1].address: must be host:port with a port from 1 to 65535 (got \"127.0.0.1\")"),
        ("address = \"127.0.0.1:7002\"", "address = \"127.0.0.1:7001\"", "c.toml: members[1].address: 127.0.0.1:7001 is used by two members"),
        ("id = 2\n", "id = 9\n", "c.toml: id: node 9 is not one of the [[members]] (1, 2, 3)"),
        ("fabric = \"tcp\"", "fabric = \"tcp\"\nmetrics_address = \"127.0.0.1\"", "c.toml: metrics_address: must be host:port with a port from 1 to 65535 (got \"127.0.0.1\")"),
        ("fabric = \"tcp\"", "fabric = \"tcp\"\nmetrics_address = \"127.0.0.1:0\"", "c.toml: metrics_address: must be host:port with a port from 1 to 65535 (got \"127.0.0.1:0\")"),
        ("fabric = \"tcp\"", "fabric = \"tcp\"\nmetrics_address = \"127.0.0.1:7102\"", "c.toml: metrics_address: 127.0.0.1:7102 is already this member's client_address"),
    ])
    func badConfigNamesKeyAndProblem(find: String, replace: String, message: String) {
        let text = Self.good.replacingOccurrences(of: find, with: replace, options: [], range: Self.good.range(of: find))
        #expect(throws: ConfigError.self) { try NodeConfig.parse(text, file: "c.toml") }
        do { _ = try NodeConfig.parse(text, file: "c.toml") } catch { #expect(error.description == message) }
    }

    @Test func memoryLogCapMustHoldTheUncommittedEntries() throws {
        let memory = Self.good.replacingOccurrences(of: "durability = \"async\"", with: "durability = \"memory\"")
        #expect(try NodeConfig.parse(memory, file: "c.toml").memoryLogBytesMax == 512 << 20)
        let small = memory + "\n\n[limits]\nmemory_log_bytes_max = 134217728\n"
        do {
            _ = try NodeConfig.parse(small, file: "c.toml")
            Issue.record("a cap below 8 × uncommitted_bytes_max was accepted")
        } catch {
            #expect(error.description.hasPrefix("c.toml: limits.memory_log_bytes_max: must be at least 8 × limits.uncommitted_bytes_max"))
        }
        let fits = small + "uncommitted_bytes_max = 16777216\n"
        #expect(try NodeConfig.parse(fits, file: "c.toml").memoryLogBytesMax == 128 << 20)
    }

    @Test func asyncFlushIntervalDefaultsTo100MillisecondsAndIsBounded() throws {
        #expect(try NodeConfig.parse(Self.good, file: "c.toml").asyncFlushMilliseconds == 100)
        #expect(try NodeConfig.parse(Self.good + "\n\n[limits]\nasync_flush_ms = 0\n", file: "c.toml").asyncFlushMilliseconds == 0)
        #expect(throws: ConfigError.self) { try NodeConfig.parse(Self.good + "\n\n[limits]\nasync_flush_ms = 60001\n", file: "c.toml") }
    }

    @Test func metricsAddressIsOptionalAndKeptAsGiven() throws {
        #expect(try NodeConfig.parse(Self.good, file: "c.toml").metricsAddress == nil)
        let text = Self.good.replacingOccurrences(of: "fabric = \"tcp\"", with: "fabric = \"tcp\"\nmetrics_address = \"127.0.0.1:9102\"")
        #expect(try NodeConfig.parse(text, file: "c.toml").metricsAddress == "127.0.0.1:9102")
    }

    @Test func invalidTomlReportsLine() {
        do {
            _ = try NodeConfig.parse("id = 1\n[[members]\n", file: "c.toml")
            Issue.record("parsed invalid TOML")
        } catch {
            #expect(error.description.hasPrefix("c.toml: not valid TOML at line 2"))
        }
    }

    @Test func worldReadableKeyFileIsRefused() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("plover-key-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let path = dir.appendingPathComponent("cluster.key").path
        _ = FileManager.default.createFile(atPath: path, contents: Data("0123456789abcdef0123456789abcdef\n".utf8), attributes: [.posixPermissions: 0o644])
        #expect(throws: ConfigError.self) { try ClusterKey.load(path: path) }
        chmod(path, 0o600)
        #expect(try ClusterKey.load(path: path).bytes.count == 32)
        _ = FileManager.default.createFile(atPath: path, contents: Data("short".utf8), attributes: [.posixPermissions: 0o600])
        #expect(throws: ConfigError.self) { try ClusterKey.load(path: path) }
    }

    /// toml++ aborts the process on these; the config reader must refuse them first.
    @Test(arguments: ["[", "[=]", "[#]", "[.]", "[é]", "[ é]", "[[\\]]", "[\u{1}]"])
    func tableHeaderWithoutANameIsAConfigErrorNotACrash(header: String) {
        let text = Self.good.replacingOccurrences(of: "[timing]", with: header + "\n[timing]")
        #expect {
            try NodeConfig.parse(text, file: "c.toml")
        } throws: { error in
            (error as? ConfigError)?.description == "c.toml: not valid TOML at line 7: a table header needs a name ([name] or [[name]])"
        }
    }
}
