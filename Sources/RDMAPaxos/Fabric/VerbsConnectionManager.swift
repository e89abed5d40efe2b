import CVerbs
import Foundation
import NIOCore
import Synchronization

// HARDWARE ONLY: queue pairs and rdma_cm connection handling for `VerbsFabric`. Compiles
// everywhere; runs only where `ibv_get_device_list` finds a device.

/// Registered staging memory for outgoing WRITEs: one slot per outstanding write.
final class StagingBuffer: @unchecked Sendable {
    // `@unchecked Sendable`: a slot is written only by the poster that owns it (under the QP lock)
    // and read only by the NIC until the write completes.
    let base: UnsafeMutableRawPointer
    private var registration: VerbsRegistration?
    let slotBytes: Int

    init(device: VerbsDevice, slots: Int, slotBytes: Int) throws(VerbsError) {
        var p: UnsafeMutableRawPointer?
        guard posix_memalign(&p, 4096, slots * slotBytes) == 0, let p else {
            throw VerbsError(operation: "posix_memalign", code: ENOMEM, message: "cannot allocate \(slots * slotBytes) staging bytes")
        }
        base = p
        self.slotBytes = slotBytes
        do { registration = try device.register(p, lengthBytes: slots * slotBytes) } catch { free(p); throw error }
    }

    var localKey: UInt32 { registration?.localKey ?? 0 }

    deinit {
        registration = nil  // deregister before the memory goes away
        free(base)
    }
}

/// One RC queue pair created through rdma_cm (either end of a connection).
final class VerbsQueuePair: QueuePair, @unchecked Sendable {
    // `@unchecked Sendable`: `id`/`qp` are written once; posting on one QP is serialized by
    // `state`, and libibverbs allows posting and polling from different threads.
    let peer: NodeID
    let id: UnsafeMutablePointer<rdma_cm_id>
    let qp: UnsafeMutablePointer<ibv_qp>
    let number: UInt32
    private let staging: StagingBuffer
    private let fabric: VerbsFabric
    private struct Pending { var sequence: UInt64; var workRequestID: UInt64; var signaled: Bool }
    private struct State {
        var machine = QueuePairStateMachine()
        var remote: RemoteRegion?
        var nextSequence: UInt64 = 1
        var outstanding = CircularBuffer<Pending>()
    }
    private let state = Mutex(State())

    /// Send work request ids carry this bit; receives use 0.
    static let sendBit: UInt64 = 1 << 63
    static func isSend(wrID: UInt64) -> Bool { wrID & sendBit != 0 }

    init(fabric: VerbsFabric, id: UnsafeMutablePointer<rdma_cm_id>, peer: NodeID, remote: RemoteRegion?) throws(VerbsError) {
        guard let qp = id.pointee.qp else {
            throw VerbsError(operation: "rdma_create_qp", code: EINVAL, message: "rdma_cm id has no queue pair")
        }
        self.fabric = fabric
        self.id = id
        self.qp = qp
        self.peer = peer
        self.number = qp.pointee.qp_num
        let c = fabric.configuration
        staging = try StagingBuffer(device: fabric.device, slots: c.outstandingWritesMax, slotBytes: c.slotBytesMax)
        try state.withLock { s throws(VerbsError) in
            s.remote = remote
            try s.machine.move(to: .initialized)  // rdma_create_qp leaves an RC QP in INIT
        }
    }

    deinit {
        rdma_destroy_qp(id)
        rdma_destroy_id(id)
    }

    var remote: RemoteRegion {
        state.withLock { $0.remote ?? RemoteRegion(node: peer, base: 0, key: 0, lengthBytes: 0) }
    }

    var isUsable: Bool { state.withLock { $0.machine.state != .error } }

    /// rdma_cm moved the QP through RTR to RTS while connecting or accepting.
    func establish(remote: RemoteRegion) throws(VerbsError) {
        try state.withLock { s throws(VerbsError) in
            s.remote = remote
            try s.machine.move(to: .readyToReceive)
            try s.machine.move(to: .readyToSend)
        }
    }

    func postReceive() throws(VerbsError) {
        var wr = ibv_recv_wr()
        wr.wr_id = 0
        wr.num_sge = 0  // WRITE_WITH_IMM only needs the receive for its immediate
        var bad: UnsafeMutablePointer<ibv_recv_wr>?
        try Verbs.check(ibv_post_recv(qp, &wr, &bad), "ibv_post_recv")
    }

