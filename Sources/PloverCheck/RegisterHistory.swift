/// A history of operations on a map of registers (one register per key), as concurrent clients
/// observed it: each operation has the time its client invoked it and, when the client got an
/// answer, the time the answer arrived. An operation without an answer (timeout, lost
/// connection after the request was sent) has an unknown outcome: it may have taken effect at
/// any point after its invocation, or never.
///
/// Times are in any unit on one monotonic clock shared by all clients (nanoseconds of
/// `ContinuousClock` in the end-to-end tests).
public struct RegisterOperation<Key: Hashable & Sendable, Value: Hashable & Sendable>: Sendable {
    /// What an operation did to its register.
    public enum Kind: Sendable, Hashable {
        /// Sets the register; the client learnt nothing else.
        case write(Value)
        /// Sets the register and returned the value it held before (nil: it was empty).
        case swap(Value, previous: Value?)
        /// Returned the register's value (nil: empty).
        case read(Value?)
    }

    /// Who issued it (for messages only: the check does not assume one process per client).
    public var process: Int
    /// The register the operation acted on.
    public var key: Key
    /// What it did and what it returned.
    public var kind: Kind
    /// When the client sent the request.
    public var invoked: UInt64
    /// nil: the outcome is unknown (the operation may or may not have taken effect).
    public var completed: UInt64?

    /// An operation; traps if `completed` is before `invoked`.
    public init(process: Int, key: Key, kind: Kind, invoked: UInt64, completed: UInt64?) {
        precondition(completed.map { $0 >= invoked } ?? true, "an operation cannot complete before it was invoked")
        self.process = process
        self.key = key
        self.kind = kind
        self.invoked = invoked
        self.completed = completed
    }

    /// True when the client saw an answer.
    public var isComplete: Bool { completed != nil }
}

extension RegisterOperation: CustomStringConvertible {
    public var description: String {
        let what: String
        switch kind {
        case let .write(v): what = "write \(v)"
        case let .swap(v, p): what = "swap \(v) (was \(p.map { "\($0)" } ?? "empty"))"
        case let .read(v): what = "read \(v.map { "\($0)" } ?? "empty")"
        }
        return "p\(process) \(key): \(what) [\(invoked), \(completed.map(String.init) ?? "unknown")]"
    }
}

/// The verdict on a whole history.
public struct LinearizabilityReport<Key: Hashable & Sendable, Value: Hashable & Sendable>: Sendable {
    /// One key whose operations admit no linearization.
    public struct Violation: Sendable, CustomStringConvertible {
        /// The register concerned.
        public var key: Key
        /// The key's operations, in invocation order.
        public var operations: [RegisterOperation<Key, Value>]
        /// The longest prefix of a legal order the search found before every extension failed.
        public var longestLinearizedPrefix: [RegisterOperation<Key, Value>]
        /// Completed operations that prefix could not place.
        public var unplaced: [RegisterOperation<Key, Value>]

        public var description: String {
            var s = "key \(key): no linearization of \(operations.count) operations; "
            s += "the longest legal prefix places \(longestLinearizedPrefix.count)"
            if let last = longestLinearizedPrefix.last { s += ", ending with \(last)" }
            s += "; then none of these fits: "
            s += unplaced.prefix(6).map(\.description).joined(separator: "; ")
            return s
        }
    }

    /// Keys whose check gave up after the step budget (neither proved nor refuted).
    public var undecided: [Key]
    /// Keys whose operations admit no linearization; empty when the history is linearizable (or
    /// undecided).
    public var violations: [Violation]
    /// Operations checked (unknown-outcome reads excluded: they constrain nothing).
    public var operationsChecked: Int
    /// Search steps taken, over all keys.
    public var steps: Int

    /// True when every key was proved linearizable.
    public var isLinearizable: Bool { violations.isEmpty && undecided.isEmpty }
}
