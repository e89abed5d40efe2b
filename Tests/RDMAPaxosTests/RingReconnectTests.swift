import Foundation
import Synchronization
import Testing
@testable import RDMAPaxos

/// A link's reconnecting task sleeps on a signal (`AsyncSignal`), not a timer: a peer that
/// restarts is reconnected on what the transport sees (a send over the broken queue pair, the
/// transport thread's look at its links when a completion wakes it), with the poll interval a
/// minute long.
@Suite struct RingReconnectTests {
    /// A transport of the two-node cluster 1, 2 listening at `address` (port 0: any).
    static func open(_ world: FabricWorld, _ address: PeerAddress, poll: Duration) async throws -> RingTransport {
        let config = RingTransport.Configuration(listenAddress: address, cluster: [1, 2], ringBytes: 4096,
                                                 pollInterval: poll, reconnectDelayMin: .milliseconds(5),
                                                 reconnectDelayMax: .milliseconds(100))
        return try await RingTransport.open(fabric: try world.fabric(address.node, members: [1, 2]), configuration: config)
    }

    @Test(arguments: [FabricKind.memory, .tcp])
    func aRestartedPeerIsReconnectedWithNoTimerRunning(kind: FabricKind) async throws {
        let world = FabricWorld(kind)
        func open(_ address: PeerAddress) async throws -> RingTransport { try await Self.open(world, address, poll: .seconds(60)) }
        let a = try await open(world.listenAddress(1))
        let b = try await open(world.listenAddress(2))
        try introduceAndStart(a, b)
        defer { a.stop() }
        #expect(await a.waitUntilConnected())
        #expect(await b.waitUntilConnected())
        let address = b.listeningAddress
        b.stop()
        let restarted = try await open(address)
        restarted.setAddress(a.listeningAddress)
        let inbox = Inbox()
        try restarted.start { inbox.append($0) }
        defer { restarted.stop() }
        let m = Message(from: 1, to: 2, ballot: Ballot(term: 1, node: 1), body: .heartbeat(commit: 7, readRound: 0))
        #expect(await eventually(.seconds(20)) { a.send(m); return inbox.count > 0 }, "node 1 never reconnected to the restarted node 2")
        #expect(a.statistics.connects >= 2)
    }

    @Test func aSignalBeforeTheWaitIsKeptAndOneDuringItResumesIt() async {
        let s = AsyncSignal()
        s.signal()
        s.signal()
        await s.wait()  // the pending signal (two count as one)
        let resumed = Flag()
        let waiter = Task {
            await s.wait()
            resumed.set()
        }
        try? await Task.sleep(for: .milliseconds(50))
        #expect(!resumed.isSet, "a wait with no signal returned")
        s.signal()
        await waiter.value
        #expect(resumed.isSet)
    }

    @Test func cancellingTheWaitingTaskEndsItsWaitAndLeavesNoSignalBehind() async {
        let s = AsyncSignal()
        let waiter = Task { await s.wait() }
        try? await Task.sleep(for: .milliseconds(20))
        waiter.cancel()
        await waiter.value
        // The next waiter is not let through by anything the cancellation left.
        let resumed = Flag()
        let next = Task {
            await s.wait()
            resumed.set()
        }
        try? await Task.sleep(for: .milliseconds(50))
        #expect(!resumed.isSet, "a wait after a cancelled one returned with no signal")
        s.signal()
        await next.value
        #expect(resumed.isSet)
    }

    /// Nothing is sent and nothing lands: only the transport thread's look at its links after a
    /// timed-out wait finds the broken queue pair to the restarted peer (TCP closes it; the
    /// memory fabric has no failure detection of its own).
    @Test func aBrokenLinkNoSendReportsIsReconnectedByTheTransportThreadsLook() async throws {
        let world = FabricWorld(.tcp)
        func open(_ address: PeerAddress) async throws -> RingTransport { try await Self.open(world, address, poll: .milliseconds(20)) }
        let a = try await open(world.listenAddress(1))
        let b = try await open(world.listenAddress(2))
        try introduceAndStart(a, b)
        defer { a.stop() }
        #expect(await a.waitUntilConnected())
        let address = b.listeningAddress
        let connects = a.statistics.connects
        // Past the pause a reconnecting task takes after each connect (`reconnectDelayMin`).
        try await Task.sleep(for: .milliseconds(50))
        b.stop()
        #expect(await eventually { a.isLinkDown(to: 2) })
        // The restarted node does not know node 1's address: it sends nothing that lands there.
        let restarted = try await open(address)
        try restarted.start { _ in }
        defer { restarted.stop() }
        #expect(await eventually { a.statistics.connects > connects }, "node 1 never reconnected to the restarted node 2")
    }
}

private final class Flag: Sendable {
    private let value = Atomic<Bool>(false)
    func set() { value.store(true, ordering: .releasing) }
    var isSet: Bool { value.load(ordering: .acquiring) }
}
