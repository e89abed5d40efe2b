import Foundation

#if canImport(Glibc)
import Glibc
#endif

// Registering memory with an RDMA device pins it, and the kernel counts pinned pages against the
// process's RLIMIT_MEMLOCK (unless it has CAP_IPC_LOCK): past it `ibv_reg_mr` fails with ENOMEM.
// A verbs node pins its receive region and a staging buffer per queue pair it sends on, a syncvm
// backup its guest RAM too, so the default limit (often 8 MiB, sometimes 64 KiB) is far too low.
// `plover doctor` compares the two, a node checks before it starts, and a registration that fails
// anyway says the same thing.

/// RLIMIT_MEMLOCK as it applies to registering memory with an RDMA device.
public struct MemlockLimit: Sendable, Equatable, CustomStringConvertible {
    /// Bytes the process may pin (the soft limit); nil when unlimited.
    public var bytes: UInt64?
    /// The process has CAP_IPC_LOCK, which lifts the limit for pinning.
    public var capabilityBypasses: Bool

    /// A limit of `bytes` (nil: unlimited), lifted by CAP_IPC_LOCK when `capabilityBypasses`.
    public init(bytes: UInt64?, capabilityBypasses: Bool) {
        self.bytes = bytes
        self.capabilityBypasses = capabilityBypasses
    }

    /// This process's limit: `getrlimit(RLIMIT_MEMLOCK)` and CAP_IPC_LOCK from /proc/self/status.
    public static func current() -> MemlockLimit {
        var r = rlimit()
        // glibc's RLIMIT_MEMLOCK is a macro for the enum case Swift imports as __RLIMIT_MEMLOCK.
        let bytes: UInt64? = getrlimit(__rlimit_resource_t(__RLIMIT_MEMLOCK.rawValue), &r) == 0 && r.rlim_cur != rlim_t.max  // RLIM_INFINITY
            ? UInt64(r.rlim_cur) : nil
        let status = (try? String(contentsOfFile: "/proc/self/status", encoding: .utf8)) ?? ""
        return MemlockLimit(bytes: bytes, capabilityBypasses: hasIPCLock(status: status))
    }

    /// Whether the `CapEff` line of a /proc/PID/status text has CAP_IPC_LOCK (bit 14).
    public static func hasIPCLock(status: String) -> Bool {
        for line in status.split(separator: "\n") where line.hasPrefix("CapEff:") {
            let hex = line.dropFirst("CapEff:".count).trimmingCharacters(in: .whitespaces)
            guard let caps = UInt64(hex, radix: 16) else { return false }
            return caps & (1 << 14) != 0
        }
        return false
    }

    /// Whether `bytes` more may be pinned on top of `pinned` already.
    public func allows(_ bytes: UInt64, pinned: UInt64 = 0) -> Bool {
        capabilityBypasses || self.bytes.map { pinned + bytes <= $0 } ?? true
    }

    /// E.g. "8.0 MiB (RLIMIT_MEMLOCK)", "unlimited", "8.0 MiB, lifted by CAP_IPC_LOCK".
    public var description: String {
        let limit = bytes.map { "\(MemlockLimit.format($0)) (RLIMIT_MEMLOCK)" } ?? "unlimited"
        return capabilityBypasses ? "\(limit), lifted by CAP_IPC_LOCK" : limit
    }

    /// How to raise the limit, in one sentence.
    public static let advice = "raise RLIMIT_MEMLOCK for the user that runs plover: `ulimit -l unlimited` in the shell that starts it, LimitMEMLOCK=infinity in its systemd unit, or `USER - memlock unlimited` in /etc/security/limits.conf (then log in again); or use fabric = \"tcp\""

    /// Bytes in binary units with one decimal ("64.0 KiB", "2.1 GiB").
    public static func format(_ bytes: UInt64) -> String {
        var value = Double(bytes)
        for unit in ["B", "KiB", "MiB", "GiB", "TiB"] {
            if value < 1024 || unit == "TiB" { return unit == "B" ? "\(bytes) B" : String(format: "%.1f %@", value, unit) }
            value /= 1024
        }
        return "\(bytes) B"
    }
}

/// What a verbs endpoint pins: its registered regions and one staging buffer per queue pair it
/// sends on (inbound queue pairs only receive and stage nothing).
public struct VerbsMemoryBudget: Sendable, Equatable, CustomStringConvertible {
    /// Bytes of the registered regions (a node's receive region; syncvm's mailbox and guest RAM).
    public var regionBytes: UInt64
    /// Queue pairs this endpoint connects and sends on.
    public var sendingQueuePairs: Int
    /// Staging bytes of each: `outstandingWritesMax × slotBytesMax`.
    public var stagingBytesPerQueuePair: UInt64

    /// A budget of `regionBytes` plus `sendingQueuePairs` staging buffers of `stagingBytesPerQueuePair`.
    public init(regionBytes: UInt64, sendingQueuePairs: Int, stagingBytesPerQueuePair: UInt64) {
        self.regionBytes = regionBytes
        self.sendingQueuePairs = sendingQueuePairs
        self.stagingBytesPerQueuePair = stagingBytesPerQueuePair
    }

    /// A replica on a verbs fabric with `configuration`: the receive region of `RingLayout` for
    /// `members` and `ringBytes`, and one queue pair to each other member.
    public static func replica(members: [NodeID], ringBytes: Int, configuration: VerbsFabric.Configuration,
                               ringSlots: [NodeID]? = nil) throws(FabricError) -> VerbsMemoryBudget {
        // The region holds a ring per possible peer id (`ringSlots`); queue pairs go to members only.
        let layout = try RingLayout(owner: members.min() ?? 1, cluster: ringSlots ?? members, ringBytes: ringBytes)
        return VerbsMemoryBudget(regionBytes: UInt64(layout.regionBytes), sendingQueuePairs: max(0, members.count - 1),
                                 stagingBytesPerQueuePair: UInt64(configuration.outstandingWritesMax * configuration.slotBytesMax))
    }

    /// Everything together, each registration rounded up to whole pages as the kernel counts them.
    public var totalBytes: UInt64 {
        Self.pages(regionBytes) + UInt64(sendingQueuePairs) * Self.pages(stagingBytesPerQueuePair)
    }

    static func pages(_ bytes: UInt64) -> UInt64 { (bytes + 4095) / 4096 * 4096 }

    /// E.g. "66.1 MiB (regions 2.0 MiB, 2 queue pairs × 32.0 MiB staging)".
    public var description: String {
        "\(MemlockLimit.format(totalBytes)) (regions \(MemlockLimit.format(regionBytes)), \(sendingQueuePairs) queue pair\(sendingQueuePairs == 1 ? "" : "s") × \(MemlockLimit.format(stagingBytesPerQueuePair)) staging)"
    }

    /// One line for `plover doctor` or the log, and whether `limit` covers this budget.
    public func check(against limit: MemlockLimit) -> (ok: Bool, line: String) {
        if limit.allows(totalBytes) {
            return (true, "pins \(self); memlock limit \(limit): ok")
        }
        return (false, "pins \(self), more than the memlock limit \(limit): \(MemlockLimit.advice)")
    }
}
