import NIOCore
import NIOEmbedded
import Testing
@testable import RDMAPaxos

/// Counts the flushes that reach the socket end of a pipeline.
private final class FlushCounter: ChannelOutboundHandler, @unchecked Sendable {
    typealias OutboundIn = ByteBuffer
    var flushes = 0
    func flush(context: ChannelHandlerContext) {
        flushes += 1
        context.flush()
    }
}

@Suite struct AnswerChannelTests {
    /// Writes `answer` outside a node's pass: it is not flushed until the loop ends its turn, and
    /// then with one flush.
    private static func expectFlushedAtTheTurnsEnd(_ answer: ClientFrame, on answers: AnswerChannel,
                                                   _ channel: EmbeddedChannel, _ counter: FlushCounter) {
        let before = counter.flushes
        answers.write(answer)
        #expect(counter.flushes == before)
        channel.embeddedEventLoop.run()
        #expect(counter.flushes == before + 1)
    }

    /// The answers a node pass writes on the connection's loop leave in one flush, in order.
    @Test func answersOfOneLoopTurnLeaveInOneFlush() throws {
        let channel = EmbeddedChannel()
        let counter = FlushCounter()
        try channel.pipeline.syncOperations.addHandler(counter)
        let answers = AnswerChannel(channel)
        for id in 1...10 as ClosedRange<UInt64> { answers.write(.ok(id: id, result: [UInt8(id)])) }
        // Nothing reached the socket yet: the flush waits for the end of the turn.
        #expect(counter.flushes == 0)
        #expect(try channel.readOutbound(as: ByteBuffer.self) == nil)
        channel.embeddedEventLoop.run()
        #expect(counter.flushes == 1)
        var ids: [UInt64] = []
        while var b = try channel.readOutbound(as: ByteBuffer.self) {
            let length = Int(b.readInteger(as: UInt32.self)!)
            let frame = try ClientFrame(body: b.readBytes(length: length)!)
            if case let .ok(id, result) = frame, result == [UInt8(id)] { ids.append(id) }
        }
        #expect(ids == Array(1...10))
        // The next turn's answers get their own flush.
        Self.expectFlushedAtTheTurnsEnd(.ok(id: 11, result: []), on: answers, channel, counter)
        _ = try channel.finish()
    }
}

extension AnswerChannelTests {
    /// Answers a node's pass writes leave when the pass hands them out, before the writes the
    /// pass queued on the loop earlier (its commit notices to the followers).
    @Test func answersOfANodePassLeaveBeforeTheWritesItQueued() throws {
        let channel = EmbeddedChannel()
        let counter = FlushCounter()
        try channel.pipeline.syncOperations.addHandler(counter)
        let pass = PassFlushes()
        let answers = AnswerChannel(channel, pass: pass)
        var queuedRan = false
        channel.embeddedEventLoop.execute { queuedRan = true }  // a peer write the pass queued
        pass.collect {
            for id in 1...3 as ClosedRange<UInt64> { answers.write(.ok(id: id, result: [])) }
            #expect(counter.flushes == 0, "flushed as the pass ends, once")
        }
        #expect(counter.flushes == 1)
        #expect(!queuedRan)
        var frames = 0
        while try channel.readOutbound(as: ByteBuffer.self) != nil { frames += 1 }
        #expect(frames == 3)
        channel.embeddedEventLoop.run()
        #expect(queuedRan && counter.flushes == 1, "no second flush for the same answers")
        // Outside a pass, an answer waits for the end of the loop turn as before.
        Self.expectFlushedAtTheTurnsEnd(.ok(id: 4, result: []), on: answers, channel, counter)
        _ = try channel.finish()
    }
}

extension AnswerChannelTests {
    /// A client connection served on the node's own event loop is given the node's pass; one on
    /// another loop is not (the node's answers reach it from another thread, flushed at once).
    @Test func onlyAConnectionOnTheNodesLoopIsGivenTheNodesPass() throws {
        let loop = EmbeddedEventLoop()
        var o = NodeOptions(replica: ReplicaConfig(id: 1), bootstrap: Membership([Member(id: 1, role: .voter)]), seed: 1)
        o.eventLoop = loop
        let node = ReplicaNode(options: o, stateMachine: KeyValueStateMachine(), log: try MemoryLog(storage: MemoryLog.Storage()),
                               snapshots: MemorySnapshotStore(), transport: LocalHub().transport(for: 1),
                               ticks: TimerTickSource(interval: .seconds(1)))
        let onNodeLoop = ClientFrameHandler(node: node)
        let a = EmbeddedChannel(handler: onNodeLoop, loop: loop)
        #expect(onNodeLoop.answers.pass === node.passFlushes)
        let elsewhere = ClientFrameHandler(node: node)
        let b = EmbeddedChannel(handler: elsewhere)
        #expect(elsewhere.answers.pass == nil)
        _ = try a.finish()
        _ = try b.finish()
    }
}
