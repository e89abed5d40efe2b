import Foundation
import Testing
@testable import PloverTesting
@testable import RDMAPaxos

extension EndToEnd {
    /// `BerkeleyDBLog` on a disk that loses unsynced writes at a power cut (`PowerCutFS`), in a
    /// writer process (`plover _stablelog-writer`) that reports each entry once it is durable.
    /// A SIGKILL test cannot tell the durability modes apart (the operating system keeps what a
    /// killed process wrote); a power cut can: `fsync` must lose nothing it reported, `async` at
    /// most what it reported in the last flush interval. Each check also runs against a broken
    /// variant that it must catch.
    @Suite(.serialized, .timeLimit(.minutes(3))) struct PowerCutLogTests {
        /// `async` mode's flush interval (`BerkeleyDBLog.Options.asyncFlushInterval`, 100 ms)
        /// plus room for a flush to run late on a busy 2-core machine: what the test allows.
        static let asyncBoundNanoseconds: UInt64 = 250_000_000

        /// One append every 500 µs in the async tests: unpaced, the writer fills a 10 MB
        /// Berkeley DB log file every few tenths of a second, and Berkeley DB syncs a log file when
        /// it moves to the next, which would hide a missing flusher.
        static let asyncPace = 500

        struct Outcome {
            /// Each index the writer reported durable, with when (CLOCK_MONOTONIC ns).
            var reported: [(index: LogIndex, at: UInt64)]
            /// When the power was cut.
            var cutAt: UInt64
            /// Entries 1...survived came back intact after the power returned (0: the store did
            /// not even open).
            var survived: LogIndex
            var openError: String?
            /// What the writer printed on standard error, and whether it exited by itself.
            var writerError = ""
            var writerExited = false

            var lost: [(index: LogIndex, at: UInt64)] { reported.filter { $0.index > survived } }
            /// The oldest lost entry's age at the cut, in ns (nil when nothing was lost).
            var oldestLossAge: UInt64? { lost.map(\.at).min().map { cutAt > $0 ? cutAt - $0 : 0 } }
        }

        /// A power cut the file system makes itself at an exact sync (powercutfs's `--cut-at-sync`).
        struct PlannedCut {
            /// `NAME:N`: the Nth fsync of the file NAME.
            var at: String
            /// Halfway through that sync's pages instead of before it.
            var torn = false
            /// No cut: that sync fails with EIO and the disk goes on; the run ends when the writer
            /// stops (or after the time allowed), then the power is cut.
            var eio = false
            /// Megabytes of entries between Berkeley DB checkpoints (0: the log's default).
            var checkpointEveryMb = 0
        }

        /// Writes for `seconds` on powercutfs, cuts the power, brings it back and reads the log.
        /// With `planned`, the file system cuts the power itself at that sync (within `seconds`).
        static func writeThenCut(_ name: String, mode: Durability, fsyncLies: Bool = false, asyncFlushMs: Int = 100,
                                 paceMicroseconds: Int = 0, seconds: Double = 2.5, planned: PlannedCut? = nil) throws -> Outcome {
            let root = ClusterProcessTests.scratch("powercut-\(name)")
            let faults = planned.map { ($0.torn ? ["--torn"] : []) + ($0.eio ? ["--eio"] : []) } ?? []
            let fs = try PowerCutFS(root: root, fsyncLies: fsyncLies, cutAtSync: planned?.at, faultOptions: faults)
            defer { fs.remove(root: root) }
            let dir = fs.mountPoint + "/log"
            let writer = Process()
            writer.executableURL = URL(fileURLWithPath: try ClusterProcessTests.ploverExecutable())
            writer.arguments = ["_stablelog-writer", dir, "--durability", mode.rawValue, "--payload-bytes", "100",
                                "--async-flush-ms", "\(asyncFlushMs)", "--pace-us", "\(paceMicroseconds)", "--timestamps",
                                "--checkpoint-every-mb", "\(planned?.checkpointEveryMb ?? 0)"]
            // After the cut the writer may die touching Berkeley DB's region files on the dead
            // mount (SIGBUS); Swift's backtracer would then hang on the same pages, holding the
            // output pipes open.
            writer.environment = ProcessInfo.processInfo.environment.merging(["SWIFT_BACKTRACE": "enable=no"]) { $1 }
            let out = Pipe(), err = Pipe()
            writer.standardOutput = out
            writer.standardError = err
            try writer.run()
            // Read as it comes, so a full pipe never slows the writer.
            let collected = Collected(), errors = Collected()
            DispatchQueue.global().async {
                collected.finish(out.fileHandleForReading.readDataToEndOfFile())
            }
            DispatchQueue.global().async {
                errors.finish(err.fileHandleForReading.readDataToEndOfFile())
            }
            var writerExited = false
            if let planned, planned.eio {
                let deadline = Date().addingTimeInterval(seconds)
                while writer.isRunning && Date() < deadline { usleep(5_000) }
                writerExited = !writer.isRunning
            } else if let planned {
                guard fs.cutItself(within: seconds) else {
                    fs.cut()
                    kill(writer.processIdentifier, SIGKILL)
                    throw CLIError("the planned power cut at sync \(planned.at) did not come within \(seconds) s")
                }
            } else {
                Thread.sleep(forTimeInterval: seconds)
            }
            let cutAt = monotonicNanoseconds()
            fs.cut()
            kill(writer.processIdentifier, SIGKILL)
            writer.waitUntilExit()
            let bytes = collected.wait()
            let writerError = String(decoding: errors.wait(), as: UTF8.self)
            let reported: [(index: LogIndex, at: UInt64)] = String(decoding: bytes, as: UTF8.self).split(separator: "\n").compactMap { line in
                let f = line.split(separator: " ")
                guard f.count == 2, let i = LogIndex(f[0]), let t = UInt64(f[1]) else { return nil }
                return (i, t)
            }

            try fs.mount()
            var outcome = Outcome(reported: reported, cutAt: cutAt, survived: 0, writerError: writerError, writerExited: writerExited)
            do {
                let log = try BerkeleyDBLog.open(path: dir, durability: mode, create: false)
                defer { try? log.close() }
                let top = min(log.lastIndex, reported.map(\.index).max() ?? 0)
                let got = top == 0 ? [] : try log.entries(1...top)
                for e in got {
                    guard e.index == outcome.survived + 1,
                          e.payload == StableLogWriter.payload(index: e.index, bytes: 100) else { break }
                    outcome.survived = e.index
                }
            } catch {
                outcome.openError = "\(error)"
            }
            print("power cut (\(name)): \(reported.count) entries reported durable, \(outcome.lost.count) lost"
                  + (outcome.oldestLossAge.map { String(format: ", the oldest acknowledged %.0f ms before the cut", Double($0) / 1e6) } ?? "")
                  + (outcome.openError.map { "; the store did not open: \($0)" } ?? ""))
            return outcome
        }

        /// A reader thread's result. @unchecked Sendable: `data` is written once, before `done`
        /// is signalled, and read after waiting for it.
        final class Collected: @unchecked Sendable {
            private var data = Data()
            private let done = DispatchSemaphore(value: 0)
            func finish(_ d: Data) { data = d; done.signal() }
            func wait() -> Data { done.wait(); return data }
        }

        /// Within the store's first Berkeley DB log file (about 100,000 entries of this size).
        @Test func fsyncLosesNoAcknowledgedEntryAtAPowerCut() throws {
            let o = try Self.writeThenCut("fsync", mode: .fsync, seconds: 0.6)
            #expect(o.reported.count > 500, "the writer reported only \(o.reported.count) entries")
            #expect(o.openError == nil, "the store did not open after the power cut: \(o.openError ?? "")")
            #expect(o.lost.isEmpty, "\(o.lost.count) entries reported durable were lost, from \(o.lost.first?.index ?? 0)")
        }

        /// The same at a random time across several log files (about 20,000 entries each; each new
        /// file is made full-size by a write of its last byte before its first record).
        @Test func fsyncLosesNoAcknowledgedEntryAcrossLogFileSwitches() throws {
            let o = try Self.writeThenCut("fsync-switch", mode: .fsync, seconds: 2.5)
            #expect(o.reported.count > 500, "the writer reported only \(o.reported.count) entries")
            #expect(o.openError == nil, "the store did not open after the power cut: \(o.openError ?? "")")
            #expect(o.lost.isEmpty, "\(o.lost.count) entries reported durable were lost, from \(o.lost.first?.index ?? 0)")
        }

        /// The power fails at the first, second and third sync of the store's second log file:
        /// the entries reported durable in it (and everything before) come back.
        @Test(arguments: [1, 2, 3])
        func fsyncLosesNothingWhenThePowerFailsRightAfterALogFileSwitch(sync: Int) throws {
            let o = try Self.writeThenCut("fsync-switch-\(sync)", mode: .fsync, seconds: 60,
                                          planned: PlannedCut(at: "log.0000000002:\(sync)"))
            #expect(o.reported.count > 500, "the writer reported only \(o.reported.count) entries")
            #expect(o.openError == nil, "the store did not open after the power cut: \(o.openError ?? "")")
            #expect(o.lost.isEmpty, "\(o.lost.count) entries reported durable were lost, from \(o.lost.first?.index ?? 0)")
        }

        /// The power fails halfway through a checkpoint's flush of the entries database (a
        /// checkpoint every 4 MiB here): half of the flushed 4 KiB pages reach the disk, so
        /// Berkeley DB pages (64 KiB) may be torn; recovery from the log must still bring back
        /// every entry reported durable.
        @Test func fsyncLosesNothingWhenThePowerFailsHalfwayThroughACheckpoint() throws {
            let o = try Self.writeThenCut("fsync-torn-checkpoint", mode: .fsync, seconds: 60,
                                          planned: PlannedCut(at: "entries.db:1", torn: true, checkpointEveryMb: 4))
            #expect(o.reported.count > 500, "the writer reported only \(o.reported.count) entries")
            #expect(o.openError == nil, "the store did not open after the power cut: \(o.openError ?? "")")
            #expect(o.lost.isEmpty, "\(o.lost.count) entries reported durable were lost, from \(o.lost.first?.index ?? 0)")
        }

        /// The disk reports a failed flush (EIO) at the first sync of the store's second log file.
        /// Berkeley DB 5.3 takes a commit in a newer log file than its last successful sync for one
        /// already on disk and reports it durable; the log must see through that and stop with an
        /// error, and nothing it reported durable may be lost. Before the log checked Berkeley DB's
        /// synced position, the writer went on reporting entries (about 158,000 in 5 s) that were
        /// never synced.
        @Test func fsyncStopsOnAFailedFlushRightAfterALogFileSwitch() throws {
            let o = try Self.writeThenCut("fsync-eio", mode: .fsync, seconds: 60,
                                          planned: PlannedCut(at: "log.0000000002:1", eio: true))
            #expect(o.writerExited, "the writer went on after the disk failed a flush")
            #expect(o.writerError.contains("a write or fsync of the log failed"), "the writer's error: \(o.writerError)")
            #expect(o.reported.count > 500, "the writer reported only \(o.reported.count) entries")
            #expect(o.openError == nil, "the store did not open after the power cut: \(o.openError ?? "")")
            #expect(o.lost.isEmpty, "\(o.lost.count) entries reported durable were lost, from \(o.lost.first?.index ?? 0)")
        }

        /// The planned-cut checks on a disk whose log fsyncs write nothing: they must see losses.
        @Test func thePlannedCutChecksCatchADiskThatIgnoresFsync() throws {
            let o = try Self.writeThenCut("fsync-lies-planned", mode: .fsync, fsyncLies: true, seconds: 60,
                                          planned: PlannedCut(at: "entries.db:1", torn: true, checkpointEveryMb: 4))
            #expect(!o.lost.isEmpty, "a disk that ignores log fsyncs lost nothing at a planned cut")
        }

        /// The check above, on a disk whose fsync writes nothing: it must see the loss.
        @Test func theFsyncCheckCatchesADiskThatIgnoresFsync() throws {
            let o = try Self.writeThenCut("fsync-lies", mode: .fsync, fsyncLies: true)
            #expect(o.reported.count > 500, "the writer reported only \(o.reported.count) entries")
            #expect(!o.lost.isEmpty, "a disk that ignores fsync lost nothing: the power cut does not drop unsynced writes")
        }

        @Test func asyncLosesOnlyWhatItAcknowledgedInTheLastFlushInterval() throws {
            let o = try Self.writeThenCut("async", mode: .async, paceMicroseconds: Self.asyncPace)
            #expect(o.reported.count > 500, "the writer reported only \(o.reported.count) entries")
            #expect(o.openError == nil, "the store did not open after the power cut: \(o.openError ?? "")")
            let age = o.oldestLossAge ?? 0
            #expect(age < Self.asyncBoundNanoseconds,
                    "lost an entry acknowledged \(age / 1_000_000) ms before the cut (bound \(Self.asyncBoundNanoseconds / 1_000_000) ms)")
        }

        /// The bound above without the periodic flush: entries acknowledged long before the cut
        /// are lost, so the check must fail.
        @Test func theAsyncCheckCatchesAWriterThatNeverFlushes() throws {
            let o = try Self.writeThenCut("async-noflush", mode: .async, asyncFlushMs: 0, paceMicroseconds: Self.asyncPace)
            let age = o.oldestLossAge ?? 0
            #expect(age >= Self.asyncBoundNanoseconds,
                    "without the flusher the oldest loss was acknowledged only \(age / 1_000_000) ms before the cut")
        }
    }
}
