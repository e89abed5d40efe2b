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
