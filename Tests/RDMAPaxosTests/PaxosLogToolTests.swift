import Foundation
import Testing
@testable import RDMAPaxos

/// Runs the built `paxos-log` binary on real stores.
@Suite struct PaxosLogToolTests {
    func paxosLog(_ args: String...) throws -> CommandResult {
        try runCommand(try builtExecutable("paxos-log"), args)
    }

    @Test func statReportsBoundsCountHardStateModeAndVersion() throws {
        let dir = TempDir("stat")
        defer { dir.remove() }
        let log = try BerkeleyDBLog.open(path: dir.path, durability: .async)
        try log.append(entries(1...30))
        try log.compactPrefix(through: 10, ballot: Ballot(term: 1, node: 1))
        try log.saveHardState(HardState(promised: Ballot(term: 5, node: 2), commitIndex: 25, membership: Membership([Member(id: 2, role: .voter)])))
        try log.close()
        let r = try paxosLog("stat", dir.path)
        #expect(r.status == 0, "\(r.stderr)")
        let fields = Dictionary(r.stdout.split(separator: "\n").map { line -> (String, String) in
            (String(line.prefix(15)).trimmingCharacters(in: .whitespaces), String(line.dropFirst(15)))
        }, uniquingKeysWith: { a, _ in a })
        #expect(fields["first index"] == "11")
        #expect(fields["last index"] == "30")
        #expect(fields["entries"] == "20")
        // One segment, which holds the compacted entries until it holds only compacted ones.
        #expect(fields["compacted"]?.hasPrefix("10 entries") == true)
        #expect(fields["segments"] == "1 (first indexes 0)")
        #expect(fields["format version"] == "3")
        #expect(fields["durability"]?.hasPrefix("async") == true)
        #expect(fields["promised"] == "5.2")
        #expect(fields["commit index"] == "25")
        #expect(fields["node"] == "not running")
    }

    @Test func dumpShowsEntriesAndJSONCarriesFullPayloads() throws {
        let dir = TempDir("dump")
        defer { dir.remove() }
        let log = try BerkeleyDBLog.open(path: dir.path)
        let payload = Array("set key=value and some more bytes to pass the preview".utf8)
        try log.append(entries(1...2))
        try log.append([LogEntry(index: 3, ballot: Ballot(term: 2, node: 7), kind: .command, payload: payload)])
        try log.close()

        let text = try paxosLog("dump", dir.path, "--from", "3", "--to", "3")
        #expect(text.status == 0)
        #expect(text.stdout.contains("3\t2.7\tcommand\t\(payload.count)\t7365"))
        #expect(text.stdout.contains("|set key=value and some more byte|"))

        let json = try paxosLog("dump", dir.path, "--json")
        let lines = json.stdout.split(separator: "\n")
        #expect(lines.count == 3)
        let obj = try #require(try JSONSerialization.jsonObject(with: Data(lines[2].utf8)) as? [String: Any])
        #expect(obj["index"] as? Int == 3)
        #expect(obj["kind"] as? String == "command")
        #expect(Data(base64Encoded: obj["payload"] as? String ?? "") == Data(payload))
    }

    @Test func verifyPassesOnAHealthyStore() throws {
        let dir = TempDir("verify-ok")
        defer { dir.remove() }
        try makeStore(dir.path, 1...500)
        let r = try paxosLog("verify", dir.path)
        #expect(r.status == 0, "\(r.stdout)\(r.stderr)")
        #expect(r.stdout.contains("OK: \(dir.path): 500 entries (1...500)"))
    }

    @Test func verifyReportsACorruptRecordAndExitsOne() throws {
        let dir = TempDir("verify-corrupt")
        defer { dir.remove() }
        try makeStore(dir.path, 1...50)
        try corruptEntry(dir.path, index: 17)
        let r = try paxosLog("verify", dir.path)
        #expect(r.status == 1)
        #expect(r.stdout.contains("problem: entry 17: checksum mismatch"))
        #expect(r.stdout.contains("FAILED: \(dir.path): 1 problem(s)"))
        let dump = try paxosLog("dump", dir.path, "--from", "17", "--to", "17")
        #expect(dump.stdout.contains("17\tCORRUPT\tchecksum mismatch"))
    }

