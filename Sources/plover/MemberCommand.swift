import ArgumentParser
import Foundation
import PloverTesting
import RDMAPaxos

/// `plover member list|add|remove|promote|role`: membership changes against a running cluster.
struct MemberCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "member", abstract: "List and change the members of a running cluster (one change at a time).",
        subcommands: [List.self, Add.self, Remove.self, Promote.self, Role.self])

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Print the configuration the leader follows: id, role, priority, addresses.")
        @OptionGroup var cluster: ClusterOptions
        func run() throws {
            let (_, reply) = try discover(cluster)
            print("ID  ROLE     PRIORITY  PEER ADDRESS           CLIENT ADDRESS")
            for m in reply.membership.members {
                let mark = m.id == reply.leader ? "  (leader)" : ""
                print(pad(String(m.id), 4) + pad(m.role.description, 9) + pad(String(m.priority), 10)
                      + pad(m.peerAddress.isEmpty ? "-" : m.peerAddress, 23) + (m.clientAddress.isEmpty ? "-" : m.clientAddress) + mark)
            }
        }
    }

    struct Add: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Add a member (a learner by default); then start it with plover node --join.")
        @OptionGroup var cluster: ClusterOptions
        @Option(help: "The new member's node id (unused in this cluster, at most limits.node_id_max).") var id: NodeID
        @Option(help: "host:port of the new member's fabric (peer) endpoint.") var address: String
        @Option(help: "host:port where the new member answers clients.") var clientAddress: String
        @Option(help: "learner (default: catches up, then promote it), witness or voter.") var role: String = "learner"
        @Option(help: "Leader preference (default 1 for a voter, 0 otherwise).") var priority: UInt8?
        func run() throws {
            let r = try parseRole(role)
            for (name, a) in [("--address", address), ("--client-address", clientAddress)] where HostPort(parsing: a) == nil {
                throw ValidationError("\(name): \"\(a)\" is not host:port with a port from 1 to 65535")
            }
            let m = Member(id: id, role: r, priority: priority ?? (r == .voter ? 1 : 0), peerAddress: address, clientAddress: clientAddress)
            try change(.add(m), cluster)
        }
    }

    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Remove a member; removing the leader hands leadership to a caught-up voter first.")
        @OptionGroup var cluster: ClusterOptions
        @Argument(help: "The member's node id.") var id: NodeID
        func run() throws { try change(.remove(id), cluster) }
    }

    struct Promote: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Make a caught-up learner a voter.")
        @OptionGroup var cluster: ClusterOptions
        @Argument(help: "The learner's node id.") var id: NodeID
        func run() throws { try change(.promote(id), cluster) }
    }

    struct Role: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Give a member another role (voter or learner) or priority.")
        @OptionGroup var cluster: ClusterOptions
        @Argument(help: "The member's node id.") var id: NodeID
        @Argument(help: "voter or learner.") var role: String
        @Option(help: "New leader preference.") var priority: UInt8?
        func run() throws { try change(.changeRole(id, role: try parseRole(role), priority: priority), cluster) }
    }
}

extension ClusterOptions {
    /// The members of the live configuration (asked of the first replica of `given` that answers),
    /// with their client addresses; `given` when none answers or it records no addresses. A config
    /// file's `[[members]]` only bootstrapped the cluster: members may have been added or removed.
    func resolveLive(_ given: [NodeID: String]) -> [NodeID: String] {
        for id in given.keys.sorted() {
            guard let reply = try? NodeClient(endpoints: given, timeout: .seconds(1)).configuration(of: id) else { continue }
            var live: [NodeID: String] = [:]
            for m in reply.membership.members {
                if let a = m.clientAddress.isEmpty ? given[m.id] : m.clientAddress { live[m.id] = a }
            }
            return live.isEmpty ? given : live
        }
        return given
    }
}

/// A client of the cluster whose endpoints are those given plus every member's client address in
/// the configuration the first answering replica follows (a config file's members may be stale).
func discover(_ options: ClusterOptions) throws -> (NodeClient, ConfigurationReply) {
    let given = try options.resolve()
    var failures: [String] = []
    for id in given.keys.sorted() {
        do {
            var reply = try NodeClient(endpoints: given).configuration(of: id)
            var endpoints = given
            for m in reply.membership.members where !m.clientAddress.isEmpty { endpoints[m.id] = m.clientAddress }
            let client = NodeClient(endpoints: endpoints)
            // The leader's view is the one changes are made against.
            if let l = reply.leader, l != id, endpoints[l] != nil, let fromLeader = try? client.configuration(of: l) { reply = fromLeader }
            return (client, reply)
        } catch {
            failures.append("\(error)")
        }
    }
    throw CLIError("no replica answered: \(failures.joined(separator: "; "))")
}

func change(_ c: MembershipChange, _ options: ClusterOptions) throws {
    let (client, _) = try discover(options)
    let answers: [MembershipAnswer]
    do { answers = try client.changeMembership(c) } catch let e as NodeClient.Failure { throw CLIError(e.description) }
    for a in answers {
        if let t = a.handedOverTo {
            print("node \(a.change.member) was the leader: leadership handed to node \(t) first")
            continue
        }
        print("\(a.change): committed at index \(a.index ?? 0)")
        print("members: " + a.membership.members.map { "\($0.id) (\($0.role))" }.joined(separator: ", "))
    }
}

func parseRole(_ s: String) throws -> MemberRole {
    guard let r = MemberRole.allCases.first(where: { $0.description == s }) else {
        throw ValidationError("role \"\(s)\" is not one of \(MemberRole.allCases.map(\.description).joined(separator: ", "))")
    }
    return r
}

private func pad(_ s: String, _ n: Int) -> String { s.count >= n ? s + " " : s + String(repeating: " ", count: n - s.count) }
