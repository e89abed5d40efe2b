import Foundation

/// What a client does with a node's answer to one of its requests. `NodeClient` and
/// `PipelinedNodeClient` both decide by `ClientFrame.clientAction`, so they follow one set of
/// retry rules.
enum ClientAction {
    /// The request succeeded with this result.
    case result([UInt8])
    /// Leadership is moving: retry at `leader` when the node named one, else at the next member.
    case retry(leader: NodeID?, why: String)
    /// Give up with this failure.
    case fail(NodeClient.Failure)
}

extension ClientFrame {
    /// How a client treats this frame received as the answer to request `id`, sent to `node`.
    /// A proposal (`idempotent` false) answered with an error that leaves its outcome open fails
    /// with `outcomeUnknown`: sending it again could apply it twice.
    func clientAction(request id: UInt64, from node: NodeID, idempotent: Bool) -> ClientAction {
        switch self {
        case let .ok(rid, result) where rid == id:
            return .result(result)
        case let .error(_, code, _, message) where !idempotent && code.leavesProposalOutcomeUnknown:
            // "stopped" and "storage" may come from a leader that was replicating the command as
            // it stopped or its log failed: the other replicas can still commit it.
            let note = code == .timedOut ? "" : "; the command may or may not have taken effect"
            return .fail(NodeClient.Failure(description: "node \(node): \(message)\(note)", outcomeUnknown: true))
        case let .error(_, code, leader, message) where code == .notLeader || code == .superseded || code == .stopped:
            return .retry(leader: leader, why: "node \(node): \(message)")
        case let .error(_, _, _, message):
            return .fail(NodeClient.Failure(description: "node \(node): \(message)"))
        default:
            // An answer that is not this request's: the command itself may have been applied.
            return .fail(NodeClient.Failure(description: "node \(node) sent an unexpected answer" + (idempotent ? "" : "; the command may or may not have taken effect"),
                                            outcomeUnknown: !idempotent))
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
