// When each step of a failover happened on the backup that takes over, in wall-clock
// milliseconds, so a benchmark can set them against the moment it killed the primary
// (`plover bench vm-failover` reads the line this logs). A measurement, not a decision.

#if canImport(Glibc)
import Glibc
#endif
import Foundation
import RDMAPaxos

/// The steps of one failover as seen by the backup, from its syncvm link dropping to the first
/// answer it sends as the new primary.
struct FailoverTimeline {
    enum Step: String, CaseIterable {
        /// The scheduler found the syncvm link down.
        case linkDown = "link_down"
        /// The probe found nothing listening at the primary's address.
        case probeRefused = "probe_refused"
        /// The forced election was asked for.
        case campaign
        /// The scheduler saw this backup lead.
        case leading
        /// `takeOver(by: me)` was proposed.
        case takeOverProposed = "takeover_proposed"
        /// The driver applied it.
        case takeOverApplied = "takeover_applied"
        /// The primary's syncvm endpoint is open: output goes out.
        case serving
        /// The first answer went to a client.
        case firstAnswer = "first_answer"
    }

    private(set) var at: [Step: Double] = [:]

    /// A timeline is being recorded (from the link going down until the first answer).
    var isOpen: Bool { at[.linkDown] != nil }

    /// Starts a new timeline at the link going down.
    mutating func start() {
        at = [.linkDown: Self.nowMilliseconds]
    }

    /// Records the first time `step` happened in the open timeline.
    mutating func note(_ step: Step) {
        guard isOpen, at[step] == nil else { return }
        at[step] = Self.nowMilliseconds
    }

    /// `key=value` pairs in step order, for the steps that happened.
    var line: String {
        Step.allCases.compactMap { s in at[s].map { "\(s.rawValue)=\(String(format: "%.1f", $0))" } }.joined(separator: " ")
    }

    static var nowMilliseconds: Double {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Double(ts.tv_sec) * 1000 + Double(ts.tv_nsec) / 1e6
    }
}

/// Whether a TCP listener answers at an address.
enum PeerProbe {
    /// False only when the connection is refused (nothing listens there: on a host that is up,
    /// the process is gone); true when it connects, and also when the answer does not come
    /// within `timeout` (a host that is down or unreachable says nothing either way) or the
    /// address does not resolve.
    static func listens(at address: HostPort, timeout: Duration) -> Bool {
        do {
            try SocketDescriptor.connect(to: address, timeout: timeout).close()
            return true
        } catch {
            return error.errno != ECONNREFUSED
        }
    }
}
