import Foundation
import PloverCheck
import Testing
@testable import PloverTesting
import RDMAPaxos

extension EndToEnd {
    /// The second server shape under the shim: `interpose-c/et_kv_server.c`, one thread with
    /// edge-triggered epoll and fair reads (at most 700 bytes per client per turn, a ready list),
    /// unlike Redis's level-triggered loop. Three of them run under `LD_PRELOAD=libinterpose.so`;
    /// the same differential idea as for Redis: seeded clients, a leader `kill -9`, equal state.
    @Suite(.serialized, .timeLimit(.minutes(4))) struct InterposeEpollServerTests {
        final class ShimmedServers {
            let root: String
            let cluster: DemoCluster
            let library: String
            let program: String
            var ports: [NodeID: Int] = [:]
            var processes: [NodeID: Process] = [:]

            init(_ name: String) throws {
                root = EndToEnd.ClusterProcessTests.scratch(name)
                try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
                library = try InterposeHarness.library()
                program = try InterposeHarness.compileC("et_kv_server", into: root)
                cluster = try DemoCluster(root: root, durability: "fsync", timing: DemoCluster.Timing(electionTimeoutTicks: 40), executable: program)
                for id in cluster.ids { ports[id] = try freePort() }
            }

            func adminPath(_ id: NodeID) -> String { root + "/admin-\(id).sock" }

            func start(_ id: NodeID) throws {
                processes[id] = try InterposeHarness.spawn(program, [String(ports[id]!), adminPath(id)], log: root + "/server-\(id).log", environment: [
                    "LD_PRELOAD": library, "INTERPOSE_CONFIG": cluster.configPath(id), "INTERPOSE_PORT": String(ports[id]!),
                    "INTERPOSE_LOG_LEVEL": "info",
                ])
            }

            func kill(_ id: NodeID) { if let p = processes.removeValue(forKey: id) { InterposeHarness.kill9(p) } }
            func stopAll() { for id in processes.keys { kill(id) } }

            /// One admin command's answer line from replica `id` (its unix socket), nil if unreachable.
            func admin(_ id: NodeID, _ line: String) -> String? {
                guard let c = try? LineClient(unixPath: adminPath(id)) else { return nil }
                return try? c.request([line]).first
            }

            func converged(timeout: Duration = .seconds(30)) -> Bool {
                InterposeHarness.waitUntil(timeout) {
                    let ds = processes.keys.map { admin($0, "DIGEST") }
                    return ds.allSatisfy { $0 != nil } && Set(ds).count == 1
                }
            }

            func logTails() -> String {
                cluster.ids.map { id in
                    let text = (try? String(contentsOfFile: root + "/server-\(id).log", encoding: .utf8)) ?? ""
                    return "server \(id):\n" + text.split(separator: "\n").suffix(8).map { "  " + $0 }.joined(separator: "\n")
                }.joined(separator: "\n")
            }
        }

        @Test func edgeTriggeredServerWithRandomPipelinesAndALeaderKillStaysEqual() async throws {
            let seed = UInt64(ProcessInfo.processInfo.environment["PLOVER_INTERPOSE_SEED"] ?? "") ?? 1
            let checks = Checks()
            defer { checks.recordIssues() }
            try await onOwnThread {
                let s = try ShimmedServers("et-differential")
                defer { s.stopAll() }
                for id in s.cluster.ids { try s.start(id) }
                _ = try InterposeHarness.waitForLeader(s.cluster.endpoints, among: s.cluster.ids)
                let acked = AckedWrites()
                let stop = ManagedAtomicFlag()
                let group = DispatchGroup()
                let (ports, endpoints) = (s.ports, s.cluster.endpoints)
                for client in 0..<6 {
                    group.enter()
                    Thread {
                        defer { group.leave() }
                        var random = SeededRandom(seed: seed &* 7_919 &+ UInt64(client))
                        RandomLineClient(id: client, ports: ports, endpoints: endpoints, acked: acked).run(&random, until: stop)
                    }.start()
                }
                Thread.sleep(forTimeInterval: 2.5)
                if let victim = InterposeHarness.leader(s.cluster.endpoints, among: s.processes.keys.sorted()) {
                    s.kill(victim)
                    Thread.sleep(forTimeInterval: 1.5)
                    try s.start(victim)
                } else {
                    checks.record("seed \(seed): no leader to kill")
                }
                Thread.sleep(forTimeInterval: 2.5)
                stop.set()
                group.wait()
                let writes = acked.all
                checks.expect(writes.count > 20, "seed \(seed): only \(writes.count) SETs were acknowledged: too few to prove anything")
                checks.expect(s.converged(timeout: .seconds(60)), "seed \(seed): the servers' digests differ:\n"
                              + s.cluster.ids.map { "\($0): \(s.admin($0, "DIGEST") ?? "-")" }.joined(separator: " ") + "\n" + s.logTails())
                for id in s.cluster.ids {
                    var missing: [String] = []
                    for (k, v) in writes where s.admin(id, "GET \(k)") != "VALUE \(v)" { missing.append(k) }
                    checks.expect(missing.isEmpty, "seed \(seed): server \(id) lacks \(missing.count) of \(writes.count) acknowledged SETs, e.g. \(missing.prefix(3))")
                }
                if !checks.hasFailures { s.stopAll(); try? FileManager.default.removeItem(atPath: s.root) }
            }
        }

        /// While one client streams large values, the leader reads it ahead 16 KiB at a time and the
        /// server takes them 700 bytes per turn, so most of its epoll_waits report only that client's
        /// committed input and withhold the others'. Level-triggered, the kernel would report a
        /// withheld client again; edge-triggered, it never does, so the shim owes it the event. A
        /// second client's small requests must each be answered (within the client's 10 s timeout).
        @Test func edgeTriggeredClientIsServedBesideALargeStream() async throws {
            let checks = Checks()
            defer { checks.recordIssues() }
            try await onOwnThread {
                let s = try ShimmedServers("et-starve")
                defer { s.stopAll() }
                for id in s.cluster.ids { try s.start(id) }
                let leader = try InterposeHarness.waitForLeader(s.cluster.endpoints, among: s.cluster.ids)
                let ready = InterposeHarness.waitUntil(.seconds(20)) { (try? LineClient(port: s.ports[leader]!).request(["GET x"])) != nil }
                checks.expect(ready, "the leader's server never answered")
                let port = s.ports[leader]!
                let small = try LineClient(port: port)
                let value = String(repeating: "s", count: 200_000)
                let done = DispatchSemaphore(value: 0)
                Thread {
                    defer { done.signal() }
                    let streamer = try? LineClient(port: port)
                    let replies = (try? streamer?.request((0..<25).map { "SET stream-\($0) \(value)" })) ?? []
                    if replies.count != 25 { checks.record("the streaming client got \(replies.count) of 25 replies") }
                }.start()
                for i in 0..<30 {
                    let start = ContinuousClock.now
                    let reply = try? small.request(["SET small-\(i) \(i)"])
                    if reply != ["OK"] { checks.record("small request \(i) got \(String(describing: reply)) after \(ContinuousClock.now - start)"); break }
                }
                done.wait()
                checks.expect(s.converged(), "the servers' digests differ:\n" + s.logTails())
                if !checks.hasFailures { s.stopAll(); try? FileManager.default.removeItem(atPath: s.root) }
            }
        }
    }
}

