// The network a tap-attached VM pair's clients need (a bridge, a tap per VM replica, a client
// namespace), a RESP client for one redis connection and an HTTP GET for the guest's httpd: used
// by the tap failover test and by `plover bench vm-tap` and `vm-bytes`. docs/design/vmreplica.md,
// "Tap attachment".

import Foundation
import Synchronization
import RDMAPaxos

/// The network a tap-attached VM pair's clients need, made with `ip` and removed afterwards: a
/// bridge in this host's namespace with one persistent tap per VM replica on it (the replicas
/// attach to them; a tap outlives a killed replica, so its restart finds it on the bridge), and
/// a client namespace joined to the bridge by a veth pair, addressed in the guest's subnet, with
/// IPv6 off and `rto_min` on its route to the guest (TCP resends a lost segment after 50 ms
/// rather than 200 ms, which shortens what a failover costs a connection).
///
/// Needs root (CAP_NET_ADMIN), /dev/net/tun and iproute2, as on the machines `make test` runs on.
final class TapLab {
    /// iproute2's `ip`.
    static let ipPath = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"].first { FileManager.default.isExecutableFile(atPath: $0) } ?? "ip"

    let tag: String
    let taps: [NodeID: String]
    let clientAddress = "10.99.0.10"
    private var made: [String] = []
    private var bridgeMade = false
    var bridge: String { "\(tag)b" }
    var clientNamespace: String { "\(tag)c" }
    var clientLink: String { "\(tag)v" }
    /// The client's route to the guest's subnet resends after this long at least.
    static let rtoMin = "50ms"

    init() throws {
        let serial = Self.labsMade.add(1, ordering: .relaxed).newValue
        tag = "plt\(Int(getpid()) % 10_000)x\(serial % 100)"
        taps = [1: "\(tag)t1", 2: "\(tag)t2"]
        do { try build() } catch { tearDown(); throw error }
    }

    private func build() throws {
        let ip = Self.ip
        try ip(["link", "add", bridge, "type", "bridge"])
        bridgeMade = true
        Self.noIPv6(bridge)
        for id: NodeID in [1, 2] {
            let t = taps[id]!
            try ip(["tuntap", "add", "dev", t, "mode", "tap"])
            made.append(t)
            Self.noIPv6(t)
            try ip(["link", "set", t, "master", bridge])
            try ip(["link", "set", t, "up"])
        }
        try ip(["link", "set", bridge, "up"])
        let ns = clientNamespace
        try ip(["netns", "add", ns])
        for k in ["all", "default"] { try ip(["netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.\(k).disable_ipv6=1"]) }
        try ip(["link", "add", clientLink, "type", "veth", "peer", "name", "eth0", "netns", ns])
        Self.noIPv6(clientLink)
        try ip(["link", "set", clientLink, "master", bridge])
        try ip(["link", "set", clientLink, "up"])
        try ip(["-n", ns, "addr", "add", clientAddress + "/24", "dev", "eth0"])
        try ip(["-n", ns, "link", "set", "eth0", "up"])
        try ip(["-n", ns, "link", "set", "lo", "up"])
        try ip(["-n", ns, "route", "replace", "10.99.0.0/24", "dev", "eth0", "src", clientAddress, "rto_min", Self.rtoMin])
    }

    /// No IPv6 on a host-side link: its router solicitations and MLD reports would be flooded
    /// to the taps and logged as inputs for nothing. Where /proc/sys is read-only (many
    /// containers), a link told over netlink to make no IPv6 address stays as quiet.
    private static func noIPv6(_ link: String) {
        try? "1".write(toFile: "/proc/sys/net/ipv6/conf/\(link)/disable_ipv6", atomically: false, encoding: .utf8)
        try? ip(["link", "set", "dev", link, "addrgenmode", "none"])
    }

    /// A TCP connection from the client namespace to `address` (the socket is made on a thread
    /// that entered the namespace; it stays there whichever thread uses it), each connect and
    /// send bounded by `timeout`. Throws `CLIError` when the namespace cannot be entered and the
    /// wrapper's `SocketFailure` when the connect fails.
    func clientConnect(to address: HostPort, timeout: Duration) throws -> SocketDescriptor {
        let ns = clientNamespace
        let result = Mutex<Result<SocketDescriptor, any Error>?>(nil)
        let done = DispatchSemaphore(value: 0)
        let t = Thread {
            defer { done.signal() }
            let nsfd = open("/var/run/netns/\(ns)", O_RDONLY | O_CLOEXEC)
            guard nsfd >= 0, Self.setns(nsfd, 0x4000_0000) == 0 else {  // CLONE_NEWNET
                let e = errno
                result.withLock { $0 = .failure(CLIError("cannot enter network namespace \(ns): \(String(cString: strerror(e)))")) }
                return
            }
            close(nsfd)
            let connected = Result { () throws(SocketFailure) in try SocketDescriptor.connect(to: address, timeout: timeout) }
            result.withLock { $0 = connected.mapError { $0 } }
        }
        t.start()
        done.wait()
        return try result.withLock { $0! }.get()
    }

