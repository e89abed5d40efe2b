import NIOCore
import NIOPosix

/// A TCP server on its own one-thread event loop, or on a loop it is given: what the client
/// server and the metrics endpoint have in common (bind, options, shutdown).
final class TCPListener: Sendable {
    let group: any EventLoopGroup
    /// The group is this listener's own, shut down by `stop`.
    let ownsGroup: Bool
    let channel: any Channel
    /// The port actually bound (useful when asked for port 0).
    var boundPort: Int { channel.localAddress?.port ?? 0 }

    /// Binds `host:port`; `configure` sets up each accepted connection's pipeline.
    init(host: String, port: Int, backlog: Int32, on loop: (any EventLoop)? = nil,
         configure: @escaping @Sendable (any Channel) throws -> Void) throws {
        let group: any EventLoopGroup = loop ?? MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let owns = loop == nil
        do {
            channel = try ServerBootstrap(group: group)
                .serverChannelOption(.backlog, value: backlog)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
                .childChannelInitializer { ch in ch.eventLoop.makeCompletedFuture { try configure(ch) } }
                .bind(host: host, port: port).wait()
        } catch {
            if owns { try? group.syncShutdownGracefully() }
            throw error
        }
        self.group = group
        ownsGroup = owns
    }

    func stop() {
        try? channel.close().wait()
        if ownsGroup { try? group.syncShutdownGracefully() }
    }
}
