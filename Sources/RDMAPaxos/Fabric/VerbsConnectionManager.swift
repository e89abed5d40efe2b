import CVerbs
import Foundation
import Synchronization

// HARDWARE ONLY: rdma_cm connection handling for `VerbsFabric` (`connection = .connectionManager`).
// Compiles everywhere; runs only where librdmacm finds a device (the software RDMA device of the
// tests has no rdma_cm: the tests connect out of band, `VerbsOutOfBand.swift`). What it sends and
// checks is `VerbsConnectRequest`, which the tests do run: a request signed with the cluster key,
// a nonce and the time, verified before any queue pair exists on the accepting side.

/// librdmacm: one event channel and one thread for every connection of a `VerbsFabric`.
final class ConnectionManager: VerbsConnector, @unchecked Sendable {
    // `@unchecked Sendable`: `channel` is written once; the tables are behind `state`; rdma_cm
    // calls on one id are made only by the event thread after creation.
    let channel: UnsafeMutablePointer<rdma_event_channel>
    private struct Connecting {
        var machine = ConnectionStateMachine()
        var peer: NodeID
        /// This node's exported region, signed into the request when it is sent.
        var region: RemoteRegion
        /// The request as sent: the accept must be signed for it.
        var request: VerbsConnectRequest?
        var deadline: ContinuousClock.Instant
        var qp: VerbsQueuePair?
        var done: @Sendable (Result<VerbsQueuePair, any Error>) -> Void
    }
    private struct State {
        var connecting: [UInt: Connecting] = [:]
        var connected: [UInt: VerbsQueuePair] = [:]
        /// The listening id's address (pointers are not `Sendable`).
        var listener: UInt?
        var stopped = false
    }
    private let state = Mutex(State())

    init() throws(VerbsError) {
        try VerbsProbe.connectionManager()
        channel = try Verbs.check(rdma_create_event_channel(), "rdma_create_event_channel")
        // Non-blocking, so the event thread can notice `stop()`.
        _ = fcntl(channel.pointee.fd, F_SETFL, fcntl(channel.pointee.fd, F_GETFL) | O_NONBLOCK)
    }

    deinit {
        if let l = state.withLock({ $0.listener }), let id = UnsafeMutablePointer<rdma_cm_id>(bitPattern: l) { rdma_destroy_id(id) }
        rdma_destroy_event_channel(channel)
    }

    func stop() { state.withLock { $0.stopped = true } }

    func listen(fabric: VerbsFabric, host: String, port: Int) throws(VerbsError) -> Int {
        var id: UnsafeMutablePointer<rdma_cm_id>?
        try Verbs.check(rdma_create_id(channel, &id, nil, RDMA_PS_TCP), "rdma_create_id")
        guard let id else { throw VerbsError(operation: "rdma_create_id", code: EINVAL, message: "rdma_create_id returned no id") }
        try Verbs.check(try Verbs.withIPv4Address(host: host, port: port) { rdma_bind_addr(id, $0) }, "rdma_bind_addr")
        try Verbs.check(rdma_listen(id, 16), "rdma_listen")
        let address = UInt(bitPattern: id)
        state.withLock { $0.listener = address }
        return Int(UInt16(bigEndian: rdma_get_src_port(id)))
    }

    func connect(fabric: VerbsFabric, to peer: PeerAddress, descriptor privateData: [UInt8], timeout: Duration,
                 done: @escaping @Sendable (Result<VerbsQueuePair, any Error>) -> Void) {
        var created: UnsafeMutablePointer<rdma_cm_id>?
        do {
            try Verbs.check(rdma_create_id(channel, &created, nil, RDMA_PS_TCP), "rdma_create_id")
            guard let id = created else { throw VerbsError(operation: "rdma_create_id", code: EINVAL, message: "no id") }
            guard let (_, region) = VerbsFabric.parsePrivateData(privateData) else {
                throw VerbsError(operation: "rdma_connect", code: EINVAL, message: "no region descriptor to offer")
            }
            var c = Connecting(peer: peer.node, region: region, deadline: .now + timeout, done: done)
            _ = c.machine.handle(.start)
            state.withLock { $0.connecting[UInt(bitPattern: id)] = c }
            let ms = Int32(timeout.components.seconds * 1000)
            try Verbs.check(try Verbs.withIPv4Address(host: peer.host, port: peer.port) { rdma_resolve_addr(id, nil, $0, ms) }, "rdma_resolve_addr")
        } catch {
            if let id = created {
                // Not left for the deadline to fail a second time: `done` is called once.
                state.withLock { _ = $0.connecting.removeValue(forKey: UInt(bitPattern: id)) }
                rdma_destroy_id(id)
            }
            done(.failure(FabricError.connectFailed(peer: peer.node, reason: "\(error)")))
        }
    }

