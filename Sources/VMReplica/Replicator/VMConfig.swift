// The `[vm]` table of a VM replica's config file (the rest is `plover node`'s NodeConfig).
// Every key is listed in docs/operations.md, "VM replication".

import Foundation
import RDMAPaxos

/// How clients reach the replicated guest (`network` in the [vm] table).
public enum VMNetwork: Sendable, Equatable {
    /// `network = "front"` (the default): the line front at `front_address`; each line becomes one
    /// UDP datagram to the guest's service on port 7000, and its answer goes back to that connection.
    case front(address: String)
    /// `network = "tap"`: the existing tap device `tap_name` on the clients' bridge. Every frame for
    /// the guest read from it is an input; the guest's frames are written to it once released.
    case tap(name: String)

    /// "front on HOST:PORT" or "tap NAME", for logs.
    public var summary: String {
        switch self {
        case let .front(address): "front on \(address)"
        case let .tap(name): "tap \(name)"
        }
    }
}

/// How one VM replica (primary or backup) runs its VM and talks to its peer.
public struct VMConfig: Sendable, Equatable {
    /// How this replica starts its QEMUs (`kernel`, `initrd`, `ram_file`, `qemu`, `append`, `memory_mib`).
    public var qemu: QEMUSettings
    /// Sockets, QEMU logs and the checkpoint log (relative paths: relative to the config file).
    public var runDir: String
    /// How clients reach the guest: the line front or a tap device.
    public var network: VMNetwork
    /// host:port of this replica's syncvm endpoint, on the node's configured fabric (`SyncLink`).
    public var syncAddress: String
    /// host:port where this replica's next QEMU receives device state (backup).
    public var migrationAddress: String
    /// The other VM replica (the witness runs no VM).
    public var peer: NodeID
    /// host:port of the peer's syncvm endpoint.
    public var peerSyncAddress: String
    /// host:port where the peer's next QEMU receives device state.
    public var peerMigrationAddress: String
    /// The guest counts as idle when its QEMU uses less than this share of one core.
    public var idleCPUPercent = 30
    /// How long each idle measurement lasts.
    public var idleWindowMilliseconds = 20
    /// Held output older than this forces a checkpoint even if the guest is busy.
    public var checkpointMaxMilliseconds = 1000
    /// Release on match (`release_on_match`, default true): the primary releases a held frame
    /// as soon as the backup's guest sent the same one, and checkpoints on a mismatch.
    public var releaseOnMatch = true
    /// With release on match, held output older than this forces a checkpoint (`output_hold_max_ms`).
    public var outputHoldMaxMilliseconds = 100
    /// At least this long between the end of one checkpoint and the next: time for the backup's
    /// fresh QEMU to replay inputs (under TCG it starts with a cold translation cache).
    public var checkpointMinGapMilliseconds = 0
    /// Backup: at a checkpoint, how long it may keep running for its guest to go idle (to finish
    /// replaying the inputs before the checkpoint) before it pauses regardless.
    public var backupIdleMaxMilliseconds = 1000
    /// A sync or migration step that takes longer than this fails the checkpoint. A link that
    /// goes down or a lost leadership ends a checkpoint at once, whatever this says.
    public var checkpointTimeoutMilliseconds = 20_000
    /// A primary whose syncvm link to the backup stays down this long (or whose checkpoints fail
    /// three times in a row) goes on without it: it releases what it held and answers at once
    /// until the backup is re-protected.
    public var backupLostMilliseconds = 1000
    /// host:port of the peer's front, named in the refusal a front gives while it does not serve.
    public var peerFrontAddress: String?
    /// Hash both whole RAM files at every checkpoint while paused and log the digests (tests).
    public var recordRAMDigest = false
    /// Backup: list the pages each sync rewrote in the checkpoint log (finding what diverges).
    public var logDivergentPages = false
    /// The front's and the guest's addresses on the VM's link: `guest_mac` (also the QEMU NIC's)
    /// and `guest_ip` come from the file, the front's are fixed.
    public var link = GuestLink()
    /// `accel = "auto"`: probe KVM at start and fall back to TCG (`qemu.accel` then says TCG
    /// until the probe ran).
    public var accelAuto = false
    /// Size of the disk image `qemu.diskImage` when this replica creates it (`disk_size_mb`,
    /// default 64); an existing image must have this size. Both replicas must use the same.
    public var diskSizeMiB = 64

