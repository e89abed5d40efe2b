import Metrics
import RDMAPaxos

/// One incarnation of a replica's process in the simulator: the real `ReplicaNode`, stepped by
/// the simulator on its own thread, over simulated storage, network, clock and off-loop queue.
/// A crash drops it (the node is never stopped: nothing it held in memory survives). The
/// scenario scripts' hand-driven cluster runs its replicas the same way, with a state machine
/// of its own.
package final class SimulatedProcess<Machine: StateMachine> {
    package let node: ReplicaNode
    package let transport: SimulatedTransport
    package let machine: Machine
    package let ticks = ManualTickSource()
    package let offLoop = SimulatedOffLoop()
    package let inbox = SimulatedInbox()

    /// A stepped node over `storage`, with the runtime's options but for those the caller's
    /// `configure` sets; the inbox hears its events, warnings and removal, the transport its
    /// held acknowledgements.
    package init(options: NodeOptions, machine: Machine, storage: SimulatedStorage, checksDurability: Bool = true,
                 configure: (inout NodeOptions) -> Void = { _ in }) {
        transport = SimulatedTransport(storage: storage, onlyFinalChecks: !checksDurability)
        self.machine = machine
        var o = options
        o.steppedByCaller = true
        o.offLoop = offLoop
        o.metricsFactory = NOOPMetricsHandler.instance
        let inbox = inbox
        o.onEvent = { inbox.events.append($0) }
        o.onWarning = { inbox.warnings.append($0) }
        o.onRemoved = { _ in inbox.removed = true }
        let transport = transport
        o.onHeldAcks = { transport.held($0, $1) }
        configure(&o)
        node = ReplicaNode(options: o, stateMachine: machine, log: SimulatedLog(storage), snapshots: SimulatedSnapshots(storage),
                           transport: transport, ticks: ticks)
        transport.node = node
    }

    /// Runs the node's loop until it has nothing queued; false if it never goes idle.
    package func run() -> Bool {
        for _ in 0..<10_000 { if !node.step() { return true } }
        return false
    }
}

extension SimulatedProcess where Machine == SimulatedStateMachine {
    /// A process of the seeded simulator, with its small limits and its state machine.
    convenience init(config: ReplicaConfig, bootstrap: Membership, seed: UInt64, intact: Bool, storage: SimulatedStorage,
                     options sim: SimulationOptions) {
        var o = NodeOptions(replica: config, bootstrap: bootstrap, seed: seed)
        o.stateIntact = intact
        o.compactEveryEntries = sim.runtimeCompactEveryEntries
        o.catchUpEntriesMax = 8
        self.init(options: o, machine: SimulatedStateMachine(filler: sim.stateFillerBytes), storage: storage,
                  checksDurability: !sim.onlyFinalChecks)
        machine.node = node
    }
}

/// What a simulated process's node reported since the simulator last looked.
package final class SimulatedInbox: @unchecked Sendable {
    // @unchecked Sendable: one thread (the simulator's, which steps the node).
    package var events: [Event] = []
    package var warnings: [String] = []
    package var removed = false
    /// Answers to requests, by the request's sequence number (sorted before use: the node
    /// answers some from dictionaries, whose order differs from run to run).
    var answers: [(request: Int, result: Result<[UInt8], any Error>)] = []
}

