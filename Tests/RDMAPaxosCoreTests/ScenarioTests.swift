import Foundation
import Testing
import RDMAPaxosCore

/// Runs the scripts in testdata/*.txt. Each block is a command line, `----`, and the exact
/// expected output up to a blank line. `REWRITE_SCENARIOS=1 swift test --filter ScenarioTests`
/// rewrites the expectations from the actual output (review the diff before committing).
@Suite struct ScenarioTests {
    static var scripts: [String] {
        let dir = Bundle.module.resourceURL!.appendingPathComponent("testdata")
        let files = (try? FileManager.default.contentsOfDirectory(atPath: dir.path)) ?? []
        return files.filter { $0.hasSuffix(".txt") }.sorted()
    }

    @Test(arguments: scripts)
    func scenario(_ name: String) throws {
        let url = Bundle.module.resourceURL!.appendingPathComponent("testdata").appendingPathComponent(name)
        let text = try String(contentsOf: url, encoding: .utf8)
        let blocks = try parseScenario(text, file: name)
        var cluster = ScenarioCluster()
        var rewritten: [String] = []
        for b in blocks {
            cluster.output = []
            try run(b.command, on: &cluster, file: name, line: b.line)
            let actual = cluster.output.isEmpty ? ["ok"] : cluster.output
            rewritten.append(b.leading + b.command + "\n----\n" + actual.joined(separator: "\n") + "\n")
            if ProcessInfo.processInfo.environment["REWRITE_SCENARIOS"] == nil {
                #expect(actual == b.expected, "\(name):\(b.line): \(b.command)")
            }
        }
        if ProcessInfo.processInfo.environment["REWRITE_SCENARIOS"] != nil {
            // Write back into the source tree, next to this file.
            let source = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
                .appendingPathComponent("testdata").appendingPathComponent(name)
            try rewritten.joined(separator: "\n").write(to: source, atomically: true, encoding: .utf8)
        }
    }
}

struct ScenarioBlock {
    var leading: String
    var command: String
    var expected: [String]
    var line: Int
}

struct ScenarioError: Error, CustomStringConvertible {
    var description: String
}

func parseScenario(_ text: String, file: String) throws -> [ScenarioBlock] {
    let lines = text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
    var blocks: [ScenarioBlock] = []
    var i = 0
    var leading = ""
    while i < lines.count {
        let l = lines[i]
        if l.hasPrefix("#") { leading += l + "\n"; i += 1; continue }
        if l.trimmingCharacters(in: .whitespaces).isEmpty { i += 1; continue }
        guard i + 1 < lines.count, lines[i + 1] == "----" else {
            throw ScenarioError(description: "\(file):\(i + 1): expected '----' after command '\(l)'")
        }
        var expected: [String] = []
        var j = i + 2
        while j < lines.count, !lines[j].isEmpty { expected.append(lines[j]); j += 1 }
        blocks.append(ScenarioBlock(leading: leading, command: l, expected: expected, line: i + 1))
        leading = ""
        i = j
    }
    return blocks
}

