// `accel = "auto"`: use KVM only where a guest actually runs under it. /dev/kvm can exist and
// open while guests hang under it (nested virtualisation without the features the guest needs),
// so the probe boots the replica's own guest kernel under KVM and waits for it to write to its
// serial console; no output within the timeout means TCG.

#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// Decides `auto` between KVM and TCG on this host.
public enum AccelProbe {
    /// The accelerator to use for `settings` (its `accel` is ignored) and why. Takes up to
    /// `timeout` when /dev/kvm opens; `scratch` holds the probe's serial log.
    public static func choose(_ settings: QEMUSettings, scratch: String, timeout: Duration = .seconds(5)) -> (QEMUAccel, String) {
        let fd = open("/dev/kvm", O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { return (.tcg, "/dev/kvm cannot be opened (\(String(cString: strerror(errno))))") }
        close(fd)
        let serial = scratch + "/kvm-probe.serial.log"
        unlink(serial)
        let p = Process()
        do {
            p.executableURL = URL(fileURLWithPath: settings.binary.hasPrefix("/") ? settings.binary : try QEMUInstance.which(settings.binary))
        } catch { return (.tcg, "\(error)") }
        p.arguments = ["-machine", "q35,accel=kvm", "-m", "64", "-nodefaults", "-no-user-config", "-display", "none",
                       "-monitor", "none", "-serial", "file:\(serial)", "-kernel", settings.kernel, "-initrd", settings.initrd,
                       "-append", "console=ttyS0"]
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        p.standardInput = FileHandle.nullDevice
        do { try p.run() } catch { return (.tcg, "the KVM probe QEMU did not start: \(error)") }
        defer {
            if p.isRunning { Glibc.kill(p.processIdentifier, SIGKILL) }
            p.waitUntilExit()
            unlink(serial)
        }
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if let size = (try? FileManager.default.attributesOfItem(atPath: serial))?[.size] as? Int, size > 0 {
                return (.kvm, "a guest wrote to its console under KVM")
            }
            if !p.isRunning { return (.tcg, "the KVM probe QEMU exited with status \(p.terminationStatus)") }
            usleep(20_000)
        }
        return (.tcg, "/dev/kvm opens, but a guest under KVM wrote nothing to its console within \(timeout)")
    }
}
