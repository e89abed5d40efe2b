import CVerbs
import Foundation
import Logging
import NIOCore
import Synchronization

/// Registered staging memory for outgoing WRITEs: one slot per outstanding write.
final class StagingBuffer: @unchecked Sendable {
    // `@unchecked Sendable`: a slot is written only by the poster that owns it (under the QP lock)
    // and read only by the NIC until the write completes.
    let base: UnsafeMutableRawPointer
    private var registration: VerbsRegistration?
    let slotBytes: Int
    let slots: Int

    init(device: VerbsDevice, slots: Int, slotBytes: Int) throws(VerbsError) {
        var p: UnsafeMutableRawPointer?
        guard posix_memalign(&p, 4096, slots * slotBytes) == 0, let p else {
            throw VerbsError(operation: "posix_memalign", code: ENOMEM, message: "cannot allocate \(slots * slotBytes) staging bytes")
        }
        base = p
        self.slotBytes = slotBytes
        self.slots = slots
        // A send source only: the NIC reads it, nobody writes it remotely.
        do { registration = try device.register(p, lengthBytes: slots * slotBytes, remoteWrite: false) } catch { free(p); throw error }
    }

    var localKey: UInt32 { registration?.localKey ?? 0 }

    deinit {
        registration = nil  // deregister before the memory goes away
        free(base)
    }
}

/// What RTR needs to know about the other end of a queue pair (the out-of-band exchange carries it;
/// rdma_cm finds it by itself).
struct VerbsEndpoint: Hashable, Sendable {
    var queuePair: UInt32
    /// The first packet sequence number this end sends (the other end's expected receive PSN).
    var psn: UInt32
    var port: VerbsPortAddress
}

/// One RC queue pair (either end of a connection), created through rdma_cm or directly.
final class VerbsQueuePair: QueuePair, @unchecked Sendable {
    // `@unchecked Sendable`: the pointers are written once; posting on one QP and every state change
    // are serialized by `state`, and verbs allows posting and polling from different threads.

    /// Who created the `ibv_qp`, and so who destroys it.
    enum Origin {
        /// `rdma_create_qp` on this id; rdma_cm moves the QP through RTR and RTS.
        case connectionManager(UnsafeMutablePointer<rdma_cm_id>)
        /// `VerbsDriver.createQueuePair`; the fabric moves the QP through every state.
        case driver
    }

    struct Limits {
        var outstandingWritesMax: Int
        var slotBytesMax: Int
        /// Slots of the staging buffer. One per outstanding write, so a slot is written again only
        /// after its write completed: the NIC reads a slot when it sends, any time before the
        /// completion. Fewer is a bug that tests plant, to show the software device catches it.
        var stagingSlots: Int

        init(outstandingWritesMax: Int, slotBytesMax: Int, stagingSlots: Int? = nil) {
            self.outstandingWritesMax = outstandingWritesMax
            self.slotBytesMax = slotBytesMax
            self.stagingSlots = stagingSlots ?? outstandingWritesMax
        }
    }

    let peer: NodeID
    let qp: UnsafeMutablePointer<ibv_qp>
    let number: UInt32
    /// This end's first send PSN (random, so a stale packet of an earlier connection never fits).
    let psn = UInt32.random(in: 0...0xFF_FFFF)
    private let origin: Origin
    private let device: VerbsDevice
    /// Nil on an inbound queue pair: it only receives (WRITE_WITH_IMM's immediates), so it pins no
    /// staging memory.
    private let staging: StagingBuffer?
    private let completions: CompletionQueue
    private let outstandingWritesMax: Int
    private let logger: Logger
    private struct State {
        var machine = QueuePairStateMachine()
        var remote: RemoteRegion?
        var outstanding = OutstandingWrites()
    }
    private let state = Mutex(State())

    /// Send work request ids carry this bit; receives use 0.
    static let sendBit: UInt64 = 1 << 63
    static func isSend(wrID: UInt64) -> Bool { wrID & sendBit != 0 }

