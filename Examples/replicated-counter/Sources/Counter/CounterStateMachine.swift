import RDMAPaxos

/// A replicated counter: every replica applies the same `add`s in the same order, so every
/// replica holds the same total.
///
/// The replica calls these methods from its own thread, one at a time; nothing here needs a lock.
public final class CounterStateMachine: StateMachine {
    /// The total of every `add` applied so far (wrapping on overflow, the same way everywhere).
    public private(set) var total: Int64 = 0
    /// The index of the last command applied or snapshot restored.
    public private(set) var appliedIndex: LogIndex = 0

    /// A counter at 0.
    public init() {}

    /// Applies `add(n)` and answers the new total; a command that does not decode changes nothing
    /// and answers `CounterCommand.malformed` on every replica alike.
    public func apply(_ command: [UInt8], index: LogIndex) -> [UInt8] {
        appliedIndex = index
        guard let c = CounterCommand(decoding: command) else { return CounterCommand.malformed }
        switch c {
        case let .add(n): total &+= n
        }
        return CounterCommand.encode(total)
    }

    /// Answers the total (any query: the counter has one value).
    public func query(_ query: [UInt8]) -> [UInt8] { CounterCommand.encode(total) }

    /// The total and the applied index, 16 bytes.
    public func snapshot() -> [UInt8] { CounterCommand.encode(total) + CounterCommand.encode(Int64(bitPattern: appliedIndex)) }

    /// Replaces the total with a snapshot's; throws when the bytes are not a snapshot.
    public func restore(_ snapshot: [UInt8], index: LogIndex) throws {
        guard snapshot.count == 16, let t = CounterCommand.decodeTotal(Array(snapshot[0..<8])),
              let at = CounterCommand.decodeTotal(Array(snapshot[8..<16])) else {
            throw CounterError("a counter snapshot is 16 bytes, got \(snapshot.count)")
        }
        total = t
        appliedIndex = max(LogIndex(bitPattern: at), index)
    }
}

/// A counter's commands and results as bytes in the log.
public enum CounterCommand: Equatable, Sendable {
    /// Adds `n` (negative to subtract) and answers the new total.
    case add(Int64)

    /// The result of a command no replica could decode: no bytes.
    public static let malformed: [UInt8] = []

    /// The command as log payload: the byte `1`, then `n` as 8 bytes big-endian.
    public func encoded() -> [UInt8] {
        switch self {
        case let .add(n): [1] + Self.encode(n)
        }
    }

    /// Decodes `encoded()`; nil for anything else.
    public init?(decoding bytes: [UInt8]) {
        guard bytes.count == 9, bytes[0] == 1, let n = Self.decodeTotal(Array(bytes[1...])) else { return nil }
        self = .add(n)
    }

    /// `n` as 8 bytes, big-endian.
    public static func encode(_ n: Int64) -> [UInt8] { (0..<8).map { UInt8(truncatingIfNeeded: n >> (56 - 8 * $0)) } }

    /// A total answered by `apply` or `query`; nil when `bytes` are not 8 bytes (a malformed command's answer).
    public static func decodeTotal(_ bytes: [UInt8]) -> Int64? {
        guard bytes.count == 8 else { return nil }
        return bytes.reduce(Int64(0)) { $0 << 8 | Int64($1) }
    }
}

/// A counter's error, with what went wrong in words.
public struct CounterError: Error, CustomStringConvertible {
    /// What went wrong.
    public var description: String
    /// An error saying `description`.
    public init(_ description: String) { self.description = description }
}