    /// The event thread: waits for CM events and drives each connection's state machine.
    func run(fabric: VerbsFabric) {
        while !state.withLock({ $0.stopped }) {
            var pfd = pollfd(fd: channel.pointee.fd, events: Int16(POLLIN), revents: 0)
            if poll(&pfd, 1, 100) > 0 {
                var event: UnsafeMutablePointer<rdma_cm_event>?
                while rdma_get_cm_event(channel, &event) == 0, let e = event {
                    let id = e.pointee.id!
                    let type = e.pointee.event, status = e.pointee.status
                    let conn = e.pointee.param.conn
                    let data = conn.private_data.map { Array(UnsafeRawBufferPointer(start: $0, count: Int(conn.private_data_len))) } ?? []
                    rdma_ack_cm_event(e)
                    handle(fabric, id: id, type: type, status: status, privateData: data)
                }
            }
            expireConnects(fabric)
        }
    }

    private func handle(_ fabric: VerbsFabric, id: UnsafeMutablePointer<rdma_cm_id>, type: rdma_cm_event_type,
                        status: Int32, privateData: [UInt8]) {
        if type == RDMA_CM_EVENT_CONNECT_REQUEST { return accept(fabric, id: id, privateData: privateData) }
        let key = UInt(bitPattern: id)
        guard var c = state.withLock({ $0.connecting[key] }) else {
            if type == RDMA_CM_EVENT_DISCONNECTED || type == RDMA_CM_EVENT_DEVICE_REMOVAL,
               let qp = state.withLock({ $0.connected.removeValue(forKey: key) }) {
                qp.moveToError()
                fabric.forget(qp)
            }
            return
        }
        // A plover acceptor puts its reason in the reject's first private byte.
        if type == RDMA_CM_EVENT_REJECTED, let reason = privateData.first.flatMap(VerbsPeerRefusal.Reason.init(rawValue:)) {
            fabric.noteRefused()
            fabric.logger.warning("node \(c.peer) refused the rdma_cm connection: \(VerbsPeerRefusal(reason, claimed: fabric.localNode))")
        }
        let event: ConnectionStateMachine.Event = switch type {
        case RDMA_CM_EVENT_ADDR_RESOLVED: .addressResolved
        case RDMA_CM_EVENT_ADDR_ERROR: .addressError
        case RDMA_CM_EVENT_ROUTE_RESOLVED: .routeResolved
        case RDMA_CM_EVENT_ROUTE_ERROR: .routeError
        case RDMA_CM_EVENT_ESTABLISHED: .established
        case RDMA_CM_EVENT_REJECTED: .rejected(status: status)
        case RDMA_CM_EVENT_UNREACHABLE: .unreachable
        case RDMA_CM_EVENT_DISCONNECTED: .disconnected
        default: .connectError
        }
        perform(fabric, c.machine.handle(event), id: id, &c, privateData: privateData)
    }

    private func perform(_ fabric: VerbsFabric, _ action: ConnectionStateMachine.Action, id: UnsafeMutablePointer<rdma_cm_id>,
                         _ c: inout Connecting, privateData: [UInt8]) {
        let key = UInt(bitPattern: id)
        do {
            switch action {
            case .resolveRoute:
                try Verbs.check(rdma_resolve_route(id, 2000), "rdma_resolve_route")
            case .createQueuePairAndConnect:
                let qp = try fabric.makeQueuePair(id: id, peer: c.peer, sends: true)
                c.qp = qp
                var param = rdma_conn_param()
                param.retry_count = 7
                param.rnr_retry_count = 7
                // Signed now, so its time is fresh when the acceptor checks it.
                let (request, data) = VerbsConnectRequest.signed(key: fabric.configuration.clusterKey, node: fabric.localNode,
                                                                  region: c.region, acceptor: c.peer, time: Self.now())
                c.request = request
                param.private_data_len = UInt8(data.count)
                let rc = data.withUnsafeBytes { b -> Int32 in
                    param.private_data = b.baseAddress
                    return rdma_connect(id, &param)
                }
                try Verbs.check(rc, "rdma_connect")
            case .reportEstablished:
                guard let qp = c.qp, let request = c.request else {
                    throw VerbsError(operation: "rdma_connect", code: EPROTO, message: "established without a request sent")
                }
                // rdma_cm moved this end's queue pair to RTS on the reply already; nothing was
                // posted on it, and it goes to ERROR unless the reply proves the key.
                let region: RemoteRegion
                do {
                    region = try request.verifyAccept(privateData, key: fabric.configuration.clusterKey, acceptor: c.peer)
                } catch {
                    fabric.noteRefused()
                    fabric.logger.warning("rdma_cm connection to node \(c.peer) refused: its reply failed the check (\(error))")
                    throw VerbsError(operation: "rdma_connect", code: EACCES, message: "node \(c.peer): \(error)")
                }
                try qp.establishedByConnectionManager(remote: region)
                fabric.adopt(qp, inboundFrom: nil)
                let done = c.done
                state.withLock { s in s.connecting[key] = nil; s.connected[key] = qp }
                done(.success(qp))
                return
            case let .fail(reason):
                throw VerbsError(operation: "rdma_cm", code: EIO, message: reason)
            case .resolveAddress, .none:
                break
            }
            let updated = c
            state.withLock { $0.connecting[key] = updated }
        } catch {
            c.qp?.moveToError()
            let done = c.done
            state.withLock { _ = $0.connecting.removeValue(forKey: key) }
            if c.qp == nil { rdma_destroy_id(id) }  // otherwise the queue pair owns the id
            done(.failure(FabricError.connectFailed(peer: c.peer, reason: "\(error)")))
        }
    }

