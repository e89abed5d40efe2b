import Foundation
import Testing
@testable import RDMAPaxos

/// A real writer process killed with SIGKILL mid-append loses nothing it reported durable.
@Suite struct StableLogCrashTests {
    @Test(arguments: [Durability.fsync, .async])
    func everyIndexReportedDurableSurvivesSIGKILL(mode: Durability) throws {
        let dir = TempDir("crash-\(mode)")
        defer { dir.remove() }
        let child = try Child(try builtExecutable("plover"),
                              ["_stablelog-writer", dir.path, "--durability", mode.rawValue, "--payload-bytes", "100"])
        #expect(child.waitForLine { (Int($0) ?? 0) >= 2000 }, "the writer reported too few durable entries")
        child.kill(SIGKILL)
        #expect(child.process.terminationReason == .uncaughtSignal)
        let reported = child.output.compactMap { LogIndex($0) }
        let durable = try #require(reported.max())
        #expect(reported == Array(1...durable), "durable indexes were reported out of order")

        let log = try BerkeleyDBLog.open(path: dir.path, durability: mode)
        defer { try? log.close() }
        #expect(log.lastIndex >= durable)
        let got = try log.entries(1...durable) // decoding verifies every checksum
        #expect(got.count == Int(durable))
        let expected = (1...durable).allSatisfy { i in
            got[Int(i - 1)].payload == (0..<100).map { UInt8(truncatingIfNeeded: i &* 31 &+ UInt64($0)) }
        }
        #expect(expected, "a payload differs from what the writer appended")
    }

    @Test func anotherProcessHoldingTheStoreMakesOpenFailWithLocked() throws {
        let dir = TempDir("other-process")
        defer { dir.remove() }
        let child = try Child(try builtExecutable("plover"), ["_stablelog-writer", dir.path])
        defer { child.kill(SIGKILL) }
        #expect(child.waitForLine { $0 == "1" })
        #expect(throws: StableLogError.locked(path: dir.path)) { try BerkeleyDBLog.open(path: dir.path) }
    }
}
