// syncvm: make a paused backup's guest memory equal to the paused primary's by sending only the
// pages that differ (PLOVER, NSDI'18). Sequence, formats and the not-in-sync rule are drawn in
// docs/design/syncvm.md, "syncvm".
//
// Both VMs must stay paused for the whole call. Pages outside the union of the two dirty sets
// are assumed equal: that is the contract of the dirty-page sources.

/// Why a sync failed. Bad bytes from the peer surface as `DecodeError`, a dropped link as
/// `SyncChannelError`.
public enum SyncError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The two guests' RAM differ in page size or page count.
    case geometryMismatch(primary: SyncGeometry, backup: SyncGeometry)
    /// The backup does not support page hash `algorithm`.
    case unsupportedHash(algorithm: UInt8)
    /// A dirty bitmap (local or the peer's) describes a different number of pages.
    case dirtyBitmapMismatch(pages: Int, expected: Int)
    /// A message arrived that is not the protocol's next step.
    case unexpectedMessage(expected: String, got: String)
    /// A frame of another session arrived, or a backup given `expectedSession` got a hello of another.
    case wrongSession(expected: UInt64, got: UInt64)
    /// The backup's hashes did not arrive in order or in the agreed number.
    case hashSequence(String)
    /// The primary claims to have written a page outside the dirty union.
    case commitOutsideUnion(page: Int)
    /// The backup's re-hash of the written pages did not match the primary's digest.
    case verifyFailed(session: UInt64)
    /// The backup's guest memory is mapped read-only.
    case backupNotWritable(path: String)

    public var description: String {
        switch self {
        case .geometryMismatch(let p, let b):
            return "guest memory differs in shape: primary has \(p), backup has \(b)"
        case .unsupportedHash(let a):
            return "the backup does not support page hash algorithm \(a) (this version supports only XXH3-64, algorithm \(SyncWire.hashAlgorithmXXH3_64))"
        case .dirtyBitmapMismatch(let n, let e):
            return "dirty bitmap covers \(n) pages, guest memory has \(e)"
        case .unexpectedMessage(let e, let g):
            return "expected \(e) from the peer, got \(g)"
        case .wrongSession(let e, let g):
            return "frame of sync session \(g) arrived during session \(e)"
        case .hashSequence(let why):
            return "backup hashes out of sequence: \(why)"
        case .commitOutsideUnion(let p):
            return "primary committed page \(p), which is in neither dirty set"
        case .verifyFailed(let s):
            return "session \(s): backup pages do not hash to the primary's digest after transfer"
        case .backupNotWritable(let path):
            return "backup guest memory \(path) is mapped read-only"
        }
    }
}

/// How one side runs a sync. The primary's `verify` decides for both sides; `batchPagesMax`
/// counts on the primary, `hashesPerFrameMax` on the backup.
public struct SyncOptions: Sendable {
    /// Ask the backup to re-hash the written pages before it claims sync.
    public var verify = true
    /// Pages per bulk write (one RDMA write batch). 256 pages = 1 MiB.
    public var batchPagesMax = 256
    /// Hashes per control frame; at most `SyncWire.hashesPerFrameMax`.
    public var hashesPerFrameMax = SyncWire.hashesPerFrameMax
    /// Called as the sync passes each `SyncProgress` step (a checkpoint's failpoints use it).
    public var onProgress: (@Sendable (SyncProgress) -> Void)?

    /// Traps when `batchPagesMax` is not positive or `hashesPerFrameMax` is outside
    /// `1...SyncWire.hashesPerFrameMax`.
    public init(verify: Bool = true, batchPagesMax: Int = 256, hashesPerFrameMax: Int = SyncWire.hashesPerFrameMax) {
        precondition(batchPagesMax >= 1, "batchPagesMax must be positive")
        precondition((1...SyncWire.hashesPerFrameMax).contains(hashesPerFrameMax), "hashesPerFrameMax outside the wire limit")
        self.verify = verify
        self.batchPagesMax = batchPagesMax
        self.hashesPerFrameMax = hashesPerFrameMax
    }
}

/// Steps of one sync that its caller may observe (`SyncOptions.onProgress`).
public enum SyncProgress: Sendable, Equatable {
    /// Every page hash was exchanged; no page has been written yet.
    case hashesExchanged
    /// Primary: the first batch of pages was written into the backup.
    case firstPagesWritten
    /// Backup: the primary's commit arrived (every page landed; none confirmed yet).
    case commitReceived
}

/// Frame I/O for one session: encodes, decodes, checks the session and counts bytes.
struct SessionLink<Channel: SyncChannel> {
    let channel: Channel
    var session: UInt64
    var bytesSent = 0
    var bytesReceived = 0

