import Foundation
import Logging
import Prometheus
import Testing
@testable import RDMAPaxos

#if canImport(Glibc)
import Glibc
#endif

/// Every test uses its own `PrometheusCollectorRegistry`; none touches the process-wide `MetricsSystem`.
@Suite(.timeLimit(.minutes(1))) struct MetricsTests {
    @Test func endpointServesEachNodesMetricsAfterProposals() async throws {
        let registry = PrometheusCollectorRegistry()
        let c = try ReplicaNodeTests.Cluster(ReplicaNodeTests.three, metricsFactory: PloverMetrics.prometheusFactory(registry: registry))
        defer { c.stopAll() }
        let endpoint = try MetricsEndpoint.start(host: "127.0.0.1", port: 0, registry: registry)
        defer { endpoint.stop() }
        let leader = try await c.leader()
        for i in 0..<20 { try await c.put("k\(i)", "v\(i)", via: leader) }

        let r = try HTTPResponse.fetch(port: endpoint.boundPort, path: "/metrics")
        #expect(r.status == 200)
        #expect(r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8")
        #expect(r.body.contains("# TYPE plover_commit_latency_seconds histogram"))
        let id = leader.options.replica.id
        let node = "{node=\"\(id)\"}"
        // Each acknowledged proposal was timed once and counted in exactly one batch.
        #expect(r.sample("plover_commit_latency_seconds_count" + node) == 20)
        #expect(r.sample("plover_proposals_per_batch_sum" + node) == 20)
        #expect((r.sample("plover_proposals_per_batch_count" + node) ?? 0) >= 1)
        #expect((r.sample("plover_entries_applied_total" + node) ?? 0) >= 20)
        #expect((r.sample("plover_commit_index" + node) ?? 0) >= 20)
        #expect((r.sample("plover_last_index" + node) ?? 0) >= 20)
        #expect(r.sample("plover_pending_proposals" + node) == 0)
        #expect(r.sample("plover_role{node=\"\(id)\",role=\"leader\"}") == 1)
        #expect(r.sample("plover_role{node=\"\(id)\",role=\"follower\"}") == 0)
        #expect((r.sample("plover_elections_won_total" + node) ?? 0) >= 1)
        #expect((r.sample("plover_leader_changes_total" + node) ?? 0) >= 1)
        #expect(r.sample("plover_storage_failures_total" + node) == 0)
        for other in c.nodes.keys where other != id {
            #expect(r.sample("plover_role{node=\"\(other)\",role=\"leader\"}") == 0)
            #expect(r.sample("plover_commit_latency_seconds_count{node=\"\(other)\"}") == 0)
        }
    }

    @Test func endpointAnswersOnlyGetOnMetricsPath() throws {
        let registry = PrometheusCollectorRegistry()
        registry.makeCounter(descriptor: MetricNameDescriptor(metricName: "plover_test", unitName: "total", helpText: "a test counter")).increment()
        let endpoint = try MetricsEndpoint.start(host: "127.0.0.1", port: 0, registry: registry)
        defer { endpoint.stop() }
        let unknown = try HTTPResponse.fetch(port: endpoint.boundPort, path: "/")
        #expect(unknown.status == 404)
        #expect(!unknown.body.contains("plover_test_total"))
        #expect(try HTTPResponse.fetch(port: endpoint.boundPort, path: "/metrics/extra").status == 404)
        let post = try HTTPResponse.fetch(method: "POST", port: endpoint.boundPort, path: "/metrics")
        #expect(post.status == 405 && post.headers["allow"] == "GET, HEAD")
        let withQuery = try HTTPResponse.fetch(port: endpoint.boundPort, path: "/metrics?name=x")
        #expect(withQuery.status == 200 && withQuery.sample("plover_test_total") == 1)
    }

    @Test func ringStatisticsAreExportedAsCountersAndOccupancy() async throws {
        let c = try await RingCluster.make(.memory, nodes: [1, 2], ringBytes: 1024)
        defer { c.stop() }
        let registry = PrometheusCollectorRegistry()
        let sender = c.transports[1]!
        var ring = RingMetrics(ring: sender, metrics: NodeMetrics(node: 1, factory: PloverMetrics.prometheusFactory(registry: registry)))
        c.transports[2]!.pauseReceiving(true)
        let m = Message(from: 1, to: 2, ballot: Ballot(term: 1, node: 1), body: .heartbeat(commit: 1, readRound: 0))
        for _ in 0..<100 { sender.send(m) }
        ring.sample()
        let first = sender.statistics
        var r = HTTPResponse(text: registry.emitToString())
        #expect(first.droppedRingFull > 0)
        #expect(r.sample("plover_ring_messages_sent_total{node=\"1\"}") == Double(first.sent))
        #expect(r.sample("plover_ring_messages_dropped_total{node=\"1\",reason=\"ring_full\"}") == Double(first.droppedRingFull))
        #expect(r.sample("plover_ring_messages_dropped_total{node=\"1\",reason=\"not_connected\"}") == 0)
        #expect(r.sample("plover_ring_capacity_bytes{node=\"1\"}") == 1024)
        // The receiver consumed nothing: what was written is still in the ring.
        #expect((r.sample("plover_ring_occupancy_bytes{node=\"1\",peer=\"2\"}") ?? 0) > 0)

        c.transports[2]!.pauseReceiving(false)
        #expect(await eventually { c.inboxes[2]!.count == first.sent })
        for _ in 0..<5 { sender.send(m) }
        ring.sample()
        let second = sender.statistics
        r = HTTPResponse(text: registry.emitToString())
        // Counters follow the transport's totals across samples (only the difference is added).
        #expect(second.sent + second.droppedRingFull == 105)
        #expect(r.sample("plover_ring_messages_sent_total{node=\"1\"}") == Double(second.sent))
        #expect(r.sample("plover_ring_messages_dropped_total{node=\"1\",reason=\"ring_full\"}") == Double(second.droppedRingFull))
        #expect(r.sample("plover_ring_connects_total{node=\"1\"}") == Double(second.connects))
    }

    @Test func replicaServerServesMetricsOnConfiguredAddress() async throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("plover-metrics-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let keyPath = dir.appendingPathComponent("cluster.key").path
        _ = FileManager.default.createFile(atPath: keyPath, contents: Data("0123456789abcdef0123456789abcdef\n".utf8),
                                           attributes: [.posixPermissions: 0o600])
        // The only voter elects itself; the learner is never started (its ring stays unconnected).
        var config = NodeConfig(id: 1, dataDir: dir.path, members: [
            .init(id: 1, address: "127.0.0.1:0", clientAddress: "127.0.0.1:0", role: .voter, priority: 1),
            .init(id: 2, address: "127.0.0.1:9", clientAddress: "127.0.0.1:10", role: .learner, priority: 0),
        ])
        config.durability = .memory
        config.fabric = .tcp
        config.clusterKeyFile = keyPath
        config.metricsAddress = "127.0.0.1:0"  // The file format wants a real port; port 0 lets the test run anywhere.
        let registry = PrometheusCollectorRegistry()
        let server = try await ReplicaServer.start(config: config, stateMachine: KeyValueStateMachine(),
                                                   logger: Logger(label: "test"), metricsRegistry: registry)
        defer { server.stop() }
        let endpoint = try #require(server.metricsEndpoint)
        var applied = false
        for _ in 0..<500 where !applied {
            do {
                _ = try await server.node.propose(KeyValueStateMachine.Command.put(key: [1], value: [2]).encoded())
                applied = true
            } catch NodeError.notLeader {
                try await Task.sleep(for: .milliseconds(10))  // A single voter elects itself after one election timeout.
            }
        }
        #expect(applied)
        let r = try HTTPResponse.fetch(port: endpoint.boundPort, path: "/metrics")
        #expect(r.status == 200)
        #expect(r.sample("plover_commit_latency_seconds_count{node=\"1\"}") == 1)
        #expect(r.sample("plover_role{node=\"1\",role=\"leader\"}") == 1)
        #expect(r.sample("plover_ring_capacity_bytes{node=\"1\"}") == Double(1 << 20))
        #expect(r.sample("plover_ring_occupancy_bytes{node=\"1\",peer=\"2\"}") == 0)
    }

    @Test(arguments: [
        ("127.0.0.1", true), ("127.8.9.10", true), ("localhost", true), ("::1", true), ("[::1]", true),
        ("0.0.0.0", false), ("10.0.0.1", false), ("::", false), ("[::]", false), ("metrics.example", false), ("127.0.0", false),
    ])
    func loopbackHostsAreRecognised(host: String, loopback: Bool) {
        #expect(MetricsEndpoint.isLoopback(host: host) == loopback)
    }
}

