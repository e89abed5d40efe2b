// What one sync did, for logs, metrics and the benchmark.

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
    public var total: Duration = .zero

    public init() {}

    /// Everything except hashing and page transfer: the protocol's own cost.
    public var bookkeeping: Duration { total - hashing - transfer }
}

public struct SyncStats: Equatable, Sendable {
    public enum Role: String, Sendable { case primary, backup }

    public var role: Role
    public var session: UInt64
    public var geometry: SyncGeometry
    public var primaryDirtyPages = 0
    public var backupDirtyPages = 0
    public var unionPages = 0
    public var divergentPages = 0
    /// Control-frame bytes this side sent and received (the protocol's overhead).
    public var controlBytesSent = 0
    public var controlBytesReceived = 0
    /// Page bytes written into the backup (counted by the primary; zero on the backup).
    public var pageBytesSent = 0
    /// The backup re-hashed the received pages against the primary's digest.
    public var verified = false
    public var phases = SyncPhaseTimes()

    public init(role: Role, session: UInt64, geometry: SyncGeometry) {
        self.role = role
        self.session = session
        self.geometry = geometry
    }

    /// Bytes that crossed the link in either direction.
    public var wireBytes: Int { controlBytesSent + controlBytesReceived + pageBytesSent }
    public var controlBytes: Int { controlBytesSent + controlBytesReceived }
}

/// A finished sync: the numbers, and which pages were rewritten in the backup.
public struct SyncResult: Sendable {
    public var stats: SyncStats
    /// Pages whose backup copy differed and was replaced with the primary's.
    public var divergent: DirtyBitmap
}
