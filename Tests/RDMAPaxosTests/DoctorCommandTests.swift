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
