// A failpoint for testing the checkpoint protocol. With `PLOVER_VM_FAILPOINTS=1` in its
// environment, a VM replica looks for a file `crash-at` in its run directory as each checkpoint
// starts; holding `ROLE:PHASE`, it arms that checkpoint (when the replica runs it as ROLE) and is
// removed: on reaching PHASE the replica kills its QEMUs and itself with SIGKILL, as a host
// failure would. The kill tests drive every phase this way; without the variable nothing is
// read. docs/design/vmreplica.md, "Testing the checkpoint".

#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// The steps of one checkpoint, in order, on both sides.
public enum CheckpointPhase: String, Sendable, CaseIterable {
    /// Primary: the backup said it is paused and ready. Backup: it sent that it is ready.
    case handshake
    /// Both paused; the page hashes have been exchanged, no page written yet.
    case hashes
    /// Pages are landing on the backup: primary after its first batch, backup once the
    /// primary's commit arrived (every page landed, none confirmed).
    case pages
    /// The disk's divergent blocks are landing: primary after its first block frame (or, when
    /// none diverge, once the backup confirmed), backup once the disk commit arrived. Without
    /// a disk, the step right after the RAM sync.
    case disk
    /// The RAM (and disk) is synced; the device state is on its way to the backup's standby QEMU.
    case device
    /// Primary: the device state arrived, the VM is not resumed and no output released yet.
    /// Backup: the device state arrived, the standby QEMU is not yet its VM.
    case resume
}

/// One armed crash: a role and a phase.
struct CheckpointFailpoint: Equatable, Sendable {
    var role: VMReplicator.Role
    var phase: CheckpointPhase

    /// Parses `ROLE:PHASE`; throws a message naming the text and the forms it may take.
    static func parse(_ text: String) throws(ConfigError) -> CheckpointFailpoint {
        let parts = text.trimmingCharacters(in: .whitespacesAndNewlines).split(separator: ":").map(String.init)
        guard parts.count == 2, let role = VMReplicator.Role(rawValue: parts[0]), let phase = CheckpointPhase(rawValue: parts[1]) else {
            let phases = CheckpointPhase.allCases.map(\.rawValue).joined(separator: "|")
            throw ConfigError(file: "crash-at", key: "failpoint", problem: "\"\(text)\" is not ROLE:PHASE (ROLE primary|backup, PHASE \(phases))")
        }
        return CheckpointFailpoint(role: role, phase: phase)
    }
}

/// Arms checkpoints from the run directory's `crash-at` file and fires the crash.
final class CheckpointFailpoints: Sendable {
    /// `run_dir/crash-at`, when failpoints are enabled.
    let file: String?
    /// Kills the replica's QEMUs; the process kills itself right after.
    let killQEMUs: @Sendable () -> Void

    init(runDir: String, environment: [String: String] = ProcessInfo.processInfo.environment,
         killQEMUs: @escaping @Sendable () -> Void) {
        file = environment["PLOVER_VM_FAILPOINTS"] == "1" ? runDir + "/crash-at" : nil
        self.killQEMUs = killQEMUs
    }

    /// A checkpoint as `role` starts: the phase it is armed to crash at, if any (consumes the file).
    func arm(as role: VMReplicator.Role) -> CheckpointPhase? {
        guard let file, let text = try? String(contentsOfFile: file, encoding: .utf8) else { return nil }
        let point: CheckpointFailpoint
        do { point = try CheckpointFailpoint.parse(text) } catch {
            FileHandle.standardError.write(Data("vm: ignoring failpoint file \(file): \(error)\n".utf8))
            unlink(file)
            return nil
        }
        guard point.role == role else { return nil }
        unlink(file)
        return point.phase
    }

    /// The checkpoint armed with `armed` reached `phase`: crashes here if they are the same.
    func reached(_ phase: CheckpointPhase, armed: CheckpointPhase?) {
        guard let armed, armed == phase else { return }
        FileHandle.standardError.write(Data("vm: failpoint \(phase.rawValue): killing this replica's QEMUs and itself\n".utf8))
        killQEMUs()
        Glibc.kill(getpid(), SIGKILL)
    }
}
