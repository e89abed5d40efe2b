import Foundation
import Testing
@testable import RDMAPaxos

@Suite(.timeLimit(.minutes(1))) struct SocketDescriptorTests {
    @Test func hostPortParsesWhatConfigsWriteAndRefusesTheRest() {
        #expect(HostPort(parsing: "127.0.0.1:7000") == HostPort(host: "127.0.0.1", port: 7000))
        #expect(HostPort(parsing: "node-1.example:1") == HostPort(host: "node-1.example", port: 1))
        #expect(HostPort(parsing: "[::1]:65535") == HostPort(host: "::1", port: 65535))
        #expect(HostPort(parsing: "[::1]:65535")?.description == "[::1]:65535")
        for bad in ["", "7000", ":7000", "host:", "host:0", "host:65536", "host:-1", "host:x", "[::1:80", "[]:80"] {
            #expect(HostPort(parsing: bad) == nil, "\(bad)")
        }
        #expect(HostPort(parsing: "0.0.0.0:0", allowingPortZero: true)?.port == 0)
    }

    @Test func bytesGoBothWaysAndAClosedPeerIsTold() throws {
        let listener = try SocketDescriptor.listen(on: HostPort(host: "127.0.0.1", port: 0))
        defer { listener.close() }
        #expect(listener.localPort > 0)
        let client = try SocketDescriptor.connect(to: HostPort(host: "127.0.0.1", port: listener.localPort), timeout: .seconds(5))
        let server = try listener.accept(timeout: .seconds(5))
        try client.send([1, 2, 3, 4, 5])
        #expect(try server.receive(exactly: 5) == [1, 2, 3, 4, 5])
        // Closed before a message: nil; closed in the middle of one: an error.
        client.close()
        #expect(try server.receive(exactly: 1) == nil)
        server.close()

        let c2 = try SocketDescriptor.connect(to: HostPort(host: "127.0.0.1", port: listener.localPort))
        let s2 = try listener.accept()
        try c2.send([9])
        c2.close()
        #expect(throws: SocketFailure.self) { try s2.receive(exactly: 2) }
        s2.close()
    }

    @Test func errorsNameTheAddress() throws {
        // A port nobody listens on: take one and close it.
        let l = try SocketDescriptor.listen(on: HostPort(host: "127.0.0.1", port: 0))
        let port = l.localPort
        l.close()
        let refused = #expect(throws: SocketFailure.self) { try SocketDescriptor.connect(to: HostPort(host: "127.0.0.1", port: port)) }
        #expect(refused?.description.contains("127.0.0.1:\(port)") == true)
        #expect(refused?.errno == ECONNREFUSED)

        let listener = try SocketDescriptor.listen(on: HostPort(host: "127.0.0.1", port: 0))
        defer { listener.close() }
        let timedOut = #expect(throws: SocketFailure.self) { try listener.accept(timeout: .milliseconds(50)) }
        #expect(timedOut?.errno == ETIMEDOUT)

        let missing = "/tmp/plover-no-such-socket-\(getpid())"
        let noUnix = #expect(throws: SocketFailure.self) { try SocketDescriptor.connect(unixPath: missing) }
        #expect(noUnix?.description.contains(missing) == true)
        let tooLong = #expect(throws: SocketFailure.self) { try SocketDescriptor.listen(unixPath: "/tmp/" + String(repeating: "x", count: 200)) }
        #expect(tooLong?.errno == ENAMETOOLONG)
    }

    @Test func unixSocketsConnect() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("plover-sock-\(getpid())").path
        let listener = try SocketDescriptor.listen(unixPath: path)
        defer {
            listener.close()
            unlink(path)
        }
        let c = try SocketDescriptor.connect(unixPath: path)
        let s = try listener.accept(timeout: .seconds(5))
        try s.send(Array("hello".utf8))
        #expect(try c.receive(exactly: 5) == Array("hello".utf8))
        c.close()
        s.close()
    }

    @Test func deadlineReadsWaitThenTimeOutAndNameThePeer() throws {
        let listener = try SocketDescriptor.listen(on: HostPort(host: "127.0.0.1", port: 0))
        defer { listener.close() }
        let client = try SocketDescriptor.connect(to: HostPort(host: "localhost", port: listener.localPort))
        let server = try listener.accept(timeout: .seconds(5))
        defer { server.close() }
        // Nothing sent: both reads give up at the deadline with ETIMEDOUT and the peer's name.
        let none = #expect(throws: SocketFailure.self) { try server.receive(exactly: 4, until: .now + .milliseconds(30)) }
        #expect(none?.errno == ETIMEDOUT)
        #expect(none?.peer.contains("127.0.0.1:\(listener.localPort)") == true)
        let nothing = #expect(throws: SocketFailure.self) { try server.receive(upTo: 4, until: .now + .milliseconds(30)) }
        #expect(nothing?.errno == ETIMEDOUT)
        // Half a message, then the deadline: still a timeout, not a short read.
        try client.send([1, 2])
        let half = #expect(throws: SocketFailure.self) { try server.receive(exactly: 4, until: .now + .milliseconds(30)) }
        #expect(half?.errno == ETIMEDOUT)
        try client.send([3, 4, 5, 6, 7, 8])
        #expect(try server.receive(exactly: 4, until: .now + .seconds(5)) == [3, 4, 5, 6])
        #expect(try server.receive(upTo: 16, until: .now + .seconds(5)) == [7, 8])
        // A deadline already past still reads what is there.
        try client.send([9])
        #expect(try server.waitReadable(until: .now + .seconds(5)))
        #expect(try server.receive(exactly: 1, until: .now - .seconds(1)) == [9])
        // The peer gone: nil before a message, ECONNRESET in the middle of one.
        try client.send([10])
        client.close()
        let cut = #expect(throws: SocketFailure.self) { try server.receive(exactly: 2, until: .now + .seconds(5)) }
        #expect(cut?.errno == ECONNRESET)
        #expect(try server.receive(exactly: 1, until: .now + .seconds(5)) == nil)
        #expect(try server.receive(upTo: 1, until: .now + .seconds(5)) == [])
    }

    /// The one poll loop with a wake-up pipe beside the socket: it says which of the two was ready.
    @Test func aWaitEndsAtTheDeadlineOnDataOrOnARing() throws {
        let (listener, client, server) = try Self.connected()
        defer { listener.close(); client.close(); server.close() }
        let wake = try WakePipe()
        #expect(server.waitReadable(.milliseconds(20), orRung: wake) == (false, false))
        wake.ring()
        #expect(server.waitReadable(.seconds(5), orRung: wake) == (false, true))
        wake.drain()
        try client.send([1])
        #expect(server.waitReadable(.seconds(5), orRung: wake) == (true, false))
        wake.ring()
        #expect(server.waitReadable(.zero, orRung: wake) == (true, true))
    }

    @Test func aReceiveTimeoutIsAnErrorNamingThePeer() throws {
        let (listener, client, server) = try Self.connected()
        defer { listener.close(); client.close(); server.close() }
        server.setReceiveTimeout(.milliseconds(30))
        let timedOut = #expect(throws: SocketFailure.self) { try server.receive(upTo: 1) }
        #expect(timedOut?.errno == EAGAIN)
        #expect(timedOut?.peer.contains("127.0.0.1:\(listener.localPort)") == true)
    }

    /// A listener on loopback, a client connected to it, and the server's end; the caller closes them.
    static func connected() throws -> (listener: SocketDescriptor, client: SocketDescriptor, server: SocketDescriptor) {
        let listener = try SocketDescriptor.listen(on: HostPort(host: "127.0.0.1", port: 0))
        do {
            let client = try SocketDescriptor.connect(to: HostPort(host: "127.0.0.1", port: listener.localPort))
            do { return (listener, client, try listener.accept(timeout: .seconds(5))) } catch { client.close(); throw error }
        } catch { listener.close(); throw error }
    }
}
