import Foundation
import RDMAPaxos

/// How entries look in `dump` and `tail`.
enum Formatting {
    static let previewBytes = 32

    static func kind(_ k: EntryKind) -> String {
        switch k {
        case .noop: "noop"
        case .command: "command"
        case .membership: "membership"
        }
    }

    static func hex(_ bytes: ArraySlice<UInt8>) -> String {
        let digits = Array("0123456789abcdef".utf8)
        var out: [UInt8] = []
        out.reserveCapacity(bytes.count * 2)
        for b in bytes { out.append(digits[Int(b >> 4)]); out.append(digits[Int(b & 15)]) }
        return String(decoding: out, as: UTF8.self)
    }

    static func printable(_ bytes: ArraySlice<UInt8>) -> String {
        String(decoding: bytes.map { (0x20..<0x7f).contains($0) ? $0 : UInt8(ascii: ".") }, as: UTF8.self)
    }

    /// `index  ballot  kind  size  hex…  |preview|`, or the problem for a record that cannot be trusted.
    static func text(_ r: LogStoreReader.Record) -> String {
        switch r.entry {
        case let .success(e):
            let head = e.payload.prefix(previewBytes)
            let more = e.payload.count > previewBytes ? "…" : ""
            return "\(e.index)\t\(e.ballot)\t\(kind(e.kind))\t\(e.payload.count)\t\(hex(head))\(more)\t|\(printable(head))|\(more)"
        case let .failure(p):
            return "\(r.index)\tCORRUPT\t\(p.detail)"
        }
    }

    /// One JSON object per line; the payload in full, base64.
    static func json(_ r: LogStoreReader.Record) -> String {
        switch r.entry {
        case let .success(e):
            return "{\"index\":\(e.index),\"ballot\":{\"term\":\(e.ballot.term),\"node\":\(e.ballot.node)},"
                + "\"kind\":\"\(kind(e.kind))\",\"size\":\(e.payload.count),\"payload\":\"\(Data(e.payload).base64EncodedString())\"}"
        case let .failure(p):
            return "{\"index\":\(r.index),\"error\":\(quoted(p.detail)),\"raw\":\"\(Data(r.value).base64EncodedString())\"}"
        }
    }

    static func quoted(_ s: String) -> String {
        var out = "\""
        for u in s.unicodeScalars {
            switch u {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case _ where u.value < 0x20: out += String(format: "\\u%04x", u.value)
            default: out.unicodeScalars.append(u)
            }
        }
        return out + "\""
    }

    static func membership(_ m: Membership) -> String {
        m.members.isEmpty ? "none" : m.members.map { "\($0.id)(\($0.role),p\($0.priority))" }.joined(separator: " ")
    }
}
