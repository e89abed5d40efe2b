import Foundation
import Testing
@testable import RDMAPaxos

/// Whether a starting replica may trust its stable log (docs/operations.md, "Durability modes and
/// restarts").
@Suite struct StateTrustTests {
    static func dir() throws -> TempDir {
        let d = TempDir("trust")
        try FileManager.default.createDirectory(atPath: d.path, withIntermediateDirectories: true)
        return d
    }

    @Test func fsyncIsAlwaysTrusted() throws {
        let d = try Self.dir()
        defer { d.remove() }
        #expect(StateTrust.assess(durability: .fsync, dataDir: d.path).intact)
    }

    @Test func memoryModeIsTrustedOnlyAtTheFirstStartInItsDirectory() throws {
        let d = try Self.dir()
        defer { d.remove() }
        #expect(StateTrust.assess(durability: .memory, dataDir: d.path).intact)
        try StateTrust.writeMarker(d.path, clean: false)
        #expect(!StateTrust.assess(durability: .memory, dataDir: d.path).intact)
        // A clean stop does not help: memory keeps nothing.
        try StateTrust.writeMarker(d.path, clean: true)
        #expect(!StateTrust.assess(durability: .memory, dataDir: d.path).intact)
        // Without a directory a restart cannot be recognised (the node warns).
        #expect(StateTrust.assess(durability: .memory, dataDir: "").intact)
    }

    @Test func asyncModeIsTrustedAfterACleanStopOrOnTheSameBoot() throws {
        let d = try Self.dir()
        defer { d.remove() }
        #expect(StateTrust.assess(durability: .async, dataDir: d.path).intact, "a new store")
        #expect(FileManager.default.createFile(atPath: d.path + "/" + BerkeleyDB.metaFile, contents: Data()))
        #expect(!StateTrust.assess(durability: .async, dataDir: d.path).intact, "an existing store without a record of its last run")
        try StateTrust.writeMarker(d.path, clean: false)
        #expect(StateTrust.assess(durability: .async, dataDir: d.path).intact, "the host did not restart: the OS kept every write")
        try Data("boot_id=another-boot\nclean=0\n".utf8).write(to: URL(fileURLWithPath: d.path + "/" + StateTrust.markerFile))
        let afterReboot = StateTrust.assess(durability: .async, dataDir: d.path)
        #expect(!afterReboot.intact && afterReboot.reason.contains("host restarted"))
        try Data("boot_id=another-boot\nclean=1\n".utf8).write(to: URL(fileURLWithPath: d.path + "/" + StateTrust.markerFile))
        #expect(StateTrust.assess(durability: .async, dataDir: d.path).intact, "a clean stop synced the log")
    }
}