func run(_ command: String, on c: inout ScenarioCluster, file: String, line: Int) throws {
    let words = command.split(separator: " ").map(String.init)
    let args = Array(words.dropFirst())
    func bad(_ why: String) -> ScenarioError { ScenarioError(description: "\(file):\(line): \(command): \(why)") }
    func node(_ i: Int) throws -> NodeID {
        guard i < args.count, let n = NodeID(args[i]), c.nodes[n] != nil else { throw bad("argument \(i + 1) must be a node id") }
        return n
    }
    func option(_ key: String) -> String? {
        args.first { $0.hasPrefix(key + "=") }.map { String($0.dropFirst(key.count + 1)) }
    }
    switch words.first ?? "" {
    case "add-nodes":
        guard let n = args.first.flatMap(Int.init) else { throw bad("need a count") }
        let start = c.nodes.count + 1
        let witness = option("witness").flatMap(NodeID.init)
        let learner = option("learner").flatMap(NodeID.init)
        if let chunk = option("chunk") {
            guard let n = Int(chunk), n > 0 else { throw bad("chunk= needs a positive byte count") }
            c.snapshotChunkBytes = n
        }
        if let batch = option("batch") {
            guard let n = Int(batch), n > 0 else { throw bad("batch= needs a positive byte count") }
            c.batchBytesMax = n
        }
        var priorities: [NodeID: UInt8] = [:]
        for p in (option("priority") ?? "").split(separator: ",") {
            let kv = p.split(separator: ":")
            if kv.count == 2, let k = NodeID(kv[0]), let v = UInt8(kv[1]) { priorities[k] = v }
        }
        c.addNodes((start..<start + n).map { i in
            let id = NodeID(i)
            let role: MemberRole = id == witness ? .witness : id == learner ? .learner : .voter
            return Member(id: id, role: role, priority: priorities[id] ?? (role == .voter ? 1 : 0))
        })
    case "campaign": c.with(try node(0)) { $0.campaign() }
    case "propose":
        let id = try node(0)
        do {
            try c.with(id) { r in try r.propose([Array(args.dropFirst().joined(separator: " ").utf8)]).actions }
        } catch let e as ProposalRefusal {
            c.emit("\(id): refused: \(e)")
        }
    case "stabilize": c.stabilize()
    case "deliver": c.deliver(from: option("from").flatMap(NodeID.init), to: option("to").flatMap(NodeID.init))
    case "persist": c.persistAll(try node(0))
    case "drop":
        let from = option("from").flatMap(NodeID.init)
        let to = option("to").flatMap(NodeID.init)
        let (hit, keep) = (c.queue.filter { (from == nil || $0.from == from) && (to == nil || $0.to == to) },
                           c.queue.filter { !((from == nil || $0.from == from) && (to == nil || $0.to == to)) })
        for m in hit { c.emit("dropped \(m)") }
        c.queue = keep
    case "tick":
        let id = try node(0)
        for _ in 0..<(option("n").flatMap(Int.init) ?? 1) { c.tick(id) }
    case "tick-all":
        for _ in 0..<(option("n").flatMap(Int.init) ?? 1) {
            for id in c.ids where c.nodes[id]!.replica != nil { c.tick(id) }
        }
    case "tick-stabilize":
        // Ticks every live node and delivers everything after each tick.
        for _ in 0..<(option("n").flatMap(Int.init) ?? 1) {
            for id in c.ids where c.nodes[id]!.replica != nil { c.tick(id) }
            c.stabilize()
        }
    case "partition":
        let group = Set(try args.indices.map { try node($0) })
        for a in c.ids { for b in c.ids where group.contains(a) != group.contains(b) { c.cut.insert([a, b]) } }
    case "partition-oneway":
        // Messages from the other nodes to these are lost; these still reach the others.
        let group = Set(try args.indices.map { try node($0) })
        for a in c.ids where !group.contains(a) { for b in group { c.cut.insert([a, b]) } }
    case "heal": c.cut = []
    case "stall-disk": c.stalled.insert(try node(0))
    case "unstall-disk": c.stalled.remove(try node(0))
    case "crash": c.crash(try node(0))
    case "restart":
        // restart ID [amnesia] [intact|lost]: lose the disk first; tell the replica its state is
        // intact or may have been lost (default: lost exactly when the disk was).
        let flags = Set(args.dropFirst())
        guard flags.isSubset(of: ["amnesia", "intact", "lost"]) else { throw bad("usage: restart ID [amnesia] [intact|lost]") }
        c.restart(try node(0), amnesia: flags.contains("amnesia"),
                  intact: flags.contains("intact") ? true : flags.contains("lost") ? false : nil)
    case "compact":
        let id = try node(0)
        let data = Array(c.nodes[id]!.applied.joined(separator: ",").utf8)
        c.with(id) { r in r.compact(through: r.compactableIndex, snapshot: r.isWitness ? [] : data) }
    case "transfer-leader":
        let (id, target) = (try node(0), try node(1))
        do { try c.with(id) { try $0.transferLeadership(to: target) } } catch let e as ProposalRefusal { c.emit("\(id): refused: \(e)") }
    case "read":
        let id = try node(0)
        guard args.count > 1, let rid = UInt64(args[1]) else { throw bad("need a read id") }
        do { try c.with(id) { try $0.read(id: rid) } } catch let e as ProposalRefusal { c.emit("\(id): refused: \(e)") }
    case "membership":
        // membership LEADER add|remove|set NODE [voter|witness|learner]
        let id = try node(0)
        guard args.count >= 3, let target = NodeID(args[2]), let r = c.nodes[id]?.replica else { throw bad("usage: membership LEADER add|remove|set NODE [ROLE]") }
        var ms = r.membership.members.filter { $0.id != target }
        if args[1] != "remove" {
            let role = args.count > 3 ? MemberRole.allCases.first { $0.description == args[3] } : .voter
            guard let role else { throw bad("unknown role \(args[3])") }
            ms.append(Member(id: target, role: role, priority: role == .voter ? 1 : 0))
            if c.nodes[target] == nil { c.start(target, bootstrap: .empty, seed: c.seed) }
        }
        do { try c.with(id) { try $0.proposeMembership(Membership(ms)).actions } } catch let e as ProposalRefusal { c.emit("\(id): refused: \(e)") }
    case "status":
        for id in c.ids { c.emit(c.status(id)) }
    case "log":
        let id = try node(0)
        guard let r = c.nodes[id]!.replica else { c.emit("\(id) is down"); break }
        for i in r.firstIndex...max(r.firstIndex, r.lastIndex) {
            guard let e = r.entry(at: i) else { continue }
            c.emit("\(e.index)@\(e.ballot) \(e.kind) \(String(decoding: e.payload, as: UTF8.self))")
        }
    default:
        throw bad("unknown command")
    }
}
