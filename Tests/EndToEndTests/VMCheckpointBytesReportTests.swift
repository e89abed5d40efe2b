import XCTest
@testable import PloverTesting

/// `plover bench vm-bytes`'s parsing of its options and of `checkpoints.log` lines, and the
/// pause figures of its report, on made-up checkpoint lines (no VM).
final class VMCheckpointBytesReportTests: XCTestCase {
    typealias Bench = VMCheckpointBytesBench

    func testRunsWithAndWithoutACount() throws {
        let runs = try XCTUnwrap(Bench.parseRuns("16x1,16x16:4096,1x1", requests: 40))
        XCTAssertEqual(runs, [.init(clients: 16, pipeline: 1, requests: 640), .init(clients: 16, pipeline: 16, requests: 4096),
                              .init(clients: 1, pipeline: 1, requests: 40)])
        for bad in ["", "16x", "x1", "0x1", "16x0", "16x1:0", "16x1:a", "16x1:5:6", "16x1,,1x1", "16*1"] {
            XCTAssertNil(Bench.parseRuns(bad, requests: 40), bad)
        }
    }

    func testReleaseModes() {
        XCTAssertEqual(Bench.parseModes("both")?.map { $0.key }, ["release_on_match = false", "release_on_match = true"])
        XCTAssertEqual(Bench.parseModes("on")?.map { $0.key }, ["release_on_match = true"])
        XCTAssertEqual(Bench.parseModes("off")?.map { $0.key }, ["release_on_match = false"])
        XCTAssertNil(Bench.parseModes("yes"))
    }

    /// A primary's line as `CheckpointRecord.line` writes it (the fields the report reads).
    func checkpoint(pause: Double, scan: Double = 5, bitmap: Double = 3, sync: Double = 12, disk: Double = 2, migrate: Double = 4,
                    mismatch: Bool = false) -> Bench.Checkpoint {
        var f = ["epoch": "7", "index": "40", "role": "primary", "ok": "true", "pause_ms": String(format: "%.2f", pause),
                 "wait_ms": "9.00", "scan_ms": "\(scan)", "sync_ms": "\(sync)", "migrate_ms": "\(migrate)", "primary_dirty": "100",
                 "backup_dirty": "90", "union": "110", "divergent": "60", "page_bytes": "245760", "control_bytes": "1000",
                 "all_dirty_bytes": "409600", "disk_collect_ms": "\(bitmap)", "disk_ms": "\(disk)", "disk_primary_dirty": "4",
                 "disk_bytes": "8192", "disk_control_bytes": "100", "disk_all_dirty_bytes": "16384"]
        if mismatch { f["mismatch"] = "\"tcp-syn-seq:" }
        return Bench.Checkpoint(fields: f)
    }

    func testPausePartsAddUpToThePause() {
        let parts = checkpoint(pause: 20).pauseParts
        // scan 5, bitmap 3, RAM sync 12 − 5 − 3, disk step 2, device state 4, rest 20 − 12 − 2 − 4.
        XCTAssertEqual(parts, [5, 3, 4, 2, 4, 2])
        XCTAssertEqual(parts.count, Bench.Checkpoint.pausePartNames.count)
    }

    func testReportGivesPausePercentilesPerModeAndRun() {
        let off = Bench.Run(mode: "checkpoint release", clients: 16, pipeline: 1, requests: 640, rps: 80,
                            checkpoints: [40, 10, 30, 20].map { checkpoint(pause: $0) }, divergentPages: [:])
        let on = Bench.Run(mode: "release on match", clients: 16, pipeline: 1, requests: 640, rps: 400,
                           checkpoints: [checkpoint(pause: 18, mismatch: true), checkpoint(pause: 22)], divergentPages: [:],
                           released: .init(byMatch: 9, byCheckpoint: 1, mismatches: 2, matchWaits: 9, matchWaitTotalMs: 180))
        let report = Bench.report([off, on], diskMb: 64, machine: "Machine: test.\n\n", command: "plover bench vm-bytes")
        let rows = report.split(separator: "\n").map(String.init)
        // Nearest rank: p50 of 10, 20, 30, 40 is 20, p99 is 40; mean 25. Parts' means: scan 5,
        // bitmap 3, sync 4, disk 2, device 4, rest 25 − 18.
        XCTAssertTrue(rows.contains("| checkpoint release | 16×1 | 4 | 20.00 | 40.00 | 40.00 | 25.00 | 5.00 | 3.00 | 4.00 | 2.00 | 4.00 | 7.00 | 9.00 |"), report)
        XCTAssertTrue(rows.contains("| release on match | 16×1 | 2 | 18.00 | 22.00 | 22.00 | 20.00 | 5.00 | 3.00 | 4.00 | 2.00 | 4.00 | 2.00 | 9.00 |"), report)
        // Summary: checkpoints with those a mismatch asked for, and SETs per checkpoint.
        XCTAssertTrue(rows.contains { $0.hasPrefix("| checkpoint release | 16×1 | 640 | 80.0 | 4 (0) | 160.0 |") }, report)
        XCTAssertTrue(rows.contains { $0.hasPrefix("| release on match | 16×1 | 640 | 400.0 | 2 (1) | 320.0 |") }, report)
        // Release counters: 9 of 10 frames by a match, 20 ms mean wait; none for the run without.
        XCTAssertTrue(rows.contains("| release on match | 16×1 | 9 | 1 | 90.0% | 20.00 | 2 |"), report)
        XCTAssertTrue(rows.contains("| checkpoint release | 16×1 | 0 | 0 | - | - | 0 |"), report)
    }

    func testReleaseCountersOfARunAreTheGrowthOverIt() throws {
        let line = { (m: Int, c: Int, w: Double) in
            ["released_by_match": "\(m)", "released_by_checkpoint": "\(c)", "output_mismatches": "3", "match_waits": "\(m)",
             "match_wait_total_ms": String(format: "%.1f", w)]
        }
        let before = try XCTUnwrap(Bench.ReleaseCounters(line(100, 50, 1000))), after = try XCTUnwrap(Bench.ReleaseCounters(line(190, 60, 2800)))
        XCTAssertEqual(after - before, .init(byMatch: 90, byCheckpoint: 10, mismatches: 0, matchWaits: 90, matchWaitTotalMs: 1800))
        XCTAssertNil(Bench.ReleaseCounters(["role": "backup", "pause_ms": "30.00"]))
    }
}
