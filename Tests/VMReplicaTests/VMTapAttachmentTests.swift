// The tap attachment without QEMU: the machine's takeAttachment / leaveAttachment actions at
// start, take-over, step-down and stop; which frames are the guest's; the gratuitous ARP; the
// network keys of the [vm] table; and a real tap (made with `ip tuntap`, root only) driven from
// the kernel's side through a packet socket: a replica that does not serve discards what it
// reads, one that serves proposes the guest's frames in order and announces the guest.

import Foundation
import RDMAPaxos
import Synchronization
import Testing
@testable import VMReplica

@Suite struct VMTapAttachmentTests {
    typealias Action = VMReplicaMachine.Action
    let t0 = ContinuousClock.now

    @Test func theAttachmentFollowsTheRole() {
        // A fresh primary serves from the start; a fresh backup and a restarted primary do not.
        var p = VMReplicaMachine(role: .primary, me: 1, peer: 2, rules: SchedulerRules(), now: t0)
        #expect(p.started(recoveredThrough: 0) == [.takeAttachment(announce: true)])
        var b = VMReplicaMachine(role: .backup, me: 2, peer: 1, rules: SchedulerRules(), now: t0)
        #expect(!b.started(recoveredThrough: 0).contains { if case .takeAttachment = $0 { true } else { false } })
        var r = VMReplicaMachine(role: .primary, me: 1, peer: 2, rules: SchedulerRules(), now: t0)
        #expect(!r.started(recoveredThrough: 9).contains { if case .takeAttachment = $0 { true } else { false } })
        // The backup, once a copy, takes the attachment with the take-over, before the rest of
        // becoming the primary; the old primary leaves it when it applies the same entry.
        _ = b.apply(.checkpoint(epoch: 1, proposer: 1), at: 5)
        _ = b.checkpointEnded(.completed, now: t0)
        let over = b.apply(.takeOver(by: 2), at: 6)
        #expect(Array(over.prefix(2)) == [.takeAttachment(announce: true), .becomePrimary(index: 6)])
        let old = p.apply(.takeOver(by: 2), at: 6)
        #expect(old.first == .leaveAttachment && old.contains(.becomeBackup(because: "node 2 took the VM over at log index 6")))
        // An inconsistent backup refuses the take-over and never takes the attachment.
        var unfit = VMReplicaMachine(role: .backup, me: 2, peer: 1, rules: SchedulerRules(), now: t0)
        _ = unfit.started(recoveredThrough: 0)
        #expect(!unfit.apply(.takeOver(by: 2), at: 6).contains(.takeAttachment(announce: true)))
        // A demoted primary leaves it; a stopping replica leaves it.
        var d = VMReplicaMachine(role: .primary, me: 1, peer: 2, rules: SchedulerRules(), now: t0)
        _ = d.started(recoveredThrough: 0)
        _ = d.markInconsistent("its QEMU exited")
        #expect(d.demote().first == .leaveAttachment)
        #expect(b.stop().contains(.leaveAttachment))
    }

