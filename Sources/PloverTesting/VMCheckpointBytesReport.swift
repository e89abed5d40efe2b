import Foundation

// What `plover bench vm-bytes` reads from the replicas' `checkpoints.log` lines, and its markdown report.

extension VMCheckpointBytesBench {
    /// One checkpoint's numbers, from a `checkpoints.log` line of the primary.
    struct Checkpoint {
        var fields: [String: String]
        func n(_ k: String) -> Int { Int(fields[k] ?? "") ?? 0 }
        func ms(_ k: String) -> Double { Double(fields[k] ?? "") ?? 0 }
        var ramSent: Int { n("page_bytes") + n("control_bytes") }
        var ramAllDirty: Int { n("all_dirty_bytes") }
        var identical: Int { n("union") - n("divergent") }
        var diskSent: Int { n("disk_bytes") + n("disk_control_bytes") }
        var diskAllDirty: Int { n("disk_all_dirty_bytes") }
        /// A release-on-match checkpoint asked for by an output mismatch.
        var byMismatch: Bool { fields["mismatch"] != nil }

        /// The primary's pause (`pause_ms`: `stop` → `cont` answered) in the order the replica
        /// runs its steps, which add up to it: the hash-diff scan of all RAM (`scan_ms`), reading
        /// the disk's dirty bitmap (`disk_collect_ms`), the RAM sync (`sync_ms` counts from the
        /// `stop` and holds the two before it), the disk step (`disk_ms`), the device-state
        /// migration (`migrate_ms`) and the rest (`cont`).
        var pauseParts: [Double] {
            let scan = ms("scan_ms"), bitmap = ms("disk_collect_ms"), sync = ms("sync_ms"), disk = ms("disk_ms"), device = ms("migrate_ms")
            return [scan, bitmap, sync - scan - bitmap, disk, device, ms("pause_ms") - sync - disk - device]
        }
        static let pausePartNames = ["scan (hash-diff of all RAM)", "disk bitmap read", "RAM sync", "disk step", "device state", "rest (stop/cont)"]
    }

    /// The primary's output-guard counters (`OutputGuard.metrics`, cumulative, on each of its
    /// `checkpoints.log` lines), or their growth over a run.
    struct ReleaseCounters: Equatable {
        var byMatch = 0
        var byCheckpoint = 0
        var mismatches = 0
        var matchWaits = 0
        var matchWaitTotalMs = 0.0

        init(byMatch: Int = 0, byCheckpoint: Int = 0, mismatches: Int = 0, matchWaits: Int = 0, matchWaitTotalMs: Double = 0) {
            (self.byMatch, self.byCheckpoint, self.mismatches, self.matchWaits, self.matchWaitTotalMs) = (byMatch, byCheckpoint, mismatches, matchWaits, matchWaitTotalMs)
        }

        /// From one line's fields; nil when the line has none (not a primary's).
        init?(_ f: [String: String]) {
            guard let m = f["released_by_match"].flatMap({ Int($0) }) else { return nil }
            self.init(byMatch: m, byCheckpoint: Int(f["released_by_checkpoint"] ?? "") ?? 0, mismatches: Int(f["output_mismatches"] ?? "") ?? 0,
                      matchWaits: Int(f["match_waits"] ?? "") ?? 0, matchWaitTotalMs: Double(f["match_wait_total_ms"] ?? "") ?? 0)
        }

        static func - (a: Self, b: Self) -> Self {
            Self(byMatch: a.byMatch - b.byMatch, byCheckpoint: a.byCheckpoint - b.byCheckpoint, mismatches: a.mismatches - b.mismatches,
                 matchWaits: a.matchWaits - b.matchWaits, matchWaitTotalMs: a.matchWaitTotalMs - b.matchWaitTotalMs)
        }
    }

    /// One redis-benchmark run, the checkpoints the primary completed during it, and the pages
    /// the backup's sync rewrote at each of them (by log index).
    struct Run {
        var mode: String
        var clients: Int
        var pipeline: Int
        var requests: Int
        var rps: Double
        var checkpoints: [Checkpoint]
        var divergentPages: [String: Set<Int>]
        /// Frames released over the run (up to its last checkpoint), by how.
        var released = ReleaseCounters()

        /// Pages that diverged in at least half of the run's checkpoints.
        var recurring: Set<Int> {
            var seen: [Int: Int] = [:]
            for set in divergentPages.values { for p in set { seen[p, default: 0] += 1 } }
            return Set(seen.filter { $0.value * 2 >= max(1, divergentPages.count) }.keys)
        }
    }

