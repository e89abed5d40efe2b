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

    init(deliver: interpose_deliver_fn?, context: UInt) {
        self.deliver = deliver
        self.context = context
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

    /// Never called: the runtime turns compaction off (the C program's state cannot be captured),
    /// so a replica that starts over rebuilds its program's state from the whole log.
    func snapshot() -> [UInt8] { [] }

    func restore(_ snapshot: [UInt8], index: LogIndex) throws {
        guard snapshot.isEmpty else {
            throw NodeError.storage("a snapshot at index \(index) arrived, but a C program's state cannot be restored from one")
        }
    }

    /// The proposer's log index, from `apply`'s result.
    static func index(fromResult r: [UInt8]) -> LogIndex {
        r.count == 8 ? r.withUnsafeBytes { LogIndex(littleEndian: $0.loadUnaligned(as: LogIndex.self)) } : 0
    }
}
