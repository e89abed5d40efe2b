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
        let (host, port) = try Self.hostPort(listen, what: "--listen")
        let proxy = LeaderProxy(endpoints: endpoints, backends: backends)
        try proxy.serve(host: host, port: port)
    }

    static func parseServers(_ list: String) throws -> [NodeID: (String, Int)] {
        var out: [NodeID: (String, Int)] = [:]
        for item in list.split(separator: ",") {
            let kv = item.split(separator: "=", maxSplits: 1)
            guard kv.count == 2, let id = NodeID(kv[0]), id > 0 else { throw ValidationError("--servers: \"\(item)\" is not ID=HOST:PORT") }
            out[id] = try hostPort(String(kv[1]), what: "--servers (node \(id))")
        }
        guard !out.isEmpty else { throw ValidationError("--servers names no server") }
        return out
    }

    static func hostPort(_ s: String, what: String) throws -> (String, Int) {
        guard let colon = s.lastIndex(of: ":"), let port = Int(s[s.index(after: colon)...]), (1...65535).contains(port) else {
            throw ValidationError("\(what): \"\(s)\" is not HOST:PORT")
        }
        return (String(s[..<colon]), port)
    }
}

/// Accepts clients and pipes each to the leader's server, two threads per connection.
final class LeaderProxy: @unchecked Sendable {
    // @unchecked Sendable: immutable after init; `leaderCache` is only touched under `lock`.
    let endpoints: [NodeID: String]
    let backends: [NodeID: (String, Int)]
    private let lock = NSLock()
    private var leaderCache: NodeID?

    init(endpoints: [NodeID: String], backends: [NodeID: (String, Int)]) {
        self.endpoints = endpoints
        self.backends = backends
    }

    func serve(host: String, port: Int) throws {
        let listener = try Self.listenSocket(host: host, port: port)
        print("plover proxy: listening on \(host):\(port), forwarding to the leader's server among \(backends.keys.sorted())")
        while true {
            let client = accept(listener, nil, nil)
            if client < 0 { if errno == EINTR || errno == ECONNABORTED { continue }; throw CLIError("accept on \(host):\(port): \(String(cString: strerror(errno)))") }
            Thread { [self] in handle(client) }.start()
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

    func handle(_ client: Int32) {
        // A few tries: the leader may have just changed, or not yet replayed the log (it closes
        // new connections until then).
        var server: Int32 = -1
        for attempt in 0..<20 where server < 0 {
            if let l = leader(refresh: attempt > 0), let (h, p) = backends[l] { server = Self.connectSocket(host: h, port: p) }
            if server < 0 { Thread.sleep(forTimeInterval: 0.1) }
        }
        guard server >= 0 else { close(client); return }
        let done = DispatchGroup()
        for (from, to) in [(client, server), (server, client)] {
            done.enter()
            Thread {
                Self.pipe(from, to)
                // Either side ending ends both: the client reconnects and is forwarded afresh.
                shutdown(from, Int32(SHUT_RDWR))
                shutdown(to, Int32(SHUT_RDWR))
                done.leave()
            }.start()
        }
        done.wait()
        close(client)
        close(server)
    }

    static func pipe(_ from: Int32, _ to: Int32) {
        var buf = [UInt8](repeating: 0, count: 64 << 10)
        while true {
            let n = buf.withUnsafeMutableBytes { recv(from, $0.baseAddress, $0.count, 0) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { return }
            var sent = 0
            while sent < n {
                let w = buf[sent..<n].withUnsafeBytes { send(to, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                if w < 0 && errno == EINTR { continue }
                guard w > 0 else { return }
                sent += w
            }
        }
    }

    static func listenSocket(host: String, port: Int) throws -> Int32 {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var a = sockaddr_in()
        a.sin_family = sa_family_t(AF_INET)
        a.sin_port = in_port_t(UInt16(port).bigEndian)
        guard inet_pton(AF_INET, host, &a.sin_addr) == 1 else { close(fd); throw CLIError("--listen: \"\(host)\" is not an IPv4 address") }
        let ok = withUnsafePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 } }
        guard ok, listen(fd, 128) == 0 else {
            let e = String(cString: strerror(errno))
            close(fd)
            throw CLIError("cannot listen on \(host):\(port): \(e)")
        }
        return fd
    }

    static func connectSocket(host: String, port: Int) -> Int32 {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var a = sockaddr_in()
        a.sin_family = sa_family_t(AF_INET)
        a.sin_port = in_port_t(UInt16(port).bigEndian)
        guard inet_pton(AF_INET, host, &a.sin_addr) == 1,
              withUnsafePointer(to: &a, { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 } })
        else { close(fd); return -1 }
        return fd
    }
}