    func postWrite(_ bytes: [UInt8], remoteOffset: Int, key: UInt32, immediate: UInt32?,
                   workRequestID: UInt64, signaled: Bool) throws(FabricError) {
        let limit = fabric.configuration.outstandingWritesMax
        guard bytes.count <= staging.slotBytes else {
            throw .invalidRequest("a write of \(bytes.count) bytes exceeds slotBytesMax \(staging.slotBytes)")
        }
        try state.withLock { s throws(FabricError) in
            guard s.machine.canPostSend, let remote = s.remote else { throw FabricError.queuePairInError(peer: peer) }
            guard s.outstanding.count < limit else { throw FabricError.tooManyOutstandingWrites(peer: peer, limit: limit) }
            let seq = s.nextSequence
            // Unsignalled writes hold their slot until a later signalled one completes: signal at
            // least every half ring so slots come back.
            let signal = signaled || seq % UInt64(max(1, limit / 2)) == 0
            let slot = staging.base + Int(seq % UInt64(limit)) * staging.slotBytes
            bytes.withUnsafeBytes { if let b = $0.baseAddress { slot.copyMemory(from: b, byteCount: $0.count) } }
            var sge = ibv_sge(addr: UInt64(UInt(bitPattern: slot)), length: UInt32(bytes.count), lkey: staging.localKey)
            var wr = ibv_send_wr()
            wr.wr_id = seq | Self.sendBit
            wr.num_sge = 1
            wr.opcode = immediate == nil ? IBV_WR_RDMA_WRITE : IBV_WR_RDMA_WRITE_WITH_IMM
            wr.send_flags = signal ? IBV_SEND_SIGNALED.rawValue : 0
            wr.imm_data = (immediate ?? 0).bigEndian
            wr.wr.rdma.remote_addr = remote.base &+ UInt64(bitPattern: Int64(remoteOffset))
            wr.wr.rdma.rkey = key
            var bad: UnsafeMutablePointer<ibv_send_wr>?
            let rc = withUnsafeMutablePointer(to: &sge) { p in
                wr.sg_list = p
                return ibv_post_send(qp, &wr, &bad)
            }
            do throws(VerbsError) { try Verbs.check(rc, "ibv_post_send") } catch { throw FabricError.device(error) }
            s.nextSequence += 1
            s.outstanding.append(Pending(sequence: seq, workRequestID: workRequestID, signaled: signaled))
        }
    }

    /// A signalled (or failed) send completed: it and every earlier write are done.
    func completed(wrID: UInt64, status: CompletionStatus) {
        let seq = wrID & ~Self.sendBit
        state.withLock { s in
            while let p = s.outstanding.first, p.sequence <= seq {
                s.outstanding.removeFirst()
                let st: CompletionStatus = p.sequence == seq ? status : .success
                if st != .success || p.signaled {
                    fabric.completions.push(Completion(kind: .write, status: st, peer: peer,
                                                       workRequestID: p.workRequestID, immediate: nil))
                }
            }
            if status != .success { try? s.machine.move(to: .error) }
        }
    }

    /// Moves the QP to ERROR: the hardware flushes outstanding work with IBV_WC_WR_FLUSH_ERR.
    func moveToError() {
        state.withLock { s in
            guard s.machine.state != .error else { return }
            try? s.machine.move(to: .error)
            var attr = ibv_qp_attr()
            attr.qp_state = IBV_QPS_ERR
            if ibv_modify_qp(qp, &attr, Int32(IBV_QP_STATE.rawValue)) != 0 {
                fabric.logger.error("ibv_modify_qp to ERROR failed for the queue pair to node \(peer)")
            }
        }
    }
}

/// librdmacm: one event channel and one thread for every connection of a `VerbsFabric`.
final class ConnectionManager: @unchecked Sendable {
    // `@unchecked Sendable`: `channel` is written once; the tables are behind `state`; rdma_cm
    // calls on one id are made only by the event thread after creation.
    let channel: UnsafeMutablePointer<rdma_event_channel>
    private struct Connecting {
        var machine = ConnectionStateMachine()
        var peer: NodeID
        var privateData: [UInt8]
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

