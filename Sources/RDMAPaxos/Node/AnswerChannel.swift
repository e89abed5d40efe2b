import NIOCore
import Synchronization

/// Where a client connection's answers go. Answers written on the connection's own event loop
/// go out with one flush per loop turn: the node answers every proposal a pass committed, and a
/// connection that pipelines many requests gets them in one socket write instead of one write
/// each (the loop's "flush once at the end of the iteration"). An answer written from another
/// thread is flushed at once.
final class AnswerChannel: Sendable {
    let channel: any Channel
    /// A flush is queued for the end of this loop turn.
    private let flushQueued = Atomic<Bool>(false)

    init(_ channel: any Channel) { self.channel = channel }

    func write(_ frame: ClientFrame) {
        let buffer = ByteBuffer(bytes: frame.encoded())
        guard channel.eventLoop.inEventLoop else {
            channel.writeAndFlush(buffer, promise: nil)
            return
        }
        channel.write(buffer, promise: nil)
        guard !flushQueued.exchange(true, ordering: .acquiringAndReleasing) else { return }
        // A task queued from the loop runs after the current one (the node's pass), before the
        // loop waits for I/O again.
        channel.eventLoop.execute { [self] in
            flushQueued.store(false, ordering: .releasing)
            channel.flush()
        }
    }
}
