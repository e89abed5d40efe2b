import Foundation
import PloverCheck
import Testing
@testable import PloverTesting
import RDMAPaxos

extension EndToEnd.QEMUHooksTests {
    /// An agent that takes QEMU's answer a few bytes at a time: every send makes progress, so only
    /// a deadline for the whole answer (INTERPOSE_VM_STALL_MS, here 1.5 s) ends it. QEMU polls
    /// holding its big lock, so the answer to one request must not take longer than that.
    @Test func agentThatTricklesAnAnswerTimesOutAsAWhole() async throws {
        let checks = Checks()
        defer { checks.recordIssues() }
        try await onOwnThread {
            let (root, standin) = try Self.prepare("qemuhooks-trickle")
            let path = root + "/trickle.sock"
            let listener = try SocketDescriptor.listen(unixPath: path, backlog: 1)
            defer { listener.close() }
            let log = root + "/standin.log"
            let p = try InterposeHarness.spawn(standin, ["serve", path, String(Self.pages), String(8 << 20), root + "/l.bin", "-", "-"],
                                               log: log, environment: ["INTERPOSE_VM_STALL_MS": "1500"])
            defer { if p.isRunning { InterposeHarness.kill9(p) } }
            let fd = try listener.accept(timeout: .seconds(30)).rawValue
            defer { Glibc.close(fd) }
            var hello = [UInt8](repeating: 0, count: 21)
            guard recv(fd, &hello, hello.count, Int32(MSG_WAITALL)) == 21, hello[4] == 0x01 else { throw CLIError("no hello from the stand-in") }
            // WELCOME (u32 ABI 1), then SAVE (seq 1): the answer is 8 MiB of device state.
            let frames: [UInt8] = [4, 0, 0, 0, 0x81, 1, 0, 0, 0, 4, 0, 0, 0, 0x86, 1, 0, 0, 0]
            guard send(fd, frames, frames.count, Int32(MSG_NOSIGNAL)) == frames.count else { throw CLIError("cannot send to the stand-in") }
            let start = ContinuousClock.now
            var sink = [UInt8](repeating: 0, count: 2048)
            while p.isRunning && ContinuousClock.now - start < .seconds(10) {
                _ = recv(fd, &sink, sink.count, Int32(MSG_DONTWAIT))
                Thread.sleep(forTimeInterval: 0.05)
            }
            let took = ContinuousClock.now - start
            checks.expect(!p.isRunning, "the stand-in still sends its answer after \(took) (stall limit 1.5 s)")
            let end = Self.results(Self.readLog(log))["end"]?.first
            checks.expect(end?.code == -7 && end?.message.contains("did not take an answer") == true,
                          "the stand-in's poll did not time out as a whole: \(String(describing: end))\n\(Self.readLog(log).suffix(600))")
            if !checks.hasFailures { try? FileManager.default.removeItem(atPath: root) }
        }
    }
}
