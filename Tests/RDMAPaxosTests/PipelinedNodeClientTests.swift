import Foundation
import Synchronization
import Testing
@testable import RDMAPaxos

/// `PipelinedNodeClient`: many requests in flight on one connection, each matched to its own
/// answer; the leader followed; lost and unanswered requests failed as `NodeClient` fails them.
@Suite(.timeLimit(.minutes(1))) struct PipelinedNodeClientTests {
    static func put(_ key: String, _ value: String) -> [UInt8] {
        KeyValueStateMachine.Command.put(key: Array(key.utf8), value: Array(value.utf8)).encoded()
    }

    @Test(arguments: [false, true])
    func concurrentProposalsEachGetTheirOwnAnswerFromTheLeader(onClientExecutor: Bool) async throws {
        let c = try ReplicaNodeTests.Cluster(ReplicaNodeTests.three)
        defer { c.stopAll() }
        let leader = try await c.leader().options.replica.id
        var servers: [ClientServer] = []
        defer { servers.forEach { $0.stop() } }
        var endpoints: [NodeID: String] = [:]
        for id: NodeID in [1, 2, 3] {
            let s = try ClientServer.start(node: c.nodes[id]!, host: "127.0.0.1", port: 0)
            servers.append(s)
            endpoints[id] = "127.0.0.1:\(s.boundPort)"
        }
        let client = PipelinedNodeClient(endpoints: endpoints)
        defer { client.close() }
        let n = 300
        // Round one stores a_i; round two's answer to each put is the value it replaced, so a
        // reply delivered to the wrong request shows as the wrong previous value.
        let executor: (any TaskExecutor)? = onClientExecutor ? client.executor : nil
        var resumedOnReader: Set<Bool> = []
        for round in ["a", "b"] {
            let answers = try await withThrowingTaskGroup(of: (Int, [UInt8], Bool).self) { group in
                for i in 0..<n {
                    group.addTask(executorPreference: executor) {
                        let answer = try await client.propose(Self.put("k\(i)", "\(round)\(i)"))
                        return (i, answer, client.executor.onReaderThread)
                    }
                }
                return try await group.reduce(into: [Int: ([UInt8], Bool)]()) { $0[$1.0] = ($1.1, $1.2) }
            }
            resumedOnReader.formUnion(answers.values.map(\.1))
            #expect(answers.count == n)
            for i in 0..<n {
                let expected = KeyValueStateMachine()
                if round == "b" { _ = expected.apply(Self.put("k\(i)", "a\(i)"), index: 1) }
                #expect(answers[i]?.0 == expected.apply(Self.put("k\(i)", "\(round)\(i)"), index: 2), "answer to put \(i) of round \(round)")
            }
        }
        #expect(client.current == leader, "the client followed the leader's hint")
        // On the client's executor every answer resumed its task on the thread that read it;
        // otherwise none did.
        #expect(resumedOnReader == [onClientExecutor])
    }

    /// A node that accepts and never answers: the proposal fails with an unknown outcome after the
    /// timeout, a read is tried again and then reported as unanswered.
    @Test(arguments: [false, true])
    func unansweredRequestsTimeOutAndAProposalsOutcomeIsUnknown(onClientExecutor: Bool) async throws {
        let silent = try SocketDescriptor.listen(on: HostPort(host: "127.0.0.1", port: 0))
        defer { silent.close() }
        let accepted = Mutex<[SocketDescriptor]>([])
        let acceptor = Thread {
            while let s = try? silent.accept(timeout: .seconds(5)) { accepted.withLock { $0.append(s) } }
        }
        acceptor.start()
        defer { accepted.withLock { $0.forEach { $0.close() } } }
        let client = PipelinedNodeClient(endpoints: [1: "127.0.0.1:\(silent.localPort)"], timeout: .milliseconds(300))
        defer { client.close() }
        let executor: (any TaskExecutor)? = onClientExecutor ? client.executor : nil
        let propose = await withTaskExecutorPreference(executor) { await Result { try await client.propose(Self.put("k", "v"), attempts: 3) } }
        let failure = try #require(propose.failure as? NodeClient.Failure, "\(propose)")
        #expect(failure.outcomeUnknown && failure.description.contains("did not answer in time"), "\(failure)")
        let read = await withTaskExecutorPreference(executor) { await Result { try await client.read([], attempts: 2) } }
        let readFailure = try #require(read.failure as? NodeClient.Failure, "\(read)")
        #expect(!readFailure.outcomeUnknown && readFailure.description.contains("no leader answered after 2 attempts"), "\(readFailure)")
    }

    /// A connection that drops with proposals in flight fails every one of them as unknown; the
    /// next request connects again.
    @Test(arguments: [false, true])
    func aConnectionLostWithProposalsInFlightFailsEachAsUnknown(onClientExecutor: Bool) async throws {
        let flaky = try SocketDescriptor.listen(on: HostPort(host: "127.0.0.1", port: 0))
        defer { flaky.close() }
        let connections = Mutex(0)
        let acceptor = Thread {
            // Each connection is closed as soon as its first bytes arrive.
            while let s = try? flaky.accept(timeout: .seconds(5)) {
                connections.withLock { $0 += 1 }
                _ = try? s.receive(upTo: 16)
                s.close()
            }
        }
        acceptor.start()
        let client = PipelinedNodeClient(endpoints: [1: "127.0.0.1:\(flaky.localPort)"], timeout: .seconds(5))
        defer { client.close() }
        let executor: (any TaskExecutor)? = onClientExecutor ? client.executor : nil
        let outcomes = await withTaskGroup(of: Result<[UInt8], any Error>.self) { group in
            for i in 0..<20 {
                group.addTask(executorPreference: executor) { await Result { try await client.propose(Self.put("k\(i)", "v"), attempts: 1) } }
            }
            return await group.reduce(into: []) { $0.append($1) }
        }
        #expect(outcomes.count == 20)
        for o in outcomes {
            let f = o.failure as? NodeClient.Failure
            #expect(f.map { $0.outcomeUnknown || $0.description.contains("no leader answered") } == true, "\(o)")
        }
        #expect(outcomes.contains { ($0.failure as? NodeClient.Failure)?.outcomeUnknown == true })
        _ = await Result { try await client.propose(Self.put("again", "v"), attempts: 1) }
        #expect(connections.withLock { $0 } >= 2, "a later request connects again")
    }
}

