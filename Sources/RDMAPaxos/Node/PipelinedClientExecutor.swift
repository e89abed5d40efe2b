import Foundation
import Synchronization

/// A `PipelinedNodeClient`'s task executor: tasks that prefer it (`Task(executorPreference:)`,
/// `group.addTask(executorPreference:)`, `withTaskExecutorPreference`) run on the thread that
/// reads the client's current connection. An answer then resumes its task on the thread that
/// read it, with no hand-off to another thread, and the requests the resumed tasks make on that
/// connection in one turn leave together in one write once they ran (run to completion: read,
/// run, write once; a turn runs at most four rounds of jobs queued by jobs before it reads
/// again). With no connection yet, or after it ended, jobs run on Swift's global executor.
///
/// Tasks that prefer it must not block: a blocking call holds every answer on the connection.
/// The client itself connects to a new leader on that thread (bounded by its `timeout`); answers
/// that arrive meanwhile are still taken before any request is timed out.
public final class PipelinedClientExecutor: TaskExecutor, Sendable {
    private let session = Mutex<PipelinedSession?>(nil)

    init() {}

    /// Where jobs go from now on (nil: the global executor).
    func follow(_ s: PipelinedSession?) { session.withLock { $0 = s } }

    /// Whether the caller runs on the thread that reads the current connection.
    var onReaderThread: Bool { session.withLock { $0 }?.onReaderThread ?? false }

    /// Queues `job` for the current connection's reader thread, or on the global executor when
    /// there is none.
    public func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        if let s = session.withLock({ $0 }), s.take(job) { return }
        globalConcurrentExecutor.enqueue(ExecutorJob(job))
    }
}

/// The jobs a session's reader thread runs for its client's executor.
final class SessionJobs: Sendable {
    struct Queue {
        var jobs: [UnownedJob] = []
        /// The reader thread is gone: take no more.
        var finished = false
    }
    private let queue = Mutex(Queue())
    /// The reader thread (`pthread_self`), 0 until it starts.
    private let reader = Atomic<UInt>(0)

    /// Marks the calling thread as the reader.
    func readerStarted() { reader.store(UInt(pthread_self()), ordering: .releasing) }

    /// Whether the caller is the reader thread.
    var onReader: Bool { reader.load(ordering: .acquiring) == UInt(pthread_self()) }

    /// Queues `job`; false once the reader is gone. `ring` is called when the reader may be
    /// waiting for it: a job queued from another thread into an empty queue (a queue that held
    /// jobs already rang, or the reader is running it).
    func take(_ job: UnownedJob, ring: () -> Void) -> Bool {
        let mine = onReader
        let wake = queue.withLock { q -> Bool? in
            guard !q.finished else { return nil }
            q.jobs.append(job)
            return q.jobs.count == 1 && !mine
        }
        guard let wake else { return false }
        if wake { ring() }
        return true
    }

    /// Runs the queued jobs on `executor`, and those they queue, for at most `rounds` rounds;
    /// says whether jobs are still queued.
    func run(on executor: UnownedTaskExecutor, rounds: Int = 4) -> Bool {
        for _ in 0..<rounds {
            let batch = queue.withLock { q in defer { q.jobs = [] }; return q.jobs }
            if batch.isEmpty { return false }
            for job in batch { job.runSynchronously(on: executor) }
        }
        return queue.withLock { !$0.jobs.isEmpty }
    }

    /// The reader is done: no more jobs are taken, and those queued go to the global executor.
    func finish() {
        reader.store(0, ordering: .releasing)  // a later thread may reuse the id
        let left = queue.withLock { q in
            q.finished = true
            defer { q.jobs = [] }
            return q.jobs
        }
        for job in left { globalConcurrentExecutor.enqueue(ExecutorJob(job)) }
    }
}
