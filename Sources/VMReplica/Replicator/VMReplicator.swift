// A VM replica (PLOVER's primary or backup) around one RDMAPaxos node: the VM's inputs go
// through the log, committed inputs enter the guest's NIC in log order on both replicas, the
// primary's output waits in the output guard for the covering syncvm. Design and the order of
// every step: docs/design/vmreplica.md.

#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Logging
import RDMAPaxos

/// One VM replica. `start` boots the VM, opens the syncvm link and the front; the caller then
/// starts the consensus node with `inputLog` as its state machine and hands it to `attach`.
public final class VMReplicator: @unchecked Sendable {
    // @unchecked Sendable: `lock` guards `machine`, `current`, `spare`, `channel`, `endpoint`,
    // `syncFabric` and the few effect fields marked so; the checkpoint fields (`hashDiff`) belong
    // to the driver thread.
    /// What a VM replica does for the VM (the witness runs none).
    public enum Role: String, Sendable, CaseIterable {
        /// Prefers to lead; runs checkpoints as the syncvm primary.
        case primary
        /// Replays inputs, drops output, receives checkpoints; takes over when it leads.
        case backup
    }

    /// The role this replica was started with (`plover vm primary|backup`).
    public let configuredRole: Role
    /// What it is now: the configured role, except that a restarted primary starts as a backup
    /// and a backup that leads becomes the primary ("Re-protection" in docs/design/vmreplica.md).
    public var role: Role { lock.withLock { machine.role } }
    /// The role and checkpoint state (VMReplicaMachine.swift), under `lock`; everything in this
    /// class and its extensions is the effects around it.
    var machine: VMReplicaMachine
    /// This replica's node id in the consensus cluster.
    public let me: NodeID
    /// The `[vm]` table it runs with.
    public let config: VMConfig
    /// How its QEMUs start: `config.qemu` with `accel = "auto"` resolved (under `lock`).
    var qemuSettings: QEMUSettings
    let logger: Logger
    let clusterKey: ClusterKey
    /// The fabric the syncvm link runs over, and its channel configuration.
    public let syncLink: SyncLink
    /// The guest's Ethernet frames on their way to clients (those the attachment carries).
    let outputs: OutputGuard
    /// Backup, release on match: digests of its guest's frames on their way to the primary.
    let digestOutbox = DigestOutbox()
    /// Backup: the epoch of the checkpoint that installed its current VM (nil: none yet, or the
    /// VM is no copy); its output digests carry it (under `lock`).
    var backupGeneration: UInt64?
    /// The current VM's connection offsets (ConnectionTable.swift): how its TCP numbers map to
    /// those clients see (under `lock`; changed by the driver in log order).
    var connections = ConnectionTable()
    /// Driver: the primary's table carried by the checkpoint entry being applied, installed with
    /// the backup's new VM.
    var checkpointConnections: (epoch: UInt64, table: ConnectionRewriter)?
    /// The output failpoint (tests; VMReplicator+Match.swift), with `PLOVER_VM_FAILPOINTS=1`.
    let outputFailpoint: OutputFailpoint?
    /// The per-frame stage trace (StageTrace.swift), with `PLOVER_VM_TRACE=1`.
    let trace: StageTrace?
    let pool = PageHashPool(threadCount: 2)

    let lock = NSLock()
    var current: QEMUInstance?
    var spare: QEMUInstance?
    var channel: FabricSyncChannel?
    var qemuSerial = 0
    /// Serializes QEMU starts: each one's NIC connection is the next one accepted.
    let launchLock = NSLock()

    var node: ReplicaNode?
    /// The clients' attachment (ClientAttachment.swift): the line front, opened by `attach`, or
    /// the tap, opened by `start`. Released output goes here.
    var front: (any ClientAttachment)?
    var memory: GuestMemory!
    /// The disk image as 4 KiB blocks, and where its dirty blocks come from (nil: no disk).
    var disk: GuestMemory?
    var diskLog: DiskDirtyLog?
    var endpoint: FabricSyncChannel.Endpoint?
    var syncFabric: (any Fabric)?
    var nicListener: Int32 = -1
    var nicPath: String { config.runDir + "/nic.sock" }