    /// Runs redis-benchmark with `arguments` and `--csv` from the client namespace against the
    /// guest's redis-server; its CSV rows (the header left out, quotes removed) and its output.
    /// Throws, naming `what` was run, when it fails.
    func redisBenchmark(_ arguments: [String], what: String) throws -> (rows: [[String]], text: String) {
        let (status, text) = try Self.output(of: Self.ipPath,
                                             ["netns", "exec", clientNamespace, "redis-benchmark", "-h", "10.99.0.2", "-p", "6379"] + arguments + ["--csv"])
        guard status == 0 else { throw CLIError("redis-benchmark \(what) failed (\(status)): \(text)") }
        let rows = text.split(separator: "\n").dropFirst().map { line in
            line.split(separator: ",").map { $0.trimmingCharacters(in: CharacterSet(charactersIn: "\"")) }
        }
        return (rows, text)
    }

    /// The bridge port (a tap or the client's link) the bridge forwards frames for `mac` to;
    /// nil when it has not learnt that MAC.
    func bridgePort(of mac: String) throws -> String? {
        let (_, text) = try Self.output(of: Self.ipPath.replacingOccurrences(of: "/ip", with: "/bridge"), ["fdb", "show", "br", bridge])
        for line in text.split(separator: "\n") where line.lowercased().hasPrefix(mac.lowercased() + " ") {
            let words = line.split(separator: " ")
            if let i = words.firstIndex(of: "dev"), i + 1 < words.count, !line.contains(" permanent") { return String(words[i + 1]) }
        }
        return nil
    }

    /// glibc's setns(2), which Swift's Glibc module does not import.
    static func setns(_ fd: Int32, _ type: Int32) -> Int32 {
        guard let f = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "setns") else { return -1 }  // RTLD_DEFAULT
        return unsafeBitCast(f, to: (@convention(c) (Int32, Int32) -> Int32).self)(fd, type)
    }

    func tearDown() {
        if made.count > 0 || bridgeMade { try? Self.ip(["link", "delete", clientLink]) }
        for t in made { try? Self.ip(["link", "delete", t]) }
        made = []
        try? Self.ip(["netns", "delete", clientNamespace])
        if bridgeMade { try? Self.ip(["link", "delete", bridge]) }
        bridgeMade = false
    }

    deinit { tearDown() }

    private static let labsMade = Atomic<Int>(0)

    /// Runs `path ARGS` to its end: its exit status and standard output (standard error dropped).
    static func output(of path: String, _ args: [String]) throws -> (status: Int32, text: String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: path)
        p.arguments = args
        let out = Pipe()
        p.standardOutput = out
        p.standardError = FileHandle.nullDevice
        try p.run()
        let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        return (p.terminationStatus, text)
    }

    /// Runs `ip ARGS`; throws with its error output when it fails.
    static func ip(_ args: [String]) throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: ipPath)
        p.arguments = args
        let err = Pipe()
        p.standardError = err
        p.standardOutput = FileHandle.nullDevice
        do { try p.run() } catch { throw CLIError("cannot run \(ipPath) (iproute2): \(error)") }
        p.waitUntilExit()
        guard p.terminationStatus == 0 else {
            let text = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            throw CLIError("ip \(args.joined(separator: " ")) failed (tap networks and network namespaces need root and iproute2): \(text)")
        }
    }
}

/// One Redis connection speaking RESP, with a deadline on every answer and no reconnecting:
/// the test needs to know that one TCP connection survived.
final class RedisConnection: @unchecked Sendable {
    // @unchecked Sendable: one thread at a time uses a connection (a writer thread, then the
    // caller once that thread stopped); nothing in it is shared between calls.
    let socket: SocketDescriptor
    private var buffer: [UInt8] = []

    /// Connects with `connect` (TapLab's `clientConnect`) to host:port, trying again until
    /// `timeout` (the guest may still be booting); each attempt is bounded by 5 s.
    init(connect: (HostPort, Duration) throws -> SocketDescriptor, host: String, port: UInt16, timeout: Duration) throws {
        let deadline = ContinuousClock.now + timeout
        let address = HostPort(host: host, port: Int(port))
        var last = "no attempt"
        while ContinuousClock.now < deadline {
            do {
                socket = try connect(address, .seconds(5))
                return
            } catch let e as SocketFailure {
                last = String(cString: strerror(e.errno))
            }
            Thread.sleep(forTimeInterval: 0.5)
        }
        throw CLIError("cannot connect to redis at \(address) within \(timeout): \(last)")
    }

