import Testing
import PloverCheck

typealias Op = RegisterOperation<String, Int>

/// Shorthands: `w(p, "x", 1, 0, 10)` is process p writing 1 to x, invoked at 0, answered at 10.
func w(_ p: Int, _ k: String, _ v: Int, _ t0: UInt64, _ t1: UInt64?) -> Op {
    Op(process: p, key: k, kind: .write(v), invoked: t0, completed: t1)
}
func r(_ p: Int, _ k: String, _ v: Int?, _ t0: UInt64, _ t1: UInt64?) -> Op {
    Op(process: p, key: k, kind: .read(v), invoked: t0, completed: t1)
}
func s(_ p: Int, _ k: String, _ v: Int, was: Int?, _ t0: UInt64, _ t1: UInt64?) -> Op {
    Op(process: p, key: k, kind: .swap(v, previous: was), invoked: t0, completed: t1)
}

func linearizable(_ h: [Op], initial: [String: Int] = [:]) -> Bool {
    let report = LinearizabilityChecker<String, Int>(initial: initial).check(h)
    #expect(report.undecided.isEmpty)
    return report.isLinearizable
}

@Suite struct LinearizabilityCheckerTests {
    @Test func emptyHistoryAndSequentialRunsAreLinearizable() {
        #expect(linearizable([]))
        #expect(linearizable([r(1, "x", nil, 0, 1), w(1, "x", 1, 2, 3), r(2, "x", 1, 4, 5), w(2, "x", 2, 6, 7), r(1, "x", 2, 8, 9)]))
        #expect(linearizable([r(1, "x", 7, 0, 1)], initial: ["x": 7]))
    }

    @Test func staleReadAfterACompletedWriteIsAViolation() {
        #expect(!linearizable([w(1, "x", 1, 0, 10), w(1, "x", 2, 11, 20), r(2, "x", 1, 21, 30)]))
        #expect(!linearizable([w(1, "x", 1, 0, 10), r(2, "x", nil, 11, 12)]))
    }

    @Test func readingAValueNobodyWroteIsAViolation() {
        #expect(!linearizable([w(1, "x", 1, 0, 10), r(2, "x", 3, 5, 15)]))
    }

    @Test func readsConcurrentWithAWriteMaySeeEitherValue() {
        // The write overlaps both reads: old-then-new is fine.
        #expect(linearizable([w(1, "x", 1, 0, 100), r(2, "x", nil, 10, 20), r(3, "x", 1, 30, 40)]))
        // Overlapping reads may disagree in either order while they overlap each other.
        #expect(linearizable([w(1, "x", 1, 0, 100), r(2, "x", 1, 10, 50), r(3, "x", nil, 20, 60)]))
    }

    @Test func newThenOldAcrossSequentialReadsIsAViolation() {
        // r2 saw the new value and finished before r3 started; r3 cannot go back to the old one.
        #expect(!linearizable([w(1, "x", 1, 0, 100), r(2, "x", 1, 10, 20), r(3, "x", nil, 30, 40)]))
    }

