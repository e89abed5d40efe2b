// QEMUHooksEndpoint against a QEMU that breaks the wire format (interpose_vm.h): a fake written
// here with raw frames, since the real library (tested in EndToEndTests) never sends these.

import Foundation
import Testing
@testable import VMReplica

@Suite(.serialized) struct QEMUHooksEndpointTests {
    static let pages = 1000

    /// Runs blocking socket work off the shared test threads.
    static func onThread<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
        try await withCheckedThrowingContinuation { (c: CheckedContinuation<T, any Error>) in
            Thread { c.resume(with: Result { try body() }) }.start()
        }
    }

    static func socketPath(_ name: String) -> String {
        FileManager.default.temporaryDirectory.appendingPathComponent("plover-hooks-\(name)-\(getpid()).sock").path
    }

    static func hello(version: UInt32 = 1, pages: Int = pages) -> [UInt8] {
        var b: [UInt8] = []
        b.le32(version)
        b.le32(4096)
        let ram = UInt64(pages * 4096)
        b.le32(UInt32(truncatingIfNeeded: ram))
        b.le32(UInt32(truncatingIfNeeded: ram >> 32))
        return HooksFrame.encode(.hello, b)
    }

    /// A fake QEMU: connects, says hello, reads the welcome, answers the first request with
    /// `answer(seq)`, then reads until the agent closes. Returns the frames it got after the request.
    static func fakeQEMU(_ path: String, answer: @escaping @Sendable (UInt32) -> [UInt8]) -> (Thread, FakeResult) {
        let result = FakeResult()
        let t = Thread {
            guard let fd = try? Sockets.connectUnix(path) else { return result.set(["connect failed"]) }
            defer { close(fd) }
            Sockets.writeAll(fd, hello())
            let deadline = ContinuousClock.now + .seconds(10)
            guard case .success(let welcome) = HooksFrame.read(fd, deadline: deadline), welcome.type == 0x81 else { return result.set(["no welcome"]) }
            guard case .success(let request) = HooksFrame.read(fd, deadline: deadline) else { return result.set(["no request"]) }
            Sockets.writeAll(fd, answer(request.body.le32(at: 0)))
            var got: [String] = []
            while case .success(let f) = HooksFrame.read(fd, deadline: deadline) {
                got.append(String(format: "0x%02x ", f.type) + String(decoding: f.body, as: UTF8.self))
            }
            result.set(got)
        }
        t.start()
        return (t, result)
    }

    final class FakeResult: @unchecked Sendable {
        private let lock = NSLock()
        private var frames: [String]?
        func set(_ f: [String]) { lock.withLock { frames = f } }
        /// What the fake got, once it finished (waits up to 10 s).
        func wait() -> [String]? {
            for _ in 0..<1000 {
                if let f = lock.withLock({ frames }) { return f }
                Thread.sleep(forTimeInterval: 0.01)
            }
            return nil
        }
    }

    /// Runs `request` against a fake answering with `answer`; returns the error and what the fake got.
    static func misbehave(_ name: String, answer: @escaping @Sendable (UInt32) -> [UInt8],
                          request: @escaping @Sendable (QEMUHooksEndpoint) throws -> Void) async throws -> (QEMUHooksError?, [String]?) {
        let (e, got, later) = try await onThread { () throws -> (QEMUHooksError?, [String]?, QEMUHooksError?) in
            let path = socketPath(name)
            let endpoint = try QEMUHooksEndpoint(socketPath: path, ramBytes: pages * 4096, requestTimeout: .seconds(5))
            defer { endpoint.close() }
            let (_, result) = fakeQEMU(path, answer: answer)
            try endpoint.acceptQEMU(timeout: .seconds(5))
            var caught: QEMUHooksError?
            do { try request(endpoint) } catch let e as QEMUHooksError { caught = e }
            let got = result.wait()
            var later: QEMUHooksError?
            do { _ = try endpoint.saveDeviceState() } catch let e as QEMUHooksError { later = e }
            return (caught, got, later)
        }
        #expect(e != nil && later == e, "once broken, the endpoint keeps saying why: \(String(describing: later))")
        return (e, got)
    }

    @Test func unknownFrameTypeEndsTheConnectionWithAReason() async throws {
        let (e, got) = try await Self.misbehave("unknown", answer: { seq in
            var b: [UInt8] = []
            b.le32(seq)
            return [UInt8(4), 0, 0, 0, 0x7f] + b
        }, request: { _ = try $0.saveDeviceState() })
        #expect(e?.kind == .protocolViolation)
        #expect(e?.description.contains("unknown frame type 0x7f") == true, "\(String(describing: e))")
        #expect(got?.first?.hasPrefix("0x82 QEMU sent unknown frame type 0x7f") == true, "QEMU is told why: \(String(describing: got))")
    }

    @Test func oversizedFrameIsRefusedBeforeItIsRead() async throws {
        let (e, got) = try await Self.misbehave("oversized", answer: { _ in
            var h: [UInt8] = []
            h.le32(1 << 30)
            return h + [0x04]
        }, request: { _ = try $0.saveDeviceState() })
        #expect(e?.kind == .protocolViolation)
        #expect(e?.description.contains("frame of 1073741824 bytes") == true, "\(String(describing: e))")
        #expect(got != nil, "the fake never finished")
    }

    @Test func dirtyLogWithBitsPastTheLastPageIsRejected() async throws {
        let (e, _) = try await Self.misbehave("tailbits", answer: { seq in
            var b: [UInt8] = []
            b.le32(seq)
            b.le32(15)  // first word: the last one (1000 pages = 16 words)
            b.le32(0)
            b.le32(0)
            b.le32(1 << 8)  // bit 40 of word 15: page 1000, one past the last
            return HooksFrame.encode(.dirtyLog, b) + HooksFrame.encode(.ok, Array(b[0..<4]))
        }, request: { _ = try $0.collect() })
        #expect(e?.kind == .protocolViolation)
        #expect(e?.description.contains("bits past the last page (999)") == true, "\(String(describing: e))")
    }

    @Test func dirtyLogOutsideTheBitmapIsRejected() async throws {
        let (e, _) = try await Self.misbehave("outside", answer: { seq in
            var b: [UInt8] = []
            b.le32(seq)
            b.le32(16)
            b.le32(0)
            b += [UInt8](repeating: 0, count: 8)
            return HooksFrame.encode(.dirtyLog, b)
        }, request: { _ = try $0.collect() })
        #expect(e?.kind == .protocolViolation)
        #expect(e?.description.contains("outside the 16-word bitmap of 1000 pages") == true, "\(String(describing: e))")
    }

    @Test func answerToAnotherRequestIsAProtocolViolation() async throws {
        let (e, _) = try await Self.misbehave("seq", answer: { seq in
            var b: [UInt8] = []
            b.le32(seq &+ 7)
            return HooksFrame.encode(.ok, b)
        }, request: { try $0.stopVM() })
        #expect(e?.kind == .protocolViolation)
        #expect(e?.description.contains("does not answer the STOP request") == true, "\(String(describing: e))")
    }

    @Test func stateAnswerToALoadIsAProtocolViolation() async throws {
        let (e, _) = try await Self.misbehave("wrongkind", answer: { seq in
            var b: [UInt8] = []
            b.le32(seq)
            return HooksFrame.encode(.state, b + [1, 2])
        }, request: { try $0.loadDeviceState([9]) })
        #expect(e?.kind == .protocolViolation)
        #expect(e?.description.contains("answered the LOAD request 1 with a STATE frame") == true, "\(String(describing: e))")
    }

    @Test func helloThatIsNotAHelloIsRefused() async throws {
        let e: QEMUHooksError? = try await Self.onThread {
            let path = Self.socketPath("nohello")
            let endpoint = try QEMUHooksEndpoint(socketPath: path, ramBytes: Self.pages * 4096)
            defer { endpoint.close() }
            let t = Thread {
                guard let fd = try? Sockets.connectUnix(path) else { return }
                Sockets.writeAll(fd, HooksFrame.encode(.ok, [0, 0, 0, 0]))
                _ = HooksFrame.read(fd, deadline: ContinuousClock.now + .seconds(5))
                close(fd)
            }
            t.start()
            do { try endpoint.acceptQEMU(timeout: .seconds(5)) } catch let e as QEMUHooksError { return e }
            return nil
        }
        #expect(e?.kind == .refused)
        #expect(e?.description.contains("the first frame must be a hello") == true, "\(String(describing: e))")
    }

    @Test func noQEMUWithinTheTimeoutIsATimeout() async throws {
        let (before, e) = try await Self.onThread { () throws -> (QEMUHooksError?, QEMUHooksError?) in
            let endpoint = try QEMUHooksEndpoint(socketPath: Self.socketPath("none"), ramBytes: Self.pages * 4096)
            defer { endpoint.close() }
            var before: QEMUHooksError?
            do { _ = try endpoint.collect() } catch let e as QEMUHooksError { before = e }
            do { try endpoint.acceptQEMU(timeout: .milliseconds(50)) } catch let e as QEMUHooksError { return (before, e) }
            return (before, nil)
        }
        #expect(before?.kind == .notConnected)
        #expect(e?.kind == .timedOut)
    }
}
