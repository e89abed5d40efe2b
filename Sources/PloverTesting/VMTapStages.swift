import Foundation

/// Where the frames that release on match let out waited, stage by stage, from both replicas'
/// stage traces (`run_dir/stages.log`, written with `PLOVER_VM_TRACE=1`; VMReplica's
/// StageTrace.swift): CLOCK_MONOTONIC nanoseconds, a stage and a frame key per line. Both
/// replicas run on this host, so their times compare.
struct VMTapStages {
    /// The stages reported, in path order: (name, the first event, the second event), where an
    /// event is "P:" (primary) or "B:" (backup) and a trace stage.
    static let rows: [(String, String, String)] = [
        ("input: tap → committed (primary, the leader)", "P:tap", "P:commit"),
        ("input: committed on the primary → on the backup", "P:commit", "B:commit"),
        ("input: committed → into the primary's QEMU", "P:commit", "P:nic-in"),
        ("input: committed → into the backup's QEMU", "B:commit", "B:nic-in"),
        ("guest: input → answer, primary", "P:nic-in", "P:out"),
        ("guest: input → answer, backup", "B:nic-in", "B:out"),
        ("digest: backup's answer → sent on the syncvm link", "B:out", "B:digest-sent"),
        ("digest: sent → received by the primary", "B:digest-sent", "P:digest-recv"),
        ("digest: received → frame released", "P:digest-recv", "P:release-match"),
        ("**match wait: primary's answer → released**", "P:out", "P:release-match"),
    ]

    /// The mean match wait split into parts that add up: the backup's input lag, its slower
    /// execution, the digest's way back.
    static let parts: [(String, [(String, String)], [(String, String)])] = [
        ("the backup's input lag (input into its QEMU after the primary's)", [("P:nic-in", "B:nic-in")], []),
        ("of which: the backup learns the commit later", [("P:commit", "B:commit")], []),
        ("the backup's guest slower than the primary's", [("B:nic-in", "B:out")], [("P:nic-in", "P:out")]),
        ("the digest's way back (backup's answer → released)", [("B:out", "P:release-match")], []),
    ]

    /// Per released frame, the time of each event (ns).
    var frames: [[String: UInt64]] = []

    /// The frames released by a match between `from` and `to` (CLOCK_MONOTONIC ns), with the
    /// input the primary wrote into its QEMU last before each answer.
    init(primaryLog: String, backupLog: String, from: UInt64, to: UInt64) {
        let p = Trace(path: primaryLog), b = Trace(path: backupLog)
        for (t, key) in p.byStage["release-match"] ?? [] where t >= from && t <= to {
            var e: [String: UInt64] = ["P:release-match": t]
            guard let pOut = p.last("out", key, atOrBefore: t) else { continue }
            e["P:out"] = pOut
            let later = t + 1_000_000_000
            for (stage, side) in [("out", "B"), ("digest-sent", "B")] { e["\(side):\(stage)"] = b.last(stage, key, atOrBefore: later) }
            e["P:digest-recv"] = p.last("digest-recv", key, atOrBefore: t)
            // The answer's input: the one the primary wrote into its QEMU last before it.
            guard let (pIn, input) = p.lastOf("nic-in", atOrBefore: pOut) else { continue }
            e["P:nic-in"] = pIn
            e["P:tap"] = p.last("tap", input, atOrBefore: pIn)
            e["P:commit"] = p.last("commit", input, atOrBefore: pIn)
            if let bOut = e["B:out"] {
                e["B:commit"] = b.last("commit", input, atOrBefore: bOut)
                e["B:nic-in"] = b.last("nic-in", input, atOrBefore: bOut)
            }
            frames.append(e)
        }
    }

    func durations(_ a: String, _ b: String) -> [Double] {
        frames.compactMap { e in
            guard let x = e[a], let y = e[b] else { return nil }
            return (Double(y) - Double(x)) / 1e6
        }
    }

    /// The markdown table: stage, frames, mean, p50, p90 (ms).
    func table(title: String) -> String {
        func f(_ x: Double) -> String { String(format: "%.2f", x) }
        var s = "\n### \(title): \(frames.count) frames released by a match\n\n| stage | frames | mean ms | p50 ms | p90 ms |\n|---|---|---|---|---|\n"
        for (name, a, b) in Self.rows {
            let d = durations(a, b).sorted()
            guard !d.isEmpty else { s += "| \(name) | 0 | - | - | - |\n"; continue }
            s += "| \(name) | \(d.count) | \(f(d.reduce(0, +) / Double(d.count))) | \(f(d[d.count / 2])) | \(f(d[min(d.count - 1, d.count * 9 / 10)])) |\n"
        }
        // The additive split, over frames that have every event.
        let complete = frames.filter { e in Self.parts.allSatisfy { p in (p.1 + p.2).allSatisfy { e[$0.0] != nil && e[$0.1] != nil } } }
        guard !complete.isEmpty else { return s }
        s += "\nThe mean match wait (\(complete.count) frames with every event) splits into:"
        for (name, plus, minus) in Self.parts {
            let sum = complete.reduce(0.0) { acc, e in
                acc + plus.reduce(0.0) { $0 + Double(e[$1.1]!) - Double(e[$1.0]!) } - minus.reduce(0.0) { $0 + Double(e[$1.1]!) - Double(e[$1.0]!) }
            }
            s += " \(name) \(f(sum / Double(complete.count) / 1e6)) ms;"
        }
        return String(s.dropLast()) + ".\n"
    }

    /// Now on CLOCK_MONOTONIC in nanoseconds, as the traces write it.
    static var now: UInt64 {
        var t = timespec()
        clock_gettime(CLOCK_MONOTONIC, &t)
        return UInt64(t.tv_sec) * 1_000_000_000 + UInt64(t.tv_nsec)
    }

    /// One replica's trace: each (stage, key)'s times, and each stage's (time, key)s, sorted.
    struct Trace {
        var times: [String: [UInt64]] = [:]
        var byStage: [String: [(UInt64, String)]] = [:]

        init(path: String) {
            let text = (try? String(contentsOfFile: path, encoding: .utf8)) ?? ""
            for line in text.split(separator: "\n") {
                let f = line.split(separator: " ")
                guard f.count == 3, let t = UInt64(f[0]) else { continue }
                times["\(f[1]) \(f[2])", default: []].append(t)
                byStage[String(f[1]), default: []].append((t, String(f[2])))
            }
            for k in times.keys { times[k]!.sort() }
            for k in byStage.keys { byStage[k]!.sort { $0.0 < $1.0 } }
        }

        /// The last time `stage` happened to `key` at or before `t`.
        func last(_ stage: String, _ key: String, atOrBefore t: UInt64) -> UInt64? {
            guard let v = times["\(stage) \(key)"] else { return nil }
            return v.last { $0 <= t }
        }

        /// The last `stage` event of any key at or before `t`.
        func lastOf(_ stage: String, atOrBefore t: UInt64) -> (UInt64, String)? {
            guard let v = byStage[stage] else { return nil }
            var lo = 0, hi = v.count
            while lo < hi {
                let mid = (lo + hi) / 2
                if v[mid].0 <= t { lo = mid + 1 } else { hi = mid }
            }
            return lo > 0 ? v[lo - 1] : nil
        }
    }
}
