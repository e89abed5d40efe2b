/// Decides whether a history of register operations is linearizable (Herlihy & Wing): whether
/// every operation can be given one instant between its invocation and its completion such that
/// the operations, in the order of those instants, are a legal sequential run of registers.
///
/// The search is Wing & Gong's with Lowe's memoization, as in Knossos and Porcupine: it builds a
/// linearization one operation at a time, only choosing operations that were invoked before any
/// not yet placed operation completed, backtracks when none fits, and never revisits a
/// (set of placed operations, register value) pair it has already explored. Linearizability is
/// local, so each key is checked on its own, which keeps the searches small.
///
/// Unknown outcomes: an operation without a completion time may be placed anywhere after its
/// invocation or left out (it never took effect). A read without an answer constrains nothing
/// and is dropped; a swap without an answer is a write.
public struct LinearizabilityChecker<Key: Hashable & Sendable, Value: Hashable & Sendable>: Sendable {
    /// One operation of the history checked.
    public typealias Operation = RegisterOperation<Key, Value>

    /// What each register holds before the history starts (absent keys: empty).
    public var initial: [Key: Value]
    /// Search steps allowed per key before the key is reported undecided.
    public var stepBudget: Int

    /// A checker for registers starting at `initial`, with a step budget of 20 million per key by
    /// default.
    public init(initial: [Key: Value] = [:], stepBudget: Int = 20_000_000) {
        self.initial = initial
        self.stepBudget = stepBudget
    }

    /// Checks `history` key by key; keys whose search exceeds the step budget are reported
    /// undecided.
    public func check(_ history: [Operation]) -> LinearizabilityReport<Key, Value> {
        var byKey: [Key: [Operation]] = [:]
        var order: [Key] = []
        for op in history {
            if case .read = op.kind, !op.isComplete { continue }
            if byKey[op.key] == nil { order.append(op.key) }
            byKey[op.key, default: []].append(op)
        }
        var report = LinearizabilityReport<Key, Value>(undecided: [], violations: [], operationsChecked: 0, steps: 0)
        for key in order {
            report.operationsChecked += byKey[key]!.count
            let ops = Self.boundUnknownWrites(byKey[key]!)
            var search = KeySearch<Key, Value>(ops, initial: initial[key], budget: stepBudget)
            let outcome = search.run()
            report.steps += search.steps
            switch outcome {
            case .linearizable: break
            case .undecided: report.undecided.append(key)
            case let .violation(prefix, unplaced):
                report.violations.append(.init(key: key, operations: search.ops, longestLinearizedPrefix: prefix, unplaced: unplaced))
            }
        }
        return report
    }
}

extension LinearizabilityChecker {
    /// Shrinks the search without changing the verdict. Unanswered writes are what make these
    /// searches explode: each may be placed anywhere after its invocation, or nowhere.
    ///
    /// - An unanswered write whose value no completed operation observed is dropped: in any
    ///   linearization it is followed by another write before any read or swap (they would have
    ///   observed its value), so leaving it out keeps the order legal.
    /// - An unanswered write of a value written by no other operation, and observed, took
    ///   effect before the first observer took effect, hence before that observer completed:
    ///   it gets that completion time.
    static func boundUnknownWrites(_ ops: [Operation]) -> [Operation] {
        var writers: [Value: Int] = [:]
        var firstSeen: [Value: UInt64] = [:]
        for op in ops {
            switch op.kind {
            case let .write(v): writers[v, default: 0] += 1
            case let .swap(v, previous):
                writers[v, default: 0] += 1
                if let p = previous, let t = op.completed { firstSeen[p] = min(firstSeen[p] ?? .max, t) }
            case let .read(v):
                if let v, let t = op.completed { firstSeen[v] = min(firstSeen[v] ?? .max, t) }
            }
        }
        return ops.compactMap { op in
            guard !op.isComplete else { return op }
            let v: Value
            switch op.kind {
            case let .write(x), let .swap(x, _): v = x
            case .read: return nil
            }
            guard let seen = firstSeen[v] else { return nil }
            guard writers[v] == 1, seen >= op.invoked else { return op }
            var bounded = op
            bounded.kind = .write(v)
            bounded.completed = seen
            return bounded
        }
    }
}

