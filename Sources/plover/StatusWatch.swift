import Foundation
import RDMAPaxos

/// `plover status --watch`: a live table of the cluster, redrawn every interval: each replica's
/// role, ballot, commit and applied index, commit rate since the last draw, and, as the leader
/// sees them, each follower's lag in entries.
struct StatusWatch {
    let endpoints: [NodeID: String]
    let only: NodeID?
    let interval: Double

    func run() throws {
        let client = NodeClient(endpoints: endpoints, timeout: .milliseconds(500))
        var previous: [NodeID: (at: Double, commit: Int)] = [:]
        let tty = isatty(1) == 1
        while true {
            let now = Date().timeIntervalSince1970
            var rows: [[String]] = []
            var lag: [NodeID: Int] = [:]
            var statuses: [NodeID: [String: String]] = [:]
            for id in endpoints.keys.sorted() where only == nil || only == id {
                statuses[id] = (try? client.status(of: id)).map(Self.parse)
            }
            // Followers' lag as the leader tracks it: its last index minus their match.
            if let (_, l) = statuses.first(where: { $0.value["role"] == "leader" }), let last = Int(l["last_index"] ?? "") {
                for pair in (l["follower_match"] ?? "").split(separator: ",") {
                    let kv = pair.split(separator: ":")
                    if kv.count == 2, let f = NodeID(kv[0]), let m = Int(kv[1]) { lag[f] = last - m }
                }
            }
            for id in endpoints.keys.sorted() where only == nil || only == id {
                guard let s = statuses[id] else { rows.append(["\(id)", "unreachable", "", "", "", "", "", ""]); continue }
                let commit = Int(s["commit_index"] ?? "") ?? 0
                let rate = previous[id].map { p in String(format: "%.0f/s", Double(commit - p.commit) / max(0.001, now - p.at)) } ?? "–"
                previous[id] = (now, commit)
                rows.append(["\(id)", s["role"] ?? "?", s["ballot"] ?? "?", s["leader"] ?? "?", "\(commit)", s["applied_index"] ?? "?",
                             rate, lag[id].map(String.init) ?? (s["role"] == "leader" ? "–" : "")])
            }
            var out = tty ? "\u{1B}[H\u{1B}[2J" : ""
            out += "plover cluster, \(DateFormatter.localizedString(from: Date(), dateStyle: .none, timeStyle: .medium)) (every \(interval) s; Ctrl-C stops)\n"
            out += Self.table(["node", "role", "ballot", "leader", "commit", "applied", "commits", "lag (entries)"], rows)
            if let failures = Optional(statuses.compactMap { id, s in s["failure"].map { "node \(id): \($0)" } }), !failures.isEmpty {
                out += "\n" + failures.joined(separator: "\n") + "\n"
            }
            // One write per frame, straight to the descriptor (no buffering to flush).
            let frame = Array((out + (tty ? "" : "\n")).utf8)
            _ = frame.withUnsafeBytes { write(1, $0.baseAddress, $0.count) }
            Thread.sleep(forTimeInterval: interval)
        }
    }

    static func parse(_ text: String) -> [String: String] {
        var d: [String: String] = [:]
        for line in text.split(separator: "\n") {
            guard let eq = line.firstIndex(of: "=") else { continue }
            d[String(line[..<eq])] = String(line[line.index(after: eq)...])
        }
        return d
    }

    /// Columns padded to their widest cell.
    static func table(_ header: [String], _ rows: [[String]]) -> String {
        let all = [header] + rows
        let widths = header.indices.map { c in all.map { $0[c].count }.max() ?? 0 }
        return all.map { r in r.indices.map { r[$0].padding(toLength: widths[$0], withPad: " ", startingAt: 0) }.joined(separator: "  ") }
            .joined(separator: "\n") + "\n"
    }
}
