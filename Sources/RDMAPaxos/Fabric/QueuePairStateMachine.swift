// Pure Swift models of a verbs queue pair's life, used by `VerbsFabric` and testable anywhere.

/// The InfiniBand queue pair states a reliable-connected QP moves through, and which
/// `ibv_modify_qp` transitions are legal (IB spec, ch. 10.3): RESET → INIT → RTR → RTS, any state
/// → ERROR or RESET. Posting sends needs RTS; posting receives needs INIT or later.
public struct QueuePairStateMachine: Hashable, Sendable {
    /// The IB states: RESET, INIT, RTR (ready to receive), RTS (ready to send), ERROR.
    public enum State: Hashable, Sendable, CaseIterable { case reset, initialized, readyToReceive, readyToSend, error }

    /// The `ibv_qp_attr_mask` bits each transition must set, with verbs' values (`IBV_QP_*`), so
    /// `rawValue` is the mask `VerbsQueuePair` passes to `ibv_modify_qp`.
    public struct Attributes: OptionSet, Hashable, Sendable {
        /// The mask bits, as `ibv_modify_qp` takes them.
        public let rawValue: UInt32
        /// A mask from verbs bits.
        public init(rawValue: UInt32) { self.rawValue = rawValue }
        /// `IBV_QP_STATE`: the target state.
        public static let state = Attributes(rawValue: 1 << 0)
        /// `IBV_QP_ACCESS_FLAGS`: what remote peers may do (remote write here).
        public static let accessFlags = Attributes(rawValue: 1 << 3)
        /// `IBV_QP_PKEY_INDEX`: the partition key slot.
        public static let pkeyIndex = Attributes(rawValue: 1 << 4)
        /// `IBV_QP_PORT`: the physical port.
        public static let port = Attributes(rawValue: 1 << 5)
        /// `IBV_QP_AV`: how to reach the remote port (LID or GID).
        public static let addressVector = Attributes(rawValue: 1 << 7)
        /// `IBV_QP_PATH_MTU`.
        public static let pathMTU = Attributes(rawValue: 1 << 8)
        /// `IBV_QP_TIMEOUT`: the local ACK timeout.
        public static let timeout = Attributes(rawValue: 1 << 9)
        /// `IBV_QP_RETRY_CNT`: retransmissions before a transport error.
        public static let retryCount = Attributes(rawValue: 1 << 10)
        /// `IBV_QP_RNR_RETRY`: retries after receiver-not-ready.
        public static let rnrRetry = Attributes(rawValue: 1 << 11)
        /// `IBV_QP_RQ_PSN`: the first packet sequence number expected.
        public static let receivePSN = Attributes(rawValue: 1 << 12)
        /// `IBV_QP_MAX_QP_RD_ATOMIC`: outstanding reads/atomics this QP may issue.
        public static let maxQPReadAtomic = Attributes(rawValue: 1 << 13)
        /// `IBV_QP_MIN_RNR_TIMER`: the delay a sender is told to wait when no receive is posted.
        public static let minRNRTimer = Attributes(rawValue: 1 << 15)
        /// `IBV_QP_SQ_PSN`: the first packet sequence number sent.
        public static let sendPSN = Attributes(rawValue: 1 << 16)
        /// `IBV_QP_MAX_DEST_RD_ATOMIC`: incoming reads/atomics this QP serves at once.
        public static let maxDestReadAtomic = Attributes(rawValue: 1 << 17)
        /// `IBV_QP_DEST_QPN`: the remote queue pair number.
        public static let destQPNumber = Attributes(rawValue: 1 << 20)
    }

    /// The current state; starts in RESET.
    public private(set) var state: State = .reset

    /// A queue pair in RESET.
    public init() {}

    /// Attributes `ibv_modify_qp` needs to reach `target` from the current state (RC QP).
    public static func requiredAttributes(to target: State) -> Attributes {
        switch target {
        case .reset, .error: [.state]
        case .initialized: [.state, .pkeyIndex, .port, .accessFlags]
        case .readyToReceive: [.state, .addressVector, .pathMTU, .destQPNumber, .receivePSN, .maxDestReadAtomic, .minRNRTimer]
        case .readyToSend: [.state, .timeout, .retryCount, .rnrRetry, .sendPSN, .maxQPReadAtomic]
        }
    }

