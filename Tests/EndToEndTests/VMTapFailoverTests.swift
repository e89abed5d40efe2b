import Foundation
import PloverCheck
import RDMAPaxos
import Synchronization
import Testing
@testable import PloverTesting

/// A real network path into the replicated guest with a disk: each VM replica attaches to a tap on
/// one bridge (`network = "tap"`, TapLab) and has a disk image of its own, and a client in its own
/// network namespace keeps ONE TCP connection to Debian's unmodified redis-server in the guest
/// (its AOF on the guest's disk), writing numbered keys (SET k_i i), and fetches a page from the
/// guest's busybox httpd (kept on the disk) before and after the failover. The primary is killed (kill -9 of its replica process and QEMU) while the client
/// writes; the same connection goes on against the backup. The killed replica is restarted and
/// re-protected, then the new primary is paused between two writes (SIGSTOP of its replica and
/// QEMU, a host that hangs: its tap stays up on the bridge and the guest has nothing to send, so
/// only the next primary's gratuitous ARP moves the guest's MAC to its port, which the test reads
/// from the bridge's forwarding table) and the connection goes on again. At the end every
/// acknowledged key is read back on that connection, and the RAM and disk digests of the
/// checkpoints both sides completed are equal, with such a checkpoint in each direction (before
/// the kill, and after the restarted replica's re-protection).
extension EndToEnd {
    @Suite(.serialized) struct VMTapFailoverTests {
        typealias VM = VMReplicationTests

        /// Writes SET k_i i on one connection until stopped; remembers every i acknowledged with +OK.
        final class Writer: @unchecked Sendable {
            // @unchecked Sendable: the connection is used by the writer thread only until `stop`
            // returned; the rest is under `state`.
            let redis: RedisConnection
            private let state = Mutex<(acked: [Int], stop: Bool, error: String?, ackTimes: [ContinuousClock.Instant], pause: Bool, idle: Bool)>(([], false, nil, [], false, false))
            private let done = DispatchSemaphore(value: 0)

            init(_ redis: RedisConnection) {
                self.redis = redis
                let t = Thread { [self] in run() }
                t.name = "tap-writer"
                t.start()
            }

            private func run() {
                defer { done.signal() }
                var i = 0
                while !state.withLock({ $0.stop }) {
                    if state.withLock({ s in s.idle = s.pause; return s.pause }) {
                        Thread.sleep(forTimeInterval: 0.01)
                        continue
                    }
                    i += 1
                    do {
                        // A failover's TCP retransmissions take seconds at most; a minute is a dead connection.
                        let r = try redis.command(["SET", "k_\(i)", "\(i)"], timeout: .seconds(60))
                        guard r == "+OK" else {
                            state.withLock { $0.error = "SET k_\(i) answered \(r)" }
                            return
                        }
                        state.withLock {
                            $0.acked.append(i)
                            $0.ackTimes.append(.now)
                        }
                    } catch {
                        state.withLock { $0.error = "SET k_\(i): \(error)" }
                        return
                    }
                }
            }

            var acked: [Int] { state.withLock { $0.acked } }
            var error: String? { state.withLock { $0.error } }
            /// The first acknowledgement after `t`.
            func firstAck(after t: ContinuousClock.Instant) -> ContinuousClock.Instant? { state.withLock { $0.ackTimes.first { $0 > t } } }

            /// Waits until `n` more writes than `from` were acknowledged; false on timeout or error.
            func waitForAcks(_ n: Int, from: Int, timeout: Duration) -> Bool {
                let deadline = ContinuousClock.now + timeout
                while ContinuousClock.now < deadline {
                    let (count, err) = state.withLock { ($0.acked.count, $0.error) }
                    if err != nil { return false }
                    if count >= from + n { return true }
                    Thread.sleep(forTimeInterval: 0.05)
                }
                return false
            }

            /// Holds the writes after the one in flight, which this waits for.
            func pause() {
                state.withLock { $0.pause = true }
                while !state.withLock({ $0.idle || $0.error != nil }) { Thread.sleep(forTimeInterval: 0.01) }
            }

            func resume() { state.withLock { $0.pause = false } }

            /// Runs `body` on the writer's connection between two writes.
            func paused<T>(_ body: () throws -> T) rethrows -> T {
                pause()
                defer { resume() }
                return try body()
            }

            /// Stops after the write in flight and waits for the thread.
            func stop() {
                state.withLock { $0.stop = true }
                done.wait()
            }
        }

        static func wait(_ timeout: Duration, _ condition: () -> Bool) -> Bool {
            let deadline = ContinuousClock.now + timeout
            while ContinuousClock.now < deadline {
                if condition() { return true }
                Thread.sleep(forTimeInterval: 0.05)
            }
            return condition()
        }

        /// Replica `id`'s log from byte `offset` on.
        static func log(_ cluster: VMCluster, _ id: NodeID, from offset: Int = 0) -> String {
            let text = (try? String(contentsOfFile: cluster.logPath(id), encoding: .utf8)) ?? ""
            return String(text.utf8.dropFirst(offset)) ?? ""
        }

