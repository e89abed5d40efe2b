import Foundation
import Synchronization
@testable import PloverTesting
import RDMAPaxos

/// One network namespace per replica, each joined by a veth pair to a bridge in this host's
/// namespace, made with `ip` (iproute2) and removed afterwards. The test process reaches every
/// replica through the bridge; cutting a replica's link on the bridge side isolates it from its
/// peers and from clients alike, as a pulled cable would, while the process keeps running.
///
/// Needs root (CAP_NET_ADMIN) and iproute2, as on the machines `make test` runs on. When either is
/// missing, `make` fails with the `ip` command's own error rather than passing without the tests.
final class NetworkLab {
    let tag: String
    let ids: [NodeID]
    let subnet: Int
    private(set) var made: [String] = []
    private var bridgeMade = false

    var bridge: String { "\(tag)b" }
    func namespace(_ id: NodeID) -> String { "\(tag)n\(id)" }
    func hostLink(_ id: NodeID) -> String { "\(tag)v\(id)" }
    func address(_ id: NodeID) -> String { "10.\(subnet / 256).\(subnet % 256).\(id)" }

    /// `tag` must be short: interface names have at most 15 characters.
    init(ids: [NodeID]) throws {
        self.ids = ids
        let pid = Int(getpid())
        // Unique per lab in this process, and rarely shared with another process's labs.
        let serial = Self.labsMade.add(1, ordering: .relaxed).newValue
        tag = "plv\(pid % 10_000)x\(serial % 100)"
        subnet = 200 * 256 + (pid &+ serial * 37) % 256  // 10.200.X.0/24
        do { try build() } catch { tearDown(); throw error }
    }

    private func build() throws {
        try Self.ip(["link", "add", bridge, "type", "bridge"])
        bridgeMade = true
        try Self.ip(["addr", "add", "10.\(subnet / 256).\(subnet % 256).254/24", "dev", bridge])
        try Self.ip(["link", "set", bridge, "up"])
        for id in ids {
            let ns = namespace(id)
            try Self.ip(["netns", "add", ns])
            made.append(ns)
            try Self.ip(["link", "add", hostLink(id), "type", "veth", "peer", "name", "eth0", "netns", ns])
            try Self.ip(["link", "set", hostLink(id), "master", bridge])
            try Self.ip(["link", "set", hostLink(id), "up"])
            try Self.ip(["-n", ns, "addr", "add", address(id) + "/24", "dev", "eth0"])
            try Self.ip(["-n", ns, "link", "set", "eth0", "up"])
            try Self.ip(["-n", ns, "link", "set", "lo", "up"])
        }
    }

    /// The words that start a command inside replica `id`'s namespace.
    func launchPrefix(_ id: NodeID) -> [String] { [TapLab.ipPath, "netns", "exec", namespace(id)] }

    /// Cuts (or restores) replica `id`'s only link.
    func isolate(_ id: NodeID, _ cut: Bool) throws {
        try Self.ip(["link", "set", hostLink(id), cut ? "down" : "up"])
    }

    func tearDown() {
        // Deleting the host end deletes the pair at once; a namespace goes when its last process has.
        for id in ids { try? Self.ip(["link", "delete", hostLink(id)]) }
        for ns in made { try? Self.ip(["netns", "delete", ns]) }
        made = []
        if bridgeMade { try? Self.ip(["link", "delete", bridge]) }
        bridgeMade = false
    }

    deinit { tearDown() }

    private static let labsMade = Atomic<Int>(0)

    /// Runs `ip ARGS` (the tap lab's runner: one place that runs iproute2).
    static func ip(_ args: [String]) throws { try TapLab.ip(args) }
}