/// One seeded client of the edge-triggered server's differential test: random pipelines of
/// line commands (appends to shared keys, whose order shows, and values up to 60 KB, larger than
/// a read-ahead) against whichever replica leads, with random disconnects.
struct RandomLineClient {
    let id: Int
    let ports: [NodeID: Int]
    let endpoints: [NodeID: String]
    let acked: AckedWrites

    func run(_ random: inout SeededRandom, until stop: ManagedAtomicFlag) {
        var connection: LineClient?
        var serial = 0
        while !stop.isSet {
            if connection == nil {
                guard let l = InterposeHarness.leader(endpoints, among: ports.keys.sorted()),
                      let c = try? LineClient(port: ports[l]!) else { Thread.sleep(forTimeInterval: 0.05); continue }
                connection = c
            }
            guard let c = connection else { continue }
            if random.below(25) == 0 { connection = nil; continue }
            var lines: [String] = []
            var sets: [Int: (String, String)] = [:]
            // Appends to a few shared keys around large values: a server that took another
            // client's bytes in the middle of this pipeline would order the appends differently.
            // Odd clients race with small appends alone; even ones mix them with values.
            for _ in 0..<(2 + random.below(7)) {
                serial += 1
                switch id % 2 == 1 ? 2 : random.below(8) {
                case 0, 1:
                    let key = "k-\(id)-\(serial)"
                    // Small, within one read-ahead (and many server reads), or larger than one.
                    let size = [1 + random.below(40), 1_000 + random.below(11_000), 20_000 + random.below(40_000)][random.below(3)]
                    let value = String(repeating: Character(UnicodeScalar(UInt8(97 + random.below(26)))), count: size)
                    sets[lines.count] = (key, value)
                    lines.append("SET \(key) \(value)")
                case 2, 3, 4, 5: lines.append("APPEND shared-\(random.below(3)) c\(id)-\(serial)")
                case 6: lines.append("SET hot-\(random.below(2)) c\(id)-\(serial)")
                default: lines.append("DEL shared-\(random.below(3))")
                }
            }
            guard let replies = try? c.request(lines), replies.count == lines.count else { connection = nil; continue }
            for (i, (key, value)) in sets where replies[i] == "OK" { acked.add(key, value) }
        }
    }
}

/// A blocking client for a line protocol (TCP on loopback or a unix socket).
final class LineClient {
    let fd: Int32
    private var buffer: [UInt8] = []

    init(port: Int) throws {
        fd = try InterposeHarness.connect(port: port)
        setTimeout()
    }

    init(unixPath: String) throws {
        fd = try InterposeHarness.connect(unixPath: unixPath)
        setTimeout()
    }

    /// 10 s for every send and receive: a stalled server fails the request instead of hanging the test.
    private func setTimeout() {
        var tv = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    deinit { Glibc.close(fd) }

    /// Sends the lines in one write and returns as many reply lines.
    func request(_ lines: [String]) throws -> [String] {
        let bytes = Array(lines.map { $0 + "\n" }.joined().utf8)
        var sent = 0
        while sent < bytes.count {
            let n = bytes[sent...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            guard n > 0 else { throw CLIError("send failed: \(String(cString: strerror(errno)))") }
            sent += n
        }
        return try lines.map { _ in try line() }
    }

    private func line() throws -> String {
        while true {
            if let i = buffer.firstIndex(of: 10) {
                let s = String(decoding: buffer[..<i], as: UTF8.self)
                buffer.removeFirst(i + 1)
                return s
            }
            var chunk = [UInt8](repeating: 0, count: 65536)
            let n = chunk.withUnsafeMutableBytes { Glibc.recv(fd, $0.baseAddress, $0.count, 0) }
            guard n > 0 else { throw CLIError(n == 0 ? "the server closed the connection" : "recv failed: \(String(cString: strerror(errno)))") }
            buffer += chunk[..<n]
        }
    }
}
