import Testing
@testable import RDMAPaxosCore

@Suite struct CodecTests {
    @Test func hardStateRoundTrips() throws {
        let hs = HardState(
            promised: Ballot(term: 7, node: 2), commitIndex: 42,
            membership: Membership([Member(id: 3, role: .witness, priority: 0), Member(id: 1, role: .voter, priority: 9)]))
        #expect(try HardState(decoding: hs.encoded()) == hs)
    }

    @Test func recoveringFlagRoundTripsAndOlderHardStatesAreNotRecovering() throws {
        var hs = HardState(promised: Ballot(term: 3, node: 1), commitIndex: 9, membership: Membership([Member(id: 1, role: .voter)]))
        let plain = hs.encoded()
        hs.recovering = true
        let flagged = hs.encoded()
        #expect(flagged == plain + [1], "the flag is one trailing byte, absent when not recovering")
        #expect(try HardState(decoding: flagged) == hs)
        #expect(try HardState(decoding: plain).recovering == false)
        #expect(throws: DecodeError.self) { try HardState(decoding: plain + [0]) }
        #expect(throws: DecodeError.self) { try HardState(decoding: flagged + [1]) }
    }

    @Test func truncatedHardStateIsAnErrorNotATrap() {
        let bytes = HardState().encoded()
        #expect(throws: DecodeError.self) { try HardState(decoding: Array(bytes.dropLast())) }
    }

    @Test func ballotsOrderByTermThenNode() {
        #expect(Ballot(term: 1, node: 9) < Ballot(term: 2, node: 1))
        #expect(Ballot(term: 2, node: 1) < Ballot(term: 2, node: 3))
    }
}