    // Driver-thread state.
    let queueCond = NSCondition()
    var queue: [(LogIndex, VMLogEntry)] = []
    /// `start` ran (the driver waits for it: it says which entries are replays).
    var driverReleased = false
    var hashDiff: HashDiffDirtySource?
    var otherFrames: UInt64 = 0
    /// The scheduler asked the driver (under `queueCond`) to demote this inconsistent primary.
    var demoteRequested = false
    /// A leading backup hands leadership back to a live primary for this long before it takes over anyway.
    static let handBackLimit = Duration.seconds(6)
    /// After a failed checkpoint the next one waits this long at least.
    static let failedCheckpointBackoff = Duration.seconds(1)
    /// Crashes a test arms (`PLOVER_VM_FAILPOINTS`, CheckpointFailpoint.swift).
    lazy var failpoints = CheckpointFailpoints(runDir: config.runDir) { [weak self] in
        guard let self else { return }
        let qs = self.lock.withLock { [self.current, self.spare] }
        for q in qs.compactMap({ $0 }) { Glibc.kill(q.pid, SIGKILL) }
    }
    /// How long a checkpoint waits for a syncvm link that is down: a peer that is alive is
    /// connected again within this; a dead one must not hold the checkpoint (and a failover) up.
    let linkGrace = Duration.milliseconds(500)
    /// The control socket's listener and the operator's QMP socket (`VMControl.swift`).
    var controlListener: Int32 = -1
    var operatorQMP: QMPOperatorSocket?
    /// The last checkpoint's line of `checkpoints.log`, with when it ended (`plover vm status`).
    var lastCheckpoint: String?
    /// When each step of the last failover happened (under `lock`; FailoverTimeline.swift).
    var timeline = FailoverTimeline()

    /// A replica that starts as `role` for node `me`; `clusterKey` authenticates the syncvm link,
    /// which runs over `syncLink` (the node's configured fabric, `SyncLink.configured`; TCP when
    /// nil). Nothing runs until `start`.
    public init(role: Role, me: NodeID, config: VMConfig, clusterKey: ClusterKey, logger: Logger, syncLink: SyncLink? = nil) {
        self.syncLink = syncLink ?? .tcp(clusterKey: clusterKey)
        self.configuredRole = role
        let rules = SchedulerRules(handBackLimit: Self.handBackLimit, backupLostAfter: .milliseconds(config.backupLostMilliseconds),
                                   checkpointMinGap: .milliseconds(config.checkpointMinGapMilliseconds),
                                   failedCheckpointBackoff: Self.failedCheckpointBackoff,
                                   checkpointMaxAge: .milliseconds(config.checkpointMaxMilliseconds),
                                   releaseOnMatch: config.releaseOnMatch, outputHoldMax: .milliseconds(config.outputHoldMaxMilliseconds))
        self.machine = VMReplicaMachine(role: role, me: me, peer: config.peer, rules: rules, now: .now)
        self.me = me
        self.config = config
        self.qemuSettings = config.qemu
        self.clusterKey = clusterKey
        self.logger = logger
        self.outputs = OutputGuard(releaseOnMatch: config.releaseOnMatch)
        self.outputFailpoint = OutputFailpoint(runDir: config.runDir)
        self.trace = StageTrace(runDir: config.runDir)
        outputs.setDelivery { [weak self] frame in self?.front?.deliver(frame) }
        if let f = outputFailpoint { outputs.setMatchAudit { f.released($0) } }
        if let t = trace { outputs.setReleaseTrace { d, byMatch in t.note(byMatch ? "release-match" : "release-other", d.content) } }
        outputs.setOffsetProposer { [weak self] e in self?.proposeOffset(e) }
    }

    /// The state machine to run the node with: committed entries go to this replica's VM driver.
    public lazy var inputLog: VMInputLog = VMInputLog(
        deliver: { [weak self] index, entry in self?.enqueue(index, entry) },
        onRestore: { [weak self] index in
            self?.run { $0.markInconsistent("the log was restored from a snapshot at \(index): this VM missed the inputs before it") }
        })

