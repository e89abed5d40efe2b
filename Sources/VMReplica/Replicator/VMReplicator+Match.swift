// Release on match, the effects: the backup digests its guest's frames and sends the digests over
// the syncvm link (between checkpoints: a checkpoint's frames and the digests never share the
// link's one sender at once); the primary's link takes them aside as they arrive and hands them
// to the output guard. docs/design/vmreplica.md, "Release on match".

#if canImport(Glibc)
import Glibc
#endif
import Foundation
import RDMAPaxos

/// The backup's digests on their way to the primary, and the gate that keeps the digest sender
/// and a checkpoint from sending on the link at the same time.
final class DigestOutbox: @unchecked Sendable {
    // @unchecked Sendable: every field is guarded by `cond`.
    private let cond = NSCondition()
    private var queue: [(generation: UInt64, digest: OutputDigest)] = []
    private var sending = false
    private var checkpointHolds = false
    /// Digests queued but never sent (no link, a send failed, the queue was full).
    private(set) var lost: UInt64 = 0
    private(set) var sent: UInt64 = 0
    /// Most digests waiting; more are lost (the primary then waits for a checkpoint).
    static let queueMax = 65_536

    func add(generation: UInt64, _ d: OutputDigest) {
        cond.withLock {
            guard queue.count < Self.queueMax else { lost += 1; return }
            queue.append((generation, d))
            cond.signal()
        }
    }

    /// The next batch to send — digests of one generation, in order — once no checkpoint holds
    /// the link; nil after `timeout` without one.
    func next(timeout: Duration) -> (UInt64, [OutputDigest])? {
        cond.withLock {
            let deadline = Date().addingTimeInterval(Double(timeout.components.seconds) + Double(timeout.components.attoseconds) / 1e18)
            while queue.isEmpty || checkpointHolds {
                if !cond.wait(until: deadline) { return nil }
            }
            let g = queue[0].generation
            let n = min(queue.prefix { $0.generation == g }.count, SyncWire.outputDigestsPerFrameMax)
            let batch = queue.prefix(n).map(\.digest)
            queue.removeFirst(n)
            sending = true
            return (g, batch)
        }
    }

    /// The batch `next` gave went out (`ok`) or was lost.
    func done(_ count: Int, ok: Bool) {
        cond.withLock {
            if ok { sent += UInt64(count) } else { lost += UInt64(count) }
            sending = false
            cond.broadcast()
        }
    }

    /// A checkpoint is about to use the link: waits for a batch in flight, then holds the sender.
    func holdForCheckpoint() {
        cond.withLock {
            while sending { cond.wait() }
            checkpointHolds = true
        }
    }

    /// The checkpoint is done with the link.
    func releaseFromCheckpoint() {
        cond.withLock {
            checkpointHolds = false
            cond.broadcast()
        }
    }
}

extension VMReplicator {
    /// Backup, release on match: the digest of a frame its current VM (installed by checkpoint
    /// `generation`) sent, queued for the primary.
    func noteBackupOutput(_ frame: [UInt8], generation: UInt64) {
        var d = OutputDigest(of: frame)
        outputFailpoint?.perturb(&d)
        digestOutbox.add(generation: generation, d)
    }

    /// The backup's digest sender: one thread sending batches while this replica is a backup
    /// with a link up; a batch that cannot go is lost (the primary's held frames then wait for
    /// `output_hold_max_ms` and a checkpoint).
    func startDigestSender() {
        let t = Thread(named: "vm-digests") { [self] in
            while !isStopped {
                guard let (generation, batch) = digestOutbox.next(timeout: .milliseconds(100)) else { continue }
                if let trace { for d in batch { trace.note("digest-take", d.content) } }
                let ch = lock.withLock { machine.role == .backup ? channel : nil }
                guard let ch, !ch.isPrimary, !ch.isDown else {
                    digestOutbox.done(batch.count, ok: false)
                    continue
                }
                let bytes = SyncFrame(session: 0, .outputDigests(generation: generation, digests: batch)).encoded()
                let ok = send(bytes, over: ch)
                if let trace { for d in batch { trace.note("digest-sent", d.content) } }
                digestOutbox.done(batch.count, ok: ok)
            }
        }
        t.start()
    }

