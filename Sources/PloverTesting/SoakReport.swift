import Foundation

/// The markdown of `plover bench soak`: settings, one row per sample, and the verdicts the soak
/// exists for (no leader change, no failed put, the last minute as fast as the first).
struct SoakReport {
    var command: String
    var machine: MachineDescription
    var durability: String
    var clients: Int, valueBytes: Int, keySpace: Int
    var sampleSeconds: Double, seconds: Double
    var start: UInt64
    var samples: [SoakSample]
    var puts: [SoakLoad.ThreadLog]

    /// Puts finished in [from, to) seconds after the start, their p99 in ms, and failures in it.
    func window(_ from: Double, _ to: Double) -> (puts: Int, p99Ms: Double, failures: Int) {
        let lo = start + UInt64(from * 1e9), hi = start + UInt64(to * 1e9)
        var lat: [UInt64] = []
        var failures = 0
        for log in puts {
            for (i, t) in log.finishedAt.enumerated() where t >= lo && t < hi { lat.append(log.latency[i]) }
            failures += log.failedAt.filter { $0 >= lo && $0 < hi }.count
        }
        lat.sort()
        let p99 = lat.isEmpty ? 0 : Double(lat[min(lat.count - 1, Int(Double(lat.count) * 0.99))]) / 1e6
        return (lat.count, p99, failures)
    }

    func markdown() -> String {
        var s = "# Soak benchmark results\n\n"
        s += "Command: `make bench-soak` (release build, then `plover \(command)`).\n\n"
        s += machine.markdownLine(dataDirs: "data dirs")
        s += "Load: \(clients) closed-loop clients (`NodeClient`, following the leader), values of \(valueBytes) B, keys cycled over \(keySpace) "
        s += "(a state of about \(keySpace * valueBytes / 1_000_000) MB per replica), \(Int(seconds)) s on one 3-replica cluster with durability `\(durability)` "
        s += "(tick 10 ms, heartbeat 10 ticks, election timeout 100 ticks, disk stall 200 ticks, compaction defaults). "
        s += "A sample every \(Int(sampleSeconds)) s; RSS and disk are the sums over the three replicas.\n\n"
        s += "| second | puts/s | p99 ms | failed puts | leader changes so far | RSS MB | disk MB |\n|---:|---:|---:|---:|---:|---:|---:|\n"
        var previous = 0.0
        for x in samples {
            let w = window(previous, x.second)
            s += String(format: "| %.0f | %.0f | %.1f | %d | %d | %.0f | %.0f |\n", x.second, Double(w.puts) / max(0.001, x.second - previous),
                        w.p99Ms, w.failures, x.leaderChanges, Double(x.rssBytes) / 1e6, Double(x.diskBytes) / 1e6)
            previous = x.second
        }
        let minute = min(60, seconds / 2)
        let first = window(0, minute), last = window(seconds - minute, seconds), all = window(0, seconds)
        let ratio = first.puts == 0 ? 0 : Double(last.puts) / Double(first.puts)
        let changes = samples.last?.leaderChanges ?? 0
        s += "\n## Verdicts\n\n| check | goal | measured | met |\n|---|---|---|---|\n"
        s += "| leader changes | 0 | \(changes) | \(changes == 0 ? "yes" : "no") |\n"
        s += "| failed or timed-out puts | 0 | \(all.failures) | \(all.failures == 0 ? "yes" : "no") |\n"
        s += String(format: "| last %.0f s vs first %.0f s throughput | ≥ 0.8× | %.2f× (%.0f vs %.0f puts/s) | %@ |\n", minute, minute, ratio,
                    Double(last.puts) / minute, Double(first.puts) / minute, ratio >= 0.8 ? "yes" : "no")
        s += String(format: "| puts acknowledged | – | %d (%.0f/s), p99 %.1f ms | – |\n", all.puts, Double(all.puts) / seconds, all.p99Ms)
        if let e = puts.lazy.compactMap(\.firstError).first { s += "\nFirst client error: `\(e.prefix(300))`\n" }
        return s
    }
}
