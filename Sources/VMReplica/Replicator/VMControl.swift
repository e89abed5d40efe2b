// The replica's control socket (`run_dir/control.sock`) behind `plover vm status` and
// `plover vm switchover`: one request line in, the answer out, then the connection closes.
// Answers are `key=value` lines (status) or one line starting with `OK` or `ERR`.

#if canImport(Glibc)
import Glibc
#endif
import Foundation
import RDMAPaxos

extension VMReplicator {
    var controlPath: String { config.runDir + "/control.sock" }
    var operatorQMPPath: String { config.runDir + "/qmp.sock" }

    /// Opens the control socket and the operator's QMP socket.
    func openControl() throws {
        unlink(controlPath)
        let listener = try Sockets.listenUnix(controlPath)
        lock.withLock { controlListener = listener }
        Sockets.serve(listener, name: "plover-vm-control") { [weak self] fd in
            defer { close(fd) }
            var line: [UInt8] = []
            let client = SocketDescriptor(rawValue: fd, peer: "a client of the control socket")
            while line.count < 256, let byte = try? client.receive(upTo: 1).first, byte != 10 { line.append(byte) }
            let request = String(decoding: line, as: UTF8.self).trimmingCharacters(in: .whitespaces)
            let answer = self?.control(request) ?? "ERR the replica is stopping"
            _ = Sockets.writeAll(fd, Array((answer.hasSuffix("\n") ? answer : answer + "\n").utf8))
        }
        let qmp = try QMPOperatorSocket(path: operatorQMPPath) { [weak self] in self?.lock.withLock { self?.current?.qmp } }
        lock.withLock { operatorQMP = qmp }
    }

    func closeControl() {
        let (listener, qmp) = lock.withLock { (controlListener, operatorQMP) }
        if listener >= 0 { shutdown(listener, Int32(SHUT_RDWR)) }
        unlink(controlPath)
        qmp?.stop()
    }

    func control(_ request: String) -> String {
        switch request {
        case "status": return statusText
        case "switchover": return switchover()
        default: return "ERR unknown request \"\(request)\": send status or switchover"
        }
    }

    /// `key=value` lines for `plover vm status`.
    var statusText: String {
        let s = lock.withLock { () -> (Role, Bool, LogIndex?, String?, String?, Bool, Bool, QEMUInstance?, QEMUAccel, String?) in
            (machine.role, machine.protected, machine.unprotectedSince, machine.inconsistent, machine.unusable, channel.map { !$0.isDown } ?? false,
             machine.checkpointSlotTaken || machine.checkpoint != nil, current, qemuSettings.accel, lastCheckpoint)
        }
        let (role, isProtected, since, why, broken, linkUp, inflight, q, accel, last) = s
        let vm: String
        if let b = broken { vm = "unusable reason=\"\(b)\"" } else if let w = why { vm = "inconsistent reason=\"\(w)\"" } else if role == .backup {
            vm = "protected"
        } else if let since { vm = "unprotected since_index=\(since)" } else {
            vm = isProtected ? "protected" : "unprotected"
        }
        let status = node?.status
        var lines = [
            "node=\(me)", "role=\(role.rawValue)", "configured_role=\(configuredRole.rawValue)", "vm=\(vm)",
            "leading=\(status?.role == .leader)", "leader=\(status?.leader.map { String($0) } ?? "none")",
            "syncvm_link=\(linkUp ? "up" : "down") peer=\(config.peer)", "checkpoint_in_flight=\(inflight)",
            "held=\(outputs.heldCount) released=\(outputs.releasedCount) dropped=\(outputs.droppedCount)",
            outputs.metrics + " digests_sent=\(digestOutbox.sent) digests_lost=\(digestOutbox.lost)",
            lock.withLock { "connections_rewritten=\(connections.full.offsets.count) connections_learnt=\(connections.learnt.offsets.count)" },
            "qemu=\(q.map { "\($0.name) pid=\($0.pid)" } ?? "none") accel=\(accel.rawValue)",
        ]
        if let f = front { lines.append(f.status) }
        lines.append("last_checkpoint=" + (last ?? "none"))
        return lines.joined(separator: "\n")
    }

    /// Planned switchover (host maintenance): a checkpoint that completes, then a take-over by the
    /// backup, proposed by this primary. The backup's VM is the checkpoint plus the inputs since,
    /// which it executed too, so nothing a client was answered is lost; answers this replica
    /// still held are dropped with its role and their clients resend.
    func switchover() -> String {
        guard let node else { return "ERR the replica is starting" }
        let (role, why, linkUp, since) = lock.withLock { (machine.role, machine.notACopy, channel.map { !$0.isDown } ?? false, machine.unprotectedSince) }
        guard role == .primary else { return "ERR node \(me) is not the primary (it is the \(role.rawValue)); run the switchover against node \(config.peer)" }
        guard node.status.role == .leader else { return "ERR node \(me) does not lead right now; try again in a moment" }
        if let why { return "ERR node \(me)'s VM is not the replicated one (\(why)): there is nothing to hand over" }
        guard linkUp else { return "ERR the syncvm link to node \(config.peer) is down: the backup cannot take the VM" }
        if let since { return "ERR node \(config.peer) has not been re-protected since log index \(since): wait for a checkpoint with it" }
        // 1. A checkpoint of its own, once no other is in flight.
        let deadline = ContinuousClock.now + checkpointTimeout + .seconds(5)
        var epoch: UInt64?
        while epoch == nil {
            epoch = lock.withLock { machine.claimCheckpoint() }
            if epoch == nil {
                guard ContinuousClock.now < deadline else { return "ERR a checkpoint in flight did not end within \(checkpointTimeout)" }
                usleep(5000)
            }
        }
        logger.notice("vm: switchover requested: checkpoint \(epoch!), then node \(config.peer) takes the VM over")
        let entry = VMLogEntry.checkpoint(epoch: epoch!, proposer: me, connections: lock.withLock { connections.base })
        if case let .failure(e) = proposeAndWait(entry) {
            run { $0.proposalFailed(entry) }
            return "ERR the switchover's checkpoint was not committed: \(e)"
        }
        while lock.withLock({ machine.checkpointSlotTaken }) {
            guard ContinuousClock.now < deadline else { return "ERR the switchover's checkpoint \(epoch!) did not end within \(checkpointTimeout)" }
            usleep(5000)
        }
        guard !lock.withLock({ machine.lastCheckpointFailed }) else { return "ERR the switchover's checkpoint \(epoch!) failed (see checkpoints.log); nothing was handed over" }
        // 2. The take-over by the backup, in log order after it.
        if case let .failure(e) = proposeAndWait(VMLogEntry.takeOver(by: config.peer)) {
            return "ERR the take-over by node \(config.peer) was not committed: \(e); node \(me) keeps the VM"
        }
        return "OK node \(config.peer) took the VM over after checkpoint \(epoch!); node \(me) is its backup now and is re-protected by its next checkpoint"
    }

    /// Proposes `entry` and waits for the outcome on this (non-pool) thread.
    func proposeAndWait(_ entry: VMLogEntry) -> Result<Void, any Error> {
        guard let node else { return .failure(CheckpointAborted(reason: "no node")) }
        let bytes = entry.encoded()
        let box = Box<Void>()
        let done = DispatchSemaphore(value: 0)
        Task {
            do { _ = try await node.propose(bytes); box.result = .success(()) } catch { box.result = .failure(error) }
            done.signal()
        }
        done.wait()
        return box.result!
    }
}