    mutating func send(_ m: SyncMessage) async throws {
        let bytes = SyncFrame(session: session, m).encoded()
        try await channel.send(bytes)
        bytesSent += bytes.count
    }

    mutating func receive() async throws -> SyncMessage {
        let bytes = try await channel.receive()
        bytesReceived += bytes.count
        let frame = try SyncFrame.decode(bytes)
        guard frame.session == session else { throw SyncError.wrongSession(expected: session, got: frame.session) }
        return frame.message
    }
}

/// Digest the backup checks after transfer: XXH3 of the written pages' hashes, big-endian, in
/// ascending page order.
func writtenDigest(_ hashes: [UInt64], seed: UInt64, function: PageHashFunction) -> UInt64 {
    var w = ByteWriter(capacity: hashes.count * 8)
    w.u64s(hashes)
    return w.bytes.withUnsafeBytes { function.hash($0, seed: seed) }
}

func elapsed(since start: inout ContinuousClock.Instant) -> Duration {
    let now = ContinuousClock.now
    defer { start = now }
    return now - start
}

// MARK: - Primary

/// The primary's side of syncvm.
public struct SyncPrimary: Sendable {
    /// The primary's guest RAM; the sync only reads it.
    public let memory: GuestMemory
    /// Threads that hash the pages of the dirty union.
    public let pool: PageHashPool
    /// Whether the backup verifies, and how many pages go in one bulk write.
    public let options: SyncOptions

    /// The primary's side over `memory`; nothing is sent before `run`.
    public init(memory: GuestMemory, pool: PageHashPool, options: SyncOptions = SyncOptions()) {
        self.memory = memory
        self.pool = pool
        self.options = options
    }

    /// Runs one sync. `dirty` holds the pages the primary wrote since the last sync. The
    /// channel is closed if the sync fails, so the backup does not wait forever.
    public func run(dirty: DirtyBitmap, over channel: some SyncChannel,
                    session: UInt64 = .random(in: 1...UInt64.max),
                    seed: UInt64 = .random(in: 0...UInt64.max)) async throws -> SyncResult {
        do {
            return try await sync(dirty: dirty, channel: channel, session: session, seed: seed)
        } catch {
            channel.close()
            throw error
        }
    }

