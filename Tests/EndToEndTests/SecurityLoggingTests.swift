import Foundation
import Testing
@testable import PloverTesting
import RDMAPaxos

extension EndToEnd {
    /// What a running replica writes to its log about peers that fail authentication, and that it
    /// never writes its cluster key (the TCP fabric's unit tests check the rejections themselves,
    /// replayed handshakes included: `TCPFabricTests`).
    @Suite(.serialized, .timeLimit(.minutes(2))) struct SecurityLoggingTests {
        @Test func rejectedPeersAreLoggedAndTheClusterKeyNeverIs() async throws {
            try await EndToEnd.onCluster("security") { c, checks -> Void in
                _ = try c.waitForLeader(excluding: nil)
                let key = try ClusterKey.load(path: c.root + "/cluster.key").bytes
                let target = c.peers[2]!.split(separator: ":")
                let address = PeerAddress(node: 2, host: String(target[0]), port: Int(target[1])!)
                // A peer with the wrong key, and a stranger with the right key but an id no member
                // can have (above `limits.node_id_max`: ids up to it are admitted by the fabric,
                // so that members added later can connect; the configuration decides who votes).
                let rogues: [(NodeID, [UInt8], Set<NodeID>)] = [
                    (1, Array("not this cluster's key, 32 bytes".utf8), [1, 2, 3]),
                    (17, key, [2, 17]),
                ]
                let outcomes = try onOwnLoop(rogues.map { id, k, members in
                    { () async throws -> Bool in
                        let f = try TCPFabric(node: id, configuration: .init(clusterKey: k, members: members))
                        defer { f.close() }
                        do {
                            _ = try await f.connect(to: address, exporting: try f.registerRegion(lengthBytes: 64))
                            return false
                        } catch {
                            return true
                        }
                    }
                })
                checks.expect(outcomes == [true, true], "a rogue peer was let in: \(outcomes)")
                Thread.sleep(forTimeInterval: 0.3)
                c.stopAll()

                let log2 = (try? String(contentsOfFile: c.logPath(2), encoding: .utf8)) ?? ""
                let rejections = log2.split(separator: "\n").filter { $0.contains("rejected handshake") }
                checks.expect(rejections.contains { $0.contains("claiming node 1") }, "no log line for the wrong-key peer:\n\(rejections)")
                checks.expect(rejections.contains { $0.contains("claiming node 17") }, "no log line for the unknown node:\n\(rejections)")
                // No log holds the key, nor any 12-character piece of it.
                let secret = String(decoding: key, as: UTF8.self)
                let pieces = stride(from: 0, to: secret.count - 11, by: 6).map { String(secret.dropFirst($0).prefix(12)) }
                for id in c.ids {
                    let text = (try? String(contentsOfFile: c.logPath(id), encoding: .utf8)) ?? ""
                    checks.expect(!text.isEmpty, "node \(id) wrote no log")
                    let leaked = pieces.filter { text.localizedCaseInsensitiveContains($0) }
                    checks.expect(leaked.isEmpty, "node \(id)'s log contains part of the cluster key")
                }
            }
        }
    }
}

/// Runs async closures one after another on a private task and waits for their results from a
/// blocking thread (the end-to-end bodies run on threads of their own).
private func onOwnLoop<T: Sendable>(_ jobs: [@Sendable () async throws -> T]) throws -> [T] {
    let done = DispatchSemaphore(value: 0)
    let box = ResultBox<[T]>()
    Task {
        do {
            var out: [T] = []
            for j in jobs { out.append(try await j()) }
            box.set(.success(out))
        } catch {
            box.set(.failure(error))
        }
        done.signal()
    }
    done.wait()
    return try box.get().get()
}

private final class ResultBox<T: Sendable>: @unchecked Sendable {
    // @unchecked Sendable: `value` is only touched under `lock`.
    private let lock = NSLock()
    private var value: Result<T, any Error>?
    func set(_ r: Result<T, any Error>) { lock.withLock { value = r } }
    func get() -> Result<T, any Error> { lock.withLock { value! } }
}
