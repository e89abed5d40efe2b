// A Linux tap device opened through /dev/net/tun as IFF_TAP | IFF_NO_PI: whole Ethernet frames,
// one per read and one per write, with no packet-information prefix and no virtio-net header (the
// device advertises no offloads, so the kernel hands it checksummed, segmented frames). The device
// is the operator's: it must exist (`ip tuntap add dev NAME mode tap`) and sit on the clients'
// bridge; a replica only attaches to it. docs/design/vmreplica.md, "Tap attachment".

#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// Why a tap device could not be used, naming the config key and what to do.
public struct TapError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The config key that names the device (`vm.tap_name`).
    public var key: String
    /// What is wrong and how to fix it.
    public var problem: String
    public var description: String { "\(key): \(problem)" }
}

/// An open tap device. Reads wait at most a poll period, so a reader thread sees `close()`.
public final class TapDevice: @unchecked Sendable {
    // @unchecked Sendable: `fd` is set once; `closed` and writes are guarded by `lock`.
    /// The interface's name.
    public let name: String
    private let fd: Int32
    private let lock = NSLock()
    private var closed = false

    /// The largest frame read: a 1500-byte MTU frame with its header fits many times over.
    static let frameBytesMax = 65_536
    /// `_IOW('T', 202, int)` and the flags of <linux/if_tun.h>.
    static let tunSetIff: UInt = 0x4004_54ca
    static let iffTap: Int16 = 0x0002
    static let iffNoPI: Int16 = 0x1000
    /// Linux's interface names have at most this many bytes.
    public static let nameBytesMax = 15

    /// Attaches to the existing tap device `name`; `key` names it in errors. Throws `TapError`
    /// when the device is missing, is not a tap without packet information, is attached elsewhere,
    /// or the process lacks CAP_NET_ADMIN.
    public init(name: String, key: String = "vm.tap_name") throws {
        self.name = name
        guard !name.isEmpty, name.utf8.count <= Self.nameBytesMax, !name.contains("/") else {
            throw TapError(key: key, problem: "\"\(name)\" is not an interface name (1 to \(Self.nameBytesMax) bytes, no '/')")
        }
        guard FileManager.default.fileExists(atPath: "/sys/class/net/\(name)") else {
            throw TapError(key: key, problem: "no network device \(name): create it with `ip tuntap add dev \(name) mode tap`, add it to the clients' bridge (`ip link set \(name) master BRIDGE up`) and start the replica again")
        }
        guard FileManager.default.fileExists(atPath: "/sys/class/net/\(name)/tun_flags") else {
            throw TapError(key: key, problem: "\(name) is not a tap device (no tun_flags): create one with `ip tuntap add dev \(name) mode tap`")
        }
        let t = open("/dev/net/tun", O_RDWR | O_CLOEXEC)
        guard t >= 0 else {
            let e = errno
            throw TapError(key: key, problem: "cannot open /dev/net/tun for \(name): \(String(cString: strerror(e)))" + (e == ENOENT ? " (the kernel's tun driver is missing)" : ""))
        }
        // struct ifreq: the name (16 bytes) then the flags (a short), within 40 bytes.
        var req = [UInt8](repeating: 0, count: 40)
        for (i, b) in name.utf8.enumerated() { req[i] = b }
        let flags = Self.iffTap | Self.iffNoPI
        req[16] = UInt8(truncatingIfNeeded: flags)
        req[17] = UInt8(truncatingIfNeeded: flags >> 8)
        let r = req.withUnsafeMutableBytes { ioctl(t, Self.tunSetIff, $0.baseAddress!) }
        guard r == 0 else {
            let e = errno
            Glibc.close(t)
            let why: String
            switch e {
            case EPERM, EACCES: why = "attaching to \(name) needs CAP_NET_ADMIN: run the replica as root, or create the tap for its user (`ip tuntap add dev \(name) mode tap user USER`)"
            case EINVAL: why = "\(name) is not a tap without packet information: create it with `ip tuntap add dev \(name) mode tap` (no `pi`, no `multi_queue`)"
            case EBUSY: why = "\(name) is attached by another process (another replica or a QEMU?): each VM replica needs a tap of its own"
            default: why = "TUNSETIFF on \(name): \(String(cString: strerror(e)))"
            }
            throw TapError(key: key, problem: why)
        }
        fd = t
    }

    /// Whether the interface is administratively up (`ip link set NAME up`); frames flow only then.
    public var isUp: Bool {
        guard let s = try? String(contentsOfFile: "/sys/class/net/\(name)/flags", encoding: .utf8),
              let v = Int(s.trimmingCharacters(in: .whitespacesAndNewlines).dropFirst(2), radix: 16) else { return false }
        return v & 1 != 0
    }

    /// The bridge the interface is a port of, if any.
    public var bridge: String? {
        (try? FileManager.default.destinationOfSymbolicLink(atPath: "/sys/class/net/\(name)/master")).map { ($0 as NSString).lastPathComponent }
    }

    /// The next frame, or nil when none arrived within `timeout` or the device is closed (check `isClosed`).
    public func read(timeout: Duration) -> [UInt8]? {
        guard !isClosed else { return nil }
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        guard poll(&p, 1, Int32(clamping: max(1, timeout.wholeMilliseconds))) == 1, p.revents & Int16(POLLIN) != 0 else { return nil }
        var buf = [UInt8](repeating: 0, count: Self.frameBytesMax)
        let n = buf.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress!, Self.frameBytesMax) }
        guard n > 0 else { return nil }
        return Array(buf[..<n])
    }

    /// Writes one frame; false when the kernel refused it (the device is down, say) or it is closed.
    @discardableResult
    public func write(_ frame: [UInt8]) -> Bool {
        lock.withLock {
            guard !closed else { return false }
            return frame.withUnsafeBytes { Glibc.write(fd, $0.baseAddress!, $0.count) } == frame.count
        }
    }

    /// Whether `close()` ran.
    public var isClosed: Bool { lock.withLock { closed } }

    /// Stops reads and writes. The descriptor itself is closed when the last reference goes
    /// (a reader may still be polling it; closing it under the reader could hand its number to
    /// another file). Then the device stays, without carrier, for the next replica to attach.
    public func close() { lock.withLock { closed = true } }

    deinit { Glibc.close(fd) }
}