    deinit { socket.close() }

    /// One HTTP/1.0 GET of `path` on a new connection from `connect` (a client-namespace
    /// connection) to host:port, the guest's busybox httpd: the status line's code and the body,
    /// read to the end of the connection. Throws when no complete answer came within `timeout`.
    static func httpGet(connect: (HostPort, Duration) throws -> SocketDescriptor, host: String, port: UInt16 = 80, path: String, timeout: Duration) throws -> (status: Int, body: String) {
        let deadline = ContinuousClock.now + timeout
        let c = try RedisConnection(connect: connect, host: host, port: port, timeout: timeout)
        do { try c.socket.send(Array("GET \(path) HTTP/1.0\r\nHost: \(host)\r\n\r\n".utf8)) } catch {
            throw CLIError("GET \(path) from \(host): send: \(String(cString: strerror(error.errno)))")
        }
        var got: [UInt8] = []
        while true {
            let chunk: [UInt8]
            do { chunk = try c.socket.receive(upTo: 4096, until: deadline) } catch {
                guard error.errno != ETIMEDOUT else {
                    throw CLIError("GET \(path) from \(host):\(port): no complete answer within \(timeout) (\(got.count) bytes)")
                }
                throw CLIError("GET \(path) from \(host):\(port): read: \(String(cString: strerror(error.errno)))")
            }
            if chunk.isEmpty { break }
            got += chunk
        }
        let text = String(decoding: got, as: UTF8.self)
        guard let head = text.split(separator: "\r\n", maxSplits: 1).first, head.hasPrefix("HTTP/"),
              let code = Int(head.split(separator: " ").dropFirst().first ?? "") else {
            throw CLIError("GET \(path) from \(host):\(port): no HTTP status line in \(text.prefix(80).debugDescription)")
        }
        let body = text.range(of: "\r\n\r\n").map { String(text[$0.upperBound...]) } ?? ""
        return (code, body)
    }

    /// Sends one command and returns its reply: "+OK", "-ERR ...", ":N", the bulk string's
    /// text, or "(nil)". Throws on a closed connection or no reply within `timeout`.
    func command(_ args: [String], timeout: Duration) throws -> String {
        var req = "*\(args.count)\r\n"
        for a in args { req += "$\(a.utf8.count)\r\n\(a)\r\n" }
        do { try socket.send(Array(req.utf8)) } catch {
            throw CLIError("send \(args.first ?? ""): \(String(cString: strerror(error.errno)))")
        }
        let deadline = ContinuousClock.now + timeout
        let head = try line(until: deadline)
        guard head.hasPrefix("$") else { return head }
        guard let n = Int(head.dropFirst()), n >= 0 else { return "(nil)" }
        while buffer.count < n + 2 { try fill(until: deadline) }
        defer { buffer.removeFirst(n + 2) }
        return String(decoding: buffer[..<n], as: UTF8.self)
    }

    private func line(until deadline: ContinuousClock.Instant) throws -> String {
        while true {
            if let i = buffer.firstIndex(of: 10) {
                defer { buffer.removeFirst(i + 1) }
                return String(decoding: buffer[..<i], as: UTF8.self).trimmingCharacters(in: .newlines)
            }
            try fill(until: deadline)
        }
    }

    private func fill(until deadline: ContinuousClock.Instant) throws {
        let chunk: [UInt8]
        do { chunk = try socket.receive(upTo: 4096, until: deadline) } catch {
            guard error.errno != ETIMEDOUT else { throw CLIError("no reply from redis in time") }
            throw CLIError("redis closed the connection (\(String(cString: strerror(error.errno))))")
        }
        guard !chunk.isEmpty else { throw CLIError("redis closed the connection (EOF)") }
        buffer += chunk
    }
}

extension TapLab {
    /// The set-up every tap benchmark shares, around `body`: the test guest built, the results'
    /// machine line (taken before the run: it says how busy the cores were then), a fresh work
    /// directory (removed afterwards unless `keep`) and a lab, torn down afterwards.
    static func benchmark(workDir: String, keep: Bool,
                          _ body: (_ guest: String, _ machineLine: String, _ lab: TapLab) throws -> Void) throws {
        let guest = try buildVMGuest()
        let machine = MachineDescription.current(dataDir: FileManager.default.currentDirectoryPath)
        let machineLine = vmMachineLine(machine, qemu: MachineDescription.qemuVersion)
        try? FileManager.default.removeItem(atPath: workDir)
        try FileManager.default.createDirectory(atPath: workDir, withIntermediateDirectories: true)
        defer { if !keep { try? FileManager.default.removeItem(atPath: workDir) } }
        let lab = try TapLab()
        defer { lab.tearDown() }
        try body(guest, machineLine, lab)
    }
}
