import Testing
@testable import RDMAPaxos

/// Started transports of one fabric kind, fully connected, each delivering into its own inbox.
struct RingCluster {
    var transports: [NodeID: RingTransport] = [:]
    var inboxes: [NodeID: Inbox] = [:]

    static func make(_ kind: FabricKind, nodes: [NodeID] = [1, 2, 3], ringBytes: Int = 64 << 10) async throws -> RingCluster {
        let world = FabricWorld(kind)
        var c = RingCluster()
        for n in nodes {
            let config = RingTransport.Configuration(listenAddress: world.listenAddress(n), cluster: nodes, ringBytes: ringBytes,
                                                     pollInterval: .milliseconds(1), reconnectDelayMin: .milliseconds(5),
                                                     reconnectDelayMax: .milliseconds(100))
            c.transports[n] = try await RingTransport.open(fabric: try world.fabric(n, members: Set(nodes)), configuration: config)
        }
        for (n, t) in c.transports {
            for (m, other) in c.transports where m != n { t.setAddress(other.listeningAddress) }
            let inbox = Inbox()
            c.inboxes[n] = inbox
            try t.start { inbox.append($0) }
        }
        for t in c.transports.values { #expect(await t.waitUntilConnected()) }
        return c
    }

    func stop() { for t in transports.values { t.stop() } }
}

@Suite struct RingTransportTests {
    @Test(arguments: FabricKind.allCases)
    func messagesOfEveryKindArriveInOrder(kind: FabricKind) async throws {
        let c = try await RingCluster.make(kind)
        defer { c.stop() }
        var sent: [NodeID: [Message]] = [2: [], 3: []]
        for round in 0..<20 {
            for to in [2, 3] as [NodeID] {
                for m in everyKindOfMessage(from: 1, to: to, term: UInt64(round + 1)) {
                    c.transports[1]!.send(m)
                    sent[to]!.append(m)
                }
            }
        }
        for to in [2, 3] as [NodeID] {
            #expect(await eventually { c.inboxes[to]!.count == sent[to]!.count })
            #expect(c.inboxes[to]!.all == sent[to]!)
        }
        #expect(c.transports[1]!.statistics.sent == sent[2]!.count + sent[3]!.count)
        #expect(c.inboxes[1]!.count == 0)
    }

    @Test(arguments: FabricKind.allCases)
    func fullRingDropsAndCountsUntilCreditReturns(kind: FabricKind) async throws {
        let c = try await RingCluster.make(kind, nodes: [1, 2], ringBytes: 1024)
        defer { c.stop() }
        let sender = c.transports[1]!
        c.transports[2]!.pauseReceiving(true)
        let messages = (1...100).map { Message(from: 1, to: 2, ballot: Ballot(term: 1, node: 1), body: .heartbeat(commit: $0, readRound: 0)) }
        for m in messages { sender.send(m) }
        let s = sender.statistics
        #expect(s.sent > 0 && s.sent < 100)
        #expect(s.droppedRingFull == 100 - s.sent)
        c.transports[2]!.pauseReceiving(false)
        #expect(await eventually { c.inboxes[2]!.count == s.sent })
        // The ring filled from the front: exactly the first messages got in, in order.
        #expect(c.inboxes[2]!.all == Array(messages.prefix(s.sent)))
        // Credit came back: the ring takes messages again.
        #expect(await eventually { sender.send(messages[0]); return sender.statistics.sent > s.sent })
    }

    /// The reader keeps credit until the writer's ring is over a quarter full: many small
    /// messages cost few credit writes.
    @Test(arguments: FabricKind.allCases)
    func creditGoesBackOnlyWhenTheRingFillsUp(kind: FabricKind) async throws {
        let c = try await RingCluster.make(kind, nodes: [1, 2], ringBytes: 4096)
        defer { c.stop() }
        let sender = c.transports[1]!, reader = c.transports[2]!
        let returnedAtSessionStart = reader.statistics.creditReturns
        let messages = (1...400).map { Message(from: 1, to: 2, ballot: Ballot(term: 1, node: 1), body: .heartbeat(commit: $0, readRound: 0)) }
        for m in messages {
            // One at a time, each read before the next: eager credit would return once per message.
            let sent = sender.statistics.sent, read = c.inboxes[2]!.count
            #expect(await eventually { sender.send(m); return sender.statistics.sent > sent })
            #expect(await eventually { c.inboxes[2]!.count == read + 1 })
        }
        #expect(c.inboxes[2]!.all == messages)
        let stride = CreditRing.recordBytes(payloadBytes: WireCodec.encode(messages[0]).count)
        let returned = reader.statistics.creditReturns - returnedAtSessionStart
        // 400 records pass through a 4 KiB ring: at least one return per lap, at most about one
        // per quarter of the ring (each asking record is read once).
        #expect(returned >= 400 * stride / 4096)
        #expect(returned <= 400 * stride / 1024 + 4, "\(returned) credit writes for 400 records of \(stride) bytes")
        #expect(sender.statistics.droppedRingFull == 0)
    }

