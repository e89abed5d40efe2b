import Foundation
import Testing
@testable import RDMAPaxos

/// `RingTransport.isLinkDown(to:)`, which lets a follower stop waiting for a leader whose process
/// is gone: false while the peer is up (and before it ever connected), true once the peer's
/// transport stopped and its connection closed.
@Suite struct RingLinkDownTests {
    @Test(arguments: FabricKind.allCases)
    func aStoppedPeersLinkIsDownAndALiveOnesIsNot(kind: FabricKind) async throws {
        let world = FabricWorld(kind)
        let nodes: [NodeID] = [1, 2]
        func open(_ n: NodeID) async throws -> RingTransport {
            let config = RingTransport.Configuration(listenAddress: world.listenAddress(n), cluster: nodes, ringBytes: 4096,
                                                     pollInterval: .milliseconds(1), reconnectDelayMin: .milliseconds(5),
                                                     reconnectDelayMax: .milliseconds(50))
            return try await RingTransport.open(fabric: try world.fabric(n, members: Set(nodes)), configuration: config)
        }
        let a = try await open(1)
        let b = try await open(2)
        #expect(!a.isLinkDown(to: 2), "never connected is not down")
        try introduceAndStart(a, b)
        defer { a.stop() }
        #expect(await a.waitUntilConnected())
        #expect(!a.isLinkDown(to: 2))
        b.stop()
        // A message makes a fabric without its own failure detection find the broken connection.
        let m = Message(from: 1, to: 2, ballot: Ballot(term: 1, node: 1), body: .heartbeat(commit: 0, readRound: 0))
        #expect(await eventually { a.send(m); return a.isLinkDown(to: 2) }, "the link to a stopped peer never read as down")
    }
}
