// Which fabric a VM replica's syncvm link runs over: the node's configured one (`fabric`,
// `verbs_connect`), so that where verbs carries consensus it carries the guest's pages too, as
// docs/design/vmreplica.md says. Both VM replicas must choose the same kind: a TCP endpoint and a
// verbs endpoint cannot connect, and the channel configurations differ (the ring sizes are checked
// at connect).

import Foundation
import Logging
import RDMAPaxos

/// How a syncvm link is carried: the fabric each endpoint opens and the channel configuration that
/// fits it.
public struct SyncLink: Sendable {
    /// The fabric kind.
    public enum Kind: Sendable, Equatable, CustomStringConvertible {
        /// `TCPFabric`, authenticated with the cluster key.
        case tcp
        /// `VerbsFabric` with this connect method, authenticated with the cluster key.
        case verbs(VerbsFabric.Configuration.Connection)

        public var description: String {
            switch self {
            case .tcp: "tcp"
            case let .verbs(connection): "verbs (connect \(connection.rawValue))"
            }
        }
    }

    /// Which fabric the endpoints open.
    public let kind: Kind
    /// The channel configuration both ends use; its `mailboxBytes` sizes the backup's trailer.
    public let channel: FabricSyncChannel.Configuration
    /// Opens one endpoint's fabric for `node` among `members` (this replica and its peer).
    let open: @Sendable (_ node: NodeID, _ members: Set<NodeID>) throws -> any Fabric

    /// A link of `kind` whose endpoints open their fabric with `open` (the tests put a software
    /// RDMA device behind it).
    package init(kind: Kind, channel: FabricSyncChannel.Configuration,
                 open: @escaping @Sendable (_ node: NodeID, _ members: Set<NodeID>) throws -> any Fabric) {
        self.kind = kind
        self.channel = channel
        self.open = open
    }

    /// Over `TCPFabric`, with the default channel configuration (1 MiB rings and page writes).
    public static func tcp(clusterKey: ClusterKey) -> SyncLink {
        SyncLink(kind: .tcp, channel: FabricSyncChannel.Configuration()) { node, members in
            try TCPFabric(node: node, configuration: TCPFabric.Configuration(clusterKey: clusterKey.bytes, members: members))
        }
    }

    /// The channel configuration over verbs: smaller rings and page writes than over TCP, because
    /// every outstanding write holds a registered staging slot of the largest write's size
    /// (`verbsFabricConfiguration`), and all of it is pinned.
    public static let verbsChannel = FabricSyncChannel.Configuration(ringBytes: 256 << 10, writeBytesMax: 128 << 10)

    /// Writes a syncvm endpoint may have outstanding on its queue pair: two windows of page writes
    /// (`signalEveryWrites` each), ring records and cells, with room to spare.
    public static let verbsOutstandingWritesMax = 256

    /// The verbs fabric configuration a channel with `channel` needs: a staging slot as large as
    /// its largest write, `verbsOutstandingWritesMax` of them.
    public static func verbsFabricConfiguration(clusterKey: ClusterKey, connection: VerbsFabric.Configuration.Connection,
                                                members: Set<NodeID>, channel: FabricSyncChannel.Configuration) -> VerbsFabric.Configuration {
        VerbsFabric.Configuration(clusterKey: clusterKey.bytes, connection: connection, members: members,
                                  outstandingWritesMax: verbsOutstandingWritesMax, slotBytesMax: channel.writeBytesLargest)
    }

    /// Over `VerbsFabric` on this machine's RDMA device, connected with `connection`.
    public static func verbs(clusterKey: ClusterKey, connection: VerbsFabric.Configuration.Connection) -> SyncLink {
        SyncLink(kind: .verbs(connection), channel: verbsChannel) { node, members in
            try VerbsFabric(node: node, configuration: verbsFabricConfiguration(clusterKey: clusterKey, connection: connection,
                                                                                members: members, channel: verbsChannel))
        }
    }

    /// The node's configured fabric: verbs for `fabric = "verbs"`, and for `auto` where
    /// `ibv_get_device_list` finds a device (the consensus fabric's rule); TCP otherwise.
    public static func configured(_ node: NodeConfig, clusterKey: ClusterKey, logger: Logger) -> SyncLink {
        switch kind(of: node) {
        case .tcp:
            if node.fabric == .auto { logger.notice("syncvm link: fabric auto: no RDMA device; using tcp") }
            return .tcp(clusterKey: clusterKey)
        case let .verbs(connection):
            return .verbs(clusterKey: clusterKey, connection: connection)
        }
    }

    /// The kind `configured` picks for `node` on this machine.
    public static func kind(of node: NodeConfig) -> Kind {
        switch node.fabric {
        case .tcp: .tcp
        case .verbs: .verbs(node.verbsConnection)
        case .auto: (try? VerbsProbe.deviceNames()) == nil ? .tcp : .verbs(node.verbsConnection)
        }
    }

    /// What one verbs endpoint pins: the backup its guest RAM of `guestBytes` and the mailbox, the
    /// primary the mailbox; each one staging buffer for its queue pair.
    public static func verbsMemoryBudget(guestBytes: Int, backup: Bool) -> VerbsMemoryBudget {
        VerbsMemoryBudget(regionBytes: UInt64((backup ? guestBytes : 0) + verbsChannel.mailboxBytes), sendingQueuePairs: 1,
                          stagingBytesPerQueuePair: UInt64(verbsOutstandingWritesMax * verbsChannel.writeBytesLargest))
    }
}
