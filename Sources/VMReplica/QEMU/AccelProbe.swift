// `accel = "auto"`: use KVM only where a guest actually runs under it. /dev/kvm can exist and
// open while guests hang under it (nested virtualisation without the features the guest needs),
// so the probe boots the replica's own guest kernel under KVM with early console output and waits
// for the kernel proper to announce itself ("Linux version": the real-mode setup before it runs
// even where KVM then hangs); nothing within the timeout means TCG. Under TCG here that line
// comes within about a second.

#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// Decides `auto` between KVM and TCG on this host.
public enum AccelProbe {
    /// The accelerator to use for `settings` (its `accel` is ignored) and why. Takes up to
    /// `timeout` when /dev/kvm opens; `scratch` holds the probe's serial log. Needs the guest
    /// kernel to have the 8250 early console (`earlyprintk=serial`), as distribution kernels do.
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
        p.arguments = ["-machine", "q35,accel=kvm", "-m", "\(settings.memoryMiB)", "-nodefaults", "-no-user-config", "-display", "none",
                       "-monitor", "none", "-serial", "file:\(serial)", "-kernel", settings.kernel, "-initrd", settings.initrd,
                       "-append", "console=ttyS0 earlyprintk=serial,keep"]
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        p.standardInput = FileHandle.nullDevice
        do { try p.run() } catch { return (.tcg, "the KVM probe QEMU did not start: \(error)") }
        defer {
            // Dead as /proc shows it; Foundation reaps it (its own wait can lag by seconds).
            let pid = p.processIdentifier
            Glibc.kill(pid, SIGKILL)
            let deadline = ContinuousClock.now + .seconds(5)
            while QEMUInstance.alive(pid), ContinuousClock.now < deadline { usleep(1000) }
            unlink(serial)
        }
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if let text = try? String(contentsOfFile: serial, encoding: .utf8), text.contains("Linux version") {
                return (.kvm, "a guest kernel started under KVM")
            }
            if !QEMUInstance.alive(p.processIdentifier) { return (.tcg, "the KVM probe QEMU exited before its guest wrote anything") }
            usleep(20_000)
        }
        return (.tcg, "/dev/kvm opens, but a guest kernel under KVM did not start within \(timeout)")
    }
}