extension PipelinedNodeClientTests {
    /// A job queued from another thread wakes the reader waiting in `poll` (which, in this test,
    /// would otherwise wait a minute before it looked again).
    @Test func aJobQueuedFromAnotherThreadWakesTheIdleReader() async throws {
        let listener = try SocketDescriptor.listen(on: HostPort(host: "127.0.0.1", port: 0))
        defer { listener.close() }
        let executor = PipelinedClientExecutor()
        let session = try PipelinedSession(node: 1, address: HostPort(host: "127.0.0.1", port: listener.localPort),
                                           timeout: .seconds(5), executor: executor, idlePoll: .seconds(60))
        executor.follow(session)
        defer {
            executor.follow(nil)
            session.retire()
        }
        try await Task.sleep(for: .milliseconds(200))  // the reader is waiting by now
        let ranOnReader = Mutex<Bool?>(nil)
        Task(executorPreference: executor) { ranOnReader.withLock { $0 = executor.onReaderThread } }
        #expect(await eventually(.seconds(10)) { ranOnReader.withLock { $0 } != nil }, "the job ran")
        #expect(ranOnReader.withLock { $0 } == true, "on the reader thread")
    }
}

extension Result where Failure == any Error {
    init(catching body: () async throws -> Success) async {
        do { self = .success(try await body()) } catch { self = .failure(error) }
    }
    var failure: (any Error)? { if case let .failure(e) = self { e } else { nil } }
}
