import Foundation
import Testing
import RDMAPaxosCore

/// Runs testdata/quorum/*.txt against `Quorum`, in the scenario scripts' format (a command, `----`,
/// the expected lines). Commands:
///
/// - `commit voters=1,2,3 acked=1:5,2:3` — the index a majority acknowledged (missing voters: 0)
/// - `confirm voters=1,2,3 answered=1:4,2:4` — the read round a majority answered
/// - `vote voters=1,2,3 granted=1 refused=2,3` — won, lost or pending
/// - `majority voters=1,2,3 of=1,4` — yes or no
///
/// Every command also prints `size=N`, the members a majority needs.
@Suite struct QuorumTests {
    static var files: [String] {
        let dir = Bundle.module.resourceURL!.appendingPathComponent("testdata/quorum")
        return ((try? FileManager.default.contentsOfDirectory(atPath: dir.path)) ?? []).filter { $0.hasSuffix(".txt") }.sorted()
    }

    @Test(arguments: files)
    func quorumCases(_ name: String) throws {
        let url = Bundle.module.resourceURL!.appendingPathComponent("testdata/quorum").appendingPathComponent(name)
        let blocks = try parseScenario(try String(contentsOf: url, encoding: .utf8), file: name)
        #expect(!blocks.isEmpty, "\(name) holds no cases")
        for b in blocks {
            let actual = try evaluateQuorumCase(b.command, file: name, line: b.line)
            #expect(actual == b.expected, "\(name):\(b.line): \(b.command)")
        }
    }

    @Test func aQuorumCaseWithAWrongExpectationFails() throws {
        // The runner compares what `Quorum` says; a wrong expectation must not pass.
        let actual = try evaluateQuorumCase("commit voters=1,2,3 acked=1:5,2:3,3:1", file: "inline", line: 1)
        #expect(actual == ["size=2", "3"])
        #expect(actual != ["size=2", "5"])
    }

    @Test func aMalformedCaseNamesItsLine() {
        #expect(throws: ScenarioError.self) { try evaluateQuorumCase("commit voters=1,x", file: "f.txt", line: 7) }
        do {
            _ = try evaluateQuorumCase("commit voters=1,x", file: "f.txt", line: 7)
        } catch {
            #expect("\(error)".contains("f.txt:7"))
        }
    }
}

func evaluateQuorumCase(_ command: String, file: String, line: Int) throws -> [String] {
    let words = command.split(separator: " ").map(String.init)
    func bad(_ why: String) -> ScenarioError { ScenarioError(description: "\(file):\(line): \(command): \(why)") }
    var options: [String: String] = [:]
    for w in words.dropFirst() {
        guard let eq = w.firstIndex(of: "=") else { throw bad("'\(w)' is not key=value") }
        options[String(w[..<eq])] = String(w[w.index(after: eq)...])
    }
    func ids(_ key: String) throws -> [NodeID] {
        try (options[key] ?? "").split(separator: ",").map { s in
            guard let n = NodeID(s) else { throw bad("\(key)= holds '\(s)', not a node id") }
            return n
        }
    }
    func values(_ key: String) throws -> [NodeID: UInt64] {
        var m: [NodeID: UInt64] = [:]
        for p in (options[key] ?? "").split(separator: ",") {
            let kv = p.split(separator: ":")
            guard kv.count == 2, let k = NodeID(kv[0]), let v = UInt64(kv[1]) else { throw bad("\(key)= holds '\(p)', not id:value") }
            m[k] = v
        }
        return m
    }
    let q = Quorum(try ids("voters"))
    let size = "size=\(q.size)"
    switch words.first ?? "" {
    case "commit":
        let acked = try values("acked")
        return [size, "\(q.committedIndex { acked[$0] })"]
    case "confirm":
        let answered = try values("answered")
        return [size, "\(q.confirmedRound { answered[$0] })"]
    case "vote":
        var votes: [NodeID: Bool] = [:]
        for g in try ids("granted") { votes[g] = true }
        for r in try ids("refused") {
            guard votes[r] == nil else { throw bad("\(r) both granted and refused") }
            votes[r] = false
        }
        return [size, q.result(votes).rawValue]
    case "majority":
        return [size, q.isMajority(try ids("of")) ? "yes" : "no"]
    default:
        throw bad("unknown command (commit, confirm, vote, majority)")
    }
}
