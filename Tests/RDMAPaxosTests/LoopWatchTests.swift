import Foundation
import Testing
@testable import RDMAPaxos

/// `LoopWatch`: a slow pass says how much of its time its thread ran, so a pass that worked can
/// be told from one whose thread waited or was not scheduled.
@Suite struct LoopWatchTests {
    /// The CPU a slow pass reports, in ms (nil when it reports none).
    static func reportedCPU(_ note: String?) -> Int? {
        guard let note, let r = note.range(of: "the thread ran ") else { return nil }
        return Int(note[r.upperBound...].prefix { $0.isNumber })
    }

    @Test func aPassThatWaitsReportsLittleCPUAndOneThatWorksReportsItsCPU() {
        var w = LoopWatch()
        w.startPass(events: 1)
        Thread.sleep(forTimeInterval: 0.05)  // waits: no CPU
        let waited = w.endPass()
        #expect(waited?.contains("took") == true, "\(waited ?? "no note")")
        #expect(Self.reportedCPU(waited).map { $0 < 20 } == true, "\(waited ?? "no note")")

        var v = LoopWatch()
        v.startPass(events: 1)
        let start = LoopWatch.threadCPU()
        var spin: UInt64 = 0
        while LoopWatch.threadCPU() &- start < 40_000_000 { spin &+= 1 }  // 40 ms of CPU
        let worked = v.endPass()
        #expect(Self.reportedCPU(worked).map { $0 >= 40 } == true, "\(worked ?? "no note") \(spin)")
    }
}
