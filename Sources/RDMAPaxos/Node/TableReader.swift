import Foundation
import TOMLKit

/// Reads typed values out of one TOML table, naming the full key in every error and
/// rejecting keys nobody asked for (a misspelt key is an error, not a silent default).
public struct TableReader {
    let table: TOMLTable
    let file: String
    let path: String
    private var used: Set<String> = []

    /// Reads `table`, found at dotted `path` (empty at the top) of `file`.
    public init(_ table: TOMLTable, file: String, path: String) {
        self.table = table
        self.file = file
        self.path = path
    }

    /// The full dotted name of `key`, as errors print it.
    public func name(_ key: String) -> String { path.isEmpty ? key : path + "." + key }
    /// An error naming this file and the full key.
    public func error(_ key: String, _ problem: String) -> ConfigError { ConfigError(file: file, key: name(key), problem: problem) }

    /// The raw value of `key`, marking it as read; nil when absent.
    public mutating func value(_ key: String) -> TOMLValueConvertible? {
        used.insert(key)
        return table[key]
    }

    /// A required string.
    public mutating func string(_ key: String) throws(ConfigError) -> String {
        guard let v = try optionalString(key) else { throw error(key, "is required") }
        return v
    }

    /// A string, or nil when absent; any other type is an error.
    public mutating func optionalString(_ key: String) throws(ConfigError) -> String? {
        guard let v = value(key) else { return nil }
        guard let s = v.string else { throw error(key, "must be a string (got \(v.type))") }
        return s
    }

    /// An integer in `range`, or `d` when absent.
    public mutating func int(_ key: String, default d: Int, range: ClosedRange<Int>) throws(ConfigError) -> Int {
        guard let v = value(key) else { return d }
        guard let i = v.int else { throw error(key, "must be an integer (got \(v.type))") }
        guard range.contains(i) else { throw error(key, "must be between \(range.lowerBound) and \(range.upperBound) (got \(i))") }
        return i
    }

    /// A required node id (1 or more).
    public mutating func nodeID(_ key: String) throws(ConfigError) -> NodeID {
        guard value(key) != nil else { throw error(key, "is required") }
        return NodeID(try int(key, default: 0, range: 1...Int(Int32.max)))
    }

    mutating func choice<T: RawRepresentable & CaseIterable>(_ key: String, default d: T) throws(ConfigError) -> T where T.RawValue == String {
        try choice(key, default: d, names: T.allCases.map(\.rawValue)) { T(rawValue: $0) }
    }

    mutating func choice<T>(_ key: String, default d: T, names: [String], _ make: (String) -> T?) throws(ConfigError) -> T {
        guard let s = try optionalString(key) else { return d }
        guard let v = make(s) else { throw error(key, "must be one of \(names.joined(separator: ", ")) (got \"\(s)\")") }
        return v
    }

    /// Checks "host:port" with a numeric port.
    public func address(_ s: String, key: String) throws(ConfigError) -> String {
        guard HostPort(parsing: s) != nil else {
            throw error(key, "must be host:port with a port from 1 to 65535 (got \"\(s)\")")
        }
        return s
    }

    /// A reader of the table `key`, or nil when absent; another type is an error.
    public mutating func subtable(_ key: String) throws(ConfigError) -> TableReader? {
        guard let v = value(key) else { return nil }
        guard let t = v.table else { throw error(key, "must be a table ([\(name(key))])") }
        return TableReader(t, file: file, path: name(key))
    }

    mutating func tableArray(_ key: String) throws(ConfigError) -> [TableReader] {
        guard let v = value(key) else { throw error(key, "is required: add one [[\(name(key))]] table per member") }
        guard let a = v.array else { throw error(key, "must be an array of tables ([[\(name(key))]])") }
        var out: [TableReader] = []
        for i in 0..<a.count {
            guard let t = a[i].table else { throw error("\(key)[\(i)]", "must be a table") }
            out.append(TableReader(t, file: file, path: "\(name(key))[\(i)]"))
        }
        return out
    }

    /// Throws if the table holds a key that was never read.
    public func finish() throws(ConfigError) {
        if let extra = table.keys.sorted().first(where: { !used.contains($0) }) {
            throw error(extra, "unknown key (misspelt?)")
        }
    }

    /// Booleans: `true` or `false`.
    public mutating func bool(_ key: String, default d: Bool) throws(ConfigError) -> Bool {
        guard let v = value(key) else { return d }
        guard let b = v.bool else { throw error(key, "must be true or false (got \(v.type))") }
        return b
    }

    /// The table `[key]` of a config file, for sections that another module reads (`[vm]`);
    /// nil when the file has no such table. Syntax errors are reported like `NodeConfig.load`'s.
    public static func section(_ key: String, ofFile path: String) throws(ConfigError) -> TableReader? {
        guard let data = FileManager.default.contents(atPath: path), let text = String(data: data, encoding: .utf8) else {
            throw ConfigError(file: path, key: nil, problem: "cannot be read as UTF-8 text")
        }
        try NodeConfig.checkTableHeaders(text, file: path)
        let table: TOMLTable
        do { table = try TOMLTable(string: text) } catch { throw ConfigError(file: path, key: nil, problem: "not valid TOML: \(error)") }
        var root = TableReader(table, file: path, path: "")
        return try root.subtable(key)
    }
}
