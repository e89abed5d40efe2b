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
        answers.write(.ok(id: 11, result: []))
        channel.embeddedEventLoop.run()
        #expect(counter.flushes == 2)
        _ = try channel.finish()
    }
}
