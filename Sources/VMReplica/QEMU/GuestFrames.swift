// Ethernet + IPv4 + UDP, just enough for the client front: requests become UDP datagrams to the
// guest's service, and the guest's UDP answers are recognised and unwrapped. For the tap
// attachment: which frames are the guest's, and the gratuitous ARP that announces it.

/// Addresses of the front and of the guest on the VM's private link.
public struct GuestLink: Sendable, Equatable {
    /// The guest NIC's MAC address, where request frames go (the same as `QEMUSettings.guestMAC`).
    public var guestMAC: [UInt8] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]
    /// The guest's IPv4 address, four bytes.
    public var guestIP: [UInt8] = [10, 99, 0, 2]
    /// The UDP port of the guest's service.
    public var guestPort: UInt16 = 7000
    /// The front's own (virtual) addresses; the guest has a static ARP entry for them.
    public var frontMAC: [UInt8] = [0x02, 0, 0, 0, 0, 0x01]
    /// The front's IPv4 address, four bytes: the source of requests, where answers must go.
    public var frontIP: [UInt8] = [10, 99, 0, 1]
    /// The front's UDP port: the source port of requests, where answers must go.
    public var frontPort: UInt16 = 40000

    /// The addresses the guest image is set up with (scripts/vm-guest/init).
    public init() {}

    /// How many UDP ports from `frontPort` on the front may use as sources: one per client
    /// connection, so that the guest's answer (sent back to the request's source port) goes to
    /// the connection that asked.
    public var frontPortCount: UInt16 = 16_384

    /// One UDP datagram from the front (source port `sourcePort`, by default `frontPort`) to the
    /// guest's service, as an Ethernet frame.
    public func requestFrame(payload: [UInt8], sourcePort: UInt16? = nil) -> [UInt8] {
        var udp: [UInt8] = []
        udp.be16(sourcePort ?? frontPort); udp.be16(guestPort); udp.be16(UInt16(8 + payload.count)); udp.be16(0)
        udp += payload
        var ip: [UInt8] = [0x45, 0]
        ip.be16(UInt16(20 + udp.count))
        ip += [0, 0, 0x40, 0, 64, 17, 0, 0]  // id 0, don't fragment, TTL 64, UDP, checksum later
        ip += frontIP + guestIP
        let sum = Self.checksum(ip)
        ip[10] = UInt8(sum >> 8)
        ip[11] = UInt8(sum & 0xff)
        return guestMAC + frontMAC + [0x08, 0x00] + ip + udp
    }

    /// The payload when `frame` is a UDP datagram from the guest's service to the front; nil
    /// for anything else (ARP, other ports, malformed frames).
    public func answerPayload(_ f: [UInt8]) -> [UInt8]? { answer(f)?.payload }

    /// The answer in `frame` and the front port it is addressed to, when `frame` is a UDP datagram
    /// from the guest's service to one of the front's ports; nil for anything else.
    public func answer(_ f: [UInt8]) -> GuestAnswer? {
        guard f.count >= 42, f[12] == 0x08, f[13] == 0x00, f[14] >> 4 == 4 else { return nil }
        let ihl = Int(f[14] & 0x0f) * 4
        guard ihl >= 20, f[23] == 17, Array(f[26..<30]) == guestIP, Array(f[30..<34]) == frontIP else { return nil }
        let u = 14 + ihl
        guard f.count >= u + 8 else { return nil }
        let src = UInt16(f[u]) << 8 | UInt16(f[u + 1]), dst = UInt16(f[u + 2]) << 8 | UInt16(f[u + 3])
        let len = Int(f[u + 4]) << 8 | Int(f[u + 5])
        guard src == guestPort, dst >= frontPort, dst - frontPort < frontPortCount, len >= 8, u + len <= f.count else { return nil }
        return GuestAnswer(port: dst, payload: Array(f[(u + 8)..<(u + len)]))
    }

    /// Whether a frame read from the clients' segment is for the guest: unicast to its MAC,
    /// broadcast (ARP requests) or multicast. Unicast to another host, frames the guest itself
    /// sent, and runts shorter than an Ethernet header are not.
    public func isForGuest(_ f: [UInt8]) -> Bool {
        guard f.count >= 14, Array(f[6..<12]) != guestMAC else { return false }
        return f[0] & 1 != 0 || Array(f[0..<6]) == guestMAC
    }

    /// A gratuitous ARP for the guest: a broadcast ARP request from its MAC whose sender and
    /// target address are both its IP, padded to Ethernet's 60-byte minimum. A bridge learns
    /// the guest's MAC on the port it came in by; hosts refresh their neighbour entry.
    public func gratuitousARP() -> [UInt8] {
        var f: [UInt8] = Array(repeating: 0xff, count: 6) + guestMAC + [0x08, 0x06]
        f += [0, 1, 0x08, 0x00, 6, 4, 0, 1]  // Ethernet, IPv4, address lengths, request
        f += guestMAC + guestIP + [0, 0, 0, 0, 0, 0] + guestIP
        return f + [UInt8](repeating: 0, count: 60 - f.count)
    }

    /// Parses "aa:bb:cc:dd:ee:ff" into six bytes; nil when it is not a MAC address.
    public static func parseMAC(_ s: String) -> [UInt8]? {
        let parts = s.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 6 else { return nil }
        let bytes = parts.compactMap { $0.count == 2 ? UInt8($0, radix: 16) : nil }
        return bytes.count == 6 ? bytes : nil
    }

    /// Parses a dotted IPv4 address into four bytes; nil when it is not one.
    public static func parseIPv4(_ s: String) -> [UInt8]? {
        let parts = s.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 4 else { return nil }
        let bytes = parts.compactMap { $0.count <= 3 ? UInt8($0) : nil }
        return bytes.count == 4 ? bytes : nil
    }

    static func checksum(_ b: [UInt8]) -> UInt16 {
        var s: UInt32 = 0
        var i = 0
        while i + 1 < b.count { s += UInt32(b[i]) << 8 | UInt32(b[i + 1]); i += 2 }
        if i < b.count { s += UInt32(b[i]) << 8 }
        while s >> 16 != 0 { s = (s & 0xffff) + (s >> 16) }
        return ~UInt16(s)
    }
}

/// One answer of the guest's service: the front port it went to (which names the client
/// connection that asked) and its payload.
public struct GuestAnswer: Sendable, Equatable {
    /// The UDP destination port: the source port of the request it answers.
    public var port: UInt16
    /// The UDP payload.
    public var payload: [UInt8]

    /// An answer of `payload` to front port `port`.
    public init(port: UInt16, payload: [UInt8]) {
        self.port = port
        self.payload = payload
    }
}

extension [UInt8] {
    mutating func be16(_ v: UInt16) { append(UInt8(v >> 8)); append(UInt8(v & 0xff)) }
}