/// The network as one replica's node sees it: sends go to an outbox the simulator puts on the
/// wire after the node's step; every acknowledgement and promise is checked against the durable
/// disk at the moment the node sends it (the durability rule).
package final class SimulatedTransport: MessageTransport, @unchecked Sendable {
    // @unchecked Sendable: one thread (see `SimulatedInbox`).
    let storage: SimulatedStorage
    let onlyFinalChecks: Bool
    weak var node: ReplicaNode?
    package var onReceive: (@Sendable (Message) -> Void)?
    package var outbox: [Message] = []
    var violations: [String] = []
    /// Peers whose connection this node sees closed (their process died).
    var linksDown: Set<NodeID> = []

    init(storage: SimulatedStorage, onlyFinalChecks: Bool) {
        self.storage = storage
        self.onlyFinalChecks = onlyFinalChecks
    }

    package func start(onReceive: @escaping @Sendable (Message) -> Void) throws { self.onReceive = onReceive }
    package func stop() { onReceive = nil }
    package func isLinkDown(to peer: NodeID) -> Bool { linksDown.contains(peer) }

    /// What each held acknowledgement vouches for, noted when the node held it: the ballot its
    /// log had at the index then. An acknowledgement released later (once its unit is durable)
    /// is checked against that, not against what the log holds by the time it leaves.
    /// Oldest first for equal messages; one record leaves when such a message is sent or dropped.
    var vouchedWhenHeld: [Message: [Ballot?]] = [:]

    package func send(_ m: Message) {
        if !onlyFinalChecks, let v = durabilityViolation(m) { violations.append(v) }
        outbox.append(m)
    }

    func held(_ messages: [Message], _ holding: Bool) {
        for m in messages {
            if holding {
                vouchedWhenHeld[m, default: []].append(vouchedNow(m))
            } else {
                _ = takeVouched(m)
            }
        }
    }

    /// The oldest record of what a held message equal to `m` vouched for, removed; nil if none.
    func takeVouched(_ m: Message) -> Ballot?? {
        guard var records = vouchedWhenHeld[m], !records.isEmpty else { return nil }
        let first = records.removeFirst()
        vouchedWhenHeld[m] = records.isEmpty ? nil : records
        return .some(first)
    }

    /// The ballot of the entry an acknowledgement vouches for, as the node's log holds it now
    /// (nil: compacted, or not an acknowledgement).
    func vouchedNow(_ m: Message) -> Ballot? {
        switch m.body {
        case let .accepted(true, index), let .recovering(_, index): node?.core.entry(at: index)?.ballot
        default: nil
        }
    }

    /// A promise or an acknowledgement must not leave before the state it vouches for is
    /// durable: the entry acknowledged, with the ballot the sender's log holds it at now.
    func durabilityViolation(_ m: Message) -> String? {
        let disk = storage.durable
        switch m.body {
        case let .accepted(true, index), let .recovering(_, index):
            if case .recovering = m.body, index == 0 { return nil }
            let vouching = takeVouched(m) ?? vouchedNow(m)
            // An index compacted into the durable snapshot since is covered by it.
            guard disk.lastIndex >= index, vouching == nil || index <= disk.point.index || disk.ballot(at: index) == vouching else {
                return "node \(m.from) acknowledged \(index)@\(vouching.map(String.init(describing:)) ?? "?") before it was durable"
                    + " (disk holds \(disk.lastIndex)@\(disk.ballot(at: disk.lastIndex).map(String.init(describing:)) ?? "-"))"
            }
        case .promise(true, _, _, _):
            guard disk.hardState.promised >= m.ballot else {
                return "node \(m.from) promised \(m.ballot) before the promise was durable (disk: \(disk.hardState.promised))"
            }
        default: break
        }
        return nil
    }
}

/// The node's off-loop queue (snapshot saves): held until the simulator runs them, one at a
/// time in order; a crash drops what was not run.
package final class SimulatedOffLoop: OffLoopQueue, @unchecked Sendable {
    // @unchecked Sendable: one thread (see `SimulatedInbox`).
    package var queued: [@Sendable () -> Void] = []

    package func async(_ work: @escaping @Sendable () -> Void) { queued.append(work) }

    package func sync(_ work: () throws -> Void) throws {
        while runOne() {}
        try work()
    }

    /// Runs the oldest queued item; false when there was none.
    @discardableResult
    package func runOne() -> Bool {
        guard !queued.isEmpty else { return false }
        queued.removeFirst()()
        return true
    }
}

/// The replicas' state machine: the commands applied, with their indexes. Each apply is
/// recorded with the whole entry the node's log holds there, for the checkers; a client's
/// result is the index its command was applied at.
final class SimulatedStateMachine: StateMachine, @unchecked Sendable {
    // @unchecked Sendable: one thread (see `SimulatedInbox`).
    let filler: Int
    weak var node: ReplicaNode?
    var state: [StateEntry] = []
    /// The index of the last command applied, or of the snapshot restored.
    var stateIndex: LogIndex = 0
    /// Entries applied since the simulator last looked.
    var applied: [LogEntry] = []
    var restores = 0
    var violations: [String] = []

    init(filler: Int) { self.filler = filler }

    func apply(_ command: [UInt8], index: LogIndex) -> [UInt8] {
        state.append(StateEntry(index: index, payload: command))
        stateIndex = index
        // The command as applied, with the ballot the node's log holds at its index.
        applied.append(LogEntry(index: index, ballot: node?.core.entry(at: index)?.ballot ?? .zero, kind: .command, payload: command))
        var w = ByteWriter()
        w.u64(index)
        return w.bytes
    }

    /// A read's answer: the state's index, and the command applied at the index the query names.
    func query(_ query: [UInt8]) -> [UInt8] {
        var r = ByteReader(query, what: "simulated query")
        let at = (try? r.u64()) ?? 0
        var w = ByteWriter()
        w.u64(stateIndex)
        let held = state.command(at: at)
        w.u8(held == nil ? 0 : 1)
        w.blob(held ?? [])
        return w.bytes
    }

    func snapshot() -> [UInt8] { encodeState(state, filler: filler) }

    func restore(_ snapshot: [UInt8], index: LogIndex) throws {
        guard let s = decodeState(snapshot, filler: filler) else {
            violations.append("restored snapshot \(index) (\(snapshot.count) bytes) that is not the state machine's snapshot")
            throw SimulatedStateError()
        }
        state = s
        stateIndex = index
        restores += 1
    }
}

struct SimulatedStateError: Error {}
