/// The writing half of a credit ring (`CreditRing`): where the next record goes, whether the
/// credit the reader returned leaves room for it, and the sealed bytes to write.
///
/// Positions are unwrapped byte counts; the offset in the ring is `position mod ringBytes`.
/// `append` only plans: the caller posts the writes it returns, in order, and reports each
/// posted one with `posted(_:)`, so a write that could not be posted leaves the state as it was.
public struct CreditRingWriter: Hashable, Sendable {
    /// The ring written into.
    public let ring: CreditRing
    /// The session every record carries (`.sessionThenSequence`; unused otherwise).
    public let session: UInt64
    /// End of the last record posted.
    public private(set) var writePosition: UInt64 = 0
    /// How far the reader said it consumed.
    public private(set) var creditPosition: UInt64 = 0
    /// Sequence number of the next record.
    public private(set) var nextSequence: UInt64 = 1
    /// End of the last record that asked for credit; the next may ask once credit reached it.
    private var askedUpTo: UInt64 = 0

    /// A writer at the ring's start, for `session`.
    public init(ring: CreditRing, session: UInt64 = 0) {
        self.ring = ring
        self.session = session
    }

    /// One write into the reader's ring.
    public struct Write: Hashable, Sendable {
        /// Where the bytes go, from the ring's start.
        public let offset: Int
        /// The sealed record.
        public let bytes: [UInt8]
        /// A wrap marker (no payload) rather than a record the caller asked for.
        public let isWrapMarker: Bool
        /// The record carries the credit-wanted bit.
        public let asksForCredit: Bool
        let position: UInt64
        let end: UInt64
        let sequence: UInt64
    }

    /// The writes that append one record: a wrap marker first when the record would cross the
    /// ring's end, then the record at the start.
    public struct Append: Hashable, Sendable {
        /// Sends the reader back to the ring's start; post it before `record`.
        public let wrapMarker: Write?
        /// The record itself.
        public let record: Write
    }

    /// Bytes written and not yet credited.
    public var uncreditedBytes: Int { Int(writePosition - creditPosition) }

    /// Ring bytes the next record of `payloadBytes` takes, with the wrap waste before it when it
    /// would cross the ring's end.
    public func bytesNeeded(payloadBytes: Int) -> Int {
        let stride = CreditRing.recordBytes(payloadBytes: payloadBytes)
        let offset = Int(writePosition % UInt64(ring.ringBytes))
        return offset + stride > ring.ringBytes ? ring.ringBytes - offset + stride : stride
    }

    /// Whether the credit received leaves room for a record of `payloadBytes`.
    public func fits(payloadBytes: Int) -> Bool {
        uncreditedBytes + bytesNeeded(payloadBytes: payloadBytes) <= ring.ringBytes
    }

    /// Takes the reader's consumed position. Ignored (false) beyond what was written — a cell
    /// about another session's ring — and never moves credit backwards.
    @discardableResult
    public mutating func takeCredit(consumed: UInt64) -> Bool {
        guard consumed <= writePosition else { return false }
        creditPosition = max(creditPosition, consumed)
        return true
    }

    /// Takes the credit in a credit cell the reader wrote (`CreditRing.cellBytes`); false when
    /// the cell is unsealed, of another session, or beyond what was written.
    @discardableResult
    public mutating func takeCredit(cell: UnsafeRawBufferPointer) -> Bool {
        guard let consumed = ring.consumedPosition(cell: cell, session: session) else { return false }
        return takeCredit(consumed: consumed)
    }

    /// The writes that append a record of `kind` (never the wrap kind or the credit-wanted bit)
    /// carrying `payload` (at most `ring.payloadBytesMax`); `word` fills the caller's word of
    /// `.sequenceThenWord` records. Nil when the credit leaves no room. With lazy credit the
    /// record asks for credit when, after it, more than a quarter of the ring is uncredited and
    /// no earlier asking record is still unanswered.
    public func append(kind: UInt32, word: UInt64 = 0, payload: ArraySlice<UInt8>) -> Append? {
        precondition(payload.count <= ring.payloadBytesMax, "a record payload of \(payload.count) bytes exceeds \(ring.payloadBytesMax)")
        precondition(kind != ring.format.wrapKind && kind & (ring.format.creditWantedBit ?? 0) == 0,
                     "record kind \(kind) is reserved by the ring")
        guard fits(payloadBytes: payload.count) else { return nil }
        let ringBytes = UInt64(ring.ringBytes)
        let stride = UInt64(CreditRing.recordBytes(payloadBytes: payload.count))
        let stamp = ring.format.stamp == .sessionThenSequence ? session : word
        var position = writePosition, sequence = nextSequence
        var marker: Write?
        let offset = position % ringBytes
        if offset + stride > ringBytes {
            let bytes = ring.record(kind: ring.format.wrapKind, sequence: sequence,
                                    word: ring.format.stamp == .sessionThenSequence ? session : 0, payload: [])
            marker = Write(offset: Int(offset), bytes: bytes, isWrapMarker: true, asksForCredit: false,
                           position: position, end: position + ringBytes - offset, sequence: sequence)
            position += ringBytes - offset
            sequence += 1
        }
        var kind = kind
        let asks = ring.format.creditWantedBit != nil && position + stride - creditPosition > ringBytes / 4
            && creditPosition >= askedUpTo
        if asks, let bit = ring.format.creditWantedBit { kind |= bit }
        let record = Write(offset: Int(position % ringBytes), bytes: ring.record(kind: kind, sequence: sequence, word: stamp, payload: payload),
                           isWrapMarker: false, asksForCredit: asks, position: position, end: position + stride, sequence: sequence)
        return Append(wrapMarker: marker, record: record)
    }

    /// `append` for a whole array.
    public func append(kind: UInt32, word: UInt64 = 0, payload: [UInt8]) -> Append? {
        append(kind: kind, word: word, payload: payload[...])
    }

    /// Records that `write` was posted: the next write goes after it. Writes of one `Append`
    /// are reported in order, each once, before the next `append`.
    public mutating func posted(_ write: Write) {
        precondition(write.position == writePosition && write.sequence == nextSequence,
                     "ring writes are reported in the order append returned them, each once")
        writePosition = write.end
        nextSequence += 1
        if write.asksForCredit { askedUpTo = write.end }
    }
}
