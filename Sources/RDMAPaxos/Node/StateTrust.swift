import Foundation

/// Whether a replica's stable log still holds everything it acknowledged when the process starts
/// (`NodeOptions.stateIntact`), judged from the durability mode and a small marker file the node
/// keeps in its data directory (docs/operations.md, "Durability modes and restarts"):
///
/// - `fsync`: always intact.
/// - `memory`: intact only at the first start in this data directory (no marker yet); any later
///   start has lost everything. Without a data directory a restart cannot be told from a first
///   start, and the replica is treated as new (the caller warns).
/// - `async`: intact at the first start, after a clean stop (the log was synced to disk on the
///   way out), or when the host has not restarted since the last run (same boot id: a crashed
///   process loses nothing the operating system was given). Otherwise the host may have gone
///   down with writes of the last moments, and the replica recovers.
public struct StateTrust: Sendable, Equatable {
    /// Whether the replica may vote at once.
    public var intact: Bool
    /// Why, in words for the log.
    public var reason: String

    /// The marker's file name inside the data directory.
    public static let markerFile = "run-marker"

    /// What the operator said about this start (`plover node --assume-intact` / `--recover`).
    public enum Override: Sendable, Equatable {
        /// Vote at once, whatever the mode says: for bringing back a cluster whose majority lost
        /// state (entries and promises this replica lost are lost to the cluster).
        case assumeIntact
        /// Recover before voting, whatever the mode says: for a replica rebuilt from its peers
        /// with an empty data directory.
        case recover
    }

    /// Judges a replica about to open its store in `dataDir` (before opening it).
    public static func assess(durability: Durability, dataDir: String) -> StateTrust {
        switch durability {
        case .fsync:
            return StateTrust(intact: true, reason: "durability fsync: every acknowledged write is on disk")
        case .memory:
            guard !dataDir.isEmpty else {
                return StateTrust(intact: true, reason: "durability memory without data_dir: a restart cannot be told from a first start, so this start is taken as a first start; set data_dir so that a restarted replica recovers before it votes")
            }
            if readMarker(dataDir) != nil {
                return StateTrust(intact: false, reason: "durability memory: this data directory saw an earlier run, whose log and promises are gone")
            }
            return StateTrust(intact: true, reason: "durability memory: first start in this data directory")
        case .async:
            let storeExists = FileManager.default.fileExists(atPath: dataDir + "/" + BerkeleyDB.metaFile)
            guard storeExists else { return StateTrust(intact: true, reason: "durability async: a new store") }
            guard let m = readMarker(dataDir) else {
                return StateTrust(intact: false, reason: "durability async: the store has no record of how its last run ended (\(markerFile))")
            }
            if m.clean { return StateTrust(intact: true, reason: "durability async: the last run stopped cleanly and synced its log") }
            if let now = bootID(), m.bootID == now {
                return StateTrust(intact: true, reason: "durability async: the host has not restarted since the last run, so the operating system kept every write")
            }
            return StateTrust(intact: false, reason: "durability async: the host restarted since the last run, which did not stop cleanly; writes of its last moments may be lost")
        }
    }

    struct Marker: Equatable {
        var bootID: String
        var clean: Bool
    }

    static func readMarker(_ dataDir: String) -> Marker? {
        guard let data = FileManager.default.contents(atPath: dataDir + "/" + markerFile),
              let text = String(data: data, encoding: .utf8) else { return nil }
        var m = Marker(bootID: "", clean: false)
        for line in text.split(separator: "\n") {
            let kv = line.split(separator: "=", maxSplits: 1).map(String.init)
            guard kv.count == 2 else { continue }
            if kv[0] == "boot_id" { m.bootID = kv[1] }
            if kv[0] == "clean" { m.clean = kv[1] == "1" }
        }
        return m
    }

    /// This boot of the host (Linux's random boot id); nil where there is none.
    static func bootID() -> String? {
        guard let d = FileManager.default.contents(atPath: "/proc/sys/kernel/random/boot_id") else { return nil }
        return String(decoding: d, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// Records a run of the replica in `dataDir` (`clean`: every acknowledged write is on disk, as
    /// in fsync mode or after a clean stop that synced the log),
    /// durably: written to a temporary file, synced, renamed over the marker, directory synced.
    static func writeMarker(_ dataDir: String, clean: Bool) throws {
        let path = dataDir + "/" + markerFile
        let tmp = path + ".tmp"
        let text = "boot_id=\(bootID() ?? "unknown")\nclean=\(clean ? 1 : 0)\n"
        let fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        guard fd >= 0 else { throw MarkerError(path: tmp, errno: errno) }
        let bytes = Array(text.utf8)
        let written = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        let synced = fsync(fd)
        close(fd)
        guard written == bytes.count, synced == 0 else { throw MarkerError(path: tmp, errno: errno) }
        guard rename(tmp, path) == 0 else { throw MarkerError(path: path, errno: errno) }
        let dir = open(dataDir, O_RDONLY)
        if dir >= 0 {
            _ = fsync(dir)
            close(dir)
        }
    }

    /// The marker could not be written.
    struct MarkerError: Error, CustomStringConvertible {
        var path: String
        var errno: Int32
        var description: String { "cannot write \(path): \(String(cString: strerror(errno)))" }
    }
}
