import CBerkeleyDBHash
import Foundation
import Testing
@testable import RDMAPaxos

/// The log-record hash this package gives Berkeley DB in place of its own
/// (docs/design/stable-log.md, "The log's checksum").
@Suite struct BerkeleyDBLogHashTests {
    typealias Hash = @convention(c) (UnsafeMutableRawPointer?, UnsafeRawPointer?, UInt32) -> UInt32

    /// The address of libdb's own `__ham_func4`, looked up in libdb itself rather than in the
    /// process's scope.
    static func libdbsOwnAddress() throws -> UnsafeMutableRawPointer {
        let handle = try #require(dlopen("libdb-5.3.so", RTLD_LAZY | RTLD_NOLOAD), "libdb-5.3.so is not loaded")
        return try #require(dlsym(handle, "__ham_func4"), "libdb-5.3.so has no __ham_func4")
    }

    @Test func itGivesWhatBerkeleyDBsOwnGives() throws {
        let own = unsafeBitCast(try Self.libdbsOwnAddress(), to: Hash.self)
        var rng = SystemRandomNumberGenerator()
        var bytes = (0..<(70_000)).map { _ in UInt8.random(in: 0...255, using: &rng) }
        func check(_ offset: Int, _ length: Int) {
            bytes.withUnsafeBytes { all in
                let p = all.baseAddress! + offset
                let theirs = own(nil, p, UInt32(length))
                let ours = plover_bdb_hash4(p, UInt32(length)), portable = plover_bdb_hash4_portable(p, UInt32(length))
                #expect(ours == theirs, "\(length) bytes at offset \(offset): \(ours) against libdb's \(theirs)")
                #expect(portable == theirs, "\(length) bytes at offset \(offset), portable: \(portable) against libdb's \(theirs)")
            }
        }
        // Every length up to 300 bytes (starting at offsets 0 to 31), the blocks of 32 and 8 bytes
        // and every tail after them.
        for length in 0...300 { check(length % 32, length) }
        for _ in 0..<500 { check(Int.random(in: 0..<32), Int.random(in: 0...5000)) }
        for length in [4096, 4096 + 31, 65_536, 65_536 + 7, 69_000] { check(3, length) }
        // The largest bytes, where a lane's products wrap soonest.
        for i in bytes.indices { bytes[i] = 0xFF }
        for length in [1, 31, 32, 33, 4096, 65_536] { check(0, length) }
    }

    /// The test process's own lookup finds this package's definition, not libdb's (the
    /// `LD_DEBUG` checks below show what libdb's calls bind to).
    @Test func thisProcessResolvesTheNameToIt() throws {
        #expect(plover_bdb_hash4_in_effect() == 1, "__ham_func4 does not resolve to this package's in the test process")
        #expect(try Self.libdbsOwnAddress() != dlsym(UnsafeMutableRawPointer(bitPattern: 0), "__ham_func4"),
                "the process resolves __ham_func4 to libdb's own")
    }

    /// What the dynamic linker binds libdb's `__ham_func4` to when it starts `executable`
    /// (binding everything at start, as `LD_BIND_NOW` asks), from its `LD_DEBUG` report.
    static func libdbsHashBinding(_ executable: String, _ args: [String], preload: String? = nil) throws -> String? {
        var env = ProcessInfo.processInfo.environment
        env["LD_BIND_NOW"] = "1"
        env["LD_DEBUG"] = "bindings"
        if let preload { env["LD_PRELOAD"] = preload }
        let report = try runCommand(executable, args, environment: env).stderr
        let line = report.split(separator: "\n").first { $0.contains("binding file") && $0.contains("libdb-5.3.so") && $0.contains("`__ham_func4'") }
        return line.map { String($0.split(separator: " to ").last ?? "") }
    }

    @Test(arguments: ["plover", "paxos-log"])
    func theExecutablesGiveItToBerkeleyDB(_ name: String) throws {
        let executable = try builtExecutable(name)
        let bound = try #require(try Self.libdbsHashBinding(executable, ["--help"]), "\(name): no binding of libdb's __ham_func4 reported")
        #expect(bound.contains(executable), "\(name): libdb's __ham_func4 binds to \(bound)")
    }

    /// In a server started under `LD_PRELOAD=libinterpose.so`, whose version script must list it.
    @Test func libinterposeGivesItToBerkeleyDB() throws {
        let library = try builtExecutable("libinterpose.so")
        let bound = try #require(try Self.libdbsHashBinding("/bin/true", [], preload: library), "no binding of libdb's __ham_func4 reported")
        #expect(bound.contains(library), "under libinterpose.so, libdb's __ham_func4 binds to \(bound)")
    }

    /// A store written with this hash is read by Berkeley DB's own tools, which verify every log
    /// record's checksum with libdb's hash: large entries make long records and page splits.
    @Test func berkeleyDBsOwnToolsReadALogItWrote() throws {
        let dir = TempDir("hash")
        defer { dir.remove() }
        let log = try BerkeleyDBLog.open(path: dir.path, durability: .fsync)
        try log.append((1...300 as ClosedRange<LogIndex>).map { entry($0, bytes: 4096 + Int($0 % 7)) })
        try log.close()
        let printed = try runCommand("/usr/bin/db5.3_printlog", ["-h", dir.path])
        #expect(printed.status == 0, "db5.3_printlog: \(printed.stderr)")
        #expect(printed.stdout.contains("__bam_split"), "no page split was logged")
        let recovered = try runCommand("/usr/bin/db5.3_recover", ["-c", "-h", dir.path])
        #expect(recovered.status == 0, "db5.3_recover -c: \(recovered.stderr)")
        let reopened = try BerkeleyDBLog.open(path: dir.path)
        #expect(try reopened.entries(1...300).map(\.payload) == (1...300 as ClosedRange<LogIndex>).map { entry($0, bytes: 4096 + Int($0 % 7)).payload })
        try reopened.close()
    }
}
