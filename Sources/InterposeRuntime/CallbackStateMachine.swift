import Interpose
import RDMAPaxos

/// The state machine behind the C ABI: the state lives in the C program, so applying an entry
/// means handing it to the registered deliver callback, in log order, on the node's thread.
///
/// Entry layout in the log: one kind byte (`INTERPOSE_ENTRY_INPUT` or `INTERPOSE_ENTRY_CHECKPOINT`)
/// and the input's bytes. Anything else (a `plover kv put` sent to the replica's client port, say)
/// is skipped on every replica alike, so it cannot make them diverge. The result handed back to
/// the proposer is the entry's log index (8 bytes, little-endian).
final class CallbackStateMachine: StateMachine, @unchecked Sendable {
    // @unchecked Sendable: both fields are immutable; the C callback is only called on the
    // node's thread (the header tells C callers so).
    let deliver: interpose_deliver_fn?
    /// The callback's context pointer as an integer (it is only passed back to C).
    let context: UInt
    /// The shim's function that loads a server snapshot's file (APUS mode with a snapshot protocol).
    let restoreFile: RestoreFunction?

    init(deliver: interpose_deliver_fn?, context: UInt, restore: RestoreFunction? = nil) {
        self.deliver = deliver
        self.context = context
        self.restoreFile = restore
    }

    func apply(_ command: [UInt8], index: LogIndex) -> [UInt8] {
        guard let kind = command.first, kind == UInt8(INTERPOSE_ENTRY_INPUT) || kind == UInt8(INTERPOSE_ENTRY_CHECKPOINT) else { return [] }
        if let deliver {
            command.withUnsafeBytes { b in
                deliver(UnsafeMutableRawPointer(bitPattern: context), Int32(kind), index, b.baseAddress! + 1, b.count - 1)
            }
        }
        return withUnsafeBytes(of: index.littleEndian) { Array($0) }
    }

    /// The C program's state cannot be read from here, so there is nothing to query.
    func query(_ query: [UInt8]) -> [UInt8] { [] }

    /// Never called: the node does not snapshot on its own (a C program's state cannot be
    /// captured at an index the node picks). Snapshots come from the shim's server instead, at
    /// SNAPSHOT entries (`interpose_apus_snapshot_taken`).
    func snapshot() -> [UInt8] { [] }

    /// A server snapshot (after a restart, or from a peer): checked, then handed to the shim,
    /// which loads it into its server before it replays the entries after `index`.
    func restore(_ snapshot: [UInt8], index: LogIndex) throws {
        guard !snapshot.isEmpty else { return }
        guard let restoreFile else {
            throw NodeError.storage("a snapshot at index \(index) arrived, but this replica has no snapshot protocol to load it into its program: set the same INTERPOSE_SNAPSHOT and INTERPOSE_SNAPSHOT_FILE on every replica (docs/design/interpose.md, \"Snapshots\")")
        }
        let file = try ServerSnapshot.file(in: snapshot, index: index)
        let rc = file.withUnsafeBytes { restoreFile(index, $0.baseAddress, $0.count) }
        guard rc == 0 else { throw NodeError.storage("the shim could not take the server snapshot at index \(index) (\(file.count) bytes) to load") }
    }

    /// The proposer's log index, from `apply`'s result.
    static func index(fromResult r: [UInt8]) -> LogIndex {
        r.count == 8 ? r.withUnsafeBytes { LogIndex(littleEndian: $0.loadUnaligned(as: LogIndex.self)) } : 0
    }
}
