import Foundation

/// An example state machine: a replicated key-value map, used by `plover node` and the demo.
///
/// Commands: `put(key, value)` returns the previous value; `delete(key)` returns the removed
/// value. Queries: `get(key)`. Keys and values are bytes.
///
/// The map is held in `shardCount` copy-on-write shards (by a hash of the key), so that a
/// snapshot's capture costs the node's loop one shard copy per put that follows it rather than
/// one copy of the whole map at the first put: with a million keys that copy took half a second,
/// longer than an election timeout (docs/design/runtime.md, "Compaction without a stall").
public final class KeyValueStateMachine: SnapshotCapturing {
    /// Shards of the map; a key lives in `shards[shard(of: key)]`.
    private(set) var shards: [[[UInt8]: [UInt8]]] = Array(repeating: [:], count: KeyValueStateMachine.shardCount)
    /// Index of the last command applied or snapshot restored.
    public private(set) var appliedIndex: LogIndex = 0

    /// Shards the map is held in: after a capture, a put copies one shard, about 1/16,384 of the map.
    static let shardCount = 1 << 14

    /// The whole map, merged from its shards (a copy: for tests and tools, not for the data path).
    public var map: [[UInt8]: [UInt8]] {
        var all: [[UInt8]: [UInt8]] = [:]
        all.reserveCapacity(shards.reduce(0) { $0 + $1.count })
        for s in shards where !s.isEmpty { all.merge(s) { a, _ in a } }
        return all
    }

    /// The shard of `key`: FNV-1a over its bytes (the same in every process).
    static func shard(of key: [UInt8]) -> Int {
        var h: UInt32 = 2_166_136_261
        for b in key { h = (h ^ UInt32(b)) &* 16_777_619 }
        return Int(h % UInt32(shardCount))
    }

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
        case let .put(k, v): return Self.optional(shards[Self.shard(of: k)].updateValue(v, forKey: k))
        case let .delete(k): return Self.optional(shards[Self.shard(of: k)].removeValue(forKey: k))
        }
    }

    public func query(_ key: [UInt8]) -> [UInt8] { Self.optional(shards[Self.shard(of: key)][key]) }

    public func snapshot() -> [UInt8] { Self.encode(shards, appliedIndex: appliedIndex) }

    /// The shards are copy-on-write values: capturing them copies only the outer array; each
    /// shard is copied when a put first changes it afterwards.
    public func captureSnapshot() -> @Sendable () -> [UInt8] {
        let (s, at) = (shards, appliedIndex)
        return { Self.encode(s, appliedIndex: at) }
    }

    /// Every key in byte order, so that replicas with the same state write the same bytes.
    static func encode(_ shards: [[[UInt8]: [UInt8]]], appliedIndex: LogIndex) -> [UInt8] {
        var pairs: [(key: [UInt8], value: [UInt8])] = []
        pairs.reserveCapacity(shards.reduce(0) { $0 + $1.count })
        for s in shards { pairs.append(contentsOf: s.lazy.map { (key: $0.key, value: $0.value) }) }
        pairs.sort { bytesPrecede($0.key, $1.key) }
        var w = ByteWriter(capacity: pairs.reduce(12) { $0 + 8 + $1.key.count + $1.value.count })
        w.u64(appliedIndex)
        w.u32(UInt32(pairs.count))
        for (k, v) in pairs { w.blob(k); w.blob(v) }
        return w.bytes
    }

    /// Byte order, a common prefix putting the shorter first: `lexicographicallyPrecedes`'s
    /// order through `memcmp`. The generic comparison walks both arrays an element at a time; on
    /// a few hundred thousand keys it was most of a snapshot's encoding, which every replica
    /// runs at about the same time (benchmarks/consensus/README.md, "What compaction costs").
    static func bytesPrecede(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        a.withUnsafeBufferPointer { x in
            b.withUnsafeBufferPointer { y in
                let common = min(x.count, y.count)
                let c = common == 0 ? 0 : memcmp(x.baseAddress!, y.baseAddress!, common)
                return c != 0 ? c < 0 : x.count < y.count
            }
        }
    }

    public func restore(_ snapshot: [UInt8], index: LogIndex) throws {
        var r = ByteReader(snapshot, what: "key-value snapshot")
        var m: [[[UInt8]: [UInt8]]] = Array(repeating: [:], count: Self.shardCount)
        let at = try r.u64()
        for _ in 0..<(try r.u32()) {
            let k = try r.blob(max: Command.keyBytesMax)
            m[Self.shard(of: k)][k] = try r.blob(max: Command.valueBytesMax)
        }
        try r.finish()
        shards = m
        appliedIndex = max(at, index)
    }
}
