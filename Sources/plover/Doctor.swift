import ArgumentParser
import RDMAPaxos

/// `plover doctor`: which fabrics can run on this machine, and why not when they cannot.
struct Doctor: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Report which fabrics (verbs, tcp) are usable here, and the Berkeley DB version.",
        discussion: "Exits 0 when at least one fabric is usable, 1 otherwise.")

    @Option(help: "Address the TCP fabric would listen on.") var host = "127.0.0.1"

    func run() throws {
        var usable: [String] = []

        do {
            let devices = try VerbsProbe.deviceNames()
            print("verbs: devices: \(devices.joined(separator: ", "))")
            do {
                try VerbsProbe.connectionManager()
                print("verbs: rdma_cm event channel: ok")
                usable.append("verbs")
            } catch {
                print("verbs: unusable: \(error)")
            }
        } catch {
            print("verbs: unusable: \(error)")
            do {
                try VerbsProbe.connectionManager()
                print("verbs: rdma_cm event channel: ok (but no device)")
            } catch {
                print("verbs: \(error)")
            }
        }

        do {
            let port = try TCPFabric.probeListening(host: host)
            print("tcp: usable: can listen on \(host) (got port \(port))")
            usable.append("tcp")
        } catch {
            print("tcp: unusable: cannot listen on \(host): \(error)")
        }

        print("stable log: \(BerkeleyDBLibrary.versionString)")
        if usable.isEmpty {
            print("no usable fabric")
            throw ExitCode(1)
        }
        print("usable fabrics: \(usable.joined(separator: ", "))")
    }
}
