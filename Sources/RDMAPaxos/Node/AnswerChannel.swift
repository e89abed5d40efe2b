import NIOCore
import Synchronization

/// Where a client connection's answers go. Answers written on the connection's own event loop
/// go out with one flush per loop turn: the node answers every proposal a pass committed, and a
/// connection that pipelines many requests gets them in one socket write instead of one write
/// each (the loop's "flush once at the end of the iteration"). An answer written from another
/// thread is flushed at once.
///
/// With `pass` (the node's `PassFlushes`, when the node runs on this connection's loop), answers
/// written while the node's pass runs them are flushed when the pass ends, ahead of the peer
/// writes that pass queued on the loop (the commit notices to the followers): a client waits for
/// its answer, a follower does not wait for a commit notice.
final class AnswerChannel: Sendable {
    let channel: any Channel
    /// A flush is queued for the end of this loop turn (or of the node's pass).
    private let flushQueued = Atomic<Bool>(false)
    /// The node's pass that flushes answers written while it runs them, if the node runs on this loop.
    let pass: PassFlushes?

    init(_ channel: any Channel, pass: PassFlushes? = nil) {
        self.channel = channel
        self.pass = pass
    }

    func write(_ frame: ClientFrame) {
        let buffer = ByteBuffer(bytes: frame.encoded())
        guard channel.eventLoop.inEventLoop else {
            channel.writeAndFlush(buffer, promise: nil)
            return
        }
        channel.write(buffer, promise: nil)
        guard !flushQueued.exchange(true, ordering: .acquiringAndReleasing) else { return }
        if let pass, pass.add(self) { return }
        // A task queued from the loop runs after the current one (the node's pass), before the
        // loop waits for I/O again.
        channel.eventLoop.execute { [self] in flushNow() }
    }

    func flushNow() {
        flushQueued.store(false, ordering: .releasing)
        channel.flush()
    }
}

/// The client connections a node's pass wrote answers to (`ReplicaNode.publishAndAnswer`),
/// flushed together as the pass hands out its answers. The node's thread runs every pass; only
/// answer channels on the node's own event loop are given it (`ClientFrameHandler`), so `add`
/// runs on that thread too.
final class PassFlushes: @unchecked Sendable {
    private var collecting = false
    private var channels: [AnswerChannel] = []

    /// Runs `answer`, then flushes every connection it wrote to.
    func collect(_ answer: () -> Void) {
        collecting = true
        answer()
        collecting = false
        let touched = channels
        channels = []
        for c in touched { c.flushNow() }
    }

    /// Takes `channel` for the flush at the end of the pass; false outside a pass.
    func add(_ channel: AnswerChannel) -> Bool {
        guard collecting else { return false }
        channels.append(channel)
        return true
    }
}
