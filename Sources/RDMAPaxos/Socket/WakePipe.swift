import Glibc

/// A pipe one thread rings to wake another that waits in `poll` (`SocketDescriptor.waitReadable(_:orRung:)`).
/// Non-blocking at both ends: a ring on a full pipe is dropped (the waiter will wake anyway), a
/// drain takes whatever is there.
package final class WakePipe: Sendable {
    let readFD: Int32
    private let writeFD: Int32

    package init() throws(SocketFailure) {
        var fds: [Int32] = [0, 0]
        // pipe2 is not in Swift's Glibc module: the flags are set right after (a process that
        // forks and execs in that instant hands the child two pipe ends it never uses).
        guard pipe(&fds) == 0 else { throw SocketFailure("open", "a wake-up pipe", errno: errno) }
        for fd in fds where fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) != 0 || fcntl(fd, F_SETFD, FD_CLOEXEC) != 0 {
            let e = errno
            Glibc.close(fds[0])
            Glibc.close(fds[1])
            throw SocketFailure("set up", "a wake-up pipe", errno: e)
        }
        (readFD, writeFD) = (fds[0], fds[1])
    }

    deinit {
        Glibc.close(readFD)
        Glibc.close(writeFD)
    }

    /// Wakes the waiter (or makes its next wait return at once).
    package func ring() {
        var one: UInt8 = 1
        _ = write(writeFD, &one, 1)
    }

    /// Takes every ring so far.
    package func drain() {
        var sink = [UInt8](repeating: 0, count: 64)
        while read(readFD, &sink, sink.count) > 0 {}
    }
}

extension SocketDescriptor {
    /// Waits up to `timeout` until the socket is readable (or the peer closed) or `wake` was
    /// rung; says which. A failed poll reports the socket readable, so the read that follows
    /// reports the error.
    package func waitReadable(_ timeout: Duration, orRung wake: WakePipe) -> (readable: Bool, rung: Bool) {
        (try? waitReadable(orRung: wake.readFD, until: .now + timeout)) ?? (true, false)
    }
}
