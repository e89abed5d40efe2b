import RDMAPaxosCore

/// Seeded random inputs and mutations for bad-input tests: deterministic for a seed, so a
/// failing input can be replayed from its seed and iteration.
public struct Fuzzer: Sendable {
    private var random: SeededRandom

    /// A fuzzer whose every draw is determined by `seed`.
    public init(seed: UInt64) { random = SeededRandom(seed: seed) }

    /// The core's SplitMix64 sequence for this seed.
    public mutating func next() -> UInt64 { random.next() }

    /// Uniform in 0..<n (n > 0).
    public mutating func below(_ n: Int) -> Int {
        precondition(n > 0)
        return Int(next() % UInt64(n))
    }

    /// One random byte.
    public mutating func byte() -> UInt8 { UInt8(truncatingIfNeeded: next()) }
    /// `n` random bytes.
    public mutating func bytes(_ n: Int) -> [UInt8] { (0..<n).map { _ in byte() } }
    /// 0 to `maxCount` random bytes.
    public mutating func randomBytes(maxCount: Int) -> [UInt8] { bytes(below(maxCount + 1)) }

    /// Boundary values that length and count fields trip over.
    public static let interestingU32: [UInt32] = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x1_0000, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFE, 0xFFFF_FFFF]

    /// One to four random edits of `input`: bit flips, byte stores, boundary u32s written over
    /// length fields, insertions, deletions, truncation, duplicated ranges.
    public mutating func mutate(_ input: [UInt8]) -> [UInt8] {
        var b = input
        for _ in 0..<(1 + below(4)) {
            switch below(8) {
            case 0 where !b.isEmpty:
                b[below(b.count)] ^= 1 << UInt8(below(8))
            case 1 where !b.isEmpty:
                b[below(b.count)] = [0, 1, 0x7F, 0x80, 0xFF, byte()][below(6)]
            case 2 where b.count >= 4:
                let at = below(b.count - 3)
                let v = Self.interestingU32[below(Self.interestingU32.count)]
                for k in 0..<4 { b[at + k] = UInt8(truncatingIfNeeded: v >> UInt32(24 - 8 * k)) }
            case 3:
                b.insert(contentsOf: randomBytes(maxCount: 16), at: below(b.count + 1))
            case 4 where !b.isEmpty:
                let at = below(b.count)
                b.removeSubrange(at..<min(b.count, at + 1 + below(16)))
            case 5:
                b = Array(b.prefix(below(b.count + 1)))
            case 6 where !b.isEmpty:
                let at = below(b.count)
                let chunk = b[at..<min(b.count, at + 1 + below(32))]
                b.insert(contentsOf: chunk, at: below(b.count + 1))
            default:
                b.append(contentsOf: randomBytes(maxCount: 8))
            }
        }
        return b
    }

    /// Text edits that TOML parsers and config readers trip over.
    public static let tomlSnippets = [
        "[", "]", "[[", "]]", "=", "\"", "'", "#", "\n", ",", "{", "}", ".", "-", "+", "0", " ", "\t",
        "9223372036854775807", "-9223372036854775808", "99999999999999999999", "-1", "1e400", "0x7fffffff",
        "inf", "nan", "1_000", "true", "1979-05-27T07:32:00Z", "\"\"\"", "'''", "\\u0000", "\\", "é", "\u{0}",
        "id", "members", "[[members]]", "[timing]", "[limits]", "address", "\"127.0.0.1:\"", "\":65536\"",
        "priority = 256", "role = \"witness\"", "id = 0", "= =", "a.b.c = 1", "[members]", "x = [1, [2]]",
    ]

    /// One to three line edits of `text`: deletions, duplicates, swaps, values replaced or
    /// snippets inserted from `tomlSnippets`.
    public mutating func mutate(text: String) -> String {
        var lines = text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        for _ in 0..<(1 + below(3)) {
            let i = below(lines.count)
            switch below(7) {
            case 0: lines.remove(at: i); if lines.isEmpty { lines = [""] }
            case 1: lines.insert(lines[i], at: below(lines.count + 1))
            case 2: lines.swapAt(i, below(lines.count))
            case 3:
                // Replace the value after "=" with a snippet.
                if let eq = lines[i].firstIndex(of: "=") {
                    lines[i] = String(lines[i][...eq]) + " " + Self.tomlSnippets[below(Self.tomlSnippets.count)]
                }
            default:
                // Insert a snippet at a random character position.
                var chars = Array(lines[i])
                chars.insert(contentsOf: Self.tomlSnippets[below(Self.tomlSnippets.count)], at: below(chars.count + 1))
                lines[i] = String(chars)
            }
        }
        return lines.joined(separator: "\n")
    }
}