    /// Adopts `qp`; `limits` sizes its staging buffer, nil for a queue pair that never sends. If
    /// this throws, `qp` is destroyed but an rdma_cm id is left to its owner.
    init(device: VerbsDevice, qp: UnsafeMutablePointer<ibv_qp>, origin: Origin, peer: NodeID, limits: Limits?,
         completions: CompletionQueue, logger: Logger) throws(VerbsError) {
        do {
            staging = try limits.map { l throws(VerbsError) in try StagingBuffer(device: device, slots: l.stagingSlots, slotBytes: l.slotBytesMax) }
        } catch {
            if case let .connectionManager(id) = origin { rdma_destroy_qp(id) } else { _ = device.driver.destroyQueuePair(qp) }
            throw error
        }
        self.device = device
        self.qp = qp
        self.origin = origin
        self.peer = peer
        self.number = qp.pointee.qp_num
        self.outstandingWritesMax = limits?.outstandingWritesMax ?? 0
        self.completions = completions
        self.logger = logger
    }

    deinit {
        switch origin {
        case let .connectionManager(id):
            rdma_destroy_qp(id)
            rdma_destroy_id(id)
        case .driver:
            _ = device.driver.destroyQueuePair(qp)
        }
    }

    var remote: RemoteRegion {
        state.withLock { $0.remote ?? RemoteRegion(node: peer, base: 0, key: 0, lengthBytes: 0) }
    }

    var isUsable: Bool { state.withLock { $0.machine.state != .error } }

    /// What the other end needs for its RTR transition.
    var endpoint: VerbsEndpoint { VerbsEndpoint(queuePair: number, psn: psn, port: device.address) }

    // MARK: state transitions

    /// rdma_create_qp left the QP in INIT.
    func createdByConnectionManager() throws(VerbsError) {
        try state.withLock { s throws(VerbsError) in try s.machine.move(to: .initialized) }
    }

    /// rdma_cm moved the QP through RTR to RTS while connecting or accepting.
    func establishedByConnectionManager(remote: RemoteRegion) throws(VerbsError) {
        try state.withLock { s throws(VerbsError) in
            s.remote = remote
            try s.machine.move(to: .readyToReceive)
            try s.machine.move(to: .readyToSend)
        }
    }

    /// RESET → INIT: bound to the device's port, accepting remote writes.
    func initialize() throws(VerbsError) {
        var a = ibv_qp_attr()
        a.qp_state = IBV_QPS_INIT
        a.pkey_index = 0
        a.port_num = device.port
        a.qp_access_flags = IBV_ACCESS_LOCAL_WRITE.rawValue | IBV_ACCESS_REMOTE_WRITE.rawValue
        try modify(to: .initialized, &a)
    }

    /// INIT → RTR → RTS towards `other` (the out-of-band path; rdma_cm does this itself).
    func connect(to other: VerbsEndpoint, region: RemoteRegion) throws(VerbsError) {
        let local = device.address
        guard other.port.ethernet == local.ethernet else {
            throw VerbsError(operation: "ibv_modify_qp", code: EINVAL,
                             message: "node \(peer) is on \(other.port.ethernet ? "RoCE" : "InfiniBand"), this node on \(local.ethernet ? "RoCE" : "InfiniBand")")
        }
        var rtr = ibv_qp_attr()
        rtr.qp_state = IBV_QPS_RTR
        rtr.path_mtu = ibv_mtu(rawValue: min(local.mtu, other.port.mtu))
        rtr.dest_qp_num = other.queuePair
        rtr.rq_psn = other.psn
        rtr.max_dest_rd_atomic = 1
        rtr.min_rnr_timer = 12  // 0.64 ms
        rtr.ah_attr.port_num = device.port
        if local.ethernet {
            // RoCE has no LIDs: the address vector routes by GID (global routing header).
            rtr.ah_attr.is_global = 1
            rtr.ah_attr.grh.sgid_index = UInt8(truncatingIfNeeded: device.gidIndex)
            rtr.ah_attr.grh.hop_limit = 64
            withUnsafeMutableBytes(of: &rtr.ah_attr.grh.dgid.raw) { $0.copyBytes(from: other.port.gid.prefix(16)) }
        } else {
            rtr.ah_attr.dlid = other.port.lid
        }
        try modify(to: .readyToReceive, &rtr)
        var rts = ibv_qp_attr()
        rts.qp_state = IBV_QPS_RTS
        rts.sq_psn = psn
        rts.timeout = 14       // 4.096 µs · 2^14 ≈ 67 ms per try
        rts.retry_cnt = 7
        rts.rnr_retry = 7      // retry forever while the receiver has no receive posted
        rts.max_rd_atomic = 1
        try modify(to: .readyToSend, &rts)
        state.withLock { $0.remote = region }
    }

