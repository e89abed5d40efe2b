import RDMAPaxosCore

// Sizes: commands larger than a batch, a state machine whose snapshot is large, and the limits
// the real transport puts on one message (it drops what exceeds them, so a message over them
// is a violation here rather than a silent loss).
extension Simulation {
    /// Bytes an entry takes in a message besides its payload, as the core's batching counts them.
    static let entryOverheadBytes = 32

    /// The command for client write `n`: short, or (`largeCommandShare`) two to five times the
    /// batch limit, so it travels alone in its accept and in a witness's hand-over.
    mutating func command(_ n: Int) -> [UInt8] {
        var cmd = Array("c\(n)".utf8)
        if options.largeCommandShare > 0, chance(options.largeCommandShare) {
            let batch = replicaConfig(ids[0]).batchBytesMax
            cmd += [UInt8](repeating: UInt8(ascii: "."), count: batch * (2 + rng.below(4)))
        }
        return cmd
    }

    /// The transport's limits: entries beyond the first fit the batch limit, a snapshot chunk
    /// fits the chunk size, and no message carries more than `messageBytesMax` of entries or data.
    func checkTransportLimits(_ m: Message) throws(SimulationFailure) {
        let config = replicaConfig(m.from)
        var bytes = 0
        switch m.body {
        case let .accept(_, _, entries, _), let .promise(_, _, entries, _):
            bytes = entries.reduce(0) { $0 + $1.payload.count + Self.entryOverheadBytes }
            if entries.count > 1, bytes > config.batchBytesMax {
                throw fail("node \(m.from) sent \(m.to) \(entries.count) entries of \(bytes) bytes in one message, over the batch limit of \(config.batchBytesMax)")
            }
        case let .installSnapshot(c):
            bytes = c.data.count
            if bytes > max(1, config.snapshotChunkBytes) {
                throw fail("node \(m.from) sent \(m.to) a snapshot chunk of \(bytes) bytes, over the chunk size \(config.snapshotChunkBytes)")
            }
        default:
            return
        }
        if bytes > options.messageBytesMax {
            throw fail("node \(m.from) sent \(m.to) a message carrying \(bytes) bytes, over the transport's limit of \(options.messageBytesMax): the real transport drops it")
        }
    }
}

/// The simulated state machine's snapshot: the commands with their indices, then `filler` bytes
/// of a fixed pattern standing for a large state (checked when the snapshot is restored).
func encodeState(_ s: [StateEntry], filler: Int) -> [UInt8] {
    var w = ByteWriter()
    w.u32(UInt32(s.count))
    for c in s {
        w.u64(c.index)
        w.blob(c.payload)
    }
    w.blob(fillerBytes(filler))
    return w.bytes
}

func fillerBytes(_ n: Int) -> [UInt8] { (0..<n).map { UInt8(truncatingIfNeeded: $0 % 251) } }

/// Decodes a snapshot; nil when it is not one `encodeState` wrote with `filler` bytes of filler.
func decodeState(_ b: [UInt8], filler: Int) -> [StateEntry]? {
    guard !b.isEmpty else { return [] }
    var r = ByteReader(b, what: "simulated state")
    guard let n = try? r.u32() else { return nil }
    var out: [StateEntry] = []
    for _ in 0..<n {
        guard let i = try? r.u64(), let p = try? r.blob(max: 1 << 20) else { return nil }
        out.append(StateEntry(index: i, payload: p))
    }
    guard let f = try? r.blob(max: 1 << 24), f == fillerBytes(filler) else { return nil }
    return out
}
