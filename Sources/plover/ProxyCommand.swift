import ArgumentParser
import Foundation
import PloverTesting
import RDMAPaxos

/// `plover proxy`: one stable address for the clients of a server replicated by
/// `libinterpose.so`. Each accepted connection is forwarded to the replicated server's port on
/// the current leader (followers refuse clients). When the leader fails, the forwarded
/// connection ends, the proxy closes the client's, and the client's reconnect reaches the new
/// leader (which accepts clients once it has replayed the log).
struct ProxyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "proxy",
        abstract: "Forward clients of a server replicated with libinterpose.so to the current leader's server.")

    @OptionGroup var cluster: ClusterOptions
    @Option(help: "Where clients connect: HOST:PORT.") var listen: String
    @Option(help: "The replicated server on each replica as ID=HOST:PORT, comma-separated (e.g. each replica's Redis).")
    var servers: String

    func run() throws {
        let endpoints = try cluster.resolve()
        let backends = try Self.parseServers(servers)
        for id in backends.keys where endpoints[id] == nil {
            throw ValidationError("--servers names node \(id), which is not a member of the cluster (\(endpoints.keys.sorted()))")
        }
        let address = try Self.hostPort(listen, what: "--listen")
        let proxy = LeaderProxy(endpoints: endpoints, backends: backends)
        try proxy.serve(on: address)
    }

    static func parseServers(_ list: String) throws -> [NodeID: HostPort] {
        var out: [NodeID: HostPort] = [:]
        for item in list.split(separator: ",") {
            let kv = item.split(separator: "=", maxSplits: 1)
            guard kv.count == 2, let id = NodeID(kv[0]), id > 0 else { throw ValidationError("--servers: \"\(item)\" is not ID=HOST:PORT") }
            out[id] = try hostPort(String(kv[1]), what: "--servers (node \(id))")
        }
        guard !out.isEmpty else { throw ValidationError("--servers names no server") }
        return out
    }

    static func hostPort(_ s: String, what: String) throws -> HostPort {
        guard let a = HostPort(parsing: s) else { throw ValidationError("\(what): \"\(s)\" is not HOST:PORT with a port from 1 to 65535") }
        return a
    }
}

/// Accepts clients and pipes each to the leader's server, two threads per connection.
final class LeaderProxy: @unchecked Sendable {
    // @unchecked Sendable: immutable after init; `leaderCache` is only touched under `lock`.
    let endpoints: [NodeID: String]
    let backends: [NodeID: HostPort]
    private let lock = NSLock()
    private var leaderCache: NodeID?

    init(endpoints: [NodeID: String], backends: [NodeID: HostPort]) {
        self.endpoints = endpoints
        self.backends = backends
    }

    func serve(on address: HostPort) throws {
        let listener = try SocketDescriptor.listen(on: address)
        print("plover proxy: listening on \(address), forwarding to the leader's server among \(backends.keys.sorted())")
        while true {
            let client = try listener.accept()
            Thread(named: "proxy-client") { [self] in handle(client) }.start()
        }
    }

    /// The leader per the replicas' status (cached until a connection to it fails).
    func leader(refresh: Bool) -> NodeID? {
        if !refresh, let l = lock.withLock({ leaderCache }) { return l }
        let c = NodeClient(endpoints: endpoints, timeout: .milliseconds(500))
        for id in endpoints.keys.sorted() {
            if let s = try? c.status(of: id), s.split(separator: "\n").contains("role=leader") {
                lock.withLock { leaderCache = id }
                return id
            }
        }
        lock.withLock { leaderCache = nil }
        return nil
    }

    func handle(_ client: SocketDescriptor) {
        // A few tries: the leader may have just changed, or not yet replayed the log (it closes
        // new connections until then).
        var server: SocketDescriptor?
        for attempt in 0..<20 where server == nil {
            if let l = leader(refresh: attempt > 0), let a = backends[l] { server = try? SocketDescriptor.connect(to: a) }
            if server == nil { Thread.sleep(forTimeInterval: 0.1) }
        }
        guard let server else { client.close(); return }
        let done = DispatchGroup()
        for (from, to) in [(client, server), (server, client)] {
            done.enter()
            Thread(named: "proxy-pipe") {
                Self.pipe(from, to)
                // Either side ending ends both: the client reconnects and is forwarded afresh.
                from.shutdown()
                to.shutdown()
                done.leave()
            }.start()
        }
        done.wait()
        client.close()
        server.close()
    }

    static func pipe(_ from: SocketDescriptor, _ to: SocketDescriptor) {
        while let chunk = try? from.receive(upTo: 64 << 10), !chunk.isEmpty {
            guard (try? to.send(chunk)) != nil else { return }
        }
    }
}