    /// Boots the VM (and, on the backup, the first standby QEMU) and starts the syncvm link.
    /// `recoveredThrough` is the last index the node's log held when this process opened it
    /// (`ReplicaServer.recoveredLastIndex`): above 0, the process restarted, so its VM is new,
    /// the entries up to that index are replays it skips, and a primary comes back as the
    /// backup of whoever holds the VM now.
    public func start(recoveredThrough: LogIndex = 0) async throws {
        if case let .tap(name) = config.network { try openTap(name) }
        if failpoints.file != nil {
            logger.warning("vm: PLOVER_VM_FAILPOINTS=1: a checkpoint armed through \(config.runDir)/crash-at kills this replica (a test failpoint)")
        }
        run { $0.started(recoveredThrough: recoveredThrough) }
        queueCond.withLock {
            driverReleased = true
            queueCond.broadcast()
        }
        try FileManager.default.createDirectory(atPath: config.runDir, withIntermediateDirectories: true)
        // QEMU logs are numbered on from those an earlier run of this replica left.
        let earlierLogs = Self.highestQEMULog(in: config.runDir)
        lock.withLock { qemuSerial = earlierLogs }
        if config.accelAuto {
            let (accel, why) = AccelProbe.choose(config.qemu, scratch: config.runDir)
            lock.withLock { qemuSettings.accel = accel }
            logger.notice("vm: accel = \"auto\" chose \(accel.rawValue): \(why)")
        }
        unlink(config.qemu.ramFile)
        try openDisk()
        nicListener = try Sockets.listenUnix(nicPath)
        let first = try launchLock.withLock { try launch(incoming: false) }
        try first.qmp.execute("migrate-set-capabilities", ["capabilities": [["capability": "x-ignore-shared", "state": true]]])
        lock.withLock { current = first }
        startReader(first)
        memory = try GuestMemory(mappingFile: config.qemu.ramFile, writable: role == .backup,
                                 trailingBytes: role == .backup ? syncLink.channel.mailboxBytes : 0)
        if role == .backup { startSpare() }
        try await openSyncEndpoint(as: role)
        if config.releaseOnMatch { startDigestSender() }
        let driver = Thread(named: "vm-driver") { [self] in driverLoop() }
        driver.start()
    }

    /// Starts serving clients and watching the roles (checkpoint scheduling on the primary, the
    /// take-over on a leading backup), once the node runs.
    public func attach(_ node: ReplicaNode) throws {
        self.node = node
        let link = config.link
        if case let .front(address) = config.network {
            let f = try ClientFront(address: address, sourcePorts: (link.frontPort + 1)..<(link.frontPort + link.frontPortCount)) {
                [weak self] line, port, reply in self?.frontLine(line, sourcePort: port, reply: reply)
            }
            front = LineFrontAttachment(front: f, link: link)
        }
        try openControl()
        let t = Thread(named: "vm-scheduler") { [self] in schedulerLoop() }
        t.start()
    }

    /// QEMU logs (`qemu-N.log`, `qemu-N.serial.log`) kept in the run directory.
    static let qemuLogsKept = 4

    /// Kills the QEMUs, closes the front and the link, removes the RAM file and the NIC socket.
    /// The node is the caller's to stop.
    public func stop() {
        run { $0.stop() }
        // A standby QEMU being started now either finishes and is registered, or sees `stopped`
        // and kills itself, before this returns: none outlives the replica process.
        let (a, b, ch) = launchLock.withLock {
            lock.withLock { () -> (QEMUInstance?, QEMUInstance?, FabricSyncChannel?) in
                defer { current = nil; spare = nil }
                return (current, spare, channel)
            }
        }
        front?.stop()
        closeControl()
        ch?.close()
        lock.withLock { syncFabric }?.close()
        a?.kill()
        b?.kill()
        // Nothing maps the guest's RAM any more (it would stay in /dev/shm until a reboot).
        unlink(config.qemu.ramFile)
        unlink(nicPath)
        queueCond.withLock { queueCond.broadcast() }
    }

    /// A one-line summary for logs and `plover vm` status output.
    public var summary: String {
        let (u, i, inflight) = lock.withLock { (machine.unusable, machine.inconsistent, machine.checkpointSlotTaken || machine.checkpoint != nil) }
        return "role=\(role.rawValue) held=\(outputs.heldCount) released=\(outputs.releasedCount) dropped=\(outputs.droppedCount) checkpoint_in_flight=\(inflight) \(outputs.metrics)"
            + (u.map { " unusable=\"\($0)\"" } ?? "") + (i.map { " inconsistent=\"\($0)\"" } ?? "")
    }

    /// The replica is stopping (or stopped).
    var isStopped: Bool { lock.withLock { machine.stopping } }

    /// Steps the machine under `lock` and carries out what it returns, outside the lock.
    func run(_ event: (inout VMReplicaMachine) -> [VMReplicaMachine.Action]) {
        perform(lock.withLock { event(&machine) })
    }

    /// Marks the VM inconsistent if `q` is still the current VM (checked and set in one step: a
    /// checkpoint swapping `current` cannot slip in between).
    func markInconsistent(_ why: String, ifCurrent q: QEMUInstance) {
        run { m in current === q ? m.markInconsistent(why) : [] }
    }

    // MARK: QEMU

