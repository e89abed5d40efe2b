// What one sync did, for logs, metrics and the benchmark.

/// How long each phase of one sync took on one side.
public struct SyncPhaseTimes: Equatable, Sendable {
    /// hello and hello reply.
    public var handshake: Duration = .zero
    /// Dirty bitmaps both ways, and the union.
    public var bitmapExchange: Duration = .zero
    /// Hashing this side's copy of the union's pages.
    public var hashing: Duration = .zero
    /// Backup hashes crossing over (primary: waiting for and comparing them).
    public var hashExchange: Duration = .zero
    /// Divergent pages landing in the backup (primary only).
    public var transfer: Duration = .zero
    /// Commit, the optional verify re-hash, and the backup's state update.
    public var commit: Duration = .zero
    /// The whole sync on this side, every phase included.
    public var total: Duration = .zero

    /// Every phase zero.
    public init() {}

    /// Everything except hashing and page transfer: the protocol's own cost.
    public var bookkeeping: Duration { total - hashing - transfer }
}

/// What one sync did on one side: page counts, bytes on the link, phase times.
public struct SyncStats: Equatable, Sendable {
    /// Which side of a sync the numbers come from.
    public enum Role: String, Sendable { case primary, backup }

    /// The side that counted.
    public var role: Role
    /// The sync's session number.
    public var session: UInt64
    /// The guest RAM shape both sides share.
    public var geometry: SyncGeometry
    /// Pages in the primary's dirty set.
    public var primaryDirtyPages = 0
    /// Pages in the backup's dirty set.
    public var backupDirtyPages = 0
    /// Pages in the union of both sets: the pages each side hashed.
    public var unionPages = 0
    /// Pages of the union whose copies differed: rewritten in the backup.
    public var divergentPages = 0
    /// Control-frame bytes this side sent (the protocol's overhead).
    public var controlBytesSent = 0
    /// Control-frame bytes this side received.
    public var controlBytesReceived = 0
    /// Page bytes written into the backup (counted by the primary; zero on the backup).
    public var pageBytesSent = 0
    /// The backup re-hashed the received pages against the primary's digest.
    public var verified = false
    /// How long each phase took.
    public var phases = SyncPhaseTimes()

    /// Zero counts for a sync of `session` on `role`'s side.
    public init(role: Role, session: UInt64, geometry: SyncGeometry) {
        self.role = role
        self.session = session
        self.geometry = geometry
    }

    /// Bytes that crossed the link in either direction.
    public var wireBytes: Int { controlBytesSent + controlBytesReceived + pageBytesSent }
    /// Control-frame bytes in both directions.
    public var controlBytes: Int { controlBytesSent + controlBytesReceived }
}

/// A finished sync: the numbers, and which pages were rewritten in the backup.
public struct SyncResult: Sendable {
    /// What the sync did and how long it took.
    public var stats: SyncStats
    /// Pages whose backup copy differed and was replaced with the primary's.
    public var divergent: DirtyBitmap
}
