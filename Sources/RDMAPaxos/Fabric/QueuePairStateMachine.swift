// Pure Swift models of a verbs queue pair's life, used by `VerbsFabric` and testable anywhere.

/// The InfiniBand queue pair states a reliable-connected QP moves through, and which
/// `ibv_modify_qp` transitions are legal (IB spec, ch. 10.3): RESET → INIT → RTR → RTS, any state
/// → ERROR or RESET. Posting sends needs RTS; posting receives needs INIT or later.
public struct QueuePairStateMachine: Hashable, Sendable {
    public enum State: Hashable, Sendable, CaseIterable { case reset, initialized, readyToReceive, readyToSend, error }

    /// The `ibv_qp_attr_mask` bits each transition must set, with verbs' values (`IBV_QP_*`), so
    /// `rawValue` is the mask `VerbsQueuePair` passes to `ibv_modify_qp`.
    public struct Attributes: OptionSet, Hashable, Sendable {
        public let rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }
        public static let state = Attributes(rawValue: 1 << 0)
        public static let accessFlags = Attributes(rawValue: 1 << 3)
        public static let pkeyIndex = Attributes(rawValue: 1 << 4)
        public static let port = Attributes(rawValue: 1 << 5)
        public static let addressVector = Attributes(rawValue: 1 << 7)
        public static let pathMTU = Attributes(rawValue: 1 << 8)
        public static let timeout = Attributes(rawValue: 1 << 9)
        public static let retryCount = Attributes(rawValue: 1 << 10)
        public static let rnrRetry = Attributes(rawValue: 1 << 11)
        public static let receivePSN = Attributes(rawValue: 1 << 12)
        public static let maxQPReadAtomic = Attributes(rawValue: 1 << 13)
        public static let minRNRTimer = Attributes(rawValue: 1 << 15)
        public static let sendPSN = Attributes(rawValue: 1 << 16)
        public static let maxDestReadAtomic = Attributes(rawValue: 1 << 17)
        public static let destQPNumber = Attributes(rawValue: 1 << 20)
    }

    public private(set) var state: State = .reset

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

    public var canPostSend: Bool { state == .readyToSend }
    public var canPostReceive: Bool { state == .initialized || state == .readyToReceive || state == .readyToSend }
}

/// How one rdma_cm connection (active side) proceeds from event to event, and what the fabric
/// must do next. The fabric feeds it `rdma_cm_event_type`s; everything else is pure.
public struct ConnectionStateMachine: Hashable, Sendable {
    public enum State: Hashable, Sendable {
        case idle, resolvingAddress, resolvingRoute, connecting, established, disconnected
        case failed(String)
    }

    public enum Event: Hashable, Sendable {
        case start
        case addressResolved, addressError
        case routeResolved, routeError
        case established, rejected(status: Int32), unreachable, connectError
        case disconnected
        case timeout
    }

    public enum Action: Hashable, Sendable {
        case resolveAddress
        /// Resolve the route, then create the QP (INIT) and post receives before connecting.
        case resolveRoute
        case createQueuePairAndConnect
        case reportEstablished
        /// Move the QP to ERROR (flushing outstanding work) and report the failure.
        case fail(String)
        case none
    }

    public private(set) var state: State = .idle
    public init() {}

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