    /// The highest N of the `qemu-N.log` files in `dir` (0 for none): what an earlier run of
    /// this replica left there.
    static func highestQEMULog(in dir: String) -> Int {
        let files = (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []
        return files.compactMap { f -> Int? in
            guard f.hasPrefix("qemu-"), f.hasSuffix(".log"), !f.hasSuffix(".serial.log") else { return nil }
            return Int(f.dropFirst(5).dropLast(4))
        }.max() ?? 0
    }

    /// Starts the next QEMU. Callers hold `launchLock`.
    func launch(incoming: Bool) throws -> QEMUInstance {
        let n = lock.withLock { qemuSerial += 1; return qemuSerial }
        // A backup starts a QEMU per checkpoint: keep the logs of the last few only (numbering
        // goes on from an earlier run's, see `start`, so a restarted replica prunes those too).
        if n > Self.qemuLogsKept {
            for suffix in ["log", "serial.log"] { unlink("\(config.runDir)/qemu-\(n - Self.qemuLogsKept).\(suffix)") }
        }
        let q = try QEMUInstance.launch(lock.withLock { qemuSettings }, name: "qemu-\(n)", runDir: config.runDir, nicListener: nicListener,
                                        nicSocket: nicPath, incoming: incoming)
        if let diskLog {
            do { try diskLog.track(q) } catch {
                q.kill()
                throw error
            }
        }
        return q
    }

    /// Backup: a `-incoming defer` QEMU for the next checkpoint, started outside the pause.
    func startSpare() {
        let t = Thread(named: "plover-vm-spare") { [self] in
            launchLock.withLock {
                guard !isStopped else { return }
                do {
                    let q = try launch(incoming: true)
                    do {
                        try q.qmp.execute("migrate-set-capabilities", ["capabilities": [["capability": "x-ignore-shared", "state": true]]])
                    } catch {
                        q.kill()
                        throw error
                    }
                    // Not needed once this replica became the primary, nor when another one is up.
                    let keep = lock.withLock { () -> Bool in
                        guard !machine.stopping, machine.role == .backup, spare == nil else { return false }
                        spare = q
                        return true
                    }
                    if !keep { q.kill() }
                } catch {
                    logger.error("vm: cannot start the standby QEMU for the next checkpoint: \(error)")
                }
            }
        }
        t.start()
    }

    /// Reads what `q`'s guest sends and applies the output rule to the answers.
    func startReader(_ q: QEMUInstance) {
        let t = Thread(named: "vm-nic-\(q.name)") { [self] in
            while let frame = q.nic.readFrame() {
                guard carries(frame) else { continue }
                handleOutput(frame, from: q)
            }
            // The stream ends when QEMU does (or this side closed it: a replaced or stopped VM,
            // no longer current). The current VM gone is a lost copy: a primary hands the VM to
            // its backup and becomes a backup itself; either way the next checkpoint of the
            // primary re-protects this replica into its standby QEMU.
            markInconsistent("its QEMU \(q.name) (pid \(q.pid)) exited", ifCurrent: q)
        }
        t.start()
    }

    /// Whether the output guard takes `frame` of the guest: every frame on a tap; only the
    /// counter's answers on the line front.
    func carries(_ frame: [UInt8]) -> Bool {
        if case .tap = config.network { return true }
        return config.link.answer(frame) != nil
    }

    func handleOutput(_ answer: [UInt8], from q: QEMUInstance) {
        if let trace { trace.note("out", OutputDigest(of: answer).content) }
        let (isCurrent, role, serves, isProtected, generation, table) = lock.withLock {
            (current === q, machine.role, machine.notACopy == nil, machine.protected, backupGeneration, connections)
        }
        // A backup whose VM is a checkpoint's copy tells the primary what its guest sent, in the
        // numbers of the table that came with the VM (the primary's matcher adds what it learnt since).
        if role == .backup, isCurrent, serves, config.releaseOnMatch, let generation {
            noteBackupOutput(table.base.rewrite(answer, .fromGuest), generation: generation)
        }
        // What clients see of this VM's connections (unchanged unless a failover brought offsets).
        let answer = table.full.rewrite(answer, .fromGuest)
        guard isCurrent, let node, node.status.role == .leader, !(role == .primary && !serves) else {
            outputs.drop()
            logger.debug("vm: dropped a \(answer.count)-byte frame from \(q.name) (current \(isCurrent))")
            return
        }
        switch role {
        case .primary:
            if isProtected {
                outputs.hold(answer)
            } else {
                // No backup holds a copy of this VM yet: waiting would only delay the answer.
                outputs.passThrough(answer)
                noteAnswerDelivered()
            }
        case .backup:
            // Its VM is the one clients see only once a committed take-over made it the
            // primary; leading before that (an election, or while its take-over commits) it
            // answers nothing.
            outputs.drop()
        }
    }

    // MARK: Inputs

    /// Why this replica's front must not take a request now (it would never answer it), with
    /// where to go instead; nil when it serves.
    func refusal(_ node: ReplicaNode) -> String? {
        let status = node.status
        let other = config.peerFrontAddress.map { " at \($0)" } ?? ""
        guard status.role == .leader else {
            if let l = status.leader, l == config.peer { return "ERR not the primary: node \(l) leads; its front is\(other.isEmpty ? " unknown here" : other)" }
            return "ERR not the primary: no VM replica leads right now; try again shortly"
        }
        let (role, why, broken) = lock.withLock { (machine.role, machine.inconsistent, machine.unusable) }
        if let w = broken ?? why { return "ERR this replica's VM is not serving (\(w)); try node \(config.peer)\(other)" }
        if role == .backup { return "ERR this replica is taking the VM over; try again shortly" }
        return nil
    }

    func frontLine(_ line: [UInt8], sourcePort: UInt16, reply: @escaping @Sendable (String) -> Void) {
        guard let node else { reply("ERR starting"); return }
        if let no = refusal(node) { reply(no); return }
        let frame = config.link.requestFrame(payload: line + [10], sourcePort: sourcePort)
        Task {
            do { _ = try await node.propose(VMLogEntry.input(frame: frame).encoded()) } catch { reply("ERR \(error)") }
        }
    }

    func enqueue(_ index: LogIndex, _ entry: VMLogEntry) {
        if let trace, case let .input(frame) = entry { trace.note("commit", StageTrace.key(input: frame)) }
        queueCond.withLock {
            queue.append((index, entry))
            queueCond.signal()
        }
    }

    /// The input driver: applies committed entries in log order through the machine and carries
    /// out what it returns (inputs into the VM, checkpoints, role changes) on this one thread.
    func driverLoop() {
        while true {
            let next = queueCond.withLock { () -> ([(LogIndex, VMLogEntry)], Bool)? in
                while (queue.isEmpty && !demoteRequested || !driverReleased) && !isStopped { queueCond.wait() }
                if isStopped { return nil }
                defer {
                    queue = []
                    demoteRequested = false
                }
                return (queue, demoteRequested)
            }
            guard let (batch, demote) = next else { return }
            for (n, (index, entry)) in batch.enumerated() {
                // A later checkpoint by the same proposer already committed: this one is over (a
                // primary asks for one only after the previous one ended).
                var superseded = false
                if case let .checkpoint(epoch, proposer, table) = entry {
                    superseded = batch[(n + 1)...].contains { $0.1.isCheckpoint(by: proposer) }
                    checkpointConnections = (epoch, table)
                }
                run { $0.apply(entry, at: index, superseded: superseded) }
            }
            // An inconsistent primary asked to step aside (its VM is no copy of anything).
            if demote { run { $0.demote() } }
        }
    }

    // MARK: Sync link

    /// Connects `endpoint` to the peer until a link is up; gives up once another endpoint
    /// replaced it (a change of role) or the replica stops.
    func connectLoop(_ endpoint: FabricSyncChannel.Endpoint) async {
        guard let peerAddress = HostPort(parsing: config.peerSyncAddress, allowingPortZero: true) else { return }
        while !lock.withLock({ machine.stopping || channel != nil || self.endpoint !== endpoint }) {
            do {
                let ch = try await endpoint.connect(to: PeerAddress(node: config.peer, peerAddress))
                let kept = lock.withLock { () -> Bool in
                    guard self.endpoint === endpoint, !machine.stopping else { return false }
                    channel = ch
                    return true
                }
                guard kept else { ch.close(); return }
                logger.info("vm: syncvm link to node \(config.peer) is up")
            } catch {
                try? await Task.sleep(for: .milliseconds(200))
            }
        }
    }

    /// The syncvm link, waiting up to `timeout` for it; a link that went down is connected
    /// again first (`reviveLinkIfDown`), so a restarted peer can be re-protected.
    func waitForChannel(timeout: Duration) -> FabricSyncChannel? {
        reviveLinkIfDown()
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            let (c, aborted) = lock.withLock { (channel, machine.checkpointAbort) }
            if let c { return c }
            if aborted != nil { return nil }  // e.g. the failure detector found the primary gone
            usleep(5_000)
        }
        return nil
    }
}
