import Foundation
import Interpose
import Logging
import RDMAPaxos
import Synchronization

/// The process's one replica behind the C ABI (`include/interpose.h`).
final class Runtime: Sendable {
    static let shared = Runtime()

    enum Phase { case idle, starting, running(ReplicaServer), stopped }

    struct State {
        var phase: Phase = .idle
        var deliver: interpose_deliver_fn?
        var context: UInt = 0
        var restore: RestoreFunction?
    }

    let state = Mutex(State())

    /// The running replica's node, or nil.
    var node: ReplicaNode? {
        state.withLock { if case let .running(s) = $0.phase { return s.node } else { return nil } }
    }

    func setDeliver(_ fn: interpose_deliver_fn?, context: UInt) -> Int32 {
        state.withLock { s in
            guard case .idle = s.phase else {
                return fail(INTERPOSE_ESTATE, "interpose_set_deliver: call it before interpose_init")
            }
            s.deliver = fn
            s.context = context
            return INTERPOSE_OK
        }
    }

    func setRestore(_ fn: RestoreFunction?) -> Int32 {
        state.withLock { s in
            guard case .idle = s.phase else {
                return fail(INTERPOSE_ESTATE, "interpose_apus_set_restore: call it before interpose_init")
            }
            s.restore = fn
            return INTERPOSE_OK
        }
    }

    /// Loads the config and starts the replica; blocks the calling (C) thread until it serves.
    func start(configPath: String) -> Int32 {
        let claimed: (interpose_deliver_fn?, UInt, RestoreFunction?)? = state.withLock { s in
            guard case .idle = s.phase else { return nil }
            s.phase = .starting
            return (s.deliver, s.context, s.restore)
        }
        guard let (deliver, context, restore) = claimed else {
            return fail(INTERPOSE_ESTATE, "interpose_init: a replica was already started in this process")
        }
        var config: NodeConfig
        do {
            config = try NodeConfig.load(path: configPath)
        } catch {
            state.withLock { $0.phase = .idle }
            return fail(INTERPOSE_ECONFIG, "interpose_init: \(error)")
        }
        // The node never snapshots on its own: a C program's state cannot be captured at an index
        // the node picks. The shim compacts through the server's own snapshots, taken at SNAPSHOT
        // entries (`interpose_apus_snapshot_taken`); without a snapshot protocol nothing does.
        config.compactEveryEntries = Int.max / 2
        config.compactEveryBytes = Int.max / 2
        var logger = Logger(label: "interpose.\(config.id)") { StreamLogHandler.standardError(label: $0) }
        logger.logLevel = ProcessInfo.processInfo.environment["INTERPOSE_LOG_LEVEL"].flatMap(Logger.Level.init(rawValue:)) ?? .notice
        let machine = CallbackStateMachine(deliver: deliver, context: context, restore: restore)
        let (finalConfig, finalLogger) = (config, logger)
        let result = Blocking.run {
            try await ReplicaServer.start(config: finalConfig, stateMachine: machine, logger: finalLogger)
        }
        switch result {
        case let .success(server):
            state.withLock { $0.phase = .running(server) }
            return INTERPOSE_OK
        case let .failure(error):
            state.withLock { $0.phase = .idle }
            return fail(INTERPOSE_ESTART, "interpose_init: replica \(config.id) from \(configPath) did not start: \(error)")
        }
    }

    func shutdown() -> Int32 {
        let server: ReplicaServer? = state.withLock { s in
            guard case let .running(server) = s.phase else { return nil }
            s.phase = .stopped
            return server
        }
        guard let server else { return fail(INTERPOSE_ESTATE, "interpose_shutdown: no replica is running") }
        server.stop()
        return INTERPOSE_OK
    }

    /// Proposes `bytes` (kind byte included) and calls `done` with a code and the log index.
    func propose(_ bytes: [UInt8], done: @escaping @Sendable (Int32, LogIndex) -> Void) -> Int32 {
        guard let node else { return fail(INTERPOSE_ESTATE, "interpose_propose: no replica is running (call interpose_init first)") }
        node.propose(bytes) { r in
            switch r {
            case let .success(result): done(INTERPOSE_OK, CallbackStateMachine.index(fromResult: result))
            case let .failure(error): done(Self.code(for: error), 0)
            }
        }
        return INTERPOSE_OK
    }

    /// Proposes and waits for the outcome on the calling thread.
    func proposeAndWait(_ bytes: [UInt8], what: String, index: UnsafeMutablePointer<UInt64>?) -> Int32 {
        let outcome = Mutex<(Int32, LogIndex)>((INTERPOSE_ESTOPPED, 0))
        let done = DispatchSemaphore(value: 0)
        let rc = propose(bytes) { code, i in
            outcome.withLock { $0 = (code, i) }
            done.signal()
        }
        guard rc == INTERPOSE_OK else { return rc }
        done.wait()
        let (code, i) = outcome.withLock { $0 }
        guard code == INTERPOSE_OK else { return fail(code, "\(what): \(Self.message(for: code))") }
        index?.pointee = i
        return INTERPOSE_OK
    }

    static func code(for error: any Error) -> Int32 {
        switch error as? NodeError {
        case .notLeader: INTERPOSE_ENOTLEADER
        case .superseded: INTERPOSE_ESUPERSEDED
        case .timedOut, .outcomeUnknown: INTERPOSE_EUNKNOWN
        case .refused, .membershipRefused: INTERPOSE_EREFUSED
        case .stopped, .storage, nil: INTERPOSE_ESTOPPED
        }
    }

    static func message(for code: Int32) -> String {
        switch code {
        case INTERPOSE_ENOTLEADER: "this replica is not the leader; the input was not proposed"
        case INTERPOSE_ESUPERSEDED: "leadership changed before the input committed; it did not take effect"
        case INTERPOSE_EUNKNOWN: "timed out; the input may or may not commit"
        case INTERPOSE_EREFUSED: "the leader refused the input (overloaded, too large, or a transfer is running)"
        default: "the replica stopped"
        }
    }
}

/// Runs async work to completion from a plain (non-Swift-concurrency) C thread.
enum Blocking {
    static func run<T: Sendable>(_ body: @escaping @Sendable () async throws -> T) -> Result<T, any Error> {
        let box = Mutex<Result<T, any Error>?>(nil)
        let done = DispatchSemaphore(value: 0)
        Task.detached {
            let r: Result<T, any Error>
            do { r = .success(try await body()) } catch { r = .failure(error) }
            box.withLock { $0 = r }
            done.signal()
        }
        done.wait()
        return box.withLock { $0! }
    }
}
