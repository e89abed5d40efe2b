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
}