    /// Whether `ibv_modify_qp` may move a QP from the current state to `target`.
    public func canMove(to target: State) -> Bool {
        switch (state, target) {
        case (_, .error), (_, .reset): true
        case (.reset, .initialized), (.initialized, .initialized): true
        case (.initialized, .readyToReceive): true
        case (.readyToReceive, .readyToSend), (.readyToSend, .readyToSend): true
        default: false
        }
    }

    /// Records a transition, refusing an illegal one before the driver would.
    public mutating func move(to target: State) throws(VerbsError) {
        guard canMove(to: target) else {
            throw VerbsError(operation: "ibv_modify_qp", code: 22,
                             message: "illegal queue pair transition \(state) → \(target)")
        }
        state = target
    }

    /// Sends (WRITEs) may be posted: the QP is in RTS.
    public var canPostSend: Bool { state == .readyToSend }
    /// Receives may be posted: INIT or later, not ERROR.
    public var canPostReceive: Bool { state == .initialized || state == .readyToReceive || state == .readyToSend }
}

/// How one rdma_cm connection (active side) proceeds from event to event, and what the fabric
/// must do next. The fabric feeds it `rdma_cm_event_type`s; everything else is pure.
public struct ConnectionStateMachine: Hashable, Sendable {
    /// Where one rdma_cm connection attempt stands.
    public enum State: Hashable, Sendable {
        /// Before `start`; then waiting for each rdma_cm step in turn; connected; torn down.
        case idle, resolvingAddress, resolvingRoute, connecting, established, disconnected
        /// Gave up, with the reason.
        case failed(String)
    }

    /// What rdma_cm (or the timer) reported.
    public enum Event: Hashable, Sendable {
        /// The caller asks to connect.
        case start
        /// RDMA_CM_EVENT_ADDR_RESOLVED / ADDR_ERROR.
        case addressResolved, addressError
        /// RDMA_CM_EVENT_ROUTE_RESOLVED / ROUTE_ERROR.
        case routeResolved, routeError
        /// RDMA_CM_EVENT_ESTABLISHED, REJECTED (with the peer's status), UNREACHABLE, CONNECT_ERROR.
        case established, rejected(status: Int32), unreachable, connectError
        /// RDMA_CM_EVENT_DISCONNECTED.
        case disconnected
        /// The connect timeout passed.
        case timeout
    }

    /// What the caller must do next.
    public enum Action: Hashable, Sendable {
        /// Call `rdma_resolve_addr`.
        case resolveAddress
        /// Resolve the route, then create the QP (INIT) and post receives before connecting.
        case resolveRoute
        /// Create the QP and call `rdma_connect`.
        case createQueuePairAndConnect
        /// Hand the connected QP to the waiting caller.
        case reportEstablished
        /// Move the QP to ERROR (flushing outstanding work) and report the failure.
        case fail(String)
        /// Nothing: the event does not apply in this state.
        case none
    }

    /// The current state; starts idle.
    public private(set) var state: State = .idle
    /// A connection not yet started.
    public init() {}

    /// Applies one event and says what to do.
    public mutating func handle(_ e: Event) -> Action {
        switch (state, e) {
        case (.idle, .start):
            state = .resolvingAddress; return .resolveAddress
        case (.resolvingAddress, .addressResolved):
            state = .resolvingRoute; return .resolveRoute
        case (.resolvingRoute, .routeResolved):
            state = .connecting; return .createQueuePairAndConnect
        case (.connecting, .established):
            state = .established; return .reportEstablished
        case (.established, .disconnected):
            state = .disconnected; return .fail("peer disconnected")
        case (.disconnected, _), (.failed, _):
            return .none
        case let (_, .rejected(status)):
            return failing("peer rejected the connection (status \(status))")
        case (_, .addressError): return failing("address resolution failed")
        case (_, .routeError): return failing("route resolution failed")
        case (_, .unreachable): return failing("peer unreachable")
        case (_, .connectError): return failing("connection error")
        case (_, .timeout): return failing("timed out in \(state)")
        case (_, .disconnected): return failing("disconnected before the connection was established")
        default:
            return failing("unexpected \(e) while \(state)")
        }
    }

    private mutating func failing(_ reason: String) -> Action {
        state = .failed(reason)
        return .fail(reason)
    }
}
