// The tap attachment's effects: opening the operator's tap at start, proposing the frames it
// reads while the machine says this replica serves, and taking over or leaving the attachment
// (the machine's takeAttachment / leaveAttachment). docs/design/vmreplica.md, "Tap attachment".

import Foundation
import RDMAPaxos

extension VMReplicator {
    /// Attaches to tap `name` (`tap_name`); errors name the key (TapDevice). Frames read before
    /// the machine hands this replica the attachment are discarded.
    func openTap(_ name: String) throws {
        let tap = try TapDevice(name: name)
        if !tap.isUp { logger.warning("vm: tap \(name) is down: no frame flows until `ip link set \(name) up`") }
        if let b = tap.bridge {
            logger.info("vm: attached to tap \(name) on bridge \(b); the guest is \(config.link.macText) at \(config.link.ipText)")
        } else {
            logger.warning("vm: tap \(name) is on no bridge: clients reach the guest only if the host routes to it")
        }
        front = TapAttachment(tap: tap, link: config.link) { [weak self] frame in self?.proposeFrame(frame) }
    }

    /// Proposes one frame read from the tap as an input. Called from the tap's one reader thread,
    /// so frames enter the log in the order they were read while this replica leads; a follower's
    /// proposal fails (the frame is lost, as on a wire: the client's TCP sends it again).
    func proposeFrame(_ frame: [UInt8]) {
        guard let node else { return }
        let key = trace.map { t in
            let k = StageTrace.key(input: frame)
            t.note("tap", k)
            return k
        }
        node.propose(VMLogEntry.input(frame: frame).encoded()) { [logger, trace] result in
            if let key, case .success = result { trace?.note("proposal-done", key) }
            if case let .failure(e) = result { logger.debug("vm: a \(frame.count)-byte frame from the tap was not logged: \(e)") }
        }
    }

    /// The machine's `takeAttachment`: frames from clients are this replica's to propose now.
    func takeAttachment(announce: Bool) {
        guard let tap = front as? TapAttachment else { return }
        tap.take(announce: announce)
        let said = announce ? "; announced the guest (\(config.link.macText) at \(config.link.ipText)) with a gratuitous ARP" : ""
        logger.notice("vm: node \(me) serves clients on tap \(tap.tap.name)\(said)")
    }

    /// The machine's `leaveAttachment`: frames read from the tap are discarded from now on.
    func leaveAttachment() {
        guard let tap = front as? TapAttachment, tap.isServing else { return }
        tap.leave()
        logger.notice("vm: node \(me) no longer serves clients on tap \(tap.tap.name): frames read there are discarded")
    }
}

extension GuestLink {
    /// The guest's MAC address as text (aa:bb:cc:dd:ee:ff).
    var macText: String { guestMAC.map { String(format: "%02x", $0) }.joined(separator: ":") }
    /// The guest's IPv4 address as text.
    var ipText: String { guestIP.map(String.init).joined(separator: ".") }
}