    /// The pages in a `divergent_pages=` field ("3,7-9").
    static func pages(_ ranges: String) -> Set<Int> {
        var out = Set<Int>()
        for part in ranges.split(separator: ",") {
            let ends = part.split(separator: "-").compactMap { Int($0) }
            if ends.count == 1 { out.insert(ends[0]) } else if ends.count == 2, ends[0] <= ends[1] { out.formUnion(ends[0]...ends[1]) }
        }
        return out
    }

    /// Nearest-rank percentile `p` (0…1) of `v`; NaN for none.
    static func percentile(_ v: [Double], _ p: Double) -> Double {
        let s = v.sorted()
        return s.isEmpty ? .nan : s[min(s.count - 1, max(0, Int((Double(s.count) * p).rounded(.up)) - 1))]
    }

    static func report(_ runs: [Run], diskMb: Int, machine: String, command: String) -> String {
        func f(_ x: Double) -> String { String(format: "%.1f", x) }
        func f2(_ x: Double) -> String { String(format: "%.2f", x) }
        func ratio(_ all: Int, _ sent: Int) -> String { sent == 0 ? "-" : String(format: "%.2f×", Double(all) / Double(sent)) }
        func mean(_ v: [Int]) -> Double { v.isEmpty ? .nan : Double(v.reduce(0, +)) / Double(v.count) }
        func meanD(_ v: [Double]) -> Double { v.isEmpty ? .nan : v.reduce(0, +) / Double(v.count) }
        func p50(_ v: [Int]) -> Int { let s = v.sorted(); return s.isEmpty ? 0 : s[(s.count - 1) / 2] }
        var s = "# Bytes per VM checkpoint under redis-benchmark SET\n\n" + machine
        s += "`\(command)`; 128 MiB guest under TCG with a \(diskMb) MiB disk per VM, Debian's redis-server 7 in it with its AOF on the disk "
        s += "(`appendfsync everysec`), `redis-benchmark -t set -d 1024 -r 1000000 -c C -P P -n N` from a client network namespace over "
        s += "the tap path, `checkpoint_min_gap_ms = 0` (the default). *Checkpoint release* (`release_on_match = false`): every guest frame "
        s += "waits for a checkpoint, so the primary checkpoints whenever output is held and its guest is idle. *Release on match* "
        s += "(`release_on_match = true`, the default): a frame goes out once the backup's guest sent the same one, and the primary "
        s += "checkpoints on a mismatch, on output held `output_hold_max_ms` (100 ms), and at most every second while frames go out by "
        s += "matching. Each mode runs on a fresh cluster. Per checkpoint, from the primary's `checkpoints.log`: syncvm's RAM "
        s += "bytes (divergent pages + control frames) against a Remus-style transfer of every page the primary dirtied (hash-diff: pages whose "
        s += "contents changed since the last checkpoint), the union's pages that hashed equal (identical-dirty) and those that differed "
        s += "(divergent), the disk step's bytes against every block the primary wrote (QEMU's dirty bitmap), and both together. "
        s += "The device state migrated at each checkpoint (about 320 KB, the same for both schemes) is in neither column. "
        s += "Divergent pages are split by the backup's list of the pages each sync rewrote: *recurring* ones diverged in at least half "
        s += "of the run's checkpoints (the same page numbers again and again: the guest kernel's timers, statistics and per-CPU data), "
        s += "*other* ones did not.\n\n"
        s += "## Summary per run (steady-state checkpoints while redis-benchmark ran)\n\n"
        s += "| release | C×P | SETs | SET/s | checkpoints (by a mismatch) | SETs per checkpoint | primary dirty pages (mean) | identical-dirty (mean) | divergent (mean) | divergent recurring / other (mean) | RAM sent (mean B) | RAM all-dirty (mean B) | RAM all-dirty / sent | disk sent (mean B) | disk all-dirty (mean B) | disk all-dirty / sent | RAM+disk all-dirty / sent |\n"
        s += "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
        for r in runs {
            let c = r.checkpoints
            let rec = r.recurring
            let split = c.compactMap { r.divergentPages[$0.fields["index"] ?? ""] }.map { set in (set.intersection(rec).count, set.subtracting(rec).count) }
            let ramSent = c.map(\.ramSent).reduce(0, +), ramAll = c.map(\.ramAllDirty).reduce(0, +)
            let diskSent = c.map(\.diskSent).reduce(0, +), diskAll = c.map(\.diskAllDirty).reduce(0, +)
            s += "| \(r.mode) | \(r.clients)×\(r.pipeline) | \(r.requests) | \(f(r.rps)) | \(c.count) (\(c.filter(\.byMismatch).count)) | "
            s += "\(c.isEmpty ? "-" : f(Double(r.requests) / Double(c.count))) | "
            s += "\(f(mean(c.map { $0.n("primary_dirty") }))) | \(f(mean(c.map(\.identical)))) | \(f(mean(c.map { $0.n("divergent") }))) | "
            s += "\(f(mean(split.map(\.0)))) / \(f(mean(split.map(\.1)))) | "
            s += "\(wholeNumber(mean(c.map(\.ramSent)))) | \(wholeNumber(mean(c.map(\.ramAllDirty)))) | **\(ratio(ramAll, ramSent))** | "
            s += "\(wholeNumber(mean(c.map(\.diskSent)))) | \(wholeNumber(mean(c.map(\.diskAllDirty)))) | **\(ratio(diskAll, diskSent))** | **\(ratio(ramAll + diskAll, ramSent + diskSent))** |\n"
        }
        s += "\nGoal: all-dirty / sent ≥ 9 (bytes per checkpoint ≤ 1/9 of the all-dirty transfer; PLOVER reports 9.2×) for 16×1 (the issue's workload). "
        s += "SETs per checkpoint: the run's SETs over its steady-state checkpoints.\n\n"
        s += "## Pause per checkpoint (ms: the primary's VM stopped → resumed)\n\n"
        s += "From the primary's `checkpoints.log` (`pause_ms` and its parts, in the order the checkpoint runs them; the part means add up "
        s += "to the mean pause). Not in the pause: the primary's wait, VM running, for the backup to reach the checkpoint, pause and scan (`wait_ms`).\n\n"
        s += "| release | C×P | checkpoints | pause p50 | pause p99 | pause max | pause mean | "
        s += Checkpoint.pausePartNames.map { "\($0) (mean)" }.joined(separator: " | ") + " | wait for the backup p50 (VM running) |\n"
        s += "|---|---|---|---|---|---|---|" + String(repeating: "---|", count: Checkpoint.pausePartNames.count) + "---|\n"
        for r in runs {
            let p = r.checkpoints.map { $0.ms("pause_ms") }
            s += "| \(r.mode) | \(r.clients)×\(r.pipeline) | \(p.count) | \(f2(percentile(p, 0.5))) | \(f2(percentile(p, 0.99))) | \(f2(p.max() ?? .nan)) | \(f2(meanD(p))) | "
            s += Checkpoint.pausePartNames.indices.map { i in f2(meanD(r.checkpoints.map { $0.pauseParts[i] })) }.joined(separator: " | ")
            s += " | \(f2(percentile(r.checkpoints.map { $0.ms("wait_ms") }, 0.5))) |\n"
        }
        s += "\n## What released the guest's frames (the primary's output-guard counters over each run, up to its last checkpoint)\n\n"
        s += "| release | C×P | by match | by checkpoint | match rate | mean wait for the match (ms) | mismatches |\n|---|---|---|---|---|---|---|\n"
        for r in runs {
            let c = r.released, all = r.released.byMatch + r.released.byCheckpoint
            s += "| \(r.mode) | \(r.clients)×\(r.pipeline) | \(c.byMatch) | \(c.byCheckpoint) | \(all == 0 ? "-" : String(format: "%.1f%%", 100 * Double(c.byMatch) / Double(all))) | "
            s += "\(c.matchWaits == 0 ? "-" : f2(c.matchWaitTotalMs / Double(c.matchWaits))) | \(c.mismatches) |\n"
        }
        for r in runs {
            s += "\n## Per checkpoint, \(r.mode), \(r.clients) clients × \(r.pipeline) in flight\n\n"
            s += "| # | epoch | primary dirty | backup dirty | union | identical-dirty | divergent | RAM sent B | RAM all-dirty B | disk dirty (primary) | disk union | disk divergent | disk sent B | disk all-dirty B | RAM+disk all-dirty / sent | pause ms |\n"
            s += "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
            for (i, c) in r.checkpoints.enumerated() {
                s += "| \(i + 1) | \(c.fields["epoch"] ?? "?") | \(c.n("primary_dirty")) | \(c.n("backup_dirty")) | \(c.n("union")) | \(c.identical) | \(c.n("divergent")) | "
                s += "\(c.ramSent) | \(c.ramAllDirty) | \(c.n("disk_primary_dirty")) | \(c.n("disk_union")) | \(c.n("disk_divergent")) | \(c.diskSent) | \(c.diskAllDirty) | "
                s += "\(ratio(c.ramAllDirty + c.diskAllDirty, c.ramSent + c.diskSent)) | \(c.fields["pause_ms"] ?? "?") |\n"
            }
            let div = r.checkpoints.map { $0.n("divergent") }
            s += "\nDivergent pages per checkpoint: p50 \(p50(div)), min \(div.min() ?? 0), max \(div.max() ?? 0).\n"
        }
        return s
    }
}