        @Test(VM.needsQEMU, .timeLimit(.minutes(6)))
        func oneTCPConnectionToRedisSurvivesAKillAndAPausedHost() async throws {
            let checks = Checks()
            defer { checks.recordIssues() }
            try await onOwnThread {
                let lab = try TapLab()
                defer { lab.tearDown() }
                try VM.withCluster(checks, vmExtra: VM.disk, taps: lab.taps) { cluster in
                    try Self.scenario(cluster, lab, checks)
                }
            }
        }

        /// The page busybox httpd serves from the guest's disk (scripts/vm-guest/init).
        static let diskPage = "plover guest: served from the disk (/data/www)"

        /// GET / from the guest's httpd over the tap path, on a connection of its own.
        static func page(_ lab: TapLab) throws -> String {
            let (status, body) = try RedisConnection.httpGet(connect: lab.clientConnect, host: "10.99.0.2", path: "/", timeout: .seconds(60))
            guard status == 200 else { throw CLIError("GET / from the guest's httpd answered \(status): \(body.prefix(80))") }
            return body.trimmingCharacters(in: .whitespacesAndNewlines)
        }

        /// Checkpoints both replicas completed with `primary` as the primary, each with RAM and disk digests.
        static func digested(_ cluster: VMCluster, primary: NodeID) -> Int {
            let p = cluster.checkpoints(primary).filter { $0["ok"] == "true" && $0["role"] == "primary" }
            let b = cluster.checkpoints(primary == 1 ? 2 : 1).filter { $0["ok"] == "true" && $0["role"] == "backup" }
            return p.filter { pc in
                pc["ram_digest"] != nil && pc["disk_digest"] != nil
                    && b.contains { $0["index"] == pc["index"] && $0["epoch"] == pc["epoch"] && $0["disk_digest"] != nil }
            }.count
        }

