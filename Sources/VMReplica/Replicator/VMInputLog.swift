// The replicated state machine of a VM replica: the VM's input log. Committed entries are not
// interpreted here; they are handed, in log order, to whatever drives the local VM (nothing
// on a witness, which only logs and acknowledges).

import RDMAPaxos

/// One entry of a VM's input log.
public enum VMLogEntry: Equatable, Sendable {
    /// An Ethernet frame for the guest's NIC.
    case input(frame: [UInt8])
    /// Both VM replicas pause at this log position and run syncvm; `proposer` is the VM primary
    /// that asked for it, `epoch` counts its checkpoints. `connections` is the primary's table of
    /// connection offsets (empty unless it took the VM over with some): the backup's copy of
    /// the VM speaks to clients through it (docs/design/vmreplica.md, "Connection offsets").
    case checkpoint(epoch: UInt64, proposer: NodeID, connections: ConnectionRewriter = ConnectionRewriter())
    /// `node`, a backup that leads while the primary is gone, owns the VM from this log
    /// position: it becomes the primary and the old primary a backup, each when it applies this.
    case takeOver(by: NodeID)
    /// `node`, the primary, goes on without a backup from this log position (its backup is
    /// gone): it releases the output it held, and the backup's VM is no copy until a checkpoint
    /// after this entry re-protects it; a take-over by the backup before that is void.
    case unprotected(by: NodeID)
    /// The primary's release on match found that its backup's VM numbers one connection
    /// differently (another initial sequence number, a lagging TCP timestamp clock): the backup
    /// rewrites that connection by this offset from this log position, and the primary releases
    /// the frames that depended on it only once it applied this entry.
    case connectionOffset(LearntOffset)

    /// The entry as a log command: kind 1 and the frame; kind 2, the epoch (u64), the proposer
    /// (u32) and 20 bytes per connection offset (guest address u32, guest port u16, client
    /// address u32, client port u16, sequence offset u32, timestamp offset u32); kind 3
    /// (take-over) or 4 (unprotected) and the node (u32); kind 5, the generation (u64), the
    /// proposer (u32), the ticket (u64) and one connection offset; big-endian.
    public func encoded() -> [UInt8] {
        switch self {
        case let .input(frame): return [1] + frame
        case let .checkpoint(epoch, proposer, connections):
            var b: [UInt8] = [2]
            b.be(epoch, 8)
            b.be(UInt64(proposer), 4)
            for (k, o) in connections.offsets.sorted(by: { $0.key.order.lexicographicallyPrecedes($1.key.order) }) { b.append(k, o) }
            return b
        case let .connectionOffset(e):
            var b: [UInt8] = [5]
            b.be(e.generation, 8)
            b.be(UInt64(e.proposer), 4)
            b.be(e.ticket, 8)
            b.append(e.key, e.offset)
            return b
        case let .takeOver(node):
            return [3] + (0..<4).reversed().map { UInt8(node >> (8 * UInt32($0)) & 0xff) }
        case let .unprotected(node):
            return [4] + (0..<4).reversed().map { UInt8(node >> (8 * UInt32($0)) & 0xff) }
        }
    }

    /// Whether this is a checkpoint that `proposer` asked for.
    public func isCheckpoint(by proposer: NodeID) -> Bool {
        if case .checkpoint(_, proposer, _) = self { return true }
        return false
    }

    /// Decodes a log command. Throws `DecodeError` for an unknown kind, an input shorter than an
    /// Ethernet header, or a checkpoint or connection offset of the wrong length.
    public init(decoding b: [UInt8]) throws(DecodeError) {
        func be(_ r: Range<Int>) -> UInt64 { b[r].reduce(UInt64(0)) { $0 << 8 | UInt64($1) } }
        func offset(at i: Int) -> (TCPConnectionKey, ConnectionOffset) {
            (TCPConnectionKey(guestIP: UInt32(be(i..<(i + 4))), guestPort: UInt16(be((i + 4)..<(i + 6))),
                              peerIP: UInt32(be((i + 6)..<(i + 10))), peerPort: UInt16(be((i + 10)..<(i + 12)))),
             ConnectionOffset(sequence: UInt32(be((i + 12)..<(i + 16))), timestamp: UInt32(be((i + 16)..<(i + 20)))))
        }
        switch b.first {
        case 1? where b.count >= 15:  // at least an Ethernet header
            self = .input(frame: Array(b.dropFirst()))
        case 2? where b.count >= 13 && (b.count - 13) % 20 == 0:
            var connections = ConnectionRewriter()
            for i in stride(from: 13, to: b.count, by: 20) {
                let (k, o) = offset(at: i)
                connections[k] = o
            }
            self = .checkpoint(epoch: be(1..<9), proposer: NodeID(be(9..<13)), connections: connections)
        case 5? where b.count == 41:
            let (k, o) = offset(at: 21)
            self = .connectionOffset(LearntOffset(generation: be(1..<9), proposer: NodeID(be(9..<13)), ticket: be(13..<21), key: k, offset: o))
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
        case .takeOver, .unprotected, .connectionOffset: break
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

extension [UInt8] {
    /// Appends the low `bytes` bytes of `v`, big-endian.
    fileprivate mutating func be(_ v: UInt64, _ bytes: Int) {
        for i in (0..<bytes).reversed() { append(UInt8(v >> (8 * UInt64(i)) & 0xff)) }
    }

    /// Appends one connection offset (20 bytes).
    fileprivate mutating func append(_ k: TCPConnectionKey, _ o: ConnectionOffset) {
        be(UInt64(k.guestIP), 4)
        be(UInt64(k.guestPort), 2)
        be(UInt64(k.peerIP), 4)
        be(UInt64(k.peerPort), 2)
        be(UInt64(o.sequence), 4)
        be(UInt64(o.timestamp), 4)
    }
}

extension TCPConnectionKey {
    /// A total order, so an encoded table does not depend on a dictionary's order.
    fileprivate var order: [UInt64] { [UInt64(guestIP) << 16 | UInt64(guestPort), UInt64(peerIP) << 16 | UInt64(peerPort)] }
}
