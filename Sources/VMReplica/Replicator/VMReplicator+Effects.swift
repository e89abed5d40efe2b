// Carrying out the replica machine's actions (VMReplicaMachine.swift): the only place where its
// decisions touch QEMU, the front, the syncvm link and the consensus node. Called outside `lock`.

#if canImport(Glibc)
import Glibc
#endif
import Foundation
import RDMAPaxos

extension VMReplicator {
    /// Does what the machine decided, in order. Checkpoint-only actions (`rollBack`,
    /// `abandonVM`) are carried out by the checkpoint code that asked (VMReplicator+Checkpoint).
    func perform(_ actions: [VMReplicaMachine.Action]) {
        for a in actions {
            switch a {
            case let .info(m): logger.info("\(m)")
            case let .notice(m): logger.notice("\(m)")
            case let .warning(m): logger.warning("\(m)")
            case let .error(m): logger.error("\(m)")
            case let .writeInput(frame):
                // Clients' acknowledgements and TSecrs back into this VM's own numbers.
                let (q, rewriter) = lock.withLock { (current, connections.full) }
                let ok = q?.nic.write(frame: rewriter.rewrite(frame, .toGuest))
                if let trace { trace.note("nic-in", StageTrace.key(input: frame)) }
                logger.debug("vm: input into \(q?.name ?? "no VM"): \(ok ?? false)")
            case let .runCheckpoint(epoch, index, side):
                if side == .primary { primaryCheckpoint(epoch: epoch, index: index) } else { backupCheckpoint(epoch: epoch, index: index) }
            case let .becomePrimary(index):
                becomePrimary(at: index)
            case .becomeBackup:
                becomeBackup()
            case .releaseHeld:
                let n = outputs.releaseAll()
                if n > 0 { logger.notice("vm: released \(n) held answers") }
            case let .offsetApplied(generation, ticket):
                outputs.offsetApplied(generation: generation, ticket: ticket)
            case let .learnOffset(e):
                let learnt = lock.withLock { () -> Bool in
                    guard backupGeneration == e.generation else { return false }
                    connections.learn(e)
                    return true
                }
                logger.debug("vm: connection \(e.key) offset seq+\(e.offset.sequence) ts+\(e.offset.timestamp) of generation \(e.generation): \(learnt ? "rewritten from here" : "void, this VM is another generation's")")
            case .abortCheckpoint:
                lock.withLock { channel }?.close()
            case .dropBaseline:
                hashDiff = nil
                diskLog?.dropBaseline()
            case .rollBack, .abandonVM:
                break
            case let .propose(entry):
                propose(entry)
            case .handLeadership:
                guard let node else { break }
                let peer = config.peer
                Task { try? await node.transferLeadership(to: peer) }
            case .probePeer:
                probePeer()
            case let .campaignNow(because):
                guard let node else { break }
                lock.withLock { timeline.note(.campaign) }
                logger.notice("vm: backup \(me) starts an election now: \(because)")
                _ = node.campaignNow(replacing: config.peer)
            case let .takeAttachment(announce):
                takeAttachment(announce: announce)
            case .leaveAttachment:
                leaveAttachment()
            case .requestDemotion:
                queueCond.withLock {
                    demoteRequested = true
                    queueCond.signal()
                }
            }
        }
    }

    /// Proposes `entry`; a refusal goes back to the machine.
    func propose(_ entry: VMLogEntry) {
        guard let node else { return }
        var entry = entry
        // A checkpoint carries this primary's table: the backup's copy must speak through it.
        if case let .checkpoint(epoch, proposer, _) = entry { entry = .checkpoint(epoch: epoch, proposer: proposer, connections: lock.withLock { connections.base }) }
        if case .takeOver = entry { lock.withLock { timeline.note(.takeOverProposed) } }
        let bytes = entry.encoded()
        Task {
            do { _ = try await node.propose(bytes) } catch {
                self.logger.warning("vm: proposal \(entry.kindName) failed: \(error)")
                self.run { $0.proposalFailed(entry) }
            }
        }
    }

    /// Asks whether anything listens at the primary's syncvm address (on another thread); the
    /// answer goes to the machine with the leader the node follows then.
    func probePeer() {
        guard let address = HostPort(parsing: config.peerSyncAddress, allowingPortZero: true) else { return }
        let t = Thread(named: "plover-vm-probe") { [self] in
            let listening = PeerProbe.listens(at: address, timeout: .milliseconds(200))
            if !listening { lock.withLock { timeline.note(.probeRefused) } }
            let leader = node?.status.leader
            run { $0.peerProbed(listening: listening, leader: leader, now: .now) }
        }
        t.start()
    }

    /// A new primary's first answer to a client: the end of a failover's timeline, logged once.
    func noteAnswerDelivered() {
        let line = lock.withLock { () -> String? in
            guard timeline.isOpen, timeline.at[.serving] != nil else { return nil }
            timeline.note(.firstAnswer)
            defer { timeline = FailoverTimeline() }
            return timeline.line
        }
        if let line { logger.notice("vm: failover timeline (unix ms): \(line)") }
    }
}

extension VMLogEntry {
    /// The entry's kind for messages.
    var kindName: String {
        switch self {
        case .input: "input"
        case let .checkpoint(epoch, _, _): "checkpoint \(epoch)"
        case let .connectionOffset(e): "connection offset \(e.ticket)"
        case let .takeOver(node): "take-over by node \(node)"
        case let .unprotected(node): "unprotected by node \(node)"
        }
    }
}

extension VMReplicator {
    /// Primary: proposes a `connectionOffset` entry the output guard's matcher learnt (called
    /// under the guard's lock, so entries enter the log in the order learnt while this replica
    /// leads). A refused proposal leaves the frames that wait for it to a checkpoint.
    func proposeOffset(_ learnt: LearntOffset) {
        guard let node else { return }
        var entry = learnt
        entry.proposer = me
        let e = entry
        node.propose(VMLogEntry.connectionOffset(e).encoded()) { [logger] result in
            if case let .failure(err) = result { logger.info("vm: connection offset \(e.ticket) for \(e.key) not logged: \(err)") }
        }
    }
}
