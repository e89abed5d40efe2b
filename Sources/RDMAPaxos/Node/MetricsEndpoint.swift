import NIOCore
import NIOHTTP1
import NIOPosix
import Prometheus

/// Serves a Prometheus registry in the text exposition format at `GET /metrics` (HEAD too);
/// every other path is 404 and other methods on `/metrics` are 405. Plain HTTP/1.1 without
/// authentication: bind it to loopback unless the network in between is trusted.
public final class MetricsEndpoint: Sendable {
    let listener: TCPListener
    /// The port actually bound (useful when asked for port 0).
    public var boundPort: Int { listener.boundPort }

    /// Listens on `host`:`port` (0: any free port; IPv6 hosts may be bracketed) and serves
    /// `registry`; throws when the address cannot be bound.
    public static func start(host: String, port: Int, registry: PrometheusCollectorRegistry) throws -> MetricsEndpoint {
        MetricsEndpoint(listener: try TCPListener(host: unbracketed(host), port: port, backlog: 32) { ch in
            try ch.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
            try ch.pipeline.syncOperations.addHandler(MetricsHTTPHandler(registry: registry))
        })
    }

    init(listener: TCPListener) { self.listener = listener }

    /// Closes the listener and waits for its event loops to shut down.
    public func stop() { listener.stop() }

    /// Whether `host` (a name or an address, IPv6 possibly in brackets) is this machine's loopback:
    /// `localhost`, 127.0.0.0/8 or ::1.
    public static func isLoopback(host: String) -> Bool {
        let h = unbracketed(host).lowercased()
        if h == "localhost" || h == "::1" || h == "0:0:0:0:0:0:0:1" { return true }
        let octets = h.split(separator: ".", omittingEmptySubsequences: false)
        return octets.count == 4 && octets.allSatisfy { UInt8($0) != nil } && octets[0] == "127"
    }

    static func unbracketed(_ host: String) -> String {
        host.hasPrefix("[") && host.hasSuffix("]") ? String(host.dropFirst().dropLast()) : host
    }
}

/// Answers one request at a time (`HTTPServerPipelineHandler` holds pipelined ones back).
final class MetricsHTTPHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    static let contentType = "text/plain; version=0.0.4; charset=utf-8"

    let registry: PrometheusCollectorRegistry
    var head: HTTPRequestHead?

    init(registry: PrometheusCollectorRegistry) { self.registry = registry }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case let .head(h): head = h
        case .body: break  // A scrape has no body; anything sent is ignored.
        case .end:
            if let h = head { respond(to: h, context: context) }
            head = nil
        }
    }

    func respond(to request: HTTPRequestHead, context: ChannelHandlerContext) {
        let path = request.uri.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init) ?? ""
        var headers = HTTPHeaders()
        let status: HTTPResponseStatus
        let body: [UInt8]
        if path != "/metrics" {
            status = .notFound
            body = Array("not found; metrics are at /metrics\n".utf8)
            headers.add(name: "Content-Type", value: "text/plain; charset=utf-8")
        } else if request.method != .GET && request.method != .HEAD {
            status = .methodNotAllowed
            body = Array("use GET\n".utf8)
            headers.add(name: "Content-Type", value: "text/plain; charset=utf-8")
            headers.add(name: "Allow", value: "GET, HEAD")
        } else {
            status = .ok
            body = registry.emitToBuffer()
            headers.add(name: "Content-Type", value: Self.contentType)
        }
        headers.add(name: "Content-Length", value: "\(body.count)")
        let keepAlive = request.isKeepAlive
        if !keepAlive { headers.add(name: "Connection", value: "close") }
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: request.version, status: status, headers: headers))), promise: nil)
        if request.method != .HEAD {
            context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(bytes: body)))), promise: nil)
        }
        let written = context.writeAndFlush(wrapOutboundOut(.end(nil)))
        if !keepAlive {
            let channel = context.channel
            written.whenComplete { _ in channel.close(promise: nil) }
        }
    }
}