    static func withAddress<R>(host: String, port: Int, _ body: (UnsafeMutablePointer<sockaddr>) -> R) throws(VerbsError) -> R {
        var sin = sockaddr_in()
        sin.sin_family = sa_family_t(AF_INET)
        sin.sin_port = in_port_t(UInt16(truncatingIfNeeded: port).bigEndian)
        guard inet_pton(AF_INET, host, &sin.sin_addr) == 1 else {
            throw VerbsError(operation: "inet_pton", code: EINVAL, message: "\(host) is not an IPv4 address")
        }
        return withUnsafeMutablePointer(to: &sin) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0) } }
    }

    func listen(host: String, port: Int) throws(VerbsError) -> Int {
        var id: UnsafeMutablePointer<rdma_cm_id>?
        try Verbs.check(rdma_create_id(channel, &id, nil, RDMA_PS_TCP), "rdma_create_id")
        guard let id else { throw VerbsError(operation: "rdma_create_id", code: EINVAL, message: "rdma_create_id returned no id") }
        try Verbs.check(try Self.withAddress(host: host, port: port) { rdma_bind_addr(id, $0) }, "rdma_bind_addr")
        try Verbs.check(rdma_listen(id, 16), "rdma_listen")
        let address = UInt(bitPattern: id)
        state.withLock { $0.listener = address }
        return Int(UInt16(bigEndian: rdma_get_src_port(id)))
    }

    func connect(fabric: VerbsFabric, to peer: PeerAddress, privateData: [UInt8], timeout: Duration,
                 done: @escaping @Sendable (Result<VerbsQueuePair, any Error>) -> Void) {
        do {
            var id: UnsafeMutablePointer<rdma_cm_id>?
            try Verbs.check(rdma_create_id(channel, &id, nil, RDMA_PS_TCP), "rdma_create_id")
            guard let id else { throw VerbsError(operation: "rdma_create_id", code: EINVAL, message: "no id") }
            var c = Connecting(peer: peer.node, privateData: privateData, deadline: .now + timeout, done: done)
            _ = c.machine.handle(.start)
            state.withLock { $0.connecting[UInt(bitPattern: id)] = c }
            let ms = Int32(timeout.components.seconds * 1000)
            try Verbs.check(try Self.withAddress(host: peer.host, port: peer.port) { rdma_resolve_addr(id, nil, $0, ms) }, "rdma_resolve_addr")
        } catch {
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
                let qp = try fabric.makeQueuePair(id: id, peer: c.peer, remote: nil)
                c.qp = qp
                var param = rdma_conn_param()
                param.retry_count = 7
                param.rnr_retry_count = 7
                param.private_data_len = UInt8(c.privateData.count)
                let rc = c.privateData.withUnsafeBytes { b -> Int32 in
                    param.private_data = b.baseAddress
                    return rdma_connect(id, &param)
                }
                try Verbs.check(rc, "rdma_connect")
            case .reportEstablished:
                guard let qp = c.qp, let (node, region) = VerbsFabric.parsePrivateData(privateData), node == c.peer else {
                    throw VerbsError(operation: "rdma_connect", code: EPROTO, message: "peer sent no valid region descriptor")
                }
                try qp.establish(remote: region)
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

    private func accept(_ fabric: VerbsFabric, id: UnsafeMutablePointer<rdma_cm_id>, privateData: [UInt8]) {
        guard let (node, region) = VerbsFabric.parsePrivateData(privateData),
              fabric.configuration.members.contains(node), node != fabric.localNode,
              let descriptor = fabric.exportedDescriptor() else {
            fabric.logger.warning("rejected an rdma_cm connection request: unknown node or malformed descriptor")
            rdma_reject(id, nil, 0)
            rdma_destroy_id(id)
            return
        }
        do {
            let qp = try fabric.makeQueuePair(id: id, peer: node, remote: region)
            var param = rdma_conn_param()
            param.rnr_retry_count = 7
            param.private_data_len = UInt8(descriptor.count)
            let rc = descriptor.withUnsafeBytes { b -> Int32 in
                param.private_data = b.baseAddress
                return rdma_accept(id, &param)
            }
            try Verbs.check(rc, "rdma_accept")
            try qp.establish(remote: region)
            fabric.adopt(qp, inboundFrom: node)
            state.withLock { $0.connected[UInt(bitPattern: id)] = qp }
        } catch {
            fabric.logger.error("accepting node \(node) failed: \(error)")
            rdma_reject(id, nil, 0)
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
