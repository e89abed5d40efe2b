import Counter
import Testing

/// The state machine alone: what every replica computes from the same commands.
@Suite struct CounterStateMachineTests {
    @Test func addsAndAnswersTheNewTotal() {
        let c = CounterStateMachine()
        #expect(CounterCommand.decodeTotal(c.apply(CounterCommand.add(5).encoded(), index: 1)) == 5)
        #expect(CounterCommand.decodeTotal(c.apply(CounterCommand.add(-7).encoded(), index: 2)) == -2)
        #expect(CounterCommand.decodeTotal(c.query([])) == -2)
        #expect(c.appliedIndex == 2)
    }

    @Test func commandsRoundTrip() {
        for n: Int64 in [0, 1, -1, .max, .min, 0x0102_0304_0506_0708] {
            #expect(CounterCommand(decoding: CounterCommand.add(n).encoded()) == .add(n))
        }
    }

    @Test func malformedCommandsChangeNothing() {
        let c = CounterStateMachine()
        _ = c.apply(CounterCommand.add(3).encoded(), index: 1)
        for bad: [UInt8] in [[], [1], [2, 0, 0, 0, 0, 0, 0, 0, 1], [1, 0, 0, 0, 0, 0, 0, 0, 0, 9]] {
            #expect(c.apply(bad, index: 2) == CounterCommand.malformed, "\(bad)")
        }
        #expect(c.total == 3)
    }

    @Test func snapshotRestoresTheTotal() throws {
        let a = CounterStateMachine()
        for i in 1...10 { _ = a.apply(CounterCommand.add(Int64(i)).encoded(), index: UInt64(i)) }
        let b = CounterStateMachine()
        try b.restore(a.snapshot(), index: 10)
        #expect(b.total == 55 && b.appliedIndex == 10)
        #expect(throws: CounterError.self) { try b.restore([1, 2, 3], index: 11) }
    }
}
