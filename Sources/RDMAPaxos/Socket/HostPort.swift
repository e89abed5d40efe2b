/// A `host:port` address as configs and command lines write it, parsed once: an IPv4 address,
/// a host name, or an IPv6 address in brackets (`[::1]:7000`), and a port from 0 to 65535.
package struct HostPort: Hashable, Sendable, CustomStringConvertible {
    /// Host name or address, without brackets.
    package var host: String
    /// Port, 0 to 65535 (0 asks `listen` for any free port).
    package var port: Int

    package init(host: String, port: Int) {
        self.host = host
        self.port = port
    }

    /// Parses "host:port"; nil when the host is empty, the port is not a number in range, or
    /// it has no colon. `allowingPortZero` accepts port 0 (a listener's "any port").
    package init?(parsing s: String, allowingPortZero: Bool = false) {
        guard let colon = s.lastIndex(of: ":"), let p = Int(s[s.index(after: colon)...]),
              ((allowingPortZero ? 0 : 1)...65_535).contains(p) else { return nil }
        var h = String(s[..<colon])
        if h.hasPrefix("[") && h.hasSuffix("]") { h = String(h.dropFirst().dropLast()) }
        guard !h.isEmpty, !h.contains("[") && !h.contains("]") else { return nil }
        host = h
        port = p
    }

    /// "host:port", with brackets around an IPv6 host.
    package var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
}

extension PeerAddress {
    /// The fabric address of `node` at `address`.
    package init(node: NodeID, _ address: HostPort) {
        self.init(node: node, host: address.host, port: address.port)
    }
}