    @Test func concurrentWritesNeedAConsistentOrder() {
        // Both orders of two overlapping writes are possible...
        #expect(linearizable([w(1, "x", 1, 0, 50), w(2, "x", 2, 10, 60), r(3, "x", 1, 70, 80)]))
        #expect(linearizable([w(1, "x", 1, 0, 50), w(2, "x", 2, 10, 60), r(3, "x", 2, 70, 80)]))
        // ...but once both finished, the register keeps whichever came last.
        #expect(!linearizable([w(1, "x", 1, 0, 50), w(2, "x", 2, 10, 60), r(3, "x", 1, 70, 80), r(4, "x", 2, 90, 95)]))
        // Two readers see the writes in opposite orders while both writes were long finished.
        #expect(!linearizable([w(1, "x", 1, 0, 50), w(2, "x", 2, 10, 60),
                               r(3, "x", 1, 70, 80), r(4, "x", 2, 70, 80), r(3, "x", 2, 81, 85), r(4, "x", 1, 81, 85)]))
    }

    @Test func anUnknownOutcomeWriteMayHaveHappenedOrNot() {
        // The timed-out write took effect: a later read sees it.
        #expect(linearizable([w(1, "x", 1, 0, 10), w(2, "x", 2, 20, nil), r(3, "x", 2, 30, 40)]))
        // It did not (or not yet): reads keep seeing the old value.
        #expect(linearizable([w(1, "x", 1, 0, 10), w(2, "x", 2, 20, nil), r(3, "x", 1, 30, 40), r(3, "x", 1, 50, 60)]))
        // It took effect long after its client gave up.
        #expect(linearizable([w(2, "x", 2, 0, nil), r(3, "x", nil, 30, 40), w(1, "x", 1, 50, 60), r(3, "x", 2, 70, 80)]))
    }

    @Test func anUnknownOutcomeWriteTakesEffectAtMostOnce() {
        // Seen, then overwritten, then seen again: it would have to happen twice.
        #expect(!linearizable([w(2, "x", 2, 0, nil), r(3, "x", 2, 10, 20), w(1, "x", 1, 30, 40), r(3, "x", 2, 50, 60)]))
        // Seen, then the old value again.
        #expect(!linearizable([w(1, "x", 1, 0, 5), w(2, "x", 2, 6, nil), r(3, "x", 2, 10, 20), r(3, "x", 1, 30, 40)]))
    }

    @Test func anUnknownOutcomeWriteCannotExplainAReadThatFinishedBeforeIt() {
        #expect(!linearizable([r(3, "x", 2, 0, 10), w(2, "x", 2, 20, nil)]))
    }

    @Test func unansweredReadsConstrainNothing() {
        #expect(linearizable([w(1, "x", 1, 0, 10), r(2, "x", 99, 20, nil)]))
    }

    @Test func swapsMustReturnTheValueTheyReplaced() {
        #expect(linearizable([s(1, "x", 1, was: nil, 0, 10), s(2, "x", 2, was: 1, 20, 30), r(1, "x", 2, 40, 50)]))
        // Concurrent swaps: exactly one of them can have seen the empty register.
        #expect(linearizable([s(1, "x", 1, was: nil, 0, 10), s(2, "x", 2, was: 1, 5, 30)]))
        #expect(!linearizable([s(1, "x", 1, was: nil, 0, 10), s(2, "x", 2, was: nil, 5, 30)]))
        // A lost update: the second swap claims to have replaced a value already overwritten.
        #expect(!linearizable([s(1, "x", 1, was: nil, 0, 10), s(2, "x", 2, was: 1, 20, 30), s(3, "x", 3, was: 1, 40, 50)]))
        // Without an answer the previous value is unknown: the swap is a plain write.
        #expect(linearizable([s(1, "x", 1, was: 42, 0, nil), r(2, "x", 1, 10, 20)]))
    }

    @Test func keysAreCheckedIndependentlyAndTheViolationNamesItsKey() throws {
        let h = [w(1, "x", 1, 0, 10), r(2, "x", 1, 20, 30),
                 w(1, "y", 1, 0, 10), w(1, "y", 2, 11, 20), r(2, "y", 1, 21, 30)]
        let report = LinearizabilityChecker<String, Int>().check(h)
        #expect(report.operationsChecked == 5)
        let v = try #require(report.violations.first)
        #expect(report.violations.count == 1 && v.key == "y")
        #expect(v.unplaced.contains { $0.kind == .read(1) })
        #expect(v.description.contains("key y"))
    }

    /// Many clients on one key: each operation takes effect at a random instant inside a random
    /// interval around it, so the history is linearizable by construction. Changing one read's
    /// answer to a value never written must be caught.
    @Test(arguments: [1, 2, 3, 4, 5] as [UInt64])
    func randomConcurrentHistoriesAreAcceptedAndCorruptedOnesRejected(seed: UInt64) async throws {
        var rng = Fuzzer(seed: seed)
        var h: [Op] = []
        var value: Int?
        var nextValue = 1
        var t: UInt64 = 1_000
        for _ in 0..<600 {
            t += UInt64(rng.below(20))
            let before = UInt64(rng.below(60)), after = UInt64(rng.below(60))
            let p = rng.below(8)
            switch rng.below(10) {
            case 0..<4:
                value = nextValue
                let answered = rng.below(10) != 0
                h.append(w(p, "k", nextValue, t - before, answered ? t + after : nil))
                nextValue += 1
            case 4:
                let was = value
                value = nextValue
                h.append(s(p, "k", nextValue, was: was, t - before, t + after))
                nextValue += 1
            default:
                h.append(r(p, "k", value, t - before, t + after))
            }
        }
        let reads = h.indices.filter { if case .read = h[$0].kind { true } else { false } }
        var bad = h
        let victim = reads[rng.below(reads.count)]
        bad[victim].kind = .read(-1)
        // Searches take a while: off the threads that run the other tests' async work.
        let (good, refuted) = try await onOwnThread { [h, bad] in
            let checker = LinearizabilityChecker<String, Int>()
            return (checker.check(h), checker.check(bad))
        }
        #expect(good.isLinearizable, "\(good.violations.first?.description ?? "undecided")")
        #expect(good.operationsChecked == h.count)
        #expect(refuted.violations.count == 1)
    }

    @Test func aSearchThatRunsOutOfBudgetSaysUndecidedNotLinearizable() {
        // Many overlapping writes and a read of an unwritten value: refuting it means trying
        // every order, far more than ten steps.
        var h = (0..<12).map { w($0, "x", $0, 0, 100) }
        h.append(r(99, "x", -1, 50, 60))
        let report = LinearizabilityChecker<String, Int>(stepBudget: 10).check(h)
        #expect(report.undecided == ["x"] && !report.isLinearizable)
    }
}
