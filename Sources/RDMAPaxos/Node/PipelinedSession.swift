import Foundation
import Synchronization

/// One connection of a `PipelinedNodeClient`: requests are written as they come (those made
/// while another is being written go with the next write), each waits for the answer with its
/// id, and a thread of the session's own reads answers in whatever order the node sends them. A
/// request unanswered by its deadline, or in flight when the connection fails, is resumed with
/// `PipelinedSession.Lost`. The reader thread also runs the jobs of the client's executor
/// (`PipelinedClientExecutor`) between reads; requests those jobs make are written once they
/// all ran.
final class PipelinedSession: Sendable {
    /// Why a request got no answer.
    struct Lost: Error, CustomStringConvertible {
        var description: String
        /// Whether the request went out (a node may have it), or never left this client.
        var sent: Bool
    }

    private struct Waiter {
        var continuation: CheckedContinuation<ClientFrame, any Error>
        var deadline: ContinuousClock.Instant
    }

    private struct State {
        var waiters: [UInt64: Waiter] = [:]
        /// Why the session ended; set once, after which no request is taken.
        var ended: String?
        /// No new request will come (the client moved on); end once the last answer is in.
        var retired = false
    }

    /// Request bytes not yet written, and whether a caller is writing them.
    private struct Outbox {
        var bytes: [UInt8] = []
        var writing = false
    }

    let node: NodeID
    private let socket: SocketDescriptor
    private let state = Mutex(State())
    private let outbox = Mutex(Outbox())
    private let jobs = SessionJobs()
    private let wake: WakePipe
    /// The executor whose jobs the reader runs (`take`).
    private let executor: PipelinedClientExecutor
    /// How long the idle reader waits before it looks for overdue requests.
    private let idlePoll: Duration

    /// Connects to `node` at `address` (connect bounded by `timeout`) and starts the reader.
    init(node: NodeID, address: HostPort, timeout: Duration, executor: PipelinedClientExecutor,
         idlePoll: Duration = .milliseconds(100)) throws(SocketFailure) {
        self.node = node
        self.executor = executor
        self.idlePoll = idlePoll
        wake = try WakePipe()
        socket = try SocketDescriptor.connect(to: address, timeout: timeout)
        socket.setReceiveTimeout(.zero)  // the reader waits with poll, never in recv
        let t = Thread(named: "plover-client") { [self] in readLoop() }
        t.start()
    }

    /// Whether the session still takes requests.
    var isOpen: Bool { state.withLock { $0.ended == nil && !$0.retired } }

    /// Sends `frame` (request `id`) and waits for its answer until `deadline`.
    func request(_ frame: ClientFrame, id: UInt64, deadline: ContinuousClock.Instant) async throws -> ClientFrame {
        try await withCheckedThrowingContinuation { (c: CheckedContinuation<ClientFrame, any Error>) in
            let refused = state.withLock { s -> String? in
                if let why = s.ended { return why }
                s.waiters[id] = Waiter(continuation: c, deadline: deadline)
                return nil
            }
            if let refused {
                c.resume(throwing: Lost(description: refused, sent: false))
                return
            }
            send(frame.encoded())
        }
    }

    /// Writes `bytes` after every request queued before them. Requests made while another
    /// caller writes join the outbox, and that caller writes them with its next write: many
    /// tasks' requests leave in one write, as the node answers them in one. Under sustained load
    /// the writing caller may carry others' requests for a while before it returns to wait for
    /// its own answer.
    ///
    /// On the reader thread (a job of the client's executor) the bytes wait in the outbox: the
    /// reader writes them once every job of its turn ran.
    private func send(_ bytes: [UInt8]) {
        outbox.withLock { $0.bytes += bytes }
        if !jobs.onReader { writeOutbox() }
    }

    /// Writes the outbox unless another caller is writing it (that caller takes these bytes too).
    private func writeOutbox() {
        let writer = outbox.withLock { o -> Bool in
            guard !o.writing, !o.bytes.isEmpty else { return false }
            o.writing = true
            return true
        }
        guard writer else { return }
        while let chunk = outbox.withLock({ o -> [UInt8]? in
            guard !o.bytes.isEmpty else { o.writing = false; return nil }
            defer { o.bytes = [] }
            return o.bytes
        }) {
            do throws(SocketFailure) { try socket.send(chunk) } catch {
                // Every waiting request is told; what is still queued will never go, and nothing
                // more does: `writing` stays set, so no request is written after a frame cut short.
                outbox.withLock { $0.bytes = [] }
                end("connection to node \(node) lost while sending: \(String(cString: strerror(error.errno)))")
                return
            }
        }
    }