    /// A message that needs more room than the credit the writer holds, while the reader read
    /// everything and owes credit that no record asked for, gets in once the writer asks
    /// through the control cell.
    @Test(arguments: FabricKind.allCases)
    func aWriterShortOfRoomAsksForTheCreditItIsOwed(kind: FabricKind) async throws {
        let c = try await RingCluster.make(kind, nodes: [1, 2], ringBytes: 4096)
        defer { c.stop() }
        let sender = c.transports[1]!
        func message(totalBytes: Int, _ i: UInt64) -> Message {
            // A command entry whose record (header + encoded message) is `totalBytes` long.
            func make(_ n: Int) -> Message {
                let e = LogEntry(index: i, ballot: Ballot(term: 1, node: 1), kind: .command, payload: [UInt8](repeating: 7, count: n))
                return Message(from: 1, to: 2, ballot: Ballot(term: 1, node: 1),
                               body: .accept(prevIndex: i - 1, prevBallot: Ballot(term: 1, node: 1), entries: [e], commit: 0))
            }
            var n = totalBytes - RingLayout.recordHeaderBytes - WireCodec.encode(make(0)).count
            while RingLayout.recordHeaderBytes + WireCodec.encode(make(n)).count > totalBytes { n -= 1 }
            let m = make(n)
            #expect(CreditRing.recordBytes(payloadBytes: WireCodec.encode(m).count) == totalBytes)
            return m
        }
        func sendOnce(_ m: Message) async -> Bool {
            // Counted before sending: a fabric that lands at once may deliver before send returns.
            let before = sender.statistics.sent
            let delivered = c.inboxes[2]!.count
            sender.send(m)
            guard sender.statistics.sent == before + 1 else { return false }
            return await eventually { c.inboxes[2]!.count == delivered + 1 }
        }
        // 1,536 bytes: over a quarter of the ring, so it asks and its credit comes back.
        #expect(await sendOnce(message(totalBytes: 1_536, 1)))
        // Eight records of 128 bytes: the ring is then exactly a quarter full; none asks.
        for i in 0..<8 { #expect(await sendOnce(message(totalBytes: 128, UInt64(2 + i)))) }
        // 2,048 bytes at position 2,560 must wrap: 1,536 + 2,048 bytes of room, 1,024 not returned.
        let big = message(totalBytes: 2_048, 10)
        sender.send(big)
        #expect(sender.statistics.droppedRingFull == 1)
        #expect(sender.statistics.creditRequests == 1)
        #expect(await eventually { sender.send(big); return sender.statistics.sent == 10 })
        #expect(await eventually { c.inboxes[2]!.count == 10 })
        #expect(c.inboxes[2]!.all.last == big)
    }

    @Test(arguments: FabricKind.allCases)
    func creditReturnLetsTheRingWrapManyTimes(kind: FabricKind) async throws {
        let c = try await RingCluster.make(kind, nodes: [1, 2], ringBytes: 1024)
        defer { c.stop() }
        let sender = c.transports[1]!
        var rng = SeededRandom(seed: 7)
        var messages: [Message] = []
        var bytes = 0
        for i in 0..<1500 {
            let payload = (0..<Int(rng.next() % 300)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            let e = LogEntry(index: UInt64(i + 1), ballot: Ballot(term: 1, node: 1), kind: .command, payload: payload)
            let m = Message(from: 1, to: 2, ballot: Ballot(term: 1, node: 1),
                            body: .accept(prevIndex: UInt64(i), prevBallot: Ballot(term: 1, node: 1), entries: [e], commit: 0))
            messages.append(m)
            bytes += CreditRing.recordBytes(payloadBytes: WireCodec.encode(m).count)
            // Retry each message until the ring takes it (consensus would retransmit instead).
            let before = sender.statistics.sent
            while sender.statistics.sent == before {
                sender.send(m)
                if sender.statistics.sent == before { try await Task.sleep(for: .microseconds(200)) }
            }
        }
        #expect(bytes / 1024 > 100, "the ring should have wrapped over a hundred times")
        #expect(await eventually { c.inboxes[2]!.count == messages.count })
        #expect(c.inboxes[2]!.all == messages)
        if kind.landsAtomically { #expect(c.transports[2]!.statistics.tornRecords == 0) }
    }

    @Test func tornRecordIsNeverDelivered() async throws {
        let network = MemoryNetwork()
        let cluster: [NodeID] = [1, 2]
        let receiver = try await RingTransport.open(
            fabric: MemoryFabric(node: 2, network: network),
            configuration: .init(listenAddress: PeerAddress(node: 2), cluster: cluster, peerAddresses: [PeerAddress(node: 1)],
                                 ringBytes: 4096, pollInterval: .milliseconds(1)))
        // Node 1 is driven by hand: its own region, and raw writes into node 2's ring.
        let f1 = MemoryFabric(node: 1, network: network)
        let layout1 = try RingLayout(owner: 1, cluster: cluster, ringBytes: 4096)
        let layout2 = try RingLayout(owner: 2, cluster: cluster, ringBytes: 4096)
        let region1 = try f1.registerRegion(lengthBytes: layout1.regionBytes)
        _ = try await f1.listen(at: PeerAddress(node: 1), exporting: region1)
        let inbox = Inbox()
        try receiver.start { inbox.append($0) }
        defer { receiver.stop(); f1.close() }

        let qp = try await f1.connect(to: PeerAddress(node: 2), exporting: region1)
        try qp.postWrite(RingLayout.controlCell(epoch: 77), remoteOffset: layout2.controlOffset(0), immediate: 2, signaled: false)
        // The receiver acknowledges the session through node 1's credit cell.
        #expect(await eventually {
            region1.read(offset: layout1.creditOffset(0) + 8, count: 8) == [0, 0, 0, 0, 0, 0, 0, 77]
        })

        let m = Message(from: 1, to: 2, ballot: Ballot(term: 3, node: 1), body: .timeoutNow)
        let record = CreditRingWriter(ring: layout2.ring, session: 77).append(kind: RingLayout.messageKind, payload: WireCodec.encode(m))!.record.bytes
        var torn = record
        torn[torn.count - 1] ^= 0xFF
        try qp.postWrite(torn, remoteOffset: layout2.ringOffset(0), immediate: 1, signaled: false)
        #expect(await eventually { receiver.statistics.tornRecords == 1 })
        // A record of an older session at the right place is not delivered either.
        let stale = CreditRingWriter(ring: layout2.ring, session: 76).append(kind: RingLayout.messageKind, payload: WireCodec.encode(m))!.record.bytes
        try qp.postWrite(stale, remoteOffset: layout2.ringOffset(0), immediate: 1, signaled: false)
        try await Task.sleep(for: .milliseconds(20))
        #expect(inbox.count == 0)

        try qp.postWrite(record, remoteOffset: layout2.ringOffset(0), immediate: 1, signaled: false)
        #expect(await eventually { inbox.count == 1 })
        #expect(inbox.all == [m])
    }

    @Test func restartedPeerStartsAFreshSession() async throws {
        let network = MemoryNetwork()
        let cluster: [NodeID] = [1, 2]
        func open(_ n: NodeID) async throws -> RingTransport {
            try await RingTransport.open(
                fabric: MemoryFabric(node: n, network: network),
                configuration: .init(listenAddress: PeerAddress(node: n), cluster: cluster,
                                     peerAddresses: [PeerAddress(node: 3 - n)], ringBytes: 4096,
                                     pollInterval: .milliseconds(1), reconnectDelayMin: .milliseconds(2),
                                     reconnectDelayMax: .milliseconds(20)))
        }
        let t2 = try await open(2)
        let inbox = Inbox()
        try t2.start { inbox.append($0) }
        defer { t2.stop() }
        func heartbeat(_ i: UInt64) -> Message { Message(from: 1, to: 2, ballot: Ballot(term: 1, node: 1), body: .heartbeat(commit: i, readRound: 0)) }

        let first = try await open(1)
        try first.start { _ in }
        #expect(await first.waitUntilConnected())
        for i in UInt64(1)...5 { first.send(heartbeat(i)) }
        #expect(await eventually { inbox.count == 5 })
        first.stop()

        let second = try await open(1)
        try second.start { _ in }
        defer { second.stop() }
        #expect(await second.waitUntilConnected())
        for i in UInt64(6)...8 { second.send(heartbeat(i)) }
        #expect(await eventually { inbox.count == 8 })
        #expect(inbox.all == (UInt64(1)...8).map(heartbeat))
    }

    @Test func tcpPeerThatRestartsOnItsPortIsReconnectedWithBackoff() async throws {
        let cluster: [NodeID] = [1, 2]
        func open(_ n: NodeID, port: Int) async throws -> RingTransport {
            let fabric = try TCPFabric(node: n, configuration: .init(clusterKey: testClusterKey, members: Set(cluster)))
            return try await RingTransport.open(
                fabric: fabric,
                configuration: .init(listenAddress: PeerAddress(node: n, port: port), cluster: cluster, ringBytes: 4096,
                                     pollInterval: .milliseconds(1), reconnectDelayMin: .milliseconds(5),
                                     reconnectDelayMax: .milliseconds(50)))
        }
        let t2 = try await open(2, port: 0)
        defer { t2.stop() }
        let first = try await open(1, port: 0)
        let port1 = first.listeningAddress.port
        t2.setAddress(first.listeningAddress)
        first.setAddress(t2.listeningAddress)
        let inbox1 = Inbox()
        try t2.start { _ in }
        try first.start { inbox1.append($0) }
        #expect(await t2.waitUntilConnected())
        func ping(_ i: UInt64) -> Message { Message(from: 2, to: 1, ballot: Ballot(term: 2, node: 2), body: .heartbeat(commit: i, readRound: 0)) }
        t2.send(ping(1))
        #expect(await eventually { inbox1.count == 1 })
        first.stop()

        // Node 1 comes back on the same port with empty memory; node 2 keeps retrying until it is there.
        let second = try await open(1, port: port1)
        defer { second.stop() }
        second.setAddress(t2.listeningAddress)
        let inbox2 = Inbox()
        try second.start { inbox2.append($0) }
        // Until node 2 notices the old connection died it may still send into it (and lose the
        // message, which consensus would retransmit): wait for the new session.
        #expect(await eventually { t2.statistics.connects >= 2 && t2.isConnected(to: 1) })
        t2.send(ping(2))
        #expect(await eventually { inbox2.count == 1 })
        #expect(inbox2.all == [ping(2)])
    }

    @Test(arguments: FabricKind.allCases)
    func oversizedAndUnroutableMessagesAreDroppedAndCounted(kind: FabricKind) async throws {
        let c = try await RingCluster.make(kind, nodes: [1, 2], ringBytes: 1024)
        defer { c.stop() }
        let t = c.transports[1]!
        t.send(Message(from: 1, to: 2, ballot: .zero, body: .installSnapshot(SnapshotChunk(whole:
            Snapshot(index: 1, ballot: .zero, membership: .empty, data: [UInt8](repeating: 1, count: 600))))))
        t.send(Message(from: 1, to: 9, ballot: .zero, body: .timeoutNow))
        #expect(t.statistics.droppedTooLarge == 1)
        #expect(t.statistics.droppedUnknownPeer == 1)
        #expect(t.statistics.sent == 0)
    }

    @Test func layoutOffsetsMatchTheDesignTable() throws {
        let l = try RingLayout(owner: 2, cluster: [3, 1, 2], ringBytes: 4096)
        #expect(l.peers == [1, 3])
        #expect(l.creditOffset(0) == 64 && l.creditOffset(1) == 128)
        #expect(l.controlOffset(0) == 192 && l.ringOffset(0) == 256)
        #expect(l.controlOffset(1) == 256 + 4096 && l.ringOffset(1) == 320 + 4096)
        #expect(l.regionBytes == 192 + 2 * (64 + 4096))
        #expect(throws: FabricError.self) { try RingLayout(owner: 1, cluster: [1], ringBytes: 4096) }
        #expect(throws: FabricError.self) { try RingLayout(owner: 1, cluster: [1, 2], ringBytes: 1000) }
    }
}
