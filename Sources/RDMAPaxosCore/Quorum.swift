/// The majority rule, as one pure value: which members of a voting set make a majority, and what
/// a majority has acknowledged. Commit, read-index confirmation, vote counting and check-quorum
/// all ask it, so the rule is written once and tested on its own (`testdata/quorum/`).
///
/// The core changes its configuration one member at a time (`proposeMembership`), so every
/// quorum is a majority of one voting set; there are no joint configurations.
public struct Quorum: Sendable, Hashable {
    /// The members whose acknowledgements count, sorted, without duplicates.
    public let voters: [NodeID]

    /// The quorum of `voters` (duplicates are ignored).
    public init<S: Sequence>(_ voters: S) where S.Element == NodeID {
        self.voters = Array(Set(voters)).sorted()
    }

    /// Members that make a majority: more than half of `voters`. An empty set needs one, which
    /// it cannot have: nothing commits, no vote is won.
    public var size: Int { voters.count / 2 + 1 }

    /// Whether `members` (others are ignored) include a majority of the voters.
    public func isMajority<S: Sequence>(_ members: S) -> Bool where S.Element == NodeID {
        Set(members).intersection(voters).count >= size
    }

    /// The highest index that a majority of voters has acknowledged: each voter's acknowledged
    /// index comes from `acknowledged` (nil counts as nothing, 0). Zero for an empty set.
    public func committedIndex(_ acknowledged: (NodeID) -> LogIndex?) -> LogIndex {
        highestHeldByMajority(voters.map { acknowledged($0) ?? 0 })
    }

    /// The highest read round that a majority of voters has answered (`answered`: each voter's
    /// highest answered round, nil as 0): reads opened in that round or before are confirmed.
    public func confirmedRound(_ answered: (NodeID) -> UInt64?) -> UInt64 {
        highestHeldByMajority(voters.map { answered($0) ?? 0 })
    }

    /// The outcome of an election whose answers so far are `votes` (true: granted, false:
    /// refused; absent: not answered). Answers from members outside the set are ignored.
    public func result(_ votes: [NodeID: Bool]) -> VoteResult {
        let granted = voters.filter { votes[$0] == true }.count
        let refused = voters.filter { votes[$0] == false }.count
        if granted >= size { return .won }
        // Lost once the members that have not refused cannot make a majority any more.
        if voters.count - refused < size { return .lost }
        return .pending
    }

    /// How an election stands.
    public enum VoteResult: String, Sendable, Hashable {
        /// A majority granted.
        case won
        /// Too many refused for a majority to grant.
        case lost
        /// Neither yet.
        case pending
    }

    /// The size-th largest value: every value at or below it is held by a majority.
    func highestHeldByMajority<T: Comparable & FixedWidthInteger>(_ values: [T]) -> T {
        guard values.count >= size else { return 0 }
        return values.sorted(by: >)[size - 1]
    }
}
