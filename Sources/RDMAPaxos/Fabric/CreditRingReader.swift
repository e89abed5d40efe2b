/// The reading half of a credit ring (`CreditRing`): takes the sealed records a writer landed in
/// this side's ring, in sequence order, and says when credit is owed back and what cell carries it.
///
/// A record is taken only when its header names the next sequence number (and this reader's
/// session, with `.sessionThenSequence`), its length fits the ring, and its seal verifies; a
/// header that names it but does not verify is still landing (or torn) and is read again later.
public struct CreditRingReader: Hashable, Sendable {
    /// The ring read from.
    public let ring: CreditRing
    /// The session whose records are taken (`.sessionThenSequence`; unused otherwise).
    public let session: UInt64
    /// Unwrapped position of the next record.
    public private(set) var readPosition: UInt64 = 0
    /// Sequence number of the next record.
    public private(set) var nextSequence: UInt64 = 1
    /// The position last reported to the writer in a credit cell.
    public private(set) var creditReturned: UInt64 = 0
    /// Credit must go back at the next chance, however little was read.
    private var creditRequested = false

    /// A reader at the ring's start, for `session`.
    public init(ring: CreditRing, session: UInt64 = 0) {
        self.ring = ring
        self.session = session
    }

    /// A record taken from the ring.
    public struct Record: Hashable, Sendable {
        /// The record's kind, without the credit-wanted bit.
        public var kind: UInt32
        /// The record's sequence number.
        public var sequence: UInt64
        /// The caller's word (`.sequenceThenWord`) or the session.
        public var word: UInt64
        /// The bytes after the header.
        public var payload: [UInt8]
    }

    /// What `next` found at the read position.
    public enum Next: Hashable, Sendable {
        /// Nothing new: not written yet, or a record of an earlier lap or session.
        case empty
        /// A header names the next record but its seal does not verify: it is still landing, or
        /// torn. Nothing was taken; read again later.
        case landing
        /// The next record, taken (wrap markers before it were skipped).
        case record(Record)
        /// A sealed record that breaks the ring's rules (a wrap marker with a payload); nothing
        /// was taken. The string says what.
        case malformed(String)
    }

    /// Offset of the read position from the ring's start.
    public var readOffset: Int { Int(readPosition % UInt64(ring.ringBytes)) }

    /// Whether `header`, read at the read position, names the next record with a length that fits.
    public func claimsNext(_ header: CreditRing.RecordHeader) -> Bool {
        let payloadBytes = header.totalBytes - CreditRing.recordHeaderBytes
        return header.sequence == nextSequence
            && (ring.format.stamp != .sessionThenSequence || header.word == session)
            && payloadBytes >= 0 && payloadBytes <= ring.payloadBytesMax
            && readOffset + CreditRing.stride(header.totalBytes) <= ring.ringBytes
    }

    /// Whether the header at the read position names the next record (cheap: one header, no
    /// seal check). `ringOffset` is where the ring starts in `memory`.
    public func hasRecord(in memory: some RingMemory, at ringOffset: Int) -> Bool {
        let h = memory.withBytes(offset: ringOffset + readOffset, count: CreditRing.recordHeaderBytes) { ring.header($0) }
        return claimsNext(h)
    }

    /// Takes the next record from the ring at `ringOffset` in `memory`, skipping wrap markers.
    public mutating func next(in memory: some RingMemory, at ringOffset: Int) -> Next {
        while true {
            let offset = readOffset
            let claimed = memory.withBytes(offset: ringOffset + offset, count: CreditRing.recordHeaderBytes) { ring.header($0) }
            guard claimsNext(claimed) else { return .empty }
            // The header and the payload come from the bytes the seal covers, not the first read.
            let sealed: (CreditRing.RecordHeader, [UInt8])? = memory.withBytes(offset: ringOffset + offset, count: claimed.totalBytes) { b in
                let body = UnsafeRawBufferPointer(rebasing: b[8...])
                guard CreditRing.u64(b, 0) == CreditRing.checksum(body) else { return nil }
                return (ring.header(b), Array(b[CreditRing.recordHeaderBytes...]))
            }
            guard let (header, payload) = sealed, header == claimed else { return .landing }
            let isWrap = header.kind == ring.format.wrapKind
            if isWrap && !payload.isEmpty { return .malformed("wrap marker \(header.sequence) carries \(payload.count) payload bytes") }
            nextSequence += 1
            var kind = header.kind
            if let bit = ring.format.creditWantedBit, kind & bit != 0 {
                creditRequested = true
                kind &= ~bit
            }
            if isWrap {
                readPosition += UInt64(ring.ringBytes - offset)
                continue
            }
            readPosition += UInt64(CreditRing.stride(header.totalBytes))
            return .record(Record(kind: kind, sequence: header.sequence, word: header.word, payload: payload))
        }
    }

    // MARK: credit

    /// Whether credit is owed to the writer now: it was requested (a record asked, or
    /// `requestCredit()`), or — without lazy credit — anything was read since it was last returned.
    public var creditDue: Bool {
        creditRequested || (ring.format.creditWantedBit == nil && readPosition != creditReturned)
    }

    /// Owes credit at the next chance, however little was read: a new session, or the writer
    /// asked out of band.
    public mutating func requestCredit() { creditRequested = true }

    /// The credit cell reporting the read position, to be written into the writer's memory.
    public func creditCell() -> [UInt8] { ring.creditCell(session: session, position: readPosition) }

    /// Records that a credit cell reporting `position` was posted.
    public mutating func returnedCredit(at position: UInt64) {
        creditReturned = position
        if position == readPosition { creditRequested = false }
    }
}
