import Foundation
import RDMAPaxos

extension DemoCluster {
    /// Ports and a config file (without `[[members]]`) for a new replica `id` that will join the
    /// running cluster; the member to add, as a learner unless `role` says otherwise.
    public func prepareJoiner(_ id: NodeID, role: MemberRole = .learner) throws -> Member {
        precondition(peers[id] == nil, "node \(id) is already part of this cluster")
        peers[id] = "127.0.0.1:\(try freePort())"
        endpoints[id] = "127.0.0.1:\(try freePort())"
        let text = configHead(for: id, "joining the running plover demo cluster") + (extraConfig.isEmpty ? "" : "\n" + extraConfig)
        try text.write(toFile: configPath(id), atomically: true, encoding: .utf8)
        return Member(id: id, role: role, priority: role == .voter ? 1 : 0, peerAddress: peers[id]!, clientAddress: endpoints[id]!)
    }

    /// Starts the prepared replica `id` with `plover node --join`, through `via`'s client address.
    public func startJoining(_ id: NodeID, via: NodeID) throws {
        try start(id, arguments: ["--join", endpoints[via]!])
        if !ids.contains(id) { ids.append(id) }
    }

    /// Forgets a removed member: it is no longer one of `ids` nor an endpoint of clients.
    public func forget(_ id: NodeID) {
        ids.removeAll { $0 == id }
        endpoints[id] = nil
    }
}
