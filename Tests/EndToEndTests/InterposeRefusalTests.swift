import Foundation
import PloverCheck
import Testing
@testable import PloverTesting
import RDMAPaxos

extension EndToEnd.InterposeEpollServerTests {
    /// memcached (Debian's, threaded, libevent) accepts on its main thread and hands every
    /// connection to a worker thread with an epoll set of its own; the workers read concurrently,
    /// so no log order can make replicas execute the same thing. The shim must refuse it — stop it
    /// with a message naming what it saw — before any byte of a client is read, never replicate it.
    @Test func memcachedIsRefusedBeforeItReadsAClientByte() async throws {
        let checks = Checks()
        defer { checks.recordIssues() }
        try await onOwnThread {
            guard FileManager.default.isExecutableFile(atPath: "/usr/bin/memcached") else {
                throw CLIError("memcached is not installed (scripts/install-deps.sh installs it; make test runs that)")
            }
            let root = EndToEnd.ClusterProcessTests.scratch("memcached-refused")
            try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
            let library = try InterposeHarness.library()
            let cluster = try DemoCluster(root: root, durability: "memory", timing: DemoCluster.Timing(electionTimeoutTicks: 40),
                                          executable: "/usr/bin/memcached")
            var ports: [NodeID: Int] = [:]
            var procs: [NodeID: Process] = [:]
            defer { for p in procs.values where p.isRunning { InterposeHarness.kill9(p) } }
            for id in cluster.ids {
                ports[id] = try freePort()
                procs[id] = try InterposeHarness.spawn("/usr/bin/memcached", [
                    "-p", String(ports[id]!), "-l", "127.0.0.1", "-U", "0", "-t", "4", "-u", "root",
                ], log: root + "/memcached-\(id).log", environment: [
                    "LD_PRELOAD": library, "INTERPOSE_CONFIG": cluster.configPath(id), "INTERPOSE_PORT": String(ports[id]!),
                ])
            }
            let leader = try InterposeHarness.waitForLeader(cluster.endpoints, among: cluster.ids)
            // Until the leader is ready it closes connections; once ready it takes one and stops.
            var replies: [String] = []
            let stopped = InterposeHarness.waitUntil(.seconds(30)) {
                if let c = try? LineClient(port: ports[leader]!), let r = try? c.request(["version"]) { replies += r }
                return !procs[leader]!.isRunning
            }
            checks.expect(stopped, "memcached under the shim still runs after 30 s of clients")
            checks.expect(replies.isEmpty, "memcached answered a client under the shim: \(replies)")
            let log = (try? String(contentsOfFile: root + "/memcached-\(leader).log", encoding: .utf8)) ?? ""
            if stopped {
                checks.expect(procs[leader]!.terminationStatus == 78, "memcached exited with \(procs[leader]!.terminationStatus), not 78:\n\(log.suffix(800))")
            }
            checks.expect(log.contains("refusing to run this server replicated") && log.contains("not in the set that watches its listener"),
                          "the leader's log does not say why it refused memcached:\n\(log.suffix(1500))")
            if !checks.hasFailures { try? FileManager.default.removeItem(atPath: root) }
        }
    }
}
