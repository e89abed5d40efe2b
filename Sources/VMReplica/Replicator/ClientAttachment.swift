// Where the replicated guest's network meets its clients (`network` in the [vm] table): the line
// front (ClientFront.swift) or a tap device on the clients' bridge. The output guard holds the
// guest's Ethernet frames and hands released ones to the attachment; the replica machine's
// `takeAttachment` / `leaveAttachment` actions say when this replica's attachment serves.
// docs/design/vmreplica.md, "Tap attachment".

#if canImport(Glibc)
import Glibc
#endif
import Foundation
import RDMAPaxos

/// How the guest's frames reach clients, and whether this replica takes clients' frames in.
protocol ClientAttachment: AnyObject, Sendable {
    /// Whether the output guard should hold `frame` of the guest (the front only carries its answers).
    func carries(_ frame: [UInt8]) -> Bool
    /// Sends a released frame of the guest to clients.
    func deliver(_ frame: [UInt8])
    /// The machine's `takeAttachment`: this replica's VM is the one clients reach from here.
    func take(announce: Bool)
    /// The machine's `leaveAttachment`: it no longer is.
    func leave()
    func stop()
    /// `key=value` words for `plover vm status`.
    var status: String { get }
}

/// The line front as an attachment: the guest's UDP answers go to the connection that asked.
/// Whether a line is taken is decided per line (`VMReplicator.refusal`), so take/leave change nothing.
final class LineFrontAttachment: ClientAttachment {
    let front: ClientFront
    let link: GuestLink

    init(front: ClientFront, link: GuestLink) {
        self.front = front
        self.link = link
    }

    func carries(_ frame: [UInt8]) -> Bool { link.answer(frame) != nil }
    func deliver(_ frame: [UInt8]) { if let a = link.answer(frame) { front.deliver(a) } }
    func take(announce: Bool) {}
    func leave() {}
    func stop() { front.stop() }
    var status: String { "attachment=front front_port=\(front.port)" }
}

/// A tap device on the clients' bridge. Both VM replicas have one on the same segment, so the
/// bridge floods clients' broadcasts (and unicast it has not learnt) to both: only the replica
/// that serves hands what it reads to `propose`; the other reads and discards. The guest's
/// released frames are written to the tap, and taking the attachment over announces the guest
/// with a gratuitous ARP, so the bridge learns its MAC on this replica's port.
final class TapAttachment: ClientAttachment, @unchecked Sendable {
    // @unchecked Sendable: the counters and `serving` are guarded by `lock`; `tap` is thread-safe.
    let tap: TapDevice
    let link: GuestLink
    private let propose: @Sendable ([UInt8]) -> Void
    private let lock = NSLock()
    private var serving = false
    private(set) var proposed: UInt64 = 0
    private(set) var discarded: UInt64 = 0
    private(set) var written: UInt64 = 0
    private(set) var writeFailures: UInt64 = 0
    private(set) var announcements: UInt64 = 0

    /// Reads `tap` on a thread of its own from now on; frames for the guest go to `propose`
    /// while this replica serves.
    init(tap: TapDevice, link: GuestLink, propose: @escaping @Sendable ([UInt8]) -> Void) {
        self.tap = tap
        self.link = link
        self.propose = propose
        let t = Thread(named: "plover-vm-tap") { [self] in readLoop() }
        t.start()
    }

    private func readLoop() {
        while !tap.isClosed {
            guard let frame = tap.read(timeout: .milliseconds(100)) else { continue }
            // One decision per frame, in read order; proposals from this one thread keep it.
            let take = lock.withLock { () -> Bool in
                guard serving, link.isForGuest(frame) else {
                    discarded += 1
                    return false
                }
                proposed += 1
                return true
            }
            if take { propose(frame) }
        }
    }

    func carries(_ frame: [UInt8]) -> Bool { true }

    func deliver(_ frame: [UInt8]) {
        let ok = tap.write(frame)
        lock.withLock { if ok { written += 1 } else { writeFailures += 1 } }
    }

    func take(announce: Bool) {
        lock.withLock { serving = true }
        if announce {
            let ok = tap.write(link.gratuitousARP())
            lock.withLock { if ok { announcements += 1 } else { writeFailures += 1 } }
        }
    }

    func leave() { lock.withLock { serving = false } }

    var isServing: Bool { lock.withLock { serving } }

    func stop() {
        leave()
        tap.close()
    }

    var status: String {
        lock.withLock {
            "attachment=tap tap=\(tap.name) tap_serving=\(serving) tap_proposed=\(proposed) tap_discarded=\(discarded) tap_written=\(written) tap_write_failures=\(writeFailures) tap_announcements=\(announcements)"
        }
    }
}
