import Foundation

/// The shared secret peers prove to each other at connect time.
public struct ClusterKey: Sendable, Equatable {
    /// The secret's bytes.
    public let bytes: [UInt8]

    /// Shortest key accepted, in bytes.
    public static let bytesMin = 16

    /// Wraps `bytes`; throws `ConfigError` when shorter than `bytesMin`.
    public init(bytes: [UInt8]) throws(ConfigError) {
        guard bytes.count >= Self.bytesMin else {
            throw ConfigError(file: "cluster key", key: nil, problem: "must be at least \(Self.bytesMin) bytes (got \(bytes.count))")
        }
        self.bytes = bytes
    }

    /// Reads a key file, refusing one that other users can read (like ssh does with private keys).
    /// Surrounding whitespace is ignored so `openssl rand -hex 32 > FILE` works.
    public static func load(path: String) throws(ConfigError) -> ClusterKey {
        var st = stat()
        guard stat(path, &st) == 0 else {
            throw ConfigError(file: path, key: nil, problem: "cluster key file cannot be read: \(String(cString: strerror(errno)))")
        }
        guard st.st_mode & 0o077 == 0 else {
            throw ConfigError(file: path, key: nil, problem: String(format: "cluster key file is readable by other users (mode %o); run: chmod 600 %@", st.st_mode & 0o777, path))
        }
        guard let data = FileManager.default.contents(atPath: path) else {
            throw ConfigError(file: path, key: nil, problem: "cluster key file cannot be read")
        }
        var bytes = [UInt8](data)
        while let l = bytes.last, l == 0x0A || l == 0x0D || l == 0x20 || l == 0x09 { bytes.removeLast() }
        while let f = bytes.first, f == 0x0A || f == 0x0D || f == 0x20 || f == 0x09 { bytes.removeFirst() }
        do {
            return try ClusterKey(bytes: bytes)
        } catch {
            throw ConfigError(file: path, key: nil, problem: error.problem)
        }
    }
}