    /// Sends one frame from this plain thread. A send that makes no progress for
    /// `checkpoint_timeout_ms` means a stuck link: it is closed (the scheduler connects again),
    /// so a checkpoint waiting for the link's sender is never held longer.
    private func send(_ bytes: [UInt8], over ch: FabricSyncChannel) -> Bool {
        let sent = Box<Void>()
        let done = DispatchSemaphore(value: 0)
        Task {
            do { sent.result = .success(try await ch.send(bytes)) } catch { sent.result = .failure(error) }
            done.signal()
        }
        if done.wait(timeout: .now() + .milliseconds(config.checkpointTimeoutMilliseconds)) == .timedOut {
            logger.warning("vm: output digests to node \(config.peer) made no progress for \(config.checkpointTimeoutMilliseconds) ms; closing the syncvm link")
            ch.close()
            done.wait()
        }
        return (try? sent.result?.get()) != nil
    }

    /// Primary: what its syncvm link takes aside — the backup's output digests.
    var digestDivert: FabricSyncChannel.Divert {
        FabricSyncChannel.Divert(selects: SyncFrame.isOutputDigests) { [weak self] frames in
            guard let self else { return }
            for bytes in frames {
                do {
                    guard case let .outputDigests(generation, digests) = try SyncFrame.decode(bytes).message else { continue }
                    if let trace { for d in digests { trace.note("digest-recv", d.content) } }
                    outputs.backupDigests(generation: generation, digests)
                } catch {
                    logger.warning("vm: dropped a malformed output-digests frame from node \(config.peer): \(error)")
                }
            }
        }
    }
}

/// A failpoint that makes the backup's output differ from the primary's: with
/// `PLOVER_VM_FAILPOINTS=1` and `run_dir/perturb-output` holding N, the backup changes the
/// digest of every N-th TCP segment with payload its guest sends (as if the frame's bytes
/// differed) and logs it to `perturbed.log`; a primary with failpoints logs every frame a match
/// released to `released-by-match.log`. Lines are "stream seq ack bytes" in hex/decimal.
final class OutputFailpoint: @unchecked Sendable {
    // @unchecked Sendable: `count` is guarded by `lock`; the files are append-only.
    private let lock = NSLock()
    private let every: Int?
    private var count = 0
    let perturbedLog: String
    let releasedLog: String

    init?(runDir: String, environment: [String: String] = ProcessInfo.processInfo.environment) {
        guard environment["PLOVER_VM_FAILPOINTS"] == "1" else { return nil }
        let text = try? String(contentsOfFile: runDir + "/perturb-output", encoding: .utf8)
        every = text.flatMap { Int($0.trimmingCharacters(in: .whitespacesAndNewlines)) }.flatMap { $0 > 0 ? $0 : nil }
        perturbedLog = runDir + "/perturbed.log"
        releasedLog = runDir + "/released-by-match.log"
    }

    static func line(_ d: OutputDigest) -> String {
        "\(String(d.stream, radix: 16)) \(d.sequence) \(d.acknowledgement) \(d.payloadBytes)\n"
    }

    /// Changes every N-th TCP digest with payload and logs it.
    func perturb(_ d: inout OutputDigest) {
        guard let every, d.kind == .tcp, d.payloadBytes > 0 else { return }
        let fire = lock.withLock { () -> Bool in
            count += 1
            return count % every == 0
        }
        guard fire else { return }
        d.content ^= 1
        append(Self.line(d), to: perturbedLog)
    }

    /// Logs a frame a match released.
    func released(_ d: OutputDigest) { append(Self.line(d), to: releasedLog) }

    private func append(_ s: String, to path: String) {
        let fd = open(path, O_WRONLY | O_CREAT | O_APPEND, 0o644)
        guard fd >= 0 else { return }
        _ = s.utf8CString.withUnsafeBufferPointer { write(fd, $0.baseAddress, $0.count - 1) }
        close(fd)
    }
}