    @Test func onlyTheGuestsFramesAreTakenAndTheAnnouncementIsAGratuitousARP() {
        let link = GuestLink()
        let other: [UInt8] = [0x02, 9, 9, 9, 9, 9]
        let payload = [UInt8](repeating: 0, count: 46)
        #expect(link.isForGuest(link.guestMAC + other + [0x08, 0x00] + payload))
        #expect(link.isForGuest([UInt8](repeating: 0xff, count: 6) + other + [0x08, 0x06] + payload), "broadcast (ARP)")
        #expect(link.isForGuest([0x01, 0, 0x5e, 0, 0, 1] + other + [0x08, 0x00] + payload), "multicast")
        #expect(!link.isForGuest([0x02, 7, 7, 7, 7, 7] + other + [0x08, 0x00] + payload), "unicast to another host, flooded by the bridge")
        #expect(!link.isForGuest([UInt8](repeating: 0xff, count: 6) + link.guestMAC + [0x08, 0x06] + payload), "the guest's own frame")
        #expect(!link.isForGuest(Array(link.guestMAC + other)), "a runt")
        let g = link.gratuitousARP()
        #expect(g.count == 60 && g[0..<6].allSatisfy { $0 == 0xff } && Array(g[6..<12]) == link.guestMAC && g[12] == 0x08 && g[13] == 0x06)
        #expect(Array(g[14..<22]) == [0, 1, 0x08, 0x00, 6, 4, 0, 1], "Ethernet/IPv4 ARP request")
        #expect(Array(g[22..<28]) == link.guestMAC && Array(g[28..<32]) == link.guestIP && Array(g[38..<42]) == link.guestIP, "sender and target are the guest")
        #expect(GuestLink.parseMAC("52:54:00:AB:cd:01") == [0x52, 0x54, 0, 0xab, 0xcd, 1] && GuestLink.parseMAC("52:54:00:ab:cd") == nil)
        #expect(GuestLink.parseIPv4("10.1.2.3") == [10, 1, 2, 3] && GuestLink.parseIPv4("10.1.2.300") == nil && GuestLink.parseIPv4("10.1.2") == nil)
    }