    private func sync(dirty: DirtyBitmap, channel: some SyncChannel, session: UInt64, seed: UInt64) async throws -> SyncResult {
        let geometry = SyncGeometry(memory)
        guard dirty.pageCount == memory.pageCount else {
            throw SyncError.dirtyBitmapMismatch(pages: dirty.pageCount, expected: memory.pageCount)
        }
        var stats = SyncStats(role: .primary, session: session, geometry: geometry)
        var link = SessionLink(channel: channel, session: session)
        let start = ContinuousClock.now
        var mark = start

        // Hello and bitmap go out together: one round trip for both.
        try await link.send(.hello(SyncHello(geometry: geometry, hashAlgorithm: SyncWire.hashAlgorithmXXH3_64,
                                             verify: options.verify, seed: seed)))
        // A backup that rejects the hello may close the link before the bitmap is sent; its
        // reply is still readable and says more than "closed", so read it first.
        var bitmapSendError: (any Error)?
        do { try await link.send(.dirtyBitmap(dirty)) } catch { bitmapSendError = error }
        switch try await link.receive() {
        case .helloReply(.accepted, let theirs) where theirs == geometry: break
        case .helloReply(.unsupportedHash, _): throw SyncError.unsupportedHash(algorithm: SyncWire.hashAlgorithmXXH3_64)
        case .helloReply(_, let theirs): throw SyncError.geometryMismatch(primary: geometry, backup: theirs)
        case let other: throw SyncError.unexpectedMessage(expected: "hello reply", got: other.name)
        }
        if let bitmapSendError { throw bitmapSendError }
        stats.phases.handshake = elapsed(since: &mark)

        guard case .dirtyBitmap(let theirs) = try await link.receive() else {
            throw SyncError.unexpectedMessage(expected: "dirty bitmap", got: "another message")
        }
        guard theirs.pageCount == geometry.pageCount else {
            throw SyncError.dirtyBitmapMismatch(pages: theirs.pageCount, expected: geometry.pageCount)
        }
        let union = dirty.union(theirs)
        let pages = union.pageIndices
        stats.primaryDirtyPages = dirty.count
        stats.backupDirtyPages = theirs.count
        stats.unionPages = pages.count
        stats.phases.bitmapExchange = elapsed(since: &mark)

        // The backup hashes the same list at the same time. This blocks the task's thread (which
        // hashes too) on purpose: the VMs are paused and hashing is the work to be done.
        let mine = pool.hash(pages: pages, of: memory, seed: seed)
        stats.phases.hashing = elapsed(since: &mark)

        var divergent = [UInt32]()
        var received = 0
        while received < pages.count {
            guard case .hashes(let first, let values) = try await link.receive() else {
                throw SyncError.unexpectedMessage(expected: "hashes", got: "another message")
            }
            guard first == received, !values.isEmpty, values.count <= pages.count - received else {
                throw SyncError.hashSequence("got \(values.count) hashes from entry \(first), expected entry \(received) of \(pages.count)")
            }
            for (i, h) in values.enumerated() where mine[first + i] != h {
                divergent.append(pages[first + i])
            }
            received += values.count
        }
        stats.divergentPages = divergent.count
        stats.phases.hashExchange = elapsed(since: &mark)
        options.onProgress?(.hashesExchanged)

        var sent = 0
        while sent < divergent.count {
            let batch = divergent[sent..<min(sent + options.batchPagesMax, divergent.count)]
            try await channel.writePages(batch, from: memory)
            if sent == 0 { options.onProgress?(.firstPagesWritten) }
            sent += batch.count
        }
        stats.pageBytesSent = divergent.count * geometry.pageSize
        stats.phases.transfer = elapsed(since: &mark)

        // Hashes of the written pages, in the order `divergent` (ascending) lists them.
        var writtenHashes = [UInt64]()
        writtenHashes.reserveCapacity(divergent.count)
        var j = 0
        for (i, p) in pages.enumerated() where j < divergent.count && divergent[j] == p {
            writtenHashes.append(mine[i])
            j += 1
        }
        let digest = writtenDigest(writtenHashes, seed: seed, function: pool.function)
        let written = DirtyBitmap(pageCount: geometry.pageCount, pages: divergent)
        try await link.send(.commit(digest: digest, written: written))
        switch try await link.receive() {
        case .commitReply(.inSync): break
        case .commitReply(.verifyFailed): throw SyncError.verifyFailed(session: session)
        case let other: throw SyncError.unexpectedMessage(expected: "commit reply", got: other.name)
        }
        stats.verified = options.verify
        stats.phases.commit = elapsed(since: &mark)
        stats.phases.total = mark - start
        stats.controlBytesSent = link.bytesSent
        stats.controlBytesReceived = link.bytesReceived
        return SyncResult(stats: stats, divergent: written)
    }
}

// MARK: - Backup

/// The backup's side of syncvm. Records "not in sync" in `state` before any page can land and
/// "in sync" only after a complete (and, if asked, verified) commit whose reply was sent.
public struct SyncBackup: Sendable {
    /// The backup's guest RAM, where the primary's pages land; it must be writable.
    public let memory: GuestMemory
    /// Threads that hash the pages of the dirty union.
    public let pool: PageHashPool
    /// Where the backup records whether its memory is in sync.
    public let state: any SyncStateStore
    /// How many hashes go in one frame (the primary's hello decides `verify`).
    public let options: SyncOptions
    /// Where the pages the primary may overwrite are copied before it may write any (nil: no
    /// copies; a sync cut off after pages landed then leaves the memory half-written).
    public let undo: PageUndoLog?

    /// The backup's side over `memory`; nothing is read or stored before `run`.
    public init(memory: GuestMemory, pool: PageHashPool, state: any SyncStateStore,
                options: SyncOptions = SyncOptions(), undo: PageUndoLog? = nil) {
        self.memory = memory
        self.pool = pool
        self.state = state
        self.options = options
        self.undo = undo
    }

    /// Serves one sync. `dirty` holds the pages the backup VM wrote since the last sync. The
    /// channel is closed if the sync fails. With `expectedSession`, a hello of any other session
    /// is refused before anything is written (a VM replica passes its checkpoint's epoch, so a
    /// backup that is late for one checkpoint cannot take the primary's next one for it).
    public func run(dirty: DirtyBitmap, over channel: some SyncChannel, expectedSession: UInt64? = nil) async throws -> SyncResult {
        do {
            return try await sync(dirty: dirty, channel: channel, expectedSession: expectedSession)
        } catch {
            channel.close()
            throw error
        }
    }

