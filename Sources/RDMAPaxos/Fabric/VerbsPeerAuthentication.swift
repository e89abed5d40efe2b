import Crypto
import Synchronization

// What both verbs connect paths share to authenticate peers with the cluster key: the refusal
// reasons, the MAC, and the memory of nonces already used. The messages themselves are in
// VerbsOutOfBandMessages.swift (the TCP side channel) and VerbsConnectRequest.swift (rdma_cm's
// private data). All of it is pure: no sockets, no verbs, the clock passed in.

/// Why a verbs peer was refused. The refusing side logs it with the address and the node the peer
/// claimed; on the out-of-band path it is also sent to the connector, so both ends say what to fix.
struct VerbsPeerRefusal: Error, Hashable, Sendable, CustomStringConvertible {
    enum Reason: UInt8, Sendable {
        case badVersion = 1, wrongNode = 2, unknownNode = 3, badMAC = 4, replayed = 5, notReady = 6
        case malformed = 7, expired = 8
    }

    var reason: Reason
    /// The node id the peer claimed, when it got that far.
    var claimed: NodeID?

    init(_ reason: Reason, claimed: NodeID? = nil) {
        self.reason = reason
        self.claimed = claimed
    }

    var description: String {
        switch reason {
        case .badVersion: "unsupported connect protocol version"
        case .wrongNode: "addressed to another node"
        case .unknownNode: "node \(claimed.map(String.init) ?? "?") is not a cluster member"
        case .badMAC: "authentication failed (cluster keys differ)"
        case .replayed: "replayed nonce"
        case .notReady: "the acceptor is not accepting connections yet"
        case .malformed: "malformed message"
        case .expired: "timestamp outside the accepted window (clocks differ by more than \(VerbsConnectRequest.windowSeconds) s?)"
        }
    }
}

/// HMAC-SHA256 under the cluster key over a role label and the fields of one message. The label
/// differs per message kind and from the TCP fabric's, so no MAC is valid anywhere else.
enum VerbsPeerMAC {
    static let bytes = 32

    static func mac(key: [UInt8], label: String, _ fields: [UInt8]) -> [UInt8] {
        Array(HMAC<SHA256>.authenticationCode(for: Array(label.utf8) + fields, using: SymmetricKey(data: key)))
    }

    /// Constant-time comparison of `mac` with the first `mac.count` bytes of the expected MAC
    /// (`mac` may be truncated: rdma_cm's private data has room for 16 bytes only).
    static func verify(_ mac: [UInt8], key: [UInt8], label: String, _ fields: [UInt8]) -> Bool {
        let expected = self.mac(key: key, label: label, fields)
        guard mac.count >= 16, mac.count <= expected.count else { return false }
        var diff: UInt8 = 0
        for (a, b) in zip(mac, expected) { diff |= a ^ b }
        return diff == 0
    }

    static func nonce(bytes: Int) -> [UInt8] {
        var g = SystemRandomNumberGenerator()
        return (0..<bytes).map { _ in UInt8.random(in: 0...255, using: &g) }
    }
}

/// Nonces a fabric has accepted recently, so a recorded message cannot be played again.
///
/// Out-of-band hellos carry no time: the last `capacity` nonces are kept, as the TCP fabric does
/// (a replayed hello could not finish anyway: the acceptor's own fresh nonce is in every MAC that
/// follows). rdma_cm requests carry their time: a nonce is kept until its request leaves the time
/// window, after which the time check refuses it; if more requests arrive within one window than
/// fit, new ones are refused rather than old ones forgotten.
final class VerbsReplayMemory: Sendable {
    private struct State {
        var seen: [[UInt8]: UInt32] = [:]
        var order: [([UInt8], UInt32)] = []
        var head = 0
    }
    private let state = Mutex(State())
    let capacity: Int

    init(capacity: Int = 4096) { self.capacity = capacity }

    /// Out-of-band hellos: false if `nonce` was seen among the last `capacity`.
    func admit(_ nonce: [UInt8]) -> Bool {
        state.withLock { s in
            guard s.seen[nonce] == nil else { return false }
            s.seen[nonce] = 0
            s.order.append((nonce, 0))
            if s.order.count - s.head > capacity {
                s.seen[s.order[s.head].0] = nil
                s.head += 1
                compact(&s)
            }
            return true
        }
    }

    /// rdma_cm requests: false if `nonce` was seen, or if the memory is full of requests still in
    /// the window ending at `now` (seconds; entries older than `now − window` are dropped first).
    func admit(_ nonce: [UInt8], time: UInt32, now: UInt32, window: UInt32) -> Bool {
        state.withLock { s in
            while s.head < s.order.count, s.order[s.head].1 &+ window < now {
                s.seen[s.order[s.head].0] = nil
                s.head += 1
            }
            compact(&s)
            guard s.seen[nonce] == nil, s.order.count - s.head < capacity else { return false }
            s.seen[nonce] = time
            s.order.append((nonce, max(time, now)))
            return true
        }
    }

    private func compact(_ s: inout State) {
        if s.head > 1024, s.head * 2 > s.order.count {
            s.order.removeFirst(s.head)
            s.head = 0
        }
    }
}