    @Test func networkKeysChooseTheAttachmentAndNameWhatIsWrong() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("vmnet-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        for f in ["k", "i"] { _ = FileManager.default.createFile(atPath: dir + "/" + f, contents: Data([0])) }
        let base = """
            id = 1
            data_dir = "d"
            [[members]]
            id = 1
            address = "127.0.0.1:1"
            client_address = "127.0.0.1:2"
            [vm]
            kernel = "k"
            initrd = "i"
            ram_file = "/dev/shm/x.ram"
            run_dir = "run"
            sync_address = "127.0.0.1:4"
            migration_address = "127.0.0.1:5"
            peer = 2
            peer_sync_address = "127.0.0.1:6"
            peer_migration_address = "127.0.0.1:7"

            """
        let path = dir + "/c.toml"
        func load(_ extra: String) throws -> VMConfig {
            try (base + extra).write(toFile: path, atomically: true, encoding: .utf8)
            return try VMConfig.load(path: path)
        }
        #expect(try load("front_address = \"127.0.0.1:3\"\n").network == .front(address: "127.0.0.1:3"))
        let t = try load("network = \"tap\"\ntap_name = \"vmtap1\"\nguest_mac = \"52:54:00:AA:00:01\"\nguest_ip = \"10.7.0.2\"\n")
        #expect(t.network == .tap(name: "vmtap1") && t.link.guestMAC == [0x52, 0x54, 0, 0xaa, 0, 1] && t.link.guestIP == [10, 7, 0, 2])
        #expect(t.qemu.arguments(nicSocket: "n", qmpSocket: "q", serialLog: "s", pidFile: "p", incoming: false).contains("virtio-net-pci,netdev=n0,mac=52:54:00:aa:00:01"),
                "QEMU's NIC has the MAC the announcement names")
        for (extra, key) in [("", "vm.front_address"), ("network = \"tap\"\n", "vm.tap_name"), ("network = \"bridge\"\n", "vm.network"),
                             ("network = \"tap\"\ntap_name = \"a-name-far-too-long\"\n", "vm.tap_name"),
                             ("network = \"tap\"\ntap_name = \"t\"\nfront_address = \"127.0.0.1:3\"\n", "vm.front_address"),
                             ("front_address = \"127.0.0.1:3\"\ntap_name = \"t\"\n", "vm.tap_name"),
                             ("network = \"tap\"\ntap_name = \"t\"\nguest_mac = \"01:00:5e:00:00:01\"\n", "vm.guest_mac"),
                             ("network = \"tap\"\ntap_name = \"t\"\nguest_ip = \"10.0.0\"\n", "vm.guest_ip")] {
            #expect(performing: { try load(extra) }, throws: { ($0 as? ConfigError)?.key == key })
        }
    }

    static var isRoot: Bool { getuid() == 0 }

    @Test(.enabled(if: isRoot, "creating a tap device needs root"))
    func aMissingOrBusyTapIsRefusedNamingTheKey() throws {
        #expect(performing: { try TapDevice(name: "plvnotthere0") }, throws: { ($0 as? TapError).map { $0.key == "vm.tap_name" && $0.problem.contains("ip tuntap add") } ?? false })
        #expect(performing: { try TapDevice(name: "lo") }, throws: { ($0 as? TapError)?.problem.contains("not a tap") ?? false })
        let lab = try KernelSideTap()
        let first = try TapDevice(name: lab.name)
        #expect(performing: { try TapDevice(name: lab.name) }, throws: { ($0 as? TapError)?.problem.contains("attached by another process") ?? false })
        first.close()
    }

    @Test(.enabled(if: isRoot, "creating a tap device needs root"))
    func aTapProposesTheGuestsFramesOnlyWhileItServesAndAnnouncesTheGuest() throws {
        let lab = try KernelSideTap()
        let link = GuestLink()
        let proposed = Mutex<[[UInt8]]>([])
        let tap = try TapDevice(name: lab.name)
        let a = TapAttachment(tap: tap, link: link) { f in proposed.withLock { $0.append(f) } }
        defer { a.stop() }
        let client: [UInt8] = [0x02, 0xc1, 0, 0, 0, 1]
        func frame(_ n: UInt8, to dst: [UInt8] = GuestLink().guestMAC) -> [UInt8] { dst + client + [0x08, 0x00] + [UInt8](repeating: n, count: 46) }
        func settle(_ until: () -> Bool) {
            let deadline = ContinuousClock.now + .seconds(5)
            while !until() && ContinuousClock.now < deadline { Thread.sleep(forTimeInterval: 0.01) }
        }
        // The host may send frames of its own on a new link (a DHCP client, IPv6 when /proc/sys is
        // read-only): the checks count only the test's frames, which come from `client`.
        func discarded() -> Int { Int(a.status.split(separator: " ").first { $0.hasPrefix("tap_discarded=") }?.dropFirst(14) ?? "") ?? -1 }
        func proposedByTest() -> [[UInt8]] { proposed.withLock { $0 }.filter { Array($0[6..<12]) == client } }
        // Not serving: read and discarded (the other replica's tap sees the same flood).
        try lab.send(frame(1))
        settle { discarded() >= 1 }
        #expect(proposed.withLock { $0.isEmpty } && discarded() >= 1, "\(a.status)")
        // Serving: announced, then the guest's frames are proposed in order; others are not.
        // Frame 1 had it been taken while not serving would come first.
        a.take(announce: true)
        let garp = lab.receive { $0.count >= 14 && $0[12] == 0x08 && $0[13] == 0x06 }
        #expect(garp == link.gratuitousARP(), "the announcement reached the segment")
        try lab.send(frame(2))
        try lab.send(frame(3, to: [0x02, 7, 7, 7, 7, 7]))
        try lab.send(frame(4, to: [UInt8](repeating: 0xff, count: 6)))
        settle { proposedByTest().count >= 2 }
        #expect(proposedByTest() == [frame(2), frame(4, to: [UInt8](repeating: 0xff, count: 6))])
        // A released frame of the guest goes out on the segment.
        let out = [UInt8](client) + link.guestMAC + [0x08, 0x00] + [UInt8](repeating: 9, count: 46)
        a.deliver(out)
        #expect(lab.receive { $0 == out } == out)
        // Left: discarded again; taken anew, the next frame is the first proposed after frame 4.
        a.leave()
        let before = discarded()
        try lab.send(frame(5))
        settle { discarded() > before }
        a.take(announce: false)
        try lab.send(frame(6))
        settle { proposedByTest().count >= 3 }
        #expect(proposedByTest() == [frame(2), frame(4, to: [UInt8](repeating: 0xff, count: 6)), frame(6)], "\(a.status)")
    }
}

