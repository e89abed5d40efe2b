// The persisted "in sync" flag.

import Foundation
import Testing
@testable import VMReplica

@Suite struct SyncStateTests {
    @Test func fileStoreRoundTripsBothStates() throws {
        let dir = try TempDir()
        let store = FileSyncStateStore(path: dir.path + "/state")
        #expect(store.load() == .notInSync(reason: "never synced"))
        try store.store(.inSync(session: 12345))
        #expect(FileSyncStateStore(path: store.path).load() == .inSync(session: 12345))
        try store.store(.notInSync(reason: "cut\noff"))
        #expect(store.load() == .notInSync(reason: "cut off"))
    }

    @Test func longReasonInWideCharactersReadsBackAsItsBoundedPrefix() throws {
        let dir = try TempDir()
        let store = FileSyncStateStore(path: dir.path + "/state")
        // 300 four-byte characters: a prefix of 400 characters would be 1200 bytes.
        try store.store(.notInSync(reason: String(repeating: "\u{1F600}", count: 300)))
        let back = store.load()
        #expect(back == .notInSync(reason: String(repeating: "\u{1F600}", count: 100)), "read back \(back)")
    }

    @Test(arguments: ["", "in-sync 12", "in-sync twelve\n", "garbage\n"])
    func damagedStateFileNeverReadsAsInSync(contents: String) throws {
        let dir = try TempDir()
        let path = dir.path + "/state"
        try Data(contents.utf8).write(to: URL(fileURLWithPath: path))
        #expect(!FileSyncStateStore(path: path).load().isInSync)
    }

    @Test func unwritableLocationIsReportedWithThePath() {
        let store = FileSyncStateStore(path: "/nonexistent-plover-dir/state")
        #expect(throws: SyncStateFileError.self) { try store.store(.inSync(session: 1)) }
    }
}