    /// Reads the `[vm]` table of `path`; relative paths there are relative to the file's directory.
    public static func load(path: String) throws(ConfigError) -> VMConfig {
        guard var r = try TableReader.section("vm", ofFile: path) else {
            throw ConfigError(file: path, key: "vm", problem: "is required for a VM primary or backup: add a [vm] table (docs/operations.md, \"VM replication\")")
        }
        let base = (path as NSString).deletingLastPathComponent
        func resolve(_ p: String) -> String { p.hasPrefix("/") || base.isEmpty ? p : base + "/" + p }
        var q = QEMUSettings(kernel: resolve(try r.string("kernel")), initrd: resolve(try r.string("initrd")),
                             ramFile: resolve(try r.string("ram_file")))
        q.binary = try r.optionalString("qemu") ?? q.binary
        q.append = try r.optionalString("append") ?? q.append
        q.memoryMiB = try r.int("memory_mib", default: q.memoryMiB, range: 16...65_536)
        q.cpus = try r.int("cpus", default: q.cpus, range: 1...256)
        let accel = try r.optionalString("accel") ?? "tcg"
        guard ["tcg", "kvm", "auto"].contains(accel) else {
            throw ConfigError(file: path, key: "vm.accel", problem: "must be one of tcg, kvm, auto (got \"\(accel)\")")
        }
        q.accel = QEMUAccel(rawValue: accel) ?? .tcg
        if let extra = try r.optionalString("qemu_args") { q.extraArguments = extra.split(whereSeparator: \.isWhitespace).map(String.init) }
        func addr(_ key: String) throws(ConfigError) -> String { try r.address(try r.string(key), key: key) }
        let network: VMNetwork
        switch try r.optionalString("network") ?? "front" {
        case "front":
            if r.value("tap_name") != nil { throw r.error("tap_name", "is only for network = \"tap\" (this replica's network is \"front\")") }
            network = .front(address: try addr("front_address"))
        case "tap":
            for k in ["front_address", "peer_front_address"] where r.value(k) != nil {
                throw r.error(k, "is only for network = \"front\": with network = \"tap\" clients reach the guest at guest_ip through tap_name")
            }
            let name = try r.string("tap_name")
            guard !name.isEmpty, name.utf8.count <= TapDevice.nameBytesMax, !name.contains("/") else {
                throw r.error("tap_name", "\"\(name)\" is not an interface name (1 to \(TapDevice.nameBytesMax) bytes, no '/')")
            }
            network = .tap(name: name)
        case let other:
            throw r.error("network", "must be \"front\" or \"tap\" (got \"\(other)\")")
        }
        var link = GuestLink()
        if let m = try r.optionalString("guest_mac") {
            guard let mac = GuestLink.parseMAC(m), mac[0] & 1 == 0 else {
                throw r.error("guest_mac", "\"\(m)\" is not a unicast MAC address (aa:bb:cc:dd:ee:ff)")
            }
            link.guestMAC = mac
            q.guestMAC = m.lowercased()
        }
        if let a = try r.optionalString("guest_ip") {
            guard let ip = GuestLink.parseIPv4(a) else { throw r.error("guest_ip", "\"\(a)\" is not an IPv4 address") }
            link.guestIP = ip
        }
        var c = VMConfig(qemu: q, runDir: resolve(try r.string("run_dir")),
                         network: network, syncAddress: try addr("sync_address"),
                         migrationAddress: try addr("migration_address"), peer: try r.nodeID("peer"),
                         peerSyncAddress: try addr("peer_sync_address"),
                         peerMigrationAddress: try addr("peer_migration_address"))
        c.idleCPUPercent = try r.int("idle_cpu_percent", default: c.idleCPUPercent, range: 1...100)
        c.idleWindowMilliseconds = try r.int("idle_window_ms", default: c.idleWindowMilliseconds, range: 1...10_000)
        c.checkpointMaxMilliseconds = try r.int("checkpoint_max_ms", default: c.checkpointMaxMilliseconds, range: 1...3_600_000)
        c.checkpointMinGapMilliseconds = try r.int("checkpoint_min_gap_ms", default: 0, range: 0...3_600_000)
        c.backupIdleMaxMilliseconds = try r.int("backup_idle_max_ms", default: c.backupIdleMaxMilliseconds, range: 0...60_000)
        c.checkpointTimeoutMilliseconds = try r.int("checkpoint_timeout_ms", default: c.checkpointTimeoutMilliseconds, range: 100...3_600_000)
        c.releaseOnMatch = try r.bool("release_on_match", default: c.releaseOnMatch)
        c.outputHoldMaxMilliseconds = try r.int("output_hold_max_ms", default: c.outputHoldMaxMilliseconds, range: 1...3_600_000)
        c.backupLostMilliseconds = try r.int("backup_lost_ms", default: c.backupLostMilliseconds, range: 100...3_600_000)
        c.link = link
        if let a = try r.optionalString("peer_front_address") { c.peerFrontAddress = try r.address(a, key: "peer_front_address") }
        c.accelAuto = accel == "auto"
        c.recordRAMDigest = try r.bool("record_ram_digest", default: false)
        c.logDivergentPages = try r.bool("log_divergent_pages", default: false)
        if let disk = try r.optionalString("disk_image") {
            guard !disk.isEmpty else { throw ConfigError(file: path, key: "vm.disk_image", problem: "is empty: name a raw image file, or leave the key out for a VM without a disk") }
            c.qemu.diskImage = resolve(disk)
        }
        c.diskSizeMiB = try r.int("disk_size_mb", default: c.diskSizeMiB, range: 1...131_072)
        try r.finish()
        for (k, v) in [("kernel", q.kernel), ("initrd", q.initrd)] where !FileManager.default.fileExists(atPath: v) {
            throw ConfigError(file: path, key: "vm.\(k)", problem: "\(v) does not exist (build the guest with scripts/build-vm-guest.sh)")
        }
        return c
    }

    init(qemu: QEMUSettings, runDir: String, network: VMNetwork, syncAddress: String, migrationAddress: String,
         peer: NodeID, peerSyncAddress: String, peerMigrationAddress: String) {
        self.qemu = qemu
        self.runDir = runDir
        self.network = network
        self.syncAddress = syncAddress
        self.migrationAddress = migrationAddress
        self.peer = peer
        self.peerSyncAddress = peerSyncAddress
        self.peerMigrationAddress = peerMigrationAddress
    }
}