    @Test func verifyReportsGapsAndBallotsGoingBackwards() throws {
        let dir = TempDir("verify-order")
        defer { dir.remove() }
        let log = try BerkeleyDBLog.open(path: dir.path)
        try log.append(entries(1...5, term: 3))
        try log.append(entries(6...10, term: 2))
        try log.close()
        try withRawStore(dir.path) { db in
            try StoreDirectory.inTransaction(db, sync: .fsync) { txn throws(StableLogError) in
                try db.delete(.entries, key: LogRecord.key(3), txn: txn)
                try db.delete(.entries, key: LogRecord.key(4), txn: txn)
            }
        }
        let r = try paxosLog("verify", dir.path)
        #expect(r.status == 1)
        #expect(r.stdout.contains("problem: entries 3...4 are missing"))
        #expect(r.stdout.contains("problem: entry 6: ballot 2.1 is lower than 3.1 of entry 5"))
    }

    @Test func aDirectoryThatIsNotAStoreExitsTwoAndSaysSo() throws {
        let dir = TempDir("not-a-store")
        defer { dir.remove() }
        try FileManager.default.createDirectory(atPath: dir.path, withIntermediateDirectories: true)
        for command in ["stat", "dump", "verify", "tail"] {
            let r = try paxosLog(command, dir.path)
            #expect(r.status == 2, "\(command)")
            #expect(r.stderr.contains("\(dir.path): not a plover log store"), "\(command): \(r.stderr)")
        }
        let missing = try paxosLog("stat", dir.path + "/nope")
        #expect(missing.status == 2)
        #expect(missing.stderr.contains("no such directory"))
    }

    @Test func aStoreOfAnotherVersionExitsFour() throws {
        let dir = TempDir("tool-version")
        defer { dir.remove() }
        try makeStore(dir.path, 1...1)
        try markFormat(dir.path, 9)
        let r = try paxosLog("stat", dir.path)
        #expect(r.status == 4)
        #expect(r.stderr.contains("log format version 9, this build reads version 3 (and upgrades 1 and 2 to 3)"))
    }

    @Test func statAndVerifyWorkWhileANodeHasTheStoreOpen() throws {
        let dir = TempDir("live")
        defer { dir.remove() }
        let log = try BerkeleyDBLog.open(path: dir.path)
        defer { try? log.close() }
        try log.append(entries(1...40))
        let stat = try paxosLog("stat", dir.path)
        #expect(stat.status == 0, "\(stat.stderr)")
        #expect(stat.stdout.contains("running"))
        #expect(stat.stdout.contains("last index     40"))
        let verify = try paxosLog("verify", dir.path)
        #expect(verify.status == 0, "\(verify.stderr)")
        try log.append(entries(41...42)) // the node goes on writing after the inspector left
        #expect(log.durableIndex == 42)
    }

    @Test func tailFollowsNewEntriesWhileTheNodeRuns() throws {
        let dir = TempDir("tail")
        defer { dir.remove() }
        let log = try BerkeleyDBLog.open(path: dir.path)
        try log.append(entries(1...20))
        let tail = try Child(try builtExecutable("paxos-log"), ["tail", "-f", "-n", "3", "--interval-ms", "20", dir.path])
        defer { tail.kill(SIGTERM) }
        #expect(tail.waitForLine { $0.hasPrefix("20\t") })
        #expect(!tail.output.contains { $0.hasPrefix("17\t") }, "tail -n 3 printed more than the last 3")
        try log.append(entries(21...25))
        #expect(tail.waitForLine { $0.hasPrefix("25\t") })
        // The node stops and a new one starts on the same store: tail detaches and follows it.
        try log.close()
        let next = try BerkeleyDBLog.open(path: dir.path)
        defer { try? next.close() }
        try next.append(entries(26...27))
        #expect(tail.waitForLine { $0.hasPrefix("27\t") })
        #expect(tail.output.filter { $0.hasPrefix("21\t") }.count == 1, "an entry was printed twice")
    }
}
