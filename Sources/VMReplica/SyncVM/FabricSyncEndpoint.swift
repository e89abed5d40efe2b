// `FabricSyncChannel.Endpoint`: one side of a syncvm link before it is up — its registered
// region (the primary's mailbox, or the backup's guest RAM with the mailbox after it) and the
// fabric listening for the peer (the channel itself: FabricSyncChannel.swift).

import Foundation
import RDMAPaxos

extension FabricSyncChannel {
    /// One side before the link is up: its region is registered and the fabric listens.
    public final class Endpoint: Sendable {
        /// The fabric this side's region is registered with; a channel consumes its completion queue.
        public let fabric: any Fabric
        /// Where the peer connects (the bound port when asked for port 0).
        public let address: PeerAddress
        /// Ring size, write batching, timings and faults of the channels it connects.
        public let configuration: Configuration
        let region: MemoryRegion
        let mailboxOffset: Int
        let isPrimary: Bool
        let layout: MailboxLayout
        let divert: Divert?

        private init(fabric: any Fabric, address: PeerAddress, configuration: Configuration, region: MemoryRegion,
                     mailboxOffset: Int, isPrimary: Bool, layout: MailboxLayout, divert: Divert? = nil) {
            self.divert = divert
            self.fabric = fabric
            self.address = address
            self.configuration = configuration
            self.region = region
            self.mailboxOffset = mailboxOffset
            self.isPrimary = isPrimary
            self.layout = layout
        }

        /// The primary's side: a region holding one mailbox (for the backup's frames).
        /// `divert` takes the frames it selects aside as they arrive (never seen by `receive`).
        public static func primary(fabric: any Fabric, listenAt address: PeerAddress,
                                   configuration: Configuration = Configuration(), divert: Divert? = nil) async throws -> Endpoint {
            let layout = try MailboxLayout(ringBytes: configuration.ringBytes)
            try check(configuration)
            let region = try fabric.registerRegion(lengthBytes: layout.bytes)
            let bound = try await fabric.listen(at: address, exporting: region)
            return Endpoint(fabric: fabric, address: bound, configuration: configuration, region: region,
                            mailboxOffset: 0, isPrimary: true, layout: layout, divert: divert)
        }

        /// The backup's side: registers `memory`'s own mapping — guest RAM at guest-physical
        /// offsets, then the mailbox in its trailer — so page batches land in the guest directly.
        public static func backup(memory: GuestMemory, fabric: any Fabric, listenAt address: PeerAddress,
                                  configuration: Configuration = Configuration()) async throws -> Endpoint {
            let layout = try MailboxLayout(ringBytes: configuration.ringBytes)
            try check(configuration)
            guard memory.isWritable else { throw SyncError.backupNotWritable(path: memory.path ?? "(anonymous)") }
            guard memory.trailingBytes >= layout.bytes else {
                throw FabricSyncChannelError.noMailboxRoom(trailingBytes: memory.trailingBytes, needed: layout.bytes)
            }
            // A mailbox from an earlier channel must not be read as this one's.
            memset(memory.base + memory.trailerOffset, 0, layout.bytes)
            let range = UnsafeMutableRawBufferPointer(start: memory.base, count: memory.trailerOffset + layout.bytes)
            let region = try fabric.registerRegion(wrapping: range, retaining: memory)
            let bound = try await fabric.listen(at: address, exporting: region)
            return Endpoint(fabric: fabric, address: bound, configuration: configuration, region: region,
                            mailboxOffset: memory.trailerOffset, isPrimary: false, layout: layout)
        }

        private static func check(_ c: Configuration) throws {
            guard c.writeBytesMax >= 1, c.signalEveryWrites >= 1 else {
                throw FabricSyncChannelError.badConfiguration("writeBytesMax and signalEveryWrites must be positive")
            }
        }

        /// Clears this side's mailbox. An endpoint may connect again after its channel went
        /// down; call this once the old channel is closed and before connecting, so nothing the
        /// old peer wrote is read as the new one's.
        public func resetMailbox() {
            region.store([UInt8](repeating: 0, count: layout.bytes), at: mailboxOffset)
        }

        /// Connects a queue pair to the peer's endpoint and starts receiving.
        public func connect(to peer: PeerAddress) async throws -> FabricSyncChannel {
            let qp = try await fabric.connect(to: peer, exporting: region)
            let remote = qp.remote.lengthBytes
            let peerMailbox = remote - layout.bytes
            // The primary's region is exactly one mailbox; the backup's is page-aligned RAM plus one.
            let fits = isPrimary ? peerMailbox > 0 && peerMailbox % 4096 == 0 : peerMailbox == 0
            guard fits else {
                qp.moveToError()
                throw FabricSyncChannelError.peerRegionMismatch(
                    "node \(peer.node) exports \(remote) bytes, which does not fit a \(layout.bytes)-byte mailbox"
                    + (isPrimary ? " after page-aligned RAM" : " alone") + "; do both sides use the same ringBytes?")
            }
            let channel = FabricSyncChannel(endpoint: self, qp: qp, peerMailboxOffset: peerMailbox)
            channel.start()
            return channel
        }
    }
}
