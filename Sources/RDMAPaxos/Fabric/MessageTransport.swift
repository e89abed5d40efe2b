/// Carries consensus messages between replicas. The replica runtime sees only this; the
/// implementation over any `Fabric` (verbs, TCP, in-memory) is `RingTransport`.
///
/// Consensus tolerates loss, duplication and reordering across peers, so `send` never blocks:
/// a message that cannot be queued (peer unreachable, ring full) is dropped and counted.
/// Messages from one peer are delivered in the order that peer sent them.
public protocol MessageTransport: AnyObject, Sendable {
    /// Starts delivering incoming messages to `onReceive`, called from the transport's own
    /// thread, one message at a time.
    func start(onReceive: @escaping @Sendable (Message) -> Void) throws
    /// Queues `message` for `message.to`.
    func send(_ message: Message)
    /// Stops delivery and releases connections; idempotent.
    func stop()
    /// Fences a deposed leader: revokes its write access to this replica's memory, so writes it
    /// still has in flight fail instead of landing (DARE and Mu do the same with verbs). The peer
    /// may reconnect afterwards; from then on the ballot in every message keeps it out.
    func fence(_ peer: NodeID)
    /// Follows the configuration: connects to (or re-addresses) `connect`, and forgets
    /// `disconnect` (removed members): no reconnecting, messages to them dropped.
    func updatePeers(connect: [PeerAddress], disconnect: [NodeID])
    /// True when the connection to `peer` is known broken (its queue pair failed, as when the
    /// peer's process died and its sockets closed), not merely busy or never made. The node
    /// uses it to stop waiting for a leader that is gone (`Replica.leaderUnreachable`).
    func isLinkDown(to peer: NodeID) -> Bool
}

/// A transport whose incoming messages the caller reads on its own thread: the replica's loop
/// then steps the core on the messages it reads, with no transport thread handing them over
/// (docs/design/runtime.md, "One thread, one queue").
public protocol PolledMessageTransport: MessageTransport {
    /// Starts the transport without a delivering thread: `wake` is called, from any thread and
    /// possibly more often than needed, whenever messages may be waiting; the caller then calls
    /// `receiveWaiting(_:)`. Use either this or `start(onReceive:)`, once.
    func startPolled(wake: @escaping @Sendable () -> Void) throws
    /// Hands every message waiting now to `deliver`, in order per sender, on the caller's
    /// thread; returns how many. Call it from one thread at a time, and not after `stop()`.
    func receiveWaiting(_ deliver: (Message) -> Void) -> Int
}

extension MessageTransport {
    /// Transports without one-sided access (test doubles) have nothing to revoke.
    public func fence(_ peer: NodeID) {}
    /// Transports without connections (test doubles) never know a link is down.
    public func isLinkDown(to peer: NodeID) -> Bool { false }
    /// Transports that reach every node without addresses (test doubles) ignore it.
    public func updatePeers(connect: [PeerAddress], disconnect: [NodeID]) {}
}