/// An HTTP response read from a blocking socket (`Connection: close`), and Prometheus samples in it.
struct HTTPResponse {
    var status = 0
    var headers: [String: String] = [:]
    var body: String

    init(text: String) { body = text }

    static func fetch(method: String = "GET", port: Int, path: String) throws -> HTTPResponse {
        var bytes: [UInt8] = []
        do {
            let s = try SocketDescriptor.connect(to: HostPort(host: "127.0.0.1", port: port))
            defer { s.close() }
            s.setReceiveTimeout(.seconds(10))
            try s.send(Array("\(method) \(path) HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".utf8))
            while true {
                let chunk = try s.receive(upTo: 65_536)
                if chunk.isEmpty { break }
                bytes += chunk
            }
        } catch {
            throw CommandError("\(method) \(path): \(error)")
        }
        let text = String(decoding: bytes, as: UTF8.self)
        guard let split = text.range(of: "\r\n\r\n") else { throw CommandError("no HTTP header in \(text.debugDescription)") }
        var r = HTTPResponse(text: String(text[split.upperBound...]))
        let lines = text[..<split.lowerBound].components(separatedBy: "\r\n")
        r.status = Int(lines[0].split(separator: " ")[1]) ?? 0
        for line in lines.dropFirst() {
            guard let colon = line.firstIndex(of: ":") else { continue }
            r.headers[line[..<colon].lowercased()] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
        }
        return r
    }

    /// The value of `series` (a metric name with its labels, exactly as exported), if exported.
    func sample(_ series: String) -> Double? {
        for line in body.split(separator: "\n") where !line.hasPrefix("#") {
            guard let space = line.lastIndex(of: " ") else { continue }
            if line[..<space] == series { return Double(line[line.index(after: space)...]) }
        }
        return nil
    }
}
