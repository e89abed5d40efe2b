// The replicated state machine of a VM replica: the VM's input log. Committed entries are not
// interpreted here; they are handed, in log order, to whatever drives the local VM (nothing
// on a witness, which only logs and acknowledges).

import RDMAPaxos

/// One entry of a VM's input log.
public enum VMLogEntry: Equatable, Sendable {
    /// An Ethernet frame for the guest's NIC.
    case input(frame: [UInt8])
    /// Both VM replicas pause at this log position and run syncvm; `proposer` is the VM primary
    /// that asked for it, `epoch` counts its checkpoints.
    case checkpoint(epoch: UInt64, proposer: NodeID)
    /// `node`, a backup that leads while the primary is gone, owns the VM from this log
    /// position: it becomes the primary and the old primary a backup, each when it applies this.
    case takeOver(by: NodeID)
    /// `node`, the primary, goes on without a backup from this log position (its backup is
    /// gone): it releases the output it held, and the backup's VM is no copy until a checkpoint
    /// after this entry re-protects it; a take-over by the backup before that is void.
    case unprotected(by: NodeID)

    /// The entry as a log command: kind 1 and the frame; kind 2, the epoch (u64) and the
    /// proposer (u32); kind 3 (take-over) or 4 (unprotected) and the node (u32); big-endian.
    public func encoded() -> [UInt8] {
        switch self {
        case let .input(frame): return [1] + frame
        case let .checkpoint(epoch, proposer):
            var b: [UInt8] = [2]
            for i in (0..<8).reversed() { b.append(UInt8(epoch >> (8 * UInt64(i)) & 0xff)) }
            for i in (0..<4).reversed() { b.append(UInt8(proposer >> (8 * UInt32(i)) & 0xff)) }
            return b
        case let .takeOver(node):
            return [3] + (0..<4).reversed().map { UInt8(node >> (8 * UInt32($0)) & 0xff) }
        case let .unprotected(node):
            return [4] + (0..<4).reversed().map { UInt8(node >> (8 * UInt32($0)) & 0xff) }
        }
    }

    /// Whether this is a checkpoint that `proposer` asked for.
    public func isCheckpoint(by proposer: NodeID) -> Bool {
        if case .checkpoint(_, proposer) = self { return true }
        return false
    }

    /// Decodes a log command. Throws `DecodeError` for an unknown kind, an input shorter than an
    /// Ethernet header, or a checkpoint of the wrong length.
    public init(decoding b: [UInt8]) throws(DecodeError) {
        switch b.first {
        case 1? where b.count >= 15:  // at least an Ethernet header
            self = .input(frame: Array(b.dropFirst()))
        case 2? where b.count == 13:
            let epoch = b[1..<9].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
            let proposer = b[9..<13].reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
            self = .checkpoint(epoch: epoch, proposer: NodeID(proposer))
        case 3? where b.count == 5:
            self = .takeOver(by: NodeID(b[1..<5].reduce(UInt32(0)) { $0 << 8 | UInt32($1) }))
        case 4? where b.count == 5:
            self = .unprotected(by: NodeID(b[1..<5].reduce(UInt32(0)) { $0 << 8 | UInt32($1) }))
        default:
            throw DecodeError("VM log entry", "unknown kind \(b.first.map(String.init) ?? "(empty)") or wrong length \(b.count)")
        }
    }
}

/// The VM input log as a `StateMachine`: counts entries and passes each committed one to
/// `deliver` (on the node's thread, so it must not block).
public final class VMInputLog: StateMachine, @unchecked Sendable {
    // @unchecked Sendable: the node calls apply/query/snapshot/restore from its one thread;
    // the counters are read elsewhere only through `query` on that thread.
    /// Input entries applied.
    public private(set) var inputs: UInt64 = 0
    /// Checkpoint entries applied.
    public private(set) var checkpoints: UInt64 = 0
    /// Commands applied that are not a `VMLogEntry` (they are not delivered).
    public private(set) var malformed: UInt64 = 0
    /// Index of the last entry applied, or of the snapshot restored.
    public private(set) var appliedIndex: LogIndex = 0
    let deliver: (@Sendable (LogIndex, VMLogEntry) -> Void)?
    /// Called when the log jumped ahead by a snapshot: the local VM missed inputs.
    let onRestore: (@Sendable (LogIndex) -> Void)?

    /// `deliver` gets each committed entry with its index; `onRestore` gets the index of a
    /// snapshot that replaced the log.
    public init(deliver: (@Sendable (LogIndex, VMLogEntry) -> Void)? = nil, onRestore: (@Sendable (LogIndex) -> Void)? = nil) {
        self.deliver = deliver
        self.onRestore = onRestore
    }

    /// Counts the entry and passes it to `deliver`. Answers `[1]`, or `[0]` for a command that
    /// does not decode (counted as `malformed`).
    public func apply(_ command: [UInt8], index: LogIndex) -> [UInt8] {
        appliedIndex = index
        guard let e = try? VMLogEntry(decoding: command) else {
            malformed += 1
            return [0]
        }
        switch e {
        case .input: inputs += 1
        case .checkpoint: checkpoints += 1
        case .takeOver, .unprotected: break
        }
        deliver?(index, e)
        return [1]
    }

    /// `key=value` lines: inputs, checkpoints, malformed, applied_index.
    public func query(_ query: [UInt8]) -> [UInt8] {
        Array("inputs=\(inputs)\ncheckpoints=\(checkpoints)\nmalformed=\(malformed)\napplied_index=\(appliedIndex)".utf8)
    }

    /// Only the counters: the VM's state lives in the VM, not in the snapshot. A replica that
    /// installs a snapshot has missed inputs and its VM needs re-protection (docs/design/vmreplica.md).
    public func snapshot() -> [UInt8] {
        var b: [UInt8] = []
        for v in [inputs, checkpoints, malformed, appliedIndex] {
            for i in (0..<8).reversed() { b.append(UInt8(v >> (8 * UInt64(i)) & 0xff)) }
        }
        return b
    }

    /// Takes the snapshot's counters and calls `onRestore`. Throws `DecodeError` unless the
    /// snapshot is 32 bytes.
    public func restore(_ snapshot: [UInt8], index: LogIndex) throws {
        guard snapshot.count == 32 else { throw DecodeError("VM log snapshot", "\(snapshot.count) bytes, expected 32") }
        let v = (0..<4).map { k in snapshot[(k * 8)..<(k * 8 + 8)].reduce(UInt64(0)) { $0 << 8 | UInt64($1) } }
        inputs = v[0]
        checkpoints = v[1]
        malformed = v[2]
        appliedIndex = max(v[3], index)
        onRestore?(index)
    }
}
