import Foundation
import RDMAPaxos

/// Something that stores a key-value pair and returns once the store acknowledged it.
/// One instance per load thread; never shared.
protocol PutClient: AnyObject {
    func put(key: [UInt8], value: [UInt8]) throws
}

/// Puts through plover's client protocol (`NodeClient`: one TCP connection, follows the leader).
final class PloverPutClient: PutClient {
    private let client: NodeClient

    init(endpoints: [NodeID: String]) { client = NodeClient(endpoints: endpoints, timeout: .seconds(10)) }

    func put(key: [UInt8], value: [UInt8]) throws {
        _ = try client.propose(KeyValueStateMachine.Command.put(key: key, value: value).encoded())
    }
}

/// Puts through etcd's v3 HTTP/JSON gateway (`POST /v3/kv/put`), one keep-alive connection.
final class EtcdPutClient: PutClient {
    private let connection: HTTPConnection
    private var lastValue: [UInt8] = []
    private var lastValueBase64 = ""

    init(port: Int) { connection = HTTPConnection(host: "127.0.0.1", port: port, timeout: .seconds(10)) }

    func put(key: [UInt8], value: [UInt8]) throws {
        if value != lastValue {  // the load puts one value over and over: encode it once
            lastValue = value
            lastValueBase64 = Data(value).base64EncodedString()
        }
        let body = "{\"key\":\"\(Data(key).base64EncodedString())\",\"value\":\"\(lastValueBase64)\"}"
        let (status, answer) = try connection.post("/v3/kv/put", body: Array(body.utf8))
        // A successful put answers {"header":{…}}; failures carry {"error":…} or a non-200 status.
        guard status == 200, answer.starts(with: Array("{\"header\"".utf8)) else {
            throw HTTPConnection.Failure(description: "etcd put: HTTP \(status): \(String(decoding: answer.prefix(200), as: UTF8.self))")
        }
    }
}

/// Latency percentiles of one measured point.
struct LatencySummary {
    var count: Int
    var p50Micros: Double
    var p99Micros: Double

    init(nanoseconds values: [UInt64]) {
        let sorted = values.sorted()
        func pct(_ p: Double) -> Double {
            sorted.isEmpty ? 0 : Double(sorted[min(sorted.count - 1, Int(Double(sorted.count) * p))]) / 1000
        }
        count = sorted.count
        p50Micros = pct(0.50)
        p99Micros = pct(0.99)
    }
}

/// The closed-loop load both systems get: N threads, each with its own client, each putting
/// one new key after another (or, with a key space, cycling over that many keys, as etcd's
/// benchmark does with --key-space-size) and timing every put.
enum ClosedLoopLoad {
    struct Result {
        var latency: LatencySummary
        var putsPerSecond: Double
        var errors: Int
        var firstError: String?
    }

    static func now() -> UInt64 { DispatchTime.now().uptimeNanoseconds }

    /// Runs `warmup` seconds unmeasured, then `seconds` measured: a put counts when it both
    /// started and finished inside the measured window.
    static func run(clients: Int, valueBytes: Int, warmup: Double, seconds: Double, keyPrefix: String, keySpace: Int? = nil,
                    makeClient: @escaping @Sendable () -> any PutClient) -> Result {
        let begin = now()
        let measureFrom = begin + UInt64(warmup * 1e9)
        let end = measureFrom + UInt64(seconds * 1e9)
        let results = (0..<clients).map { _ in ThreadResult() }
        let finished = DispatchGroup()
        // One OS thread per client (a dispatch queue would run only as many as there are cores).
        for t in 0..<clients {
            finished.enter()
            let mine = results[t]
            let th = Thread {
                loop(client: makeClient(), thread: t, valueBytes: valueBytes, keyPrefix: keyPrefix, keySpace: keySpace,
                     measureFrom: measureFrom, end: end, into: mine)
                finished.leave()
            }
            th.stackSize = 1 << 20
            th.start()
        }
        finished.wait()
        let all = results.flatMap(\.latencies)
        return Result(latency: LatencySummary(nanoseconds: all), putsPerSecond: Double(all.count) / seconds,
                      errors: results.reduce(0) { $0 + $1.errors }, firstError: results.lazy.compactMap(\.firstError).first)
    }

    private static func loop(client: any PutClient, thread t: Int, valueBytes: Int, keyPrefix: String, keySpace: Int?,
                             measureFrom: UInt64, end: UInt64, into r: ThreadResult) {
        let value = [UInt8](repeating: UInt8(ascii: "v"), count: valueBytes)
        var i = 0
        var failuresInARow = 0
        while true {
            let t0 = now()
            if t0 >= end { break }
            // A fresh key per put (no put stores over an earlier value), or keys cycled over the
            // key space so the state stays bounded however long the run.
            let key = Array((keySpace.map { "\(keyPrefix)/\((t &* 1_000_003 &+ i) % $0)" } ?? "\(keyPrefix)/\(t)/\(i)").utf8)
            i += 1
            do {
                try client.put(key: key, value: value)
                let t1 = now()
                if t0 >= measureFrom && t1 <= end { r.latencies.append(t1 - t0) }
                failuresInARow = 0
            } catch {
                r.errors += 1
                if r.firstError == nil { r.firstError = "\(error)" }
                failuresInARow += 1
                if failuresInARow >= 20 { break }  // the cluster is gone: stop rather than spin
                Thread.sleep(forTimeInterval: 0.01)
            }
        }
    }

    /// One load thread's measurements.
    private final class ThreadResult: @unchecked Sendable {
        // @unchecked Sendable: written only by its own load thread, read by `run` after
        // `finished.wait()`, which orders the accesses.
        var latencies: [UInt64] = []
        var errors = 0
        var firstError: String?
        init() { latencies.reserveCapacity(1 << 14) }
    }
}