/// The search over one key's operations.
struct KeySearch<Key: Hashable & Sendable, Value: Hashable & Sendable> {
    typealias Operation = RegisterOperation<Key, Value>

    enum Outcome {
        case linearizable
        case undecided
        case violation(prefix: [Operation], unplaced: [Operation])
    }

    /// In invocation order.
    let ops: [Operation]
    let initial: Value?
    let budget: Int
    /// Indexes into `ops` of the completed operations, by completion time.
    let byCompletion: [Int]
    /// Each completed operation's position in `byCompletion`.
    let completionRank: [Int: Int]
    var steps = 0

    init(_ operations: [Operation], initial: Value?, budget: Int) {
        ops = operations.sorted { ($0.invoked, $0.completed ?? .max) < ($1.invoked, $1.completed ?? .max) }
        self.initial = initial
        self.budget = budget
        let sortedOps = ops
        byCompletion = ops.indices.filter { sortedOps[$0].isComplete }.sorted { sortedOps[$0].completed! < sortedOps[$1].completed! }
        completionRank = Dictionary(uniqueKeysWithValues: byCompletion.enumerated().map { ($1, $0) })
    }

    /// Applies `op` to a register holding `state`: the new value, or nil if `op`'s observed
    /// result is impossible from `state`.
    static func step(_ state: Value?, _ op: Operation) -> Value?? {
        switch op.kind {
        case let .write(v): return .some(v)
        case let .swap(v, previous):
            // Without an answer the previous value was never observed.
            if op.isComplete && previous != state { return nil }
            return .some(v)
        case let .read(v): return v == state ? .some(state) : nil
        }
    }

    struct Placed {
        var op: Int
        var before: Value?
    }

    struct Memo: Hashable {
        var placed: Bitset
        var state: Value?
    }

    mutating func run() -> Outcome {
        let n = ops.count
        let mustPlace = byCompletion.count
        var placed = Bitset(count: n)
        var placedComplete = 0
        var state = initial
        var stack: [Placed] = []
        var seen: Set<Memo> = []
        var cursor = 0
        var longest: [Int] = []
        // The first completed operation (by completion time) not yet placed.
        var firstOpen = 0

        while true {
            if placedComplete == mustPlace { return .linearizable }
            steps += 1
            if steps > budget { return .undecided }
            while placed[byCompletion[firstOpen]] { firstOpen += 1 }
            let deadline = ops[byCompletion[firstOpen]].completed!

            // The next candidate at or after `cursor`: unplaced, invoked no later than the
            // earliest completion among the unplaced operations.
            var candidate: Int?
            var i = cursor
            while i < n && ops[i].invoked <= deadline {
                if !placed[i] { candidate = i; break }
                i += 1
            }
            if let i = candidate {
                cursor = i + 1
                guard let next = Self.step(state, ops[i]) else { continue }
                placed[i] = true
                guard seen.insert(Memo(placed: placed, state: next)).inserted else {
                    placed[i] = false
                    continue
                }
                stack.append(Placed(op: i, before: state))
                state = next
                if ops[i].isComplete { placedComplete += 1 }
                cursor = 0
                if stack.count > longest.count { longest = stack.map(\.op) }
                continue
            }
            // Nothing fits here: undo the last choice and try the one after it.
            guard let last = stack.popLast() else {
                let prefix = longest.map { ops[$0] }
                var done = Bitset(count: n)
                for i in longest { done[i] = true }
                let unplaced = ops.indices.filter { !done[$0] && ops[$0].isComplete }.map { ops[$0] }
                return .violation(prefix: prefix, unplaced: unplaced)
            }
            placed[last.op] = false
            if ops[last.op].isComplete { placedComplete -= 1 }
            if let r = completionRank[last.op] { firstOpen = min(firstOpen, r) }
            state = last.before
            cursor = last.op + 1
        }
    }
}

/// A fixed-size set of operation indexes.
struct Bitset: Hashable {
    var words: [UInt64]

    init(count: Int) { words = Array(repeating: 0, count: (count + 63) / 64) }

    subscript(i: Int) -> Bool {
        get { words[i >> 6] & (1 << UInt64(i & 63)) != 0 }
        set {
            if newValue { words[i >> 6] |= 1 << UInt64(i & 63) } else { words[i >> 6] &= ~(1 << UInt64(i & 63)) }
        }
    }
}
