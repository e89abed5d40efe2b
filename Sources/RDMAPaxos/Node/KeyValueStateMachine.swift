/// An example state machine: a replicated key-value map, used by `plover node` and the demo.
///
/// Commands: `put(key, value)` returns the previous value; `delete(key)` returns the removed
/// value. Queries: `get(key)`. Keys and values are bytes.
public final class KeyValueStateMachine: SnapshotCapturing {
    /// The current map.
    public private(set) var map: [[UInt8]: [UInt8]] = [:]
    /// Index of the last command applied or snapshot restored.
    public private(set) var appliedIndex: LogIndex = 0

    /// An empty map.
    public init() {}

    /// A command of the map, as proposed through the log.
    public enum Command: Equatable, Sendable {
        /// Sets `key` to `value`.
        case put(key: [UInt8], value: [UInt8])
        /// Removes `key`.
        case delete(key: [UInt8])

        /// The command as log payload: an operation byte, then length-prefixed key (and value).
        public func encoded() -> [UInt8] {
            var w = ByteWriter()
            switch self {
            case let .put(k, v): w.u8(1); w.blob(k); w.blob(v)
            case let .delete(k): w.u8(2); w.blob(k)
            }
            return w.bytes
        }

        /// Decodes `encoded()`; throws `DecodeError` on an unknown operation, a key or value above
        /// its limit, or stray bytes.
        public init(decoding bytes: [UInt8]) throws {
            var r = ByteReader(bytes, what: "key-value command")
            switch try r.u8() {
            case 1: self = .put(key: try r.blob(max: Self.keyBytesMax), value: try r.blob(max: Self.valueBytesMax))
            case 2: self = .delete(key: try r.blob(max: Self.keyBytesMax))
            case let op: throw DecodeError("key-value command", "unknown operation \(op)")
            }
            try r.finish()
        }

        /// Largest key accepted: 64 KiB.
        public static let keyBytesMax = 64 << 10
        /// Largest value accepted: 16 MiB.
        public static let valueBytesMax = 16 << 20
    }

    /// The first byte of every result of `apply` and `query`.
    public enum ResultCode: UInt8, Sendable {
        /// There was no value (nothing follows).
        case absent = 0
        /// The value follows.
        case present = 1
        /// The command did not decode; every replica rejected it alike (nothing follows).
        case malformed = 2
    }

    /// Result encoding: `absent`, or `present` followed by the value.
    static func optional(_ v: [UInt8]?) -> [UInt8] { v.map { [ResultCode.present.rawValue] + $0 } ?? [ResultCode.absent.rawValue] }

    /// The code of a result of `put`, `delete` or `get`; nil for bytes no replica returns.
    public static func resultCode(_ bytes: [UInt8]) -> ResultCode? { bytes.first.flatMap(ResultCode.init(rawValue:)) }

    /// Decodes a result of `put`, `delete` or `get`: the value, or nil if there was none.
    public static func decodeResult(_ bytes: [UInt8]) -> [UInt8]? {
        resultCode(bytes) == .present ? Array(bytes.dropFirst()) : nil
    }

    public func apply(_ command: [UInt8], index: LogIndex) -> [UInt8] {
        appliedIndex = index
        // A command that does not decode was proposed by a buggy client; every replica
        // rejects it identically, so the state stays the same everywhere.
        guard let c = try? Command(decoding: command) else { return [ResultCode.malformed.rawValue] }
        switch c {
        case let .put(k, v): return Self.optional(map.updateValue(v, forKey: k))
        case let .delete(k): return Self.optional(map.removeValue(forKey: k))
        }
    }

    public func query(_ key: [UInt8]) -> [UInt8] { Self.optional(map[key]) }

    public func snapshot() -> [UInt8] { Self.encode(map, appliedIndex: appliedIndex) }

    /// The map is a copy-on-write value: capturing it costs nothing until the next put.
    public func captureSnapshot() -> @Sendable () -> [UInt8] {
        let (m, at) = (map, appliedIndex)
        return { Self.encode(m, appliedIndex: at) }
    }

    static func encode(_ map: [[UInt8]: [UInt8]], appliedIndex: LogIndex) -> [UInt8] {
        var w = ByteWriter()
        w.u64(appliedIndex)
        w.u32(UInt32(map.count))
        for (k, v) in map.sorted(by: { $0.key.lexicographicallyPrecedes($1.key) }) { w.blob(k); w.blob(v) }
        return w.bytes
    }

    public func restore(_ snapshot: [UInt8], index: LogIndex) throws {
        var r = ByteReader(snapshot, what: "key-value snapshot")
        var m: [[UInt8]: [UInt8]] = [:]
        let at = try r.u64()
        for _ in 0..<(try r.u32()) {
            m[try r.blob(max: Command.keyBytesMax)] = try r.blob(max: Command.valueBytesMax)
        }
        try r.finish()
        map = m
        appliedIndex = max(at, index)
    }
}