    private func sync(dirty: DirtyBitmap, channel: some SyncChannel, expectedSession: UInt64?) async throws -> SyncResult {
        let geometry = SyncGeometry(memory)
        guard memory.isWritable else { throw SyncError.backupNotWritable(path: memory.path ?? "(anonymous)") }
        guard dirty.pageCount == memory.pageCount else {
            throw SyncError.dirtyBitmapMismatch(pages: dirty.pageCount, expected: memory.pageCount)
        }
        let start = ContinuousClock.now
        var mark = start

        // The session number comes from the primary's first frame.
        let firstBytes = try await channel.receive()
        let first = try SyncFrame.decode(firstBytes)
        guard case .hello(let hello) = first.message else {
            throw SyncError.unexpectedMessage(expected: "hello", got: first.message.name)
        }
        if let expectedSession, first.session != expectedSession {
            throw SyncError.wrongSession(expected: expectedSession, got: first.session)
        }
        var link = SessionLink(channel: channel, session: first.session)
        link.bytesReceived = firstBytes.count
        var stats = SyncStats(role: .backup, session: first.session, geometry: geometry)

        // Before anything can be written into this memory.
        try state.store(.notInSync(reason: "sync session \(first.session) started and did not finish"))

        guard hello.hashAlgorithm == SyncWire.hashAlgorithmXXH3_64 else {
            try? await link.send(.helloReply(.unsupportedHash, geometry))
            throw SyncError.unsupportedHash(algorithm: hello.hashAlgorithm)
        }
        guard hello.geometry == geometry else {
            try? await link.send(.helloReply(.geometryMismatch, geometry))
            throw SyncError.geometryMismatch(primary: hello.geometry, backup: geometry)
        }
        try await link.send(.helloReply(.accepted, geometry))
        stats.phases.handshake = elapsed(since: &mark)

        guard case .dirtyBitmap(let theirs) = try await link.receive() else {
            throw SyncError.unexpectedMessage(expected: "dirty bitmap", got: "another message")
        }
        guard theirs.pageCount == geometry.pageCount else {
            throw SyncError.dirtyBitmapMismatch(pages: theirs.pageCount, expected: geometry.pageCount)
        }
        try await link.send(.dirtyBitmap(dirty))
        let union = dirty.union(theirs)
        let pages = union.pageIndices
        stats.primaryDirtyPages = theirs.count
        stats.backupDirtyPages = dirty.count
        stats.unionPages = pages.count
        stats.phases.bitmapExchange = elapsed(since: &mark)

        let mine = pool.hash(pages: pages, of: memory, seed: hello.seed)
        // The primary writes only after it has every hash: the union is still untouched here.
        undo?.save(pages, of: memory)
        stats.phases.hashing = elapsed(since: &mark)

        var next = 0
        while next < mine.count {
            let end = min(next + options.hashesPerFrameMax, mine.count)
            try await link.send(.hashes(first: next, values: Array(mine[next..<end])))
            next = end
        }
        stats.phases.hashExchange = elapsed(since: &mark)
        options.onProgress?(.hashesExchanged)

        // The primary's bulk writes have landed by the time its commit arrives.
        guard case .commit(let digest, let written) = try await link.receive() else {
            throw SyncError.unexpectedMessage(expected: "commit", got: "another message")
        }
        stats.phases.transfer = elapsed(since: &mark)
        options.onProgress?(.commitReceived)
        guard written.pageCount == geometry.pageCount else {
            throw SyncError.dirtyBitmapMismatch(pages: written.pageCount, expected: geometry.pageCount)
        }
        var outside: Int?
        written.forEachPage { p in if outside == nil && !union.contains(p) { outside = p } }
        if let outside { throw SyncError.commitOutsideUnion(page: outside) }
        stats.divergentPages = written.count

        if hello.verify {
            let now = pool.hash(pages: written.pageIndices, of: memory, seed: hello.seed)
            guard writtenDigest(now, seed: hello.seed, function: pool.function) == digest else {
                try? await link.send(.commitReply(.verifyFailed))
                throw SyncError.verifyFailed(session: first.session)
            }
            stats.verified = true
        }
        try state.store(.inSync(session: first.session))
        do {
            try await link.send(.commitReply(.inSync))
        } catch {
            // The primary never learns that the commit took, so it fails its checkpoint and
            // resumes without sending the rest (a VM's device state): memory holding its pages
            // is then no state it agreed to. Say so, and the caller rolls back with `undo`.
            try? state.store(.notInSync(reason: "sync session \(first.session) committed but its reply was not delivered"))
            throw error
        }
        stats.phases.commit = elapsed(since: &mark)
        stats.phases.total = mark - start
        stats.controlBytesSent = link.bytesSent
        stats.controlBytesReceived = link.bytesReceived
        return SyncResult(stats: stats, divergent: written)
    }
}
