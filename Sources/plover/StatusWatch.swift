import Foundation
import RDMAPaxos

/// `plover status --watch`: a live table of the cluster, redrawn every interval: each replica's
/// role, ballot, commit and applied index, commit rate since the last draw, and, as the leader
/// sees them, each follower's lag in entries and in bytes. The bytes are an estimate: the lag in
/// entries times the mean size of the entries the leader's log holds (`log_bytes` over its
/// entries), since no replica counts the bytes of a range of its log.
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
            var meanEntryBytes: Double?
            var statuses: [NodeID: [String: String]] = [:]
            for id in endpoints.keys.sorted() where only == nil || only == id {
                statuses[id] = (try? client.status(of: id)).map(Self.parse)
            }
            // Followers' lag as the leader tracks it: its last index minus their match.
            if let (_, l) = statuses.first(where: { $0.value["role"] == "leader" }), let last = Int(l["last_index"] ?? "") {
                if let first = Int(l["first_index"] ?? ""), let bytes = Int(l["log_bytes"] ?? ""), last >= first {
                    meanEntryBytes = Double(bytes) / Double(last - first + 1)
                }
                for pair in (l["follower_match"] ?? "").split(separator: ",") {
                    let kv = pair.split(separator: ":")
                    if kv.count == 2, let f = NodeID(kv[0]), let m = Int(kv[1]) { lag[f] = last - m }
                }
            }
            for id in endpoints.keys.sorted() where only == nil || only == id {
                guard let s = statuses[id] else { rows.append(["\(id)", "unreachable", "", "", "", "", "", "", ""]); continue }
                let commit = Int(s["commit_index"] ?? "") ?? 0
                let rate = previous[id].map { p in String(format: "%.0f/s", Double(commit - p.commit) / max(0.001, now - p.at)) } ?? "–"
                previous[id] = (now, commit)
                rows.append(["\(id)", s["role"] ?? "?", s["ballot"] ?? "?", s["leader"] ?? "?", "\(commit)", s["applied_index"] ?? "?",
                             rate, lag[id].map(String.init) ?? (s["role"] == "leader" ? "–" : ""),
                             lag[id].map { Self.bytes(Double($0) * (meanEntryBytes ?? 0)) } ?? (s["role"] == "leader" ? "–" : "")])
            }
            var out = tty ? "\u{1B}[H\u{1B}[2J" : ""
            out += "plover cluster, \(DateFormatter.localizedString(from: Date(), dateStyle: .none, timeStyle: .medium)) (every \(interval) s; Ctrl-C stops)\n"
            out += Self.table(["node", "role", "ballot", "leader", "commit", "applied", "commits", "lag (entries)", "lag (bytes, est.)"], rows)
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

    /// A byte count in B, KiB, MiB or GiB, e.g. "~12.5 KiB" ("0 B" for none).
    static func bytes(_ n: Double) -> String {
        guard n >= 1 else { return "0 B" }
        var v = n, unit = 0
        let units = ["B", "KiB", "MiB", "GiB", "TiB"]
        while v >= 1024 && unit < units.count - 1 { v /= 1024; unit += 1 }
        return unit == 0 ? String(format: "~%.0f B", v) : String(format: "~%.1f ", v) + units[unit]
    }

    /// Columns padded to their widest cell.
    static func table(_ header: [String], _ rows: [[String]]) -> String {
        let all = [header] + rows
        let widths = header.indices.map { c in all.map { $0[c].count }.max() ?? 0 }
        return all.map { r in r.indices.map { r[$0].padding(toLength: widths[$0], withPad: " ", startingAt: 0) }.joined(separator: "  ") }
            .joined(separator: "\n") + "\n"
    }
}