    /// One `ibv_modify_qp` with exactly the attributes verbs requires for the transition.
    private func modify(to target: QueuePairStateMachine.State, _ attributes: inout ibv_qp_attr) throws(VerbsError) {
        let mask = Int32(QueuePairStateMachine.requiredAttributes(to: target).rawValue)
        try state.withLock { s throws(VerbsError) in
            guard s.machine.canMove(to: target) else {
                throw VerbsError(operation: "ibv_modify_qp", code: EINVAL, message: "illegal queue pair transition \(s.machine.state) → \(target)")
            }
            try Verbs.check(device.driver.modifyQueuePair(qp, &attributes, mask), "ibv_modify_qp to \(target)")
            try s.machine.move(to: target)
        }
    }

    // MARK: data path: exactly what runs on hardware

    func postReceive() throws(VerbsError) {
        var wr = ibv_recv_wr()
        wr.wr_id = 0
        wr.num_sge = 0  // WRITE_WITH_IMM only needs the receive for its immediate
        var bad: UnsafeMutablePointer<ibv_recv_wr>?
        try Verbs.check(ibv_post_recv(qp, &wr, &bad), "ibv_post_recv")
    }

    func postWrite(_ bytes: [UInt8], remoteOffset: Int, key: UInt32, immediate: UInt32?,
                   workRequestID: UInt64, signaled: Bool) throws(FabricError) {
        let limit = outstandingWritesMax
        guard let staging else { throw .invalidRequest("the queue pair from node \(peer) only receives") }
        guard bytes.count <= staging.slotBytes else {
            throw .invalidRequest("a write of \(bytes.count) bytes exceeds slotBytesMax \(staging.slotBytes)")
        }
        try state.withLock { s throws(FabricError) in
            guard s.machine.canPostSend, let remote = s.remote else { throw FabricError.queuePairInError(peer: peer) }
            try s.outstanding.checkRoom(limit: limit, peer: peer)
            let seq = s.outstanding.nextSequence
            // Unsignalled writes hold their slot until a later signalled one completes: signal at
            // least every half ring so slots come back.
            let signal = signaled || seq % UInt64(max(1, limit / 2)) == 0
            // The slot of the write `slots` writes earlier, which completed (at most `limit` are
            // outstanding): the NIC may read a slot until its write's completion.
            let slot = staging.base + Int(seq % UInt64(staging.slots)) * staging.slotBytes
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
            let posted = s.outstanding.append(workRequestID: workRequestID, signaled: signaled)
            assert(posted == seq, "the write was posted as \(seq) but recorded as \(posted)")
        }
    }

    /// A signalled (or failed) send completed: it and every earlier write are done.
    func completed(wrID: UInt64, status: CompletionStatus) {
        let seq = wrID & ~Self.sendBit
        state.withLock { s in
            s.outstanding.complete(through: seq, status: status) { w, st in
                completions.push(Completion(kind: .write, status: st, peer: peer, workRequestID: w.workRequestID, immediate: nil))
            }
            if status != .success { try? s.machine.move(to: .error) }
        }
    }

    /// Moves the QP to ERROR: the device flushes outstanding work with IBV_WC_WR_FLUSH_ERR.
    func moveToError() {
        state.withLock { s in
            guard s.machine.state != .error else { return }
            try? s.machine.move(to: .error)
            var attr = ibv_qp_attr()
            attr.qp_state = IBV_QPS_ERR
            let mask = Int32(QueuePairStateMachine.requiredAttributes(to: .error).rawValue)
            if device.driver.modifyQueuePair(qp, &attr, mask) != 0 {
                logger.error("ibv_modify_qp to ERROR failed for the queue pair to node \(peer)")
            }
        }
    }
}