    /// A connect request: checked (`VerbsConnectRequest.verify`) before any queue pair exists, and
    /// refused with the reason as the reject's private data (one byte) and in the log.
    private func accept(_ fabric: VerbsFabric, id: UnsafeMutablePointer<rdma_cm_id>, privateData: [UInt8]) {
        let request: VerbsConnectRequest
        let exported: RemoteRegion
        do throws(VerbsPeerRefusal) {
            request = try VerbsConnectRequest.verify(privateData, key: fabric.configuration.clusterKey, me: fabric.localNode,
                                                     members: fabric.configuration.members, now: Self.now(),
                                                     replays: fabric.connectRequestReplays)
            guard let region = fabric.exportedRegion() else { throw VerbsPeerRefusal(.notReady, claimed: request.node) }
            exported = region
        } catch {
            fabric.noteRefused()
            fabric.logger.warning("refused an rdma_cm connection from \(Self.peerName(id)) claiming node \(error.claimed.map(String.init) ?? "?"): \(error)")
            var reason = error.reason.rawValue
            rdma_reject(id, &reason, 1)
            rdma_destroy_id(id)
            return
        }
        let node = request.node, region = request.region
        let descriptor = request.accept(key: fabric.configuration.clusterKey, acceptor: fabric.localNode, region: exported)
        var qp: VerbsQueuePair?
        do {
            let created = try fabric.makeQueuePair(id: id, peer: node, sends: false)
            qp = created
            // Known to the poller before the peer can write: its first immediate needs the re-post.
            fabric.adopt(created, inboundFrom: node)
            var param = rdma_conn_param()
            param.rnr_retry_count = 7
            param.private_data_len = UInt8(descriptor.count)
            let rc = descriptor.withUnsafeBytes { b -> Int32 in
                param.private_data = b.baseAddress
                return rdma_accept(id, &param)
            }
            try Verbs.check(rc, "rdma_accept")
            try created.establishedByConnectionManager(remote: region)
            state.withLock { $0.connected[UInt(bitPattern: id)] = created }
        } catch {
            fabric.logger.error("accepting node \(node) failed: \(error)")
            rdma_reject(id, nil, 0)
            if let qp { fabric.forget(qp) } else { rdma_destroy_id(id) }  // a queue pair destroys its id when released
        }
    }

    /// Seconds since 1970, the clock connect requests carry.
    static func now() -> UInt32 { UInt32(clamping: Int(Date().timeIntervalSince1970)) }

    /// "a.b.c.d:port" of the peer of an rdma_cm id, for the log.
    private static func peerName(_ id: UnsafeMutablePointer<rdma_cm_id>) -> String {
        guard let sa = rdma_get_peer_addr(id), sa.pointee.sa_family == sa_family_t(AF_INET) else { return "?" }
        return sa.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { sin in
            var address = sin.pointee.sin_addr
            var text = [CChar](repeating: 0, count: Int(INET_ADDRSTRLEN))
            inet_ntop(AF_INET, &address, &text, socklen_t(text.count))
            return "\(String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)):\(UInt16(bigEndian: sin.pointee.sin_port))"
        }
    }

    private func expireConnects(_ fabric: VerbsFabric) {
        let now = ContinuousClock.now
        let expired = state.withLock { s in s.connecting.filter { $0.value.deadline < now }.map(\.key) }
        for key in expired {
            guard var c = state.withLock({ $0.connecting[key] }), let id = UnsafeMutablePointer<rdma_cm_id>(bitPattern: key) else { continue }
            perform(fabric, c.machine.handle(.timeout), id: id, &c, privateData: [])
        }
    }
}