        static func scenario(_ cluster: VMCluster, _ lab: TapLab, _ checks: Checks) throws {
            try cluster.startAll()
            // The connection is made through the log and the output guard, like everything after it.
            let redis = try RedisConnection(connect: lab.clientConnect, host: "10.99.0.2", port: 6379, timeout: .seconds(120))
            let writer = Writer(redis)
            var stopped = false
            defer { if !stopped { writer.stop() } }
            func need(_ ok: Bool, _ what: String) throws {
                if !ok { throw CLIError("\(what); writer: \(writer.acked.count) acknowledged, error \(writer.error ?? "none")") }
            }
            try need(writer.waitForAcks(20, from: 0, timeout: .seconds(120)), "the first 20 writes were not acknowledged")
            try need(wait(.seconds(60)) { log(cluster, 2).contains("vm: protected:") }, "the backup was never protected")
            try need(log(cluster, 1).contains("serves clients on tap \(lab.taps[1]!)"), "the primary does not say it serves on its tap")
            // The guest's second server, on its own connection, and redis keeping its AOF on the disk.
            let page1 = try page(lab)
            checks.expect(page1 == diskPage, "before the failover the guest's httpd served \(page1.debugDescription), not the page on its disk")
            let persistence = try writer.paused { try redis.command(["INFO", "persistence"], timeout: .seconds(60)) }
            checks.expect(persistence.contains("aof_enabled:1"), "redis-server in the guest keeps no AOF on the disk: \(persistence.prefix(200))")
            try need(wait(.seconds(30)) { digested(cluster, primary: 1) > 0 }, "no checkpoint with node 1 primary has RAM and disk digests on both sides")
            // A second connection opened while the backup is protected: the two guests choose
            // different initial sequence numbers for it, so release on match learns an offset
            // (docs/design/vmreplica.md, "Connection offsets"), and the backup rewrites it
            // from then on; it is killed before a checkpoint can make the two guests equal.
            let late = try RedisConnection(connect: lab.clientConnect, host: "10.99.0.2", port: 6379, timeout: .seconds(60))
            let lateSet = try late.command(["SET", "late", "1"], timeout: .seconds(60))
            checks.expect(lateSet == "+OK", "SET on the second connection answered \(lateSet)")
            let learnt = Int(vmStatus(runDir: cluster.runDir(1))["offsets_learnt"] ?? "") ?? 0

            // 1. kill -9 of the primary's replica and QEMU while the client writes.
            let before1 = writer.acked.count
            let kill1 = ContinuousClock.now
            cluster.kill(1)
            try need(writer.waitForAcks(20, from: before1, timeout: .seconds(60)), "writes stopped after the primary was killed")
            let first1 = writer.firstAck(after: kill1).map { $0 - kill1 }
            try need(log(cluster, 2).contains("serves clients on tap \(lab.taps[2]!); announced the guest"), "the new primary did not announce the guest on its tap")
            let page2 = try page(lab)
            checks.expect(page2 == diskPage, "after the failover the guest's httpd served \(page2.debugDescription), not the page on its disk")
            // The second connection goes on against the new primary, through its offsets if it had any.
            let lateGet = try late.command(["GET", "late"], timeout: .seconds(60))
            checks.expect(lateGet == "1", "GET on the second connection after the failover answered \(lateGet)")
            let lateSet2 = try late.command(["SET", "late", "2"], timeout: .seconds(60))
            checks.expect(lateSet2 == "+OK", "SET on the second connection after the failover answered \(lateSet2)")
            let rewritten = log(cluster, 2).components(separatedBy: "\n").first { $0.contains("rewrites") && $0.contains("connections by the offsets") }

            // The killed replica comes back on its own tap and is re-protected by a checkpoint.
            let offset1 = (try? String(contentsOfFile: cluster.logPath(1), encoding: .utf8))?.utf8.count ?? 0
            try cluster.restart(1)
            try need(wait(.seconds(90)) { log(cluster, 1, from: offset1).contains("vm: protected:") }, "the restarted replica was not re-protected")
            let before2 = writer.acked.count
            try need(writer.waitForAcks(10, from: before2, timeout: .seconds(60)), "writes stopped after the re-protection")
            // The checkpoint that re-protected node 1, and those after it, made its RAM and its disk
            // equal to node 2's: each side hashed both after the disk step (compared at the end).
            try need(wait(.seconds(30)) { digested(cluster, primary: 2) > 0 }, "no checkpoint with node 2 primary has RAM and disk digests on both sides")

            // 2. The new primary's host hangs (SIGSTOP) while the client is between writes: its
            // tap stays up on the bridge and its syncvm link open; the election timeout and the
            // hand-back limit make node 1 take over. The guest has nothing to send, so nothing
            // but node 1's gratuitous ARP can teach the bridge that the guest's MAC is behind
            // node 1's tap now: without it the client's next segments go to the hung port.
            writer.pause()
            let before3 = writer.acked.count
            let offset2 = (try? String(contentsOfFile: cluster.logPath(1), encoding: .utf8))?.utf8.count ?? 0
            let pause = ContinuousClock.now
            cluster.signal(2, SIGSTOP)
            var resumed = false
            defer { if !resumed { cluster.signal(2, SIGCONT) } }
            try need(wait(.seconds(60)) { log(cluster, 1, from: offset2).contains("serves clients on tap \(lab.taps[1]!); announced the guest") },
                     "node 1 did not take over from the hung primary")
            let port = try lab.bridgePort(of: "52:54:00:12:34:56")
            checks.expect(port == lab.taps[1]!, "after the take-over the bridge sends the guest's MAC to \(port ?? "no port"), not to the new primary's tap \(lab.taps[1]!)")
            writer.resume()
            try need(writer.waitForAcks(10, from: before3, timeout: .seconds(90)), "writes stopped after the primary's host hung")
            let first2 = writer.firstAck(after: pause).map { $0 - pause }
            cluster.signal(2, SIGCONT)
            resumed = true
            try need(wait(.seconds(30)) { log(cluster, 2).contains("is a backup now") }, "the paused primary did not step down when it woke")
            try need(writer.waitForAcks(5, from: writer.acked.count, timeout: .seconds(60)), "writes stopped after the old primary woke")
            writer.stop()
            stopped = true
            checks.expect(writer.error == nil, "the writer failed: \(writer.error ?? "")")

            // Every acknowledged write is there, read on the same connection.
            let acked = writer.acked
            var missing: [String] = []
            for i in acked {
                let v = try redis.command(["GET", "k_\(i)"], timeout: .seconds(60))
                if v != "\(i)" { missing.append("k_\(i)=\(v)") }
            }
            checks.expect(missing.isEmpty, "\(missing.count) of \(acked.count) acknowledged writes are wrong after two failovers: \(missing.prefix(5))")
            checks.expect(acked == Array(1...acked.count), "acknowledgements out of order or with gaps: \(acked.prefix(10))...")
            let common = VM.commonCheckpoints(cluster, checks)
            checks.expect(common.filter { $0.0["disk_digest"] != nil }.count >= 2, "fewer than two checkpoints with disk digests on both sides: \(common.map(\.0))")
            print("tap failover: \(common.count) checkpoints with equal RAM and disk digests on both sides (\(digested(cluster, primary: 1)) with node 1 primary, \(digested(cluster, primary: 2)) with node 2); \(acked.count) writes acknowledged on one connection; kill -9 → next reply \(first1.map { "\($0)" } ?? "-"), SIGSTOP → next reply (idle client, then writing) \(first2.map { "\($0)" } ?? "-") (client route rto_min \(TapLab.rtoMin)); offsets the primary learnt before the kill: \(learnt); the new primary: \(rewritten.map { String($0.suffix(140)) } ?? "rewrote no connection")")
        }
    }
}
