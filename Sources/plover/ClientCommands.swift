import ArgumentParser
import Foundation
import PloverTesting
import RDMAPaxos

/// Where the client finds the cluster: a member's config file, or explicit endpoints.
struct ClusterOptions: ParsableArguments {
    @Option(help: "A replica's config file; its [[members]] give the client addresses.")
    var cluster: String?
    @Option(help: "Client endpoints as ID=HOST:PORT, comma-separated (instead of --cluster).")
    var endpoints: String?

    func resolve() throws -> [NodeID: String] {
        if let path = cluster {
            do {
                let c = try NodeConfig.load(path: path)
                return Dictionary(uniqueKeysWithValues: c.members.map { ($0.id, $0.clientAddress) })
            } catch {
                throw ValidationError(error.description)
            }
        }
        guard let list = endpoints else { throw ValidationError("give --cluster FILE or --endpoints ID=HOST:PORT,...") }
        var out: [NodeID: String] = [:]
        for item in list.split(separator: ",") {
            let kv = item.split(separator: "=", maxSplits: 1)
            guard kv.count == 2, let id = NodeID(kv[0]), id > 0, kv[1].contains(":") else {
                throw ValidationError("--endpoints: \"\(item)\" is not ID=HOST:PORT")
            }
            out[id] = String(kv[1])
        }
        return out
    }
}

struct KV: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kv", abstract: "Read and write the replicated key-value store.",
        subcommands: [Put.self, Get.self, Delete.self])

    struct Put: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Set KEY to VALUE (linearizable; prints the previous value).")
        @OptionGroup var cluster: ClusterOptions
        @Argument var key: String
        @Argument(help: "The value; omitted or '-': read from standard input (for values over the argument limit).") var value: String?
        func run() throws {
            try checkKey(key)
            let bytes = try value.flatMap { $0 == "-" ? nil : Array($0.utf8) } ?? Self.readStandardInput()
            let r = try client(cluster).propose(KeyValueStateMachine.Command.put(key: Array(key.utf8), value: bytes).encoded())
            try printResult(r, absent: "(no previous value)")
        }

        /// Standard input up to the value limit; more is an error that names the limit.
        static func readStandardInput() throws -> [UInt8] {
            var bytes: [UInt8] = []
            var chunk = [UInt8](repeating: 0, count: 1 << 16)
            while true {
                let n = chunk.withUnsafeMutableBytes { read(0, $0.baseAddress, $0.count) }
                if n < 0 && errno == EINTR { continue }
                guard n >= 0 else { throw CLIError("reading the value from standard input: \(String(cString: strerror(errno)))") }
                if n == 0 { return bytes }
                bytes += chunk[..<n]
                if bytes.count > KeyValueStateMachine.Command.valueBytesMax {
                    throw ValidationError("the value on standard input is over the limit of \(KeyValueStateMachine.Command.valueBytesMax) bytes")
                }
            }
        }
    }
    struct Get: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Print KEY's value (linearizable read through the leader).")
        @OptionGroup var cluster: ClusterOptions
        @Argument var key: String
        @Option(help: "Read this replica's own state instead (any role; may be stale).") var local: NodeID?
        func run() throws {
            try checkKey(key)
            let c = try client(cluster)
            let r = try local.map { try c.localRead(Array(key.utf8), at: $0) } ?? c.read(Array(key.utf8))
            try printResult(r, absent: "(not found)", failIfAbsent: true)
        }
    }

    struct Delete: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Remove KEY (prints the removed value).")
        @OptionGroup var cluster: ClusterOptions
        @Argument var key: String
        func run() throws {
            try checkKey(key)
            let r = try client(cluster).propose(KeyValueStateMachine.Command.delete(key: Array(key.utf8)).encoded())
            try printResult(r, absent: "(not found)")
        }
    }
}

func checkKey(_ key: String) throws {
    guard !key.isEmpty else { throw ValidationError("KEY must not be empty") }
    guard key.utf8.count <= KeyValueStateMachine.Command.keyBytesMax else {
        throw ValidationError("KEY is \(key.utf8.count) bytes; the limit is \(KeyValueStateMachine.Command.keyBytesMax)")
    }
}

func client(_ options: ClusterOptions) throws -> NodeClient {
    NodeClient(endpoints: try options.resolve())
}

func printResult(_ r: [UInt8], absent: String, failIfAbsent: Bool = false) throws {
    if let v = KeyValueStateMachine.decodeResult(r) {
        print(String(decoding: v, as: UTF8.self))
    } else if KeyValueStateMachine.resultCode(r) == .malformed {
        throw CLIError("the replicas rejected the command as malformed")
    } else {
        print(absent)
        if failIfAbsent { throw ExitCode(1) }
    }
}

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show each replica's role, ballot, leader and log indexes.")
    @OptionGroup var cluster: ClusterOptions
    @Option(help: "Only this node.") var node: NodeID?
    @Flag(help: "Redraw a table of every replica every --interval seconds until interrupted.") var watch = false
    @Option(help: "Seconds between redraws with --watch.") var interval: Double = 1

    func validate() throws {
        guard interval >= 0.1 else { throw ValidationError("--interval must be at least 0.1 seconds, not \(interval)") }
    }

    func run() throws {
        let endpoints = cluster.resolveLive(try cluster.resolve())
        if watch { return try StatusWatch(endpoints: endpoints, only: node, interval: interval).run() }
        let c = NodeClient(endpoints: endpoints, timeout: .seconds(2))
        var unreachable = 0
        for id in endpoints.keys.sorted() where node == nil || node == id {
            print("node \(id) (\(endpoints[id]!)):")
            do {
                let text = try c.status(of: id)
                print(text.split(separator: "\n").map { "  " + $0 }.joined(separator: "\n"))
            } catch {
                print("  unreachable: \(error)")
                unreachable += 1
            }
        }
        if unreachable > 0 { throw ExitCode(2) }
    }
}
