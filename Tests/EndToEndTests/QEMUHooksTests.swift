import Foundation
import PloverCheck
import Testing
@testable import PloverTesting
import VMReplica

extension EndToEnd {
    /// The VM hooks ABI (include/interpose_vm.h) against the agent's `QEMUHooksEndpoint`: the test
    /// compiles `interpose-c/qemu_hooks_standin.c`, a stand-in for a patched QEMU, against the
    /// header and libinterpose.so alone, and runs it against endpoints in this process.
    @Suite(.serialized, .timeLimit(.minutes(2))) struct QEMUHooksTests {
        /// Guest RAM of the stand-in: 1000 pages of 4 KiB (16 bitmap words, the last one partial).
        static let pages = 1000
        static let ramBytes = pages * 4096

        /// The stand-in's saved device state: byte i is (i * 131 + (i >> 9)) & 255.
        static func pattern(_ n: Int) -> [UInt8] { (0..<n).map { UInt8(truncatingIfNeeded: $0 &* 131 &+ ($0 >> 9)) } }

        /// A scratch directory with the stand-in compiled into it.
        static func prepare(_ name: String) throws -> (root: String, standin: String) {
            let root = ClusterProcessTests.scratch(name)
            try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
            return (root, try InterposeHarness.compileC("qemu_hooks_standin", into: root))
        }

        /// The "CHECK name code=N message=M" lines of a stand-in log: name -> (code, message), in order.
        static func results(_ log: String) -> [String: [(code: Int, message: String)]] {
            var out: [String: [(code: Int, message: String)]] = [:]
            for line in log.split(separator: "\n") where line.hasPrefix("CHECK ") {
                let parts = line.dropFirst(6).split(separator: " ", maxSplits: 2, omittingEmptySubsequences: false)
                guard parts.count == 3, let code = Int(parts[1].dropFirst(5)) else { continue }
                out[String(parts[0]), default: []].append((code, String(parts[2].dropFirst(8))))
            }
            return out
        }

        static func readLog(_ path: String) -> String { (try? String(contentsOfFile: path, encoding: .utf8)) ?? "" }

        static func waitForExit(_ p: Process, _ timeout: Duration) -> Bool {
            InterposeHarness.waitUntil(timeout) { !p.isRunning }
        }

        /// Expects `body` to throw a `QEMUHooksError` of `kind`; returns it.
        @discardableResult
        static func expectHooksError(_ kind: QEMUHooksError.Kind, _ checks: Checks, sourceLocation: SourceLocation = #_sourceLocation,
                                     _ body: () throws -> Void) -> QEMUHooksError? {
            do {
                try body()
                checks.record("expected a \(kind) error, nothing was thrown", sourceLocation: sourceLocation)
            } catch let e as QEMUHooksError {
                checks.expect(e.kind == kind, "expected \(kind), got \(e.kind): \(e)", sourceLocation: sourceLocation)
                return e
            } catch {
                checks.record("expected a QEMUHooksError, got \(error)", sourceLocation: sourceLocation)
            }
            return nil
        }

        @Test func dirtyLogsArriveAsTheirUnionAndDeviceStateIsSavedAndLoaded() async throws {
            let checks = Checks()
            defer { checks.recordIssues() }
            try await onOwnThread {
                let (root, standin) = try Self.prepare("qemuhooks-serve")
                let socket = root + "/agent.sock", loaded = root + "/loaded.bin", log = root + "/standin.log"
                let endpoint = try QEMUHooksEndpoint(socketPath: socket, ramBytes: Self.ramBytes, requestTimeout: .seconds(20))
                let p = try InterposeHarness.spawn(standin, ["serve", socket, String(Self.pages), "300000", loaded,
                                                             "3,64,999;0,1,2,64", "500,63;7;-"], log: log)
                defer { if p.isRunning { InterposeHarness.kill9(p) } }
                try endpoint.acceptQEMU(timeout: .seconds(10))
                checks.expect(endpoint.isConnected, "not connected after the hello")

                // Two bitmaps handed in before the first sync plus the one the sync hook adds.
                let first = try endpoint.collect()
                checks.expect(first.pageIndices.map(Int.init) == [0, 1, 2, 3, 63, 64, 500, 999], "first collect: \(first.pageIndices)")
                let second = try endpoint.collect()
                checks.expect(second.pageIndices == [7], "second collect holds only the new page: \(second.pageIndices)")
                checks.expect(try endpoint.collect().isEmpty, "third collect: nothing was handed in")
                checks.expect(endpoint.dirtyLog.collect().isEmpty, "collect leaves nothing pending in the log")

                try endpoint.stopVM()
                let noCont = Self.expectHooksError(.hookFailed(code: -9), checks) { try endpoint.continueVM() }
                checks.expect(noCont?.description.contains("no cont hook") == true, "\(String(describing: noCont))")
                checks.expect(noCont?.description.contains(socket) == true, "the error names the socket: \(String(describing: noCont))")

                let state = try endpoint.saveDeviceState()
                checks.expect(state.count == 300_000 && state == Self.pattern(300_000), "saved state is not the stand-in's pattern (\(state.count) bytes)")

                var rng = SystemRandomNumberGenerator()
                let blob = (0..<250_000).map { _ in UInt8.random(in: 0...255, using: &rng) }
                try endpoint.loadDeviceState(blob)
                checks.expect(FileManager.default.contents(atPath: loaded).map { Array($0) } == blob, "the loaded file differs from the blob sent")

                let bad = Self.expectHooksError(.hookFailed(code: -10), checks) { try endpoint.loadDeviceState(Array("BAD state".utf8)) }
                checks.expect(bad?.description.contains("device model rejected the stream: bad magic") == true, "\(String(describing: bad))")
                checks.expect(endpoint.isConnected, "a failed hook must not end the connection")
                try endpoint.loadDeviceState([1, 2, 3])
                checks.expect(FileManager.default.contents(atPath: loaded).map { Array($0) } == [1, 2, 3], "a later load did not arrive")
                checks.expect(try endpoint.collect().isEmpty, "collect after the loads")

                endpoint.close()
                checks.expect(Self.waitForExit(p, .seconds(10)), "the stand-in did not notice the agent closing")
                let text = Self.readLog(log)
                checks.expect(p.terminationStatus == 0, "stand-in exited \(p.terminationStatus):\n\(text)")
                let r = Self.results(text)
                func check(_ name: String, _ code: Int32, _ fragment: String = "") {
                    guard let got = r[name]?.first else { return checks.record("no \(name) check in the stand-in's output:\n\(text)") }
                    checks.expect(got.code == Int(code) && (fragment.isEmpty || got.message.contains(fragment)), "\(name): code \(got.code) message \"\(got.message)\"; want \(code) and \"\(fragment)\"")
                }
                check("abi-version", 0)
                check("page-size-1000", -1, "page size 1000")
                check("connect-null-out", -1, "must not be NULL")
                check("missing-socket", -3, "/nonexistent/agent.sock")
                check("out-cleared", 0)
                check("connect", 0)
                check("wrong-size", -2, "dirty log of 17 words for 1000 pages of 4096 bytes: it needs exactly 16 words")
                check("short", -2, "15 words")
                check("past-last-page", -2, "bits past the last page (999)")
                check("range-outside", -2, "outside the 16-word bitmap")
                check("null-vm", -1, "must not be NULL")
                check("null-words", -1, "must not be NULL")
                check("end", -6, "closed the connection")
                check("after-end", -8, "failed earlier")
                checks.expect(r["pre"]?.map(\.code) == [0, 0], "pre: \(String(describing: r["pre"]))")
                checks.expect(r["sync-range"]?.map(\.code) == [0, 0], "sync-range: \(String(describing: r["sync-range"]))")
                checks.expect(text.contains("STOP\n"), "the stop hook did not run")
                if !checks.hasFailures { try? FileManager.default.removeItem(atPath: root) }
            }
        }

        /// One blob between two in-process replicas, by epoch.
        final class MemoryLink: DeviceStateLink, @unchecked Sendable {
            private let lock = NSLock()
            private var sent: [UInt64: [UInt8]] = [:]
            func send(_ state: [UInt8], epoch: UInt64) throws { lock.withLock { sent[epoch] = state } }
            func receive(epoch: UInt64) throws -> [UInt8] {
                guard let s = lock.withLock({ sent.removeValue(forKey: epoch) }) else { throw CLIError("no device state for epoch \(epoch)") }
                return s
            }
        }

        @Test func hooksMoverCarriesThePrimarysStateIntoTheBackup() async throws {
            let checks = Checks()
            defer { checks.recordIssues() }
            try await onOwnThread {
                let (root, standin) = try Self.prepare("qemuhooks-mover")
                var procs: [Process] = []
                defer { for p in procs where p.isRunning { InterposeHarness.kill9(p) } }
                var movers: [QEMUHooksDeviceStateMover] = []
                let link = MemoryLink()
                for side in ["primary", "backup"] {
                    let socket = root + "/\(side).sock"
                    let endpoint = try QEMUHooksEndpoint(socketPath: socket, ramBytes: Self.ramBytes)
                    procs.append(try InterposeHarness.spawn(standin, ["serve", socket, String(Self.pages), "123457", root + "/\(side)-loaded.bin", "-", "-"],
                                                            log: root + "/\(side).log"))
                    try endpoint.acceptQEMU(timeout: .seconds(10))
                    movers.append(QEMUHooksDeviceStateMover(endpoint: endpoint, link: link))
                }
                checks.expect(movers[0].mechanism == "hooks", "mechanism \(movers[0].mechanism)")
                let sent = try movers[0].sendDeviceState(epoch: 5)
                checks.expect(sent == 123_457, "sent \(sent) bytes")
                do {
                    _ = try movers[1].receiveDeviceState(epoch: 6)
                    checks.record("a receive for an epoch nobody sent succeeded")
                } catch {}
                let received = try movers[1].receiveDeviceState(epoch: 5)
                checks.expect(received == 123_457, "received \(received) bytes")
                let loaded = FileManager.default.contents(atPath: root + "/backup-loaded.bin").map { Array($0) }
                checks.expect(loaded == Self.pattern(123_457), "the backup's QEMU did not load the primary's state byte for byte")
                checks.expect(!FileManager.default.fileExists(atPath: root + "/primary-loaded.bin"), "the primary loaded something")
                for m in movers { m.endpoint.close() }
                for p in procs { checks.expect(Self.waitForExit(p, .seconds(10)) && p.terminationStatus == 0, "a stand-in did not finish cleanly") }
                if !checks.hasFailures { try? FileManager.default.removeItem(atPath: root) }
            }
        }

        @Test func agentRefusesAnotherABIVersionOrRAMSizeAndThenAcceptsAGoodQEMU() async throws {
            let checks = Checks()
            defer { checks.recordIssues() }
            try await onOwnThread {
                let (root, standin) = try Self.prepare("qemuhooks-hello")
                let socket = root + "/agent.sock"
                let endpoint = try QEMUHooksEndpoint(socketPath: socket, ramBytes: Self.ramBytes)
                defer { endpoint.close() }

                let rawLog = root + "/raw.log"
                let raw = try InterposeHarness.spawn(standin, ["raw-hello", socket, String(Self.pages), "99"], log: rawLog)
                defer { if raw.isRunning { InterposeHarness.kill9(raw) } }
                let versionError = Self.expectHooksError(.refused, checks) { try endpoint.acceptQEMU(timeout: .seconds(10)) }
                checks.expect(versionError?.description.contains("ABI version 99") == true, "\(String(describing: versionError))")
                checks.expect(versionError?.description.contains(socket) == true, "\(String(describing: versionError))")
                checks.expect(Self.waitForExit(raw, .seconds(10)), "raw-hello did not finish")
                let rawText = Self.readLog(rawLog)
                checks.expect(rawText.contains("REPLY type=0x82") && rawText.contains("message=QEMU speaks VM hooks ABI version 99; this agent speaks version 1"),
                              "QEMU was not told why: \(rawText)")
                checks.expect(rawText.contains("CLOSED yes"), "the agent kept the refused connection open: \(rawText)")
                checks.expect(!endpoint.isConnected, "connected after a refusal")

                let geoLog = root + "/geometry.log"
                let geo = try InterposeHarness.spawn(standin, ["geometry", socket, "2000"], log: geoLog)
                defer { if geo.isRunning { InterposeHarness.kill9(geo) } }
                let geoError = Self.expectHooksError(.refused, checks) { try endpoint.acceptQEMU(timeout: .seconds(10)) }
                checks.expect(geoError?.description.contains("8192000 bytes of RAM") == true, "\(String(describing: geoError))")
                checks.expect(Self.waitForExit(geo, .seconds(10)), "geometry did not finish")
                let connect = Self.results(Self.readLog(geoLog))["connect"]?.first
                checks.expect(connect?.code == -4 && connect?.message.contains("refused the connection: QEMU has 8192000 bytes of RAM") == true,
                              "the library did not report the refusal: \(String(describing: connect))")

                Self.expectHooksError(.notConnected, checks) { _ = try endpoint.saveDeviceState() }

                let good = try InterposeHarness.spawn(standin, ["serve", socket, String(Self.pages), "10", root + "/l.bin", "-", "-"], log: root + "/good.log")
                defer { if good.isRunning { InterposeHarness.kill9(good) } }
                try endpoint.acceptQEMU(timeout: .seconds(10))
                checks.expect(try endpoint.saveDeviceState() == Self.pattern(10), "a good QEMU after two refusals is not served")
                Self.expectHooksError(.refused, checks) { try endpoint.acceptQEMU(timeout: .milliseconds(100)) }
                if !checks.hasFailures { try? FileManager.default.removeItem(atPath: root) }
            }
        }

        @Test func qemuThatDiesOrHangsMidRequestMakesSaveThrow() async throws {
            let checks = Checks()
            defer { checks.recordIssues() }
            try await onOwnThread {
                let (root, standin) = try Self.prepare("qemuhooks-die")
                // Dies inside the save hook: an error long before the 20 s request timeout.
                let dying = try QEMUHooksEndpoint(socketPath: root + "/die.sock", ramBytes: Self.ramBytes, requestTimeout: .seconds(20))
                defer { dying.close() }
                let p = try InterposeHarness.spawn(standin, ["exit-on-save", root + "/die.sock", String(Self.pages), "1000", root + "/l.bin", "-", "-"],
                                                   log: root + "/die.log")
                defer { if p.isRunning { InterposeHarness.kill9(p) } }
                try dying.acceptQEMU(timeout: .seconds(10))
                var start = ContinuousClock.now
                let died = Self.expectHooksError(.disconnected, checks) { _ = try dying.saveDeviceState() }
                checks.expect(ContinuousClock.now - start < .seconds(5), "the disconnect took \(ContinuousClock.now - start)")
                checks.expect(died?.description.contains(root + "/die.sock") == true && died?.description.contains("SAVE request") == true,
                              "\(String(describing: died))")
                checks.expect(!dying.isConnected, "still connected after QEMU died")
                let later = Self.expectHooksError(.disconnected, checks) { _ = try dying.collect() }
                checks.expect(later == died, "a later call does not report the same failure: \(String(describing: later))")

                // Hangs inside the save hook: the request timeout ends it.
                let hanging = try QEMUHooksEndpoint(socketPath: root + "/hang.sock", ramBytes: Self.ramBytes, requestTimeout: .seconds(1))
                defer { hanging.close() }
                let h = try InterposeHarness.spawn(standin, ["hang-on-save", root + "/hang.sock", String(Self.pages), "1000", root + "/l.bin", "-", "-"],
                                                   log: root + "/hang.log")
                defer { if h.isRunning { InterposeHarness.kill9(h) } }
                try hanging.acceptQEMU(timeout: .seconds(10))
                start = ContinuousClock.now
                let hung = Self.expectHooksError(.timedOut, checks) { _ = try hanging.saveDeviceState() }
                let took = ContinuousClock.now - start
                checks.expect(took >= .milliseconds(900) && took < .seconds(5), "the timeout took \(took)")
                checks.expect(hung?.description.contains(root + "/hang.sock") == true, "\(String(describing: hung))")
                Self.expectHooksError(.timedOut, checks) { try hanging.loadDeviceState([1]) }
                if !checks.hasFailures { try? FileManager.default.removeItem(atPath: root) }
            }
        }
    }
}
