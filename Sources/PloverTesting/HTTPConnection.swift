import Foundation
import RDMAPaxos

/// One keep-alive HTTP/1.1 connection over a blocking POSIX socket: enough of the protocol to
/// POST JSON to etcd's v3 gateway and read the answer (Content-Length or chunked bodies).
/// Not thread-safe: one connection per thread.
final class HTTPConnection {
    struct Failure: Error, CustomStringConvertible {
        var description: String
    }

    let host: String
    let port: Int
    let timeout: Duration
    private var socket: SocketDescriptor?
    /// Received bytes not consumed yet, from `start`.
    private var buffer = [UInt8]()
    private var start = 0

    init(host: String, port: Int, timeout: Duration = .seconds(5)) {
        self.host = host
        self.port = port
        self.timeout = timeout
    }

    deinit { close() }

    func close() {
        socket?.close()
        socket = nil
        buffer = []
        start = 0
    }

    /// POSTs `body` (JSON) to `path`; returns the status code and the response body.
    /// Reconnects once if a kept-alive connection turns out to be closed.
    func post(_ path: String, body: [UInt8]) throws -> (status: Int, body: [UInt8]) {
        let fresh = socket == nil
        do {
            return try exchange(path, body)
        } catch {
            close()
            if fresh { throw error }
            return try exchange(path, body)
        }
    }

    private func exchange(_ path: String, _ body: [UInt8]) throws -> (status: Int, body: [UInt8]) {
        if socket == nil { try connect() }
        var request = Array("POST \(path) HTTP/1.1\r\nHost: \(host):\(port)\r\nContent-Type: application/json\r\nContent-Length: \(body.count)\r\n\r\n".utf8)
        request += body
        try sendAll(request)
        let head = try readHead()
        var lines = head.split(separator: "\r\n", omittingEmptySubsequences: false)
        let statusLine = lines.removeFirst().split(separator: " ")
        guard statusLine.count >= 2, statusLine[0].hasPrefix("HTTP/1."), let status = Int(statusLine[1]) else {
            throw Failure(description: "\(host):\(port) sent a malformed status line")
        }
        var length: Int?
        var chunked = false
        var closeAfter = statusLine[0] == "HTTP/1.0"
        for line in lines {
            guard let colon = line.firstIndex(of: ":") else { continue }
            let name = line[..<colon].lowercased()
            let value = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces).lowercased()
            switch name {
            case "content-length": length = Int(value)
            case "transfer-encoding": chunked = value.contains("chunked")
            case "connection": closeAfter = value == "close"
            default: break
            }
        }
        let answer: [UInt8]
        if chunked {
            answer = try readChunked()
        } else if let length {
            answer = try readBytes(length)
        } else {
            throw Failure(description: "\(host):\(port) sent a response without a length")
        }
        if closeAfter { close() }
        return (status, answer)
    }

    // MARK: Socket

    private func connect() throws {
        do { socket = try SocketDescriptor.connect(to: HostPort(host: host, port: port), timeout: timeout) } catch {
            throw Failure(description: "\(error)")
        }
    }

    private func sendAll(_ bytes: [UInt8]) throws {
        guard let socket else { throw Failure(description: "not connected to \(host):\(port)") }
        do { try socket.send(bytes) } catch { throw Failure(description: "\(error)") }
    }

    /// Reads more bytes into the buffer (at least one).
    private func fill() throws {
        if start > 0 && start == buffer.count {
            buffer.removeAll(keepingCapacity: true)
            start = 0
        }
        guard let socket else { throw Failure(description: "not connected to \(host):\(port)") }
        let chunk: [UInt8]
        do { chunk = try socket.receive(upTo: 16 << 10) } catch {
            throw Failure(description: "recv from \(host):\(port): \(error.errno == EAGAIN ? "timed out" : String(cString: strerror(error.errno)))")
        }
        buffer += chunk
        if chunk.isEmpty { throw Failure(description: "\(host):\(port) closed the connection") }
    }

    /// The status line and headers, without the blank line that ends them.
    private func readHead() throws -> String {
        var scanned = 0  // bytes after `start` known not to begin the blank line
        while true {
            if buffer.count - start - scanned >= 4 {
                for i in (start + scanned)...(buffer.count - 4)
                where buffer[i] == 13 && buffer[i + 1] == 10 && buffer[i + 2] == 13 && buffer[i + 3] == 10 {
                    let head = String(decoding: buffer[start..<i], as: UTF8.self)
                    start = i + 4
                    return head
                }
                scanned = buffer.count - start - 3
            }
            guard buffer.count - start < 64 << 10 else { throw Failure(description: "\(host):\(port) sent over 64 KiB of headers") }
            try fill()
        }
    }

    private func readBytes(_ n: Int) throws -> [UInt8] {
        while buffer.count - start < n { try fill() }
        defer { start += n }
        return Array(buffer[start..<start + n])
    }

    private func readLine() throws -> String {
        while true {
            if let i = buffer[start...].firstIndex(of: 10) {
                let line = String(decoding: buffer[start..<i], as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
                start = i + 1
                return line
            }
            try fill()
        }
    }

    private func readChunked() throws -> [UInt8] {
        var out = [UInt8]()
        while true {
            let sizeField = try readLine().split(separator: ";").first.map(String.init) ?? ""
            guard let size = Int(sizeField, radix: 16) else { throw Failure(description: "\(host):\(port) sent a bad chunk size") }
            if size == 0 {
                while try !readLine().isEmpty {}  // trailers, then the blank line
                return out
            }
            out += try readBytes(size)
            _ = try readLine()
        }
    }
}
