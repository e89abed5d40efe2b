import Foundation

/// What a client does with a node's answer to one of its requests. `NodeClient` and
/// `PipelinedNodeClient` both decide by `ClientFrame.clientStep`, so they follow one set of
/// retry rules.
enum ClientStep {
    /// The request succeeded with this result.
    case done([UInt8])
    /// Leadership is moving: retry at `hint` (the leader the node named, when it is another
    /// member with an address), else at the next member.
    case retry(hint: NodeID?, why: String)
}

extension ClientFrame {
    /// How a client treats this frame received as the answer to request `id`, sent to `node` of
    /// the cluster at `endpoints`; throws the `NodeClient.Failure` to give up with. A proposal
    /// (`idempotent` false) answered with an error that leaves its outcome open fails with
    /// `outcomeUnknown`: sending it again could apply it twice.
    func clientStep(request id: UInt64, from node: NodeID, idempotent: Bool, endpoints: [NodeID: String]) throws(NodeClient.Failure) -> ClientStep {
        switch self {
        case let .ok(rid, result) where rid == id:
            return .done(result)
        case let .error(_, code, _, message) where !idempotent && code.leavesProposalOutcomeUnknown:
            // "stopped" and "storage" may come from a leader that was replicating the command as
            // it stopped or its log failed: the other replicas can still commit it.
            let note = code == .timedOut ? "" : "; the command may or may not have taken effect"
            throw NodeClient.Failure(description: "node \(node): \(message)\(note)", outcomeUnknown: true)
        case let .error(_, code, leader, message) where code == .notLeader || code == .superseded || code == .stopped:
            let hint = leader.flatMap { endpoints[$0] != nil && $0 != node ? $0 : nil }
            return .retry(hint: hint, why: "node \(node): \(message)")
        case let .error(_, _, _, message):
            throw NodeClient.Failure(description: "node \(node): \(message)")
        default:
            // An answer that is not this request's: the command itself may have been applied.
            throw NodeClient.Failure(description: "node \(node) sent an unexpected answer" + (idempotent ? "" : "; the command may or may not have taken effect"),
                                     outcomeUnknown: !idempotent)
        }
    }
}

extension NodeClient {
    /// How long a client pauses before its next try once every member was tried (an election may
    /// be running): 2 ms, doubling up to 500 ms, so a client finds a leader elected within a few
    /// milliseconds soon after, and still waits about 5 s in all over 20 attempts. Nil: no pause.
    static func retryPause(attempt: Int, members: Int) -> Duration? {
        guard attempt >= members - 1 else { return nil }
        let round = min(attempt - (members - 1), 8)
        return .milliseconds(min(500, 2 << round))
    }
}
