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

    /// Small segments and frequent compactions: the writer is killed in whatever phase it is
    /// in (a group commit, a new segment's creation, a dead segment's removal), eight times over
    /// one store. After each kill the store opens, holds every index reported durable above its
    /// compaction point with its payload, and lists exactly the segment files it has.
    @Test func killedWhileStartingAndRemovingSegmentsLosesNothing() throws {
        let dir = TempDir("crash-segments")
        defer { dir.remove() }
        var reportedMax: LogIndex = 0
        for round in 1...8 {
            let child = try Child(try builtExecutable("plover"),
                                  ["_stablelog-writer", dir.path, "--payload-bytes", "100", "--segment-kib", "16",
                                   "--compact-every", "300"])
            let target = reportedMax + LogIndex(700 + 400 * round)
            #expect(child.waitForLine { (LogIndex($0) ?? 0) >= target }, "round \(round): the writer reported too few durable entries")
            child.kill(SIGKILL)
            let reported = child.output.compactMap { LogIndex($0) }
            let durable = try #require(reported.max())
            reportedMax = durable

            let log = try BerkeleyDBLog.open(path: dir.path)
            #expect(log.lastIndex >= durable)
            #expect(log.firstIndex > 1 && log.firstIndex <= durable, "round \(round): first index \(log.firstIndex), durable \(durable)")
            let got = try log.entries(log.firstIndex...durable) // decoding verifies every checksum
            #expect(got.map(\.index) == Array(log.firstIndex...durable))
            #expect(got.allSatisfy { e in e.payload == (0..<100).map { UInt8(truncatingIfNeeded: e.index &* 31 &+ UInt64($0)) } },
                    "round \(round): a payload differs from what the writer appended")
            try log.close()
            try withRawStore(dir.path) { db in
                let meta = try StoreDirectory.readMetadata(db)
                let listed = meta.segments.map { LogRecord.segmentFile(start: $0) }
                let files = ((try? FileManager.default.contentsOfDirectory(atPath: dir.path)) ?? []).filter { $0.hasPrefix("entries") }
                #expect(Set(files) == Set(listed), "round \(round): files \(files.sorted()), listed \(listed)")
                // Only the oldest segment may hold compacted entries, and it holds live ones too.
                #expect(meta.segments.count > 2, "round \(round): the writer never started a segment")
                #expect(meta.segments.count < 2 || meta.segments[1] > meta.snapshot.index + 1,
                        "round \(round): segments \(meta.segments), compacted through \(meta.snapshot.index): a dead one was kept")
            }
        }
    }

    /// Killed right after a compaction removed segments, with nothing written after it: the
    /// removal's commit must be on disk before its file is gone, or the store would list files
    /// it no longer has.
    @Test(arguments: [Durability.fsync, .async])
    func killedWhenACompactionHasJustRemovedSegmentsTheStoreStillOpens(mode: Durability) throws {
        let dir = TempDir("crash-removed-\(mode)")
        defer { dir.remove() }
        let child = try Child(try builtExecutable("plover"),
                              ["_stablelog-writer", dir.path, "--durability", mode.rawValue, "--payload-bytes", "100",
                               "--segment-kib", "16", "--count", "2000", "--hold", "--async-flush-ms", "0"])
        #expect(child.waitForLine { $0 == "held" }, "the writer did not finish its compaction")
        let files = ((try? FileManager.default.contentsOfDirectory(atPath: dir.path)) ?? []).filter { $0.hasPrefix("entries") }
        #expect(files.count == 1, "segments left by the compaction: \(files)")
        child.kill(SIGKILL)
        let log = try BerkeleyDBLog.open(path: dir.path, durability: mode)
        defer { try? log.close() }
        #expect(log.firstIndex == 2000 && log.lastIndex == 2000)
        #expect(try log.entries(2000...2000).first?.payload == (0..<100).map { UInt8(truncatingIfNeeded: 2000 &* 31 &+ $0) })
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
