// The public vocabulary of `FabricSyncChannel`: its errors, configuration, fault injection and
// counters (the channel itself: FabricSyncChannel.swift).

import Synchronization

/// Why a `FabricSyncChannel` could not be set up, or why it failed other than by a dropped
/// link (that is `SyncChannelError.closed`).
public enum FabricSyncChannelError: Error, Equatable, Sendable, CustomStringConvertible {
    /// `ringBytes` is not a multiple of 64 in 4096...2^30, or `writeBytesMax` or
    /// `signalEveryWrites` is not positive; the string says which.
    case badConfiguration(String)
    /// The backup's guest memory has no room after its RAM for the mailbox.
    case noMailboxRoom(trailingBytes: Int, needed: Int)
    /// The peer's region cannot hold what this side expects (sizes or ring configuration differ).
    case peerRegionMismatch(String)
    /// A complete, checksummed record broke the mailbox rules: a peer bug, not a torn write.
    case protocolViolation(String)

    public var description: String {
        switch self {
        case .badConfiguration(let why): return "bad sync channel configuration: \(why)"
        case .noMailboxRoom(let have, let need):
            return "backup guest memory has \(have) trailing bytes; the sync mailbox needs \(need) (GuestMemory trailingBytes)"
        case .peerRegionMismatch(let why): return "peer's sync region does not match: \(why)"
        case .protocolViolation(let why): return "sync mailbox protocol violated by the peer: \(why)"
        }
    }
}

extension FabricSyncChannel {
    /// How a channel sizes its mailbox ring, batches its page writes and times its thread.
    public struct Configuration: Sendable {
        /// Data bytes of each side's ring; a record carries at most half. Both sides must agree.
        public var ringBytes: Int
        /// Largest single page WRITE (contiguous pages are coalesced up to this).
        public var writeBytesMax: Int
        /// Request a completion every this many writes (selective signalling).
        public var signalEveryWrites: Int
        /// How long the receiving thread sleeps when no immediate wakes it.
        public var pollInterval: Duration
        /// How often an idle side writes its status cell, so a dead peer shows up as a failed write.
        public var keepaliveInterval: Duration
        /// How long `close()` waits for its "closed" mark to land before dropping the connection.
        public var closeLinger: Duration
        /// Faults to inject (none by default).
        public var faults: Faults

        /// Defaults: a 1 MiB ring, page WRITEs of up to 1 MiB, a completion every 32 writes, 5 ms
        /// polls, a keepalive every 100 ms and 1 s to linger on close.
        public init(ringBytes: Int = 1 << 20, writeBytesMax: Int = 1 << 20, signalEveryWrites: Int = 32,
                    pollInterval: Duration = .milliseconds(5), keepaliveInterval: Duration = .milliseconds(100),
                    closeLinger: Duration = .seconds(1), faults: Faults = Faults()) {
            self.ringBytes = ringBytes
            self.writeBytesMax = writeBytesMax
            self.signalEveryWrites = signalEveryWrites
            self.pollInterval = pollInterval
            self.keepaliveInterval = keepaliveInterval
            self.closeLinger = closeLinger
            self.faults = faults
        }

        /// Bytes of one mailbox; the backup's `GuestMemory` needs at least this many `trailingBytes`.
        public var mailboxBytes: Int { MailboxLayout.ringOffset + ringBytes }

        /// The largest single WRITE a channel posts — a page batch, or a ring record (at most half
        /// the ring) — which its fabric must accept (`VerbsFabric.Configuration.slotBytesMax`).
        public var writeBytesLargest: Int { max(writeBytesMax, ringBytes / 2, MailboxLayout.ringOffset) }
    }

    /// Faults to inject, for tests of interrupted syncs. A cut drops the connection without a
    /// goodbye, as a failed link would; the peer finds out through its own queue pair.
    public struct Faults: Sendable {
        /// Land this many pages in total, then cut the link.
        public var cutAfterPages: Int?
        /// Send this many control frames in total — counted over every end given (a copy of)
        /// this value — then cut the link.
        public var cutAfterFrames: Int?
        let tally = FrameTally()
        /// No faults unless a limit is given.
        public init(cutAfterPages: Int? = nil, cutAfterFrames: Int? = nil) {
            self.cutAfterPages = cutAfterPages
            self.cutAfterFrames = cutAfterFrames
        }
    }

    /// What this end put on the link and took off it.
    public struct Counters: Equatable, Sendable {
        /// Control frames sent.
        public var framesSent = 0
        /// Control frames received whole.
        public var framesReceived = 0
        /// Bytes of the control frames sent (the sync messages themselves).
        public var controlBytesSent = 0
        /// Bytes of the control frames received.
        public var controlBytesReceived = 0
        /// Primary: pages written by one-sided WRITEs and known landed.
        public var pagesWritten = 0
        /// Primary: bytes of those pages.
        public var pageBytesWritten = 0
        /// Primary: the WRITEs that carried them (contiguous pages share one).
        public var pageWrites = 0
        /// Backup: pages the primary announced as landed ("pages done" records).
        public var pagesLanded = 0
        /// Records posted into the peer's ring (fragments, wrap markers, "pages done").
        public var recordsPosted = 0
        /// Bytes of those records beyond the frame bytes they carry.
        public var recordOverheadBytes = 0
        /// Credit and status cells written (flow control, keepalive, goodbye).
        public var cellWrites = 0
        /// Bytes of those cell writes.
        public var cellBytes = 0
        /// Every byte this end wrote into the peer: frames, record overhead, cells and pages.
        public var postedBytes: Int { controlBytesSent + recordOverheadBytes + cellBytes + pageBytesWritten }
    }
}

/// Frames sent by every end sharing one `Faults` value.
final class FrameTally: Sendable {
    private let sent = Mutex(0)
    /// Counts one more frame unless `limit` were already sent.
    func take(limit: Int) -> Bool {
        sent.withLock { n in
            guard n < limit else { return false }
            n += 1
            return true
        }
    }
}

extension FabricSyncChannel {
    /// Frames an endpoint takes aside as they arrive, outside any session: `selects` is asked for
    /// every received frame (cheaply: it runs under the channel's lock), and the selected ones go
    /// to `handle`, in arrival order, on the channel's receiving thread.
    public struct Divert: Sendable {
        /// Whether the frame is one to take aside.
        public let selects: @Sendable ([UInt8]) -> Bool
        /// Takes the selected frames, oldest first.
        public let handle: @Sendable ([[UInt8]]) -> Void
        /// A divert of the frames `selects` picks to `handle`.
        public init(selects: @escaping @Sendable ([UInt8]) -> Bool, handle: @escaping @Sendable ([[UInt8]]) -> Void) {
            self.selects = selects
            self.handle = handle
        }
    }
}
