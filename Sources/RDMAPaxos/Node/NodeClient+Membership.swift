/// Membership requests of the client protocol (ClientProtocol.swift, kinds 5 and 6).
extension NodeClient {
    /// The configuration node `node` follows, and the leader it knows.
    public func configuration(of node: NodeID) throws -> ConfigurationReply {
        try connect(node)
        let id = nextRequestID()
        try send(.configuration(id: id))
        switch try receive() {
        case let .ok(_, bytes):
            do { return try ConfigurationReply(wireBytes: bytes) } catch {
                throw Failure(description: "node \(node) sent a configuration this build cannot read: \(error)")
            }
        case let .error(_, _, _, message): throw Failure(description: "node \(node): \(message)")
        default: throw Failure(description: "node \(node) sent an unexpected answer to a configuration request")
        }
    }

    /// The configuration of whichever replica answers at `address` ("host:port", a client address).
    public static func configuration(at address: String, timeout: Duration = .seconds(5)) throws -> ConfigurationReply {
        try NodeClient(endpoints: [0: address], timeout: timeout).configuration(of: 0)
    }

    /// Carries out `change` through the leader, answered once it committed. A change that removes
    /// the leader is answered first with the hand-over (`MembershipAnswer.handedOverTo`); this
    /// then asks the new leader, so the answers are one or two, in order. Refusals throw
    /// `Failure` with the member and the reason.
    public func changeMembership(_ change: MembershipChange, attempts: Int = 20) throws -> [MembershipAnswer] {
        var answers: [MembershipAnswer] = []
        while answers.count < 3 {
            let bytes = try call(attempts: attempts, idempotent: false) { .changeMembership(id: $0, change: change) }
            let a: MembershipAnswer
            do { a = try MembershipAnswer(wireBytes: bytes) } catch {
                throw Failure(description: "node \(current ?? 0) sent a membership answer this build cannot read: \(error)")
            }
            answers.append(a)
            guard let next = a.handedOverTo else { return answers }
            // The old leader answers "not the leader" from now on, with the new one as the hint.
            if endpoints[next] == nil { throw Failure(description: "\(a); no client address known for node \(next)") }
        }
        throw Failure(description: "leadership kept moving; the change was not made: \(answers.map(\.description).joined(separator: "; "))")
    }

    func nextRequestID() -> UInt64 {
        defer { nextID += 1 }
        return nextID
    }
}

extension NodeClient {
    /// A backup of node `node`'s state machine and configuration (client request 7).
    public func backup(of node: NodeID) throws -> Snapshot {
        try connect(node)
        let id = nextRequestID()
        try send(.backup(id: id))
        switch try receive() {
        case let .ok(_, bytes): return try FileSnapshotStore.decode(bytes, path: "backup from node \(node)")
        case let .error(_, _, _, message): throw Failure(description: "node \(node): \(message)")
        default: throw Failure(description: "node \(node) sent an unexpected answer to a backup request")
        }
    }
}
