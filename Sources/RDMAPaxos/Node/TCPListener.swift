import NIOCore
import NIOPosix

/// A TCP server on its own one-thread event loop: what the client server and the metrics
/// endpoint have in common (bind, options, shutdown).
final class TCPListener: Sendable {
    let group: MultiThreadedEventLoopGroup
    let channel: any Channel
    /// The port actually bound (useful when asked for port 0).
    var boundPort: Int { channel.localAddress?.port ?? 0 }

    /// Binds `host:port`; `configure` sets up each accepted connection's pipeline.
    init(host: String, port: Int, backlog: Int32, configure: @escaping @Sendable (any Channel) throws -> Void) throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        do {
            channel = try ServerBootstrap(group: group)
                .serverChannelOption(.backlog, value: backlog)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
                .childChannelInitializer { ch in ch.eventLoop.makeCompletedFuture { try configure(ch) } }
                .bind(host: host, port: port).wait()
        } catch {
            try? group.syncShutdownGracefully()
            throw error
        }
        self.group = group
    }

    func stop() {
        try? channel.close().wait()
        try? group.syncShutdownGracefully()
    }
}
