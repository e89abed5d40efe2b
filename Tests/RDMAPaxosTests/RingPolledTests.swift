import Foundation
import Synchronization
import Testing
@testable import RDMAPaxos

/// `RingTransport` in polled mode (`startPolled`), as `ReplicaNode` runs it: the fabric's thread
/// that lands a record wakes the reader, which reads the rings on its own thread.
@Suite struct RingPolledTests {
    /// A reader thread in the shape of the node loop: sleeps until woken, then reads every ring.
    final class Reader: @unchecked Sendable {
        // @unchecked Sendable: `inbox` and `wakes` are Sendable; the thread and semaphore are only
        // touched through their own thread-safe methods.
        let inbox = Inbox()
        let wakes = Atomic<Int>(0)
        let bell = DispatchSemaphore(value: 0)
        let done = Atomic<Bool>(false)
        let exited = DispatchSemaphore(value: 0)

        func wake() {
            wakes.add(1, ordering: .relaxed)
            bell.signal()
        }

        func run(_ t: RingTransport) {
            Thread { [self] in
                while !done.load(ordering: .acquiring) {
                    bell.wait()
                    _ = t.receiveWaiting { inbox.append($0) }
                }
                exited.signal()
            }.start()
        }

        func stop() {
            done.store(true, ordering: .releasing)
            bell.signal()
            exited.wait()
        }
    }

    /// With a poll interval of a minute, only the landing's wake-up can get the messages read
    /// within the test's deadline: the transport's own thread does not deliver them.
    @Test(arguments: FabricKind.allCases)
    func landingWakesTheReaderWhichGetsEveryMessageInOrder(kind: FabricKind) async throws {
        try await Self.landingWakesTheReader(kind: kind, receiverLearnsLate: false)
    }

    /// The order that once left the sender unconnected for the whole poll interval: the reader
    /// takes up the sender's session before the receiver has a queue pair back to the sender, so
    /// the session's credit cannot go out then. The receiver's connect must wake the reader to
    /// send it (it used to wait for the next poll, a minute here).
    @Test(arguments: FabricKind.allCases)
    func aSessionTakenUpBeforeTheWayBackExistsGetsItsCreditOnceItDoes(kind: FabricKind) async throws {
        try await Self.landingWakesTheReader(kind: kind, receiverLearnsLate: true)
    }

    static func landingWakesTheReader(kind: FabricKind, receiverLearnsLate: Bool) async throws {
        let world = FabricWorld(kind)
        let nodes: [NodeID] = [1, 2]
        func open(_ n: NodeID, poll: Duration) async throws -> RingTransport {
            let config = RingTransport.Configuration(listenAddress: world.listenAddress(n), cluster: nodes, ringBytes: 4096,
                                                     pollInterval: poll, reconnectDelayMin: .milliseconds(5),
                                                     reconnectDelayMax: .milliseconds(100))
            return try await RingTransport.open(fabric: try world.fabric(n, members: Set(nodes)), configuration: config)
        }
        let sender = try await open(1, poll: .milliseconds(1))
        let receiver = try await open(2, poll: .seconds(60))
        sender.setAddress(receiver.listeningAddress)
        if !receiverLearnsLate { receiver.setAddress(sender.listeningAddress) }
        let senderInbox = Inbox()
        try sender.start { senderInbox.append($0) }
        let reader = Reader()
        reader.run(receiver)
        try receiver.startPolled { reader.wake() }
        defer {
            reader.stop()
            receiver.stop()
            sender.stop()
        }
        if receiverLearnsLate {
            // The sender's session lands and rings the reader, which takes it up (its credit
            // stays due: there is no way back yet).
            #expect(await eventually { receiver.hasTakenUpSession(from: 1) })
            #expect(!sender.isConnected(to: 2))
            receiver.setAddress(sender.listeningAddress)
        }
        #expect(await sender.waitUntilConnected())
        // Many more records than the 4 KiB ring holds: credit must come back from the reader.
        let messages = (1...400).map { Message(from: 1, to: 2, ballot: Ballot(term: 1, node: 1), body: .heartbeat(commit: $0, readRound: 0)) }
        for m in messages {
            let before = sender.statistics.sent
            #expect(await eventually { sender.send(m); return sender.statistics.sent > before })
        }
        #expect(await eventually { reader.inbox.count == messages.count })
        #expect(reader.inbox.all == messages)
        #expect(reader.wakes.load(ordering: .relaxed) > 0)
        #expect(receiver.statistics.delivered == messages.count)
    }
}
