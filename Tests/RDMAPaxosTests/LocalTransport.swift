import Foundation
import RDMAPaxos

/// Test double: delivers messages between nodes in one process, each on its own queue.
/// Links can be cut to model partitions and crashed peers.
final class LocalHub: @unchecked Sendable {
    // @unchecked Sendable: `handlers` and `cut` are only touched under `lock`.
    let lock = NSLock()
    var handlers: [NodeID: @Sendable (Message) -> Void] = [:]
    var queues: [NodeID: DispatchQueue] = [:]
    var cut: Set<NodeID> = []

    func transport(for id: NodeID) -> LocalTransport { LocalTransport(hub: self, id: id) }

    func isolate(_ id: NodeID) { lock.withLock { _ = cut.insert(id) } }
    func reconnect(_ id: NodeID) { lock.withLock { _ = cut.remove(id) } }

    func deliver(_ m: Message) {
        let (h, q) = lock.withLock { () -> ((@Sendable (Message) -> Void)?, DispatchQueue?) in
            if cut.contains(m.from) || cut.contains(m.to) { return (nil, nil) }
            return (handlers[m.to], queues[m.to])
        }
        guard let h, let q else { return }
        q.async { h(m) }
    }
}

final class LocalTransport: MessageTransport, @unchecked Sendable {
    // @unchecked Sendable: state lives in the hub, under its lock.
    let hub: LocalHub
    let id: NodeID
    init(hub: LocalHub, id: NodeID) {
        self.hub = hub
        self.id = id
    }
    func start(onReceive: @escaping @Sendable (Message) -> Void) throws {
        hub.lock.withLock {
            hub.handlers[id] = onReceive
            hub.queues[id] = DispatchQueue(label: "local-\(id)")
        }
    }
    func send(_ message: Message) { hub.deliver(message) }
    func stop() { hub.lock.withLock { hub.handlers[id] = nil } }
}
