// Guest-memory views over files (QEMU's memory-backend-file) and their error messages.

import Foundation
import Testing
@testable import VMReplica

/// A scratch directory removed when the value goes away.
final class TempDir {
    let path: String

    init() throws {
        var template = Array((FileManager.default.temporaryDirectory.path + "/plover-vmreplica-XXXXXX").utf8CString)
        guard let p = mkdtemp(&template) else { throw CocoaError(.fileWriteUnknown) }
        path = String(cString: p)
    }

    deinit { try? FileManager.default.removeItem(atPath: path) }

    /// Creates a file of `bytes` bytes, each byte its offset modulo 251.
    func file(_ name: String, bytes: Int) throws -> String {
        let p = path + "/" + name
        let data = Data((0..<bytes).map { UInt8($0 % 251) })
        try data.write(to: URL(fileURLWithPath: p))
        return p
    }
}

@Suite struct GuestMemoryTests {
    @Test func mappedFileExposesItsPages() throws {
        let dir = try TempDir()
        let path = try dir.file("ram", bytes: 16 * 4096)
        let m = try GuestMemory(mappingFile: path, writable: false)
        #expect(m.pageCount == 16 && m.pageSize == 4096 && m.byteCount == 65536)
        #expect(!m.isWritable && m.path == path)
        #expect(m.page(3)[0] == UInt8(3 * 4096 % 251))
        #expect(m.page(15)[4095] == UInt8((16 * 4096 - 1) % 251))
    }

    @Test func writesThroughASharedMappingReachTheFileAndOtherMappings() throws {
        let dir = try TempDir()
        let path = try dir.file("ram", bytes: 4 * 4096)
        let writer = try GuestMemory(mappingFile: path, writable: true)
        let reader = try GuestMemory(mappingFile: path, writable: false)
        let page = [UInt8](repeating: 0xAB, count: 4096)
        page.withUnsafeBytes { writer.writePage(2, from: $0) }
        #expect(reader.page(2).allSatisfy { $0 == 0xAB })
        let onDisk = try Data(contentsOf: URL(fileURLWithPath: path))
        #expect(onDisk[2 * 4096] == 0xAB && onDisk[2 * 4096 - 1] == UInt8((2 * 4096 - 1) % 251))
    }

    @Test func missingFileIsNamed() {
        let path = "/nonexistent-plover-dir/ram"
        #expect(throws: GuestMemoryError.fileMissing(path: path)) {
            try GuestMemory(mappingFile: path, writable: false)
        }
        #expect("\(GuestMemoryError.fileMissing(path: path))".contains(path))
    }

    @Test func sizeThatIsNotAPageMultipleIsRejected() throws {
        let dir = try TempDir()
        let path = try dir.file("ram", bytes: 4096 + 100)
        let e = GuestMemoryError.sizeNotPageMultiple(path: path, bytes: 4196, pageSize: 4096)
        #expect(throws: e) { try GuestMemory(mappingFile: path, writable: true) }
        #expect("\(e)".contains(path) && "\(e)".contains("4196"))
    }

    @Test func emptyFileIsRejected() throws {
        let dir = try TempDir()
        let path = try dir.file("ram", bytes: 0)
        #expect(throws: GuestMemoryError.empty(path: path)) { try GuestMemory(mappingFile: path, writable: false) }
    }

    @Test func directoryCannotBeMapped() throws {
        let dir = try TempDir()
        #expect(throws: GuestMemoryError.self) { try GuestMemory(mappingFile: dir.path, writable: true) }
    }

    @Test func anonymousMemoryStartsZeroed() throws {
        let m = try GuestMemory(pageCount: 10)
        #expect(m.bytes.allSatisfy { $0 == 0 })
        #expect(m.path == nil && m.isWritable)
        #expect(throws: GuestMemoryError.invalidGeometry(pageCount: 0, pageSize: 4096)) { try GuestMemory(pageCount: 0) }
    }
}

@Suite struct GuestMemoryTrailerTests {
    @Test func trailerFollowsTheFileMappingAndStaysOutOfTheFile() throws {
        let dir = try TempDir()
        let path = try dir.file("ram", bytes: 8 * 4096)
        let m = try GuestMemory(mappingFile: path, writable: true, trailingBytes: 1000)
        #expect(m.pageCount == 8 && m.trailerOffset == 8 * 4096 && m.trailingBytes == 1000)
        let trailer = UnsafeMutableRawBufferPointer(rebasing: m.mappedRange[m.trailerOffset...])
        #expect(trailer.count == 1000 && trailer.allSatisfy { $0 == 0 })
        trailer[999] = 0xEE
        m.withMutablePage(7) { $0[4095] = 0x5A }
        let again = try GuestMemory(mappingFile: path, writable: false)
        #expect(again.byteCount == 8 * 4096)
        #expect(again.page(7)[4095] == 0x5A)
        #expect(again.page(0)[1] == 1)
    }

    @Test func anonymousTrailerStartsOnASystemPageAfterTheRAM() throws {
        let m = try GuestMemory(pageCount: 3, pageSize: 512, trailingBytes: 64)
        #expect(m.byteCount == 1536 && m.trailerOffset % 4096 == 0 && m.trailerOffset >= 1536)
        #expect(m.mappedRange.count == m.trailerOffset + 64)
    }
}
