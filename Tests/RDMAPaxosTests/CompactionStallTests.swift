import Foundation
import Testing
@testable import RDMAPaxos

/// A compaction must cost the node's loop little whatever the state's size: the key-value map's
/// capture leaves a put after it to copy one shard, not the map, and the encoding runs at the
/// lowest CPU priority (docs/design/runtime.md, "Compaction without a stall").
@Suite struct CompactionStallTests {
    static func put(_ m: KeyValueStateMachine, _ key: String, _ value: String, at index: LogIndex) {
        _ = m.apply(KeyValueStateMachine.Command.put(key: Array(key.utf8), value: Array(value.utf8)).encoded(), index: index)
    }

    /// The storage a dictionary value refers to (two values share it until one is changed).
    static func storage(_ d: [[UInt8]: [UInt8]]) -> UInt { unsafeBitCast(d, to: UInt.self) }

    @Test func aPutAfterACaptureCopiesOneSmallShardNotTheMap() {
        let m = KeyValueStateMachine()
        let keys = 20_000
        for i in 0..<keys { Self.put(m, "w\(i % 64)-\(i)", "v\(i)", at: LogIndex(i + 1)) }
        let captured = m.shards  // what `captureSnapshot` holds
        Self.put(m, "fresh", "x", at: LogIndex(keys + 1))
        let copied = zip(captured, m.shards).filter { Self.storage($0.0) != Self.storage($0.1) }
        #expect(copied.count == 1, "\(copied.count) shards were copied")
        // A map in one piece would have copied all 20,000 keys.
        let copiedKeys = copied.reduce(0) { $0 + $1.0.count }
        #expect(copiedKeys <= keys / 100, "the put copied storage holding \(copiedKeys) of \(keys) keys")
    }

    @Test func aCaptureEncodesTheStateAtCaptureTimeInKeyOrder() throws {
        let m = KeyValueStateMachine()
        for i in 0..<500 { Self.put(m, "k\(i)", "a\(i)", at: LogIndex(i + 1)) }
        let atCapture = m.snapshot()
        let serialize = m.captureSnapshot()
        for i in 0..<500 where i % 2 == 0 { Self.put(m, "k\(i)", "b\(i)", at: LogIndex(501 + i)) }
        _ = m.apply(KeyValueStateMachine.Command.delete(key: Array("k1".utf8)).encoded(), index: 2_000)
        #expect(serialize() == atCapture, "later puts and deletes reached the captured snapshot")
        // The same keys put in another order encode to the same bytes.
        let other = KeyValueStateMachine()
        for i in (0..<500).reversed() { Self.put(other, "k\(i)", "a\(i)", at: LogIndex(500 - i)) }
        #expect(other.snapshot() == atCapture)
        let restored = KeyValueStateMachine()
        try restored.restore(atCapture, index: 500)
        #expect(restored.map.count == 500 && restored.map[Array("k7".utf8)] == Array("a7".utf8))
        #expect(restored.query(Array("k499".utf8)) == [KeyValueStateMachine.ResultCode.present.rawValue] + Array("a499".utf8))
    }

    @Test func theEncodingsKeyOrderIsByteOrder() throws {
        // The comparison the encoding sorts with agrees with the generic one, on prefixes, empty
        // keys and bytes of 0x80 and over (which a signed comparison would put first).
        // Every key of up to three bytes drawn from these five.
        var keys: [[UInt8]] = [[]]
        var shorter: [[UInt8]] = [[]]
        for _ in 1...3 {
            shorter = shorter.flatMap { k in [UInt8](arrayLiteral: 0, 1, 0x7F, 0x80, 0xFF).map { k + [$0] } }
            keys += shorter
        }
        #expect(keys.count == 156)
        for a in keys {
            for b in keys {
                #expect(KeyValueStateMachine.bytesPrecede(a, b) == a.lexicographicallyPrecedes(b), "\(a) before \(b)")
            }
        }
        // And the snapshot lists its keys in that order.
        let m = KeyValueStateMachine()
        for (i, k) in keys.enumerated() {
            _ = m.apply(KeyValueStateMachine.Command.put(key: k, value: [UInt8(i % 256)]).encoded(), index: LogIndex(i + 1))
        }
        var r = ByteReader(m.snapshot(), what: "snapshot")
        _ = try r.u64()
        var listed: [[UInt8]] = []
        for _ in 0..<(try r.u32()) { listed.append(try r.blob(max: 1 << 20)); _ = try r.blob(max: 1 << 20) }
        #expect(listed == Set(keys).sorted { $0.lexicographicallyPrecedes($1) })
    }

    @Test func theEncodingThreadRunsAtTheLowestPriorityAndOnlyIt() {
        let mine = getpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0)
        let seen = DispatchSemaphore(value: 0)
        nonisolated(unsafe) var lowered: Int32 = 0
        let t = Thread {
            lowestCPUPriorityForThisThread()
            lowered = getpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0)
            seen.signal()
        }
        t.start()
        seen.wait()
        #expect(lowered == 19)
        #expect(getpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0) == mine, "the calling thread's priority changed too")
    }
}
