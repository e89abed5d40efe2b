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
            let th = Thread(named: "load-client-\(t)") {
                loop(client: makeClient(), thread: t, valueBytes: valueBytes, keyPrefix: keyPrefix, keySpace: keySpace,
                     measureFrom: measureFrom, end: end, into: mine)
                finished.leave()
            }
            th.stackSize = 1 << 20
            th.start()
        }
        finished.wait()
        return summary(results, seconds: seconds)
    }

    private static func loop(client: any PutClient, thread t: Int, valueBytes: Int, keyPrefix: String, keySpace: Int?,
                             measureFrom: UInt64, end: UInt64, into r: ThreadResult) {
        var load = OneClient(client: t, valueBytes: valueBytes, keyPrefix: keyPrefix, keySpace: keySpace, measureFrom: measureFrom, end: end, into: r)
        while let (key, t0) = load.next() {
            do {
                try client.put(key: key, value: load.value)
                load.succeeded(since: t0)
            } catch {
                guard load.failed(error) else { break }
                Thread.sleep(forTimeInterval: 0.01)
            }
        }
    }

    /// The same load from `clients` tasks sharing one async client (`put` may be called by all of
    /// them at once): each task puts its next key once its previous put is answered. The tasks
    /// prefer `executor` when one is given (the client's, so an answer resumes its task on the
    /// thread that read it).
    static func runTasks(clients: Int, valueBytes: Int, warmup: Double, seconds: Double, keyPrefix: String, keySpace: Int? = nil,
                         executor: (any TaskExecutor)? = nil,
                         put: @escaping @Sendable ([UInt8], [UInt8]) async throws -> Void) async -> Result {
        let measureFrom = now() + UInt64(warmup * 1e9)
        let end = measureFrom + UInt64(seconds * 1e9)
        let results = (0..<clients).map { _ in ThreadResult() }
        await withTaskGroup(of: Void.self) { group in
            for t in 0..<clients {
                let mine = results[t]
                group.addTask(executorPreference: executor) {
                    var load = OneClient(client: t, valueBytes: valueBytes, keyPrefix: keyPrefix, keySpace: keySpace, measureFrom: measureFrom, end: end, into: mine)
                    while let (key, t0) = load.next() {
                        do {
                            try await put(key, load.value)
                            load.succeeded(since: t0)
                        } catch {
                            guard load.failed(error) else { break }
                            try? await Task.sleep(for: .milliseconds(10))
                        }
                    }
                }
            }
        }
        return summary(results, seconds: seconds)
    }

    private static func summary(_ results: [ThreadResult], seconds: Double) -> Result {
        let all = results.flatMap(\.latencies)
        return Result(latency: LatencySummary(nanoseconds: all), putsPerSecond: Double(all.count) / seconds,
                      errors: results.reduce(0) { $0 + $1.errors }, firstError: results.lazy.compactMap(\.firstError).first)
    }

    /// One closed-loop client's keys and bookkeeping, whether it runs on a thread or a task.
    private struct OneClient {
        let client: Int, keyPrefix: String, keySpace: Int?, measureFrom: UInt64, end: UInt64
        let value: [UInt8]
        let r: ThreadResult
        var i = 0
        var failuresInARow = 0

        init(client: Int, valueBytes: Int, keyPrefix: String, keySpace: Int?, measureFrom: UInt64, end: UInt64, into r: ThreadResult) {
            (self.client, self.keyPrefix, self.keySpace, self.measureFrom, self.end, self.r) = (client, keyPrefix, keySpace, measureFrom, end, r)
            value = [UInt8](repeating: UInt8(ascii: "v"), count: valueBytes)
        }

        /// The next key and its start time; nil once the run is over.
        mutating func next() -> ([UInt8], UInt64)? {
            let t0 = now()
            guard t0 < end else { return nil }
            // A fresh key per put (no put stores over an earlier value), or keys cycled over the
            // key space so the state stays bounded however long the run.
            let key = Array((keySpace.map { "\(keyPrefix)/\((client &* 1_000_003 &+ i) % $0)" } ?? "\(keyPrefix)/\(client)/\(i)").utf8)
            i += 1
            return (key, t0)
        }

        mutating func succeeded(since t0: UInt64) {
            let t1 = now()
            if t0 >= measureFrom && t1 <= end { r.latencies.append(t1 - t0) }
            failuresInARow = 0
        }

        /// Counts a failed put; false once 20 failed in a row (the cluster is gone: stop rather
        /// than spin).
        mutating func failed(_ error: any Error) -> Bool {
            r.errors += 1
            if r.firstError == nil { r.firstError = "\(error)" }
            failuresInARow += 1
            return failuresInARow < 20
        }
    }

    /// One load thread's (or task's) measurements.
    private final class ThreadResult: @unchecked Sendable {
        // @unchecked Sendable: written only by its own load thread or task, read by `run` after
        // `finished.wait()` (or the task group's end), which orders the accesses.
        var latencies: [UInt64] = []
        var errors = 0
        var firstError: String?
        init() { latencies.reserveCapacity(1 << 14) }
    }
}
