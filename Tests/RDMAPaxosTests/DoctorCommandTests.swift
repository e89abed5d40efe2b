import Foundation
import Testing
@testable import RDMAPaxos

@Suite struct DoctorCommandTests {
    @Test func doctorReportsEachFabricAndSucceedsWhenTCPWorks() throws {
        let r = try runCommand(try builtExecutable("plover"), ["doctor"])
        #expect(r.status == 0, "\(r.stdout)\(r.stderr)")
        #expect(r.stdout.contains("verbs: "))
        #expect(r.stdout.contains("tcp: usable"))
        #expect(r.stdout.contains("stable log: Berkeley DB \(BerkeleyDBLibrary.version.major).\(BerkeleyDBLibrary.version.minor)"))
        if (try? VerbsProbe.deviceNames()) == nil {
            #expect(r.stdout.contains("no RDMA device: ibv_get_device_list found none"))
        }
    }
}

/// The doctor's memlock check where the limit applies: in a child that lost CAP_IPC_LOCK (the
/// tests run as root, which has it) and runs under a 64 KiB RLIMIT_MEMLOCK.
@Suite struct DoctorMemlockTests {
    static let tools = ["/usr/bin/setpriv", "/usr/bin/prlimit"].allSatisfy { FileManager.default.isExecutableFile(atPath: $0) }

    @Test func doctorSaysWhatVerbsPinsAndWhichConnectPathIsTested() throws {
        let r = try runCommand(try builtExecutable("plover"), ["doctor"])
        #expect(r.stdout.contains("memlock: this process may pin "), "\(r.stdout)")
        #expect(r.stdout.contains("memlock: a replica of 3 members with the defaults on verbs pins "), "\(r.stdout)")
        #expect(r.stdout.contains("verbs_connect: tcp (the default"), "\(r.stdout)")
        #expect(r.stdout.contains("rdma_cm: hardware only, never run by make test"), "\(r.stdout)")
    }

    @Test(.enabled(if: tools, "needs setpriv and prlimit (util-linux)"))
    func aLowLimitIsReportedWithHowToRaiseIt() throws {
        let r = try runCommand("/usr/bin/prlimit", ["--memlock=65536:65536", "/usr/bin/setpriv", "--inh-caps=-ipc_lock",
                                                    "--bounding-set=-ipc_lock", "--", try builtExecutable("plover"), "doctor"])
        #expect(r.status == 0, "\(r.stdout)\(r.stderr)")  // tcp is still usable
        #expect(r.stdout.contains("memlock: this process may pin 64.0 KiB (RLIMIT_MEMLOCK)\n"), "\(r.stdout)")
        #expect(r.stdout.contains("more than the memlock limit 64.0 KiB (RLIMIT_MEMLOCK): raise RLIMIT_MEMLOCK"), "\(r.stdout)")
        #expect(r.stdout.contains("`ulimit -l unlimited`"), "\(r.stdout)")
    }
}

/// `plover doctor --config FILE`: that node's members, its verbs_connect, and its [vm] table.
@Suite struct DoctorConfigTests {
    @Test func doctorWithAConfigSizesThatNodeAndWarnsAboutTheOldConnectDefault() throws {
        let dir = TempDir("doctor")
        try FileManager.default.createDirectory(atPath: dir.path, withIntermediateDirectories: true)
        defer { dir.remove() }
        for f in ["vmlinuz", "initrd"] { _ = FileManager.default.createFile(atPath: dir.path + "/" + f, contents: Data()) }
        let vm = """

            [vm]
            kernel = "vmlinuz"
            initrd = "initrd"
            ram_file = "ram"
            memory_mib = 64
            run_dir = "run"
            front_address = "127.0.0.1:7201"
            sync_address = "127.0.0.1:7301"
            migration_address = "127.0.0.1:7401"
            peer = 1
            peer_sync_address = "127.0.0.1:7302"
            peer_migration_address = "127.0.0.1:7402"
            """
        let path = dir.path + "/node.toml"
        try (NodeConfigTests.good.replacingOccurrences(of: "fabric = \"tcp\"", with: "fabric = \"auto\"") + vm)
            .write(toFile: path, atomically: true, encoding: .utf8)
        let r = try runCommand(try builtExecutable("plover"), ["doctor", "--config", path])
        #expect(r.status == 0, "\(r.stdout)\(r.stderr)")
        #expect(r.stdout.contains("verbs_connect: node 2 uses tcp; verbs_connect is not set: "), "\(r.stdout)")
        #expect(r.stdout.contains("memlock: node 2 (3 members) on verbs pins "), "\(r.stdout)")
        #expect(r.stdout.contains("memlock: its syncvm endpoint on verbs (a backup registers its 64 MiB of guest RAM) pins "), "\(r.stdout)")
        #expect(r.stdout.contains("memlock: together "), "\(r.stdout)")

        try NodeConfigTests.good.write(toFile: path, atomically: true, encoding: .utf8)  // fabric = "tcp"
        let tcp = try runCommand(try builtExecutable("plover"), ["doctor", "--config", path])
        #expect(tcp.stdout.contains("memlock: node 2 uses fabric = tcp, which pins nothing"), "\(tcp.stdout)")
        #expect(!tcp.stdout.contains("verbs_connect is not set"), "\(tcp.stdout)")
    }
}