    /// Takes no more requests; the connection closes once the ones in flight are answered.
    func retire() {
        let idle = state.withLock { s in
            s.retired = true
            return s.waiters.isEmpty
        }
        if idle { end("retired") }
    }

    /// Ends the session: every waiting request is resumed with `Lost(why)`, the socket shut down
    /// (the reader closes it).
    private func end(_ why: String) {
        let waiting = state.withLock { s -> [Waiter] in
            guard s.ended == nil else { return [] }
            s.ended = why
            defer { s.waiters = [:] }
            return Array(s.waiters.values)
        }
        socket.shutdown()
        for w in waiting { w.continuation.resume(throwing: Lost(description: why, sent: true)) }
    }

    /// Whether the caller is this session's reader thread.
    var onReaderThread: Bool { jobs.onReader }

    /// Queues a job of the client's executor for the reader thread; false once the reader is gone.
    func take(_ job: UnownedJob) -> Bool {
        jobs.take(job) { wake.ring() }
    }

    private func readLoop() {
        jobs.readerStarted()
        defer { jobs.finish() }
        var buffer: [UInt8] = []
        var start = 0
        while state.withLock({ $0.ended == nil }) {
            // Run to completion: the tasks the last read resumed run, then their requests leave
            // in one write, then the thread waits for the next answers (or a job from elsewhere).
            let more = jobs.run(on: executor.asUnownedTaskExecutor())
            writeOutbox()
            let ready = socket.waitReadable(more ? .zero : idlePoll, orRung: wake)
            if ready.rung { wake.drain() }
            // Answers that came are taken before any request is expired: a reader held up by a
            // job (a connect to another node runs on this thread) fails no request whose answer
            // arrived meanwhile.
            if ready.readable && !readAnswers(into: &buffer, from: &start) { break }
            expireOverdue()
        }
        socket.close()
    }

    /// Reads what is there and delivers every whole frame; false once the connection ended.
    private func readAnswers(into buffer: inout [UInt8], from start: inout Int) -> Bool {
        let chunk: [UInt8]
        do { chunk = try socket.receive(upTo: 64 << 10) } catch {
            end("connection to node \(node) failed: \(String(cString: strerror(error.errno)))")
            return false
        }
        guard !chunk.isEmpty else {
            end("connection to node \(node) closed")
            return false
        }
        buffer.removeFirst(start)
        start = 0
        buffer += chunk
        while buffer.count - start >= 4 {
            let length = buffer[start..<start + 4].reduce(0) { $0 << 8 | Int($1) }
            guard length <= ClientFrame.bytesMax else {
                end("node \(node) sent a \(length)-byte frame (limit \(ClientFrame.bytesMax))")
                return false
            }
            guard buffer.count - start >= 4 + length else { break }
            let body = Array(buffer[start + 4..<start + 4 + length])
            start += 4 + length
            do { deliver(try ClientFrame(body: body)) } catch {
                end("node \(node) sent a malformed frame: \(error)")
                return false
            }
        }
        return true
    }

    private func deliver(_ frame: ClientFrame) {
        let (waiter, idle) = state.withLock { s in
            let w = s.waiters.removeValue(forKey: frame.id)
            return (w, s.retired && s.waiters.isEmpty)
        }
        // An answer nobody waits for (its request timed out) is dropped.
        waiter?.continuation.resume(returning: frame)
        if idle { end("retired") }
    }

    private func expireOverdue() {
        let now = ContinuousClock.now
        let overdue = state.withLock { s -> [Waiter] in
            let ids = s.waiters.filter { $0.value.deadline <= now }.map(\.key)
            return ids.compactMap { s.waiters.removeValue(forKey: $0) }
        }
        for w in overdue { w.continuation.resume(throwing: Lost(description: "node \(node) did not answer in time", sent: true)) }
    }
}
