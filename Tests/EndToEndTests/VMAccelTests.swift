import Foundation
import Testing
import VMReplica
@testable import PloverTesting

/// `accel = "auto"` on this host, with the real guest: whatever it picks must boot the guest's
/// kernel, and when it falls back to TCG although /dev/kvm opens, a guest under KVM must indeed
/// fail to start (on the project's test machines /dev/kvm exists but guests hang under it, so
/// this picks TCG there).
extension EndToEnd {
    @Suite struct VMAccelTests {
        /// Whether the guest's kernel announces itself under `accel` within `timeout`.
        static func kernelStarts(_ s: QEMUSettings, _ accel: QEMUAccel, timeout: Duration) throws -> Bool {
            let serial = FileManager.default.temporaryDirectory.appendingPathComponent("accel-\(UUID().uuidString).log").path
            defer { unlink(serial) }
            let p = Process()
            p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
            p.arguments = [s.binary, "-machine", "q35,accel=\(accel.rawValue)", "-m", "\(s.memoryMiB)", "-nodefaults", "-no-user-config",
                           "-display", "none", "-monitor", "none", "-serial", "file:\(serial)", "-kernel", s.kernel, "-initrd", s.initrd,
                           "-append", "console=ttyS0 earlyprintk=serial,keep"]
            p.standardOutput = FileHandle.nullDevice
            p.standardError = FileHandle.nullDevice
            try p.run()
            defer { kill(p.processIdentifier, SIGKILL) }
            let deadline = ContinuousClock.now + timeout
            while ContinuousClock.now < deadline {
                if (try? String(contentsOfFile: serial, encoding: .utf8))?.contains("Linux version") ?? false { return true }
                Thread.sleep(forTimeInterval: 0.05)
            }
            return false
        }

        @Test(VMReplicationTests.needsQEMU, .timeLimit(.minutes(2)))
        func autoPicksAnAcceleratorThatBootsTheGuest() throws {
            let guest = try VMReplicationTests.buildGuest()
            let s = QEMUSettings(kernel: guest + "/vmlinuz", initrd: guest + "/initrd.gz", ramFile: "/dev/null")
            let scratch = FileManager.default.temporaryDirectory.path
            let (picked, why) = AccelProbe.choose(s, scratch: scratch)
            print("VMAccelTests: accel = \"auto\" picked \(picked.rawValue): \(why)")
            #expect(try Self.kernelStarts(s, picked, timeout: .seconds(20)), "the guest's kernel did not start under \(picked.rawValue), which auto picked (\(why))")
            if picked == .tcg && access("/dev/kvm", R_OK | W_OK) == 0 && why.contains("did not start") {
                #expect(try !Self.kernelStarts(s, .kvm, timeout: .seconds(5)), "auto fell back to TCG, yet a guest kernel starts under KVM here")
            }
        }
    }
}
