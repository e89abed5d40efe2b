import Testing
@testable import RDMAPaxos

/// The outstanding-write bookkeeping both real queue pairs (TCP, verbs) share.
@Suite struct OutstandingWritesTests {
    private func posted(_ signaled: [Bool]) -> OutstandingWrites {
        var w = OutstandingWrites()
        for (i, s) in signaled.enumerated() { w.append(workRequestID: UInt64(100 + i), signaled: s) }
        return w
    }

    @Test func writesAreNumberedInPostingOrderAndBoundedByTheLimit() throws {
        var w = OutstandingWrites()
        #expect(w.append(workRequestID: 7, signaled: false) == 1)
        #expect(w.append(workRequestID: 8, signaled: true) == 2)
        #expect(w.count == 2 && w.nextSequence == 3)
        #expect(w.contains(1) && w.contains(2) && !w.contains(0) && !w.contains(3))
        try w.checkRoom(limit: 3, peer: 2)
        #expect(throws: FabricError.self) { try w.checkRoom(limit: 2, peer: 2) }
    }

    /// Completing write 3 completes 1 and 2 as well; only signalled writes and failures are reported.
    @Test func aCompletionCompletesEveryEarlierWriteAndReportsWhatADeviceWould() {
        var w = posted([false, true, false, true])
        var reported: [(UInt64, CompletionStatus)] = []
        w.complete(through: 3, status: .success) { reported.append(($0.workRequestID, $1)) }
        #expect(reported.map(\.0) == [101] && reported.allSatisfy { $0.1 == .success })
        #expect(w.count == 1 && w.contains(4) && !w.contains(3))
        reported = []
        w.complete(through: 4, status: .remoteAccessError) { reported.append(($0.workRequestID, $1)) }
        #expect(reported.map(\.0) == [103] && reported.map(\.1) == [.remoteAccessError])
        #expect(w.count == 0)
        // An unsignalled write that fails is reported too.
        var u = posted([false])
        reported = []
        u.complete(through: 1, status: .remoteAccessError) { reported.append(($0.workRequestID, $1)) }
        #expect(reported.map(\.1) == [.remoteAccessError])
    }

    /// A completion for a number below every outstanding write changes nothing.
    @Test func aCompletionOfANumberNoLongerOutstandingChangesNothing() {
        var w = posted([true, true])
        var reported = 0
        w.complete(through: 1, status: .success) { _, _ in reported += 1 }
        w.complete(through: 1, status: .remoteAccessError) { _, _ in reported += 1 }
        w.complete(through: 0, status: .remoteAccessError) { _, _ in reported += 1 }
        #expect(reported == 1 && w.count == 1 && w.contains(2) && !w.contains(1))
    }

    @Test func aFailedQueuePairReportsEveryWriteTheFirstWithItsStatus() {
        var w = posted([false, true, false])
        var reported: [(UInt64, CompletionStatus)] = []
        w.flush(firstStatus: .transportError) { reported.append(($0.workRequestID, $1)) }
        #expect(reported.map(\.0) == [100, 101, 102])
        #expect(reported.map(\.1) == [.transportError, .flushed, .flushed])
        #expect(w.count == 0 && w.nextSequence == 4)
    }
}