/// A tap made with `ip tuntap` (removed afterwards) and a packet socket on it: what the socket
/// sends reaches the tap's reader, what the tap's owner writes the socket receives.
final class KernelSideTap {
    let name = "plvu\(getpid() % 100_000)t"
    let socketFD: Int32

    init() throws {
        try Self.ip(["tuntap", "add", "dev", name, "mode", "tap"])
        // The kernel's own IPv6 frames (MLD reports, DAD) would reach the tap's reader beside the
        // test's. /proc/sys is read-only in many containers, so the link is also told over netlink
        // to make no IPv6 address (no address: no DAD, no MLD report, no router solicitation).
        try? "1".write(toFile: "/proc/sys/net/ipv6/conf/\(name)/disable_ipv6", atomically: false, encoding: .utf8)
        try? Self.ip(["link", "set", "dev", name, "addrgenmode", "none"])
        try Self.ip(["link", "set", name, "up"])
        let all = UInt16(0x0003).bigEndian  // ETH_P_ALL
        socketFD = socket(AF_PACKET, Int32(SOCK_RAW.rawValue), Int32(all))
        guard socketFD >= 0 else { throw TapError(key: "test", problem: "packet socket: \(String(cString: strerror(errno)))") }
        var sll = [UInt8](repeating: 0, count: 20)  // struct sockaddr_ll
        sll[0] = UInt8(AF_PACKET & 0xff)
        sll[2] = UInt8(all & 0xff)
        sll[3] = UInt8(all >> 8)
        withUnsafeBytes(of: Int32(if_nametoindex(name))) { for (i, b) in $0.enumerated() { sll[4 + i] = b } }
        let r = sll.withUnsafeBytes { bind(socketFD, $0.baseAddress!.assumingMemoryBound(to: sockaddr.self), 20) }
        guard r == 0 else { throw TapError(key: "test", problem: "bind to \(name): \(String(cString: strerror(errno)))") }
    }

    /// Sends `frame` out of the tap's interface: the tap's reader gets it.
    func send(_ frame: [UInt8]) throws {
        let n = frame.withUnsafeBytes { Glibc.send(socketFD, $0.baseAddress!, $0.count, 0) }
        guard n == frame.count else { throw TapError(key: "test", problem: "send on \(name): \(String(cString: strerror(errno)))") }
    }

    /// The first frame the interface received that `matches`, within 5 s.
    func receive(_ matches: ([UInt8]) -> Bool) -> [UInt8]? {
        let deadline = ContinuousClock.now + .seconds(5)
        while ContinuousClock.now < deadline {
            var p = pollfd(fd: socketFD, events: Int16(POLLIN), revents: 0)
            guard poll(&p, 1, 100) == 1 else { continue }
            var buf = [UInt8](repeating: 0, count: 2048)
            var from = [UInt8](repeating: 0, count: 20)
            var len = socklen_t(20)
            let n = buf.withUnsafeMutableBytes { b in
                from.withUnsafeMutableBytes { f in recvfrom(socketFD, b.baseAddress!, 2048, 0, f.baseAddress!.assumingMemoryBound(to: sockaddr.self), &len) }
            }
            // Only frames coming in from the tap's owner (not the ones this socket sent out).
            guard n > 0, from[10] != 4 else { continue }  // PACKET_OUTGOING
            let f = Array(buf[..<n])
            if matches(f) { return f }
        }
        return nil
    }

    deinit {
        close(socketFD)
        try? Self.ip(["link", "delete", name])
    }

    static func ip(_ args: [String]) throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"].first { FileManager.default.isExecutableFile(atPath: $0) } ?? "/usr/sbin/ip")
        p.arguments = args
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        p.waitUntilExit()
        guard p.terminationStatus == 0 else { throw TapError(key: "test", problem: "ip \(args.joined(separator: " ")) failed (needs root and iproute2)") }
    }
}
