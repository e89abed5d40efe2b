import Crypto
import NIOCore

// The two ends of a TCP fabric connection. Handlers are confined to their channel's event loop.
//
//   connector                          acceptor
//   hello(version, c, a, nonceC)  →
//                                 ←    challenge(a, nonceA, MAC_acceptor)   [or reject(reason)]
//   response(MAC_connector, region) →
//                                 ←    accept(region)                       [or reject(reason)]
//   write(seq, base, key, offset, imm, data) →   … lands in the region …
//                                 ←    ack(seq, status)   [when asked, or when it did not land]

/// Acceptor side: authenticates the connector, then lands its writes and acknowledges them.
final class AcceptorHandler: ChannelInboundHandler {
    typealias InboundIn = Frame
    typealias OutboundOut = ByteBuffer

    private enum Phase {
        case awaitingHello
        case awaitingResponse(Frames.Hello, acceptorNonce: [UInt8])
        case open(peer: NodeID, id: UInt64)
        case closing
    }

    private let fabric: TCPFabric
    private let limit: FrameLimit
    private let frameBytesMax: Int
    private var phase = Phase.awaitingHello
    private var timeout: Scheduled<Void>?
    private var unflushed = false

    init(fabric: TCPFabric, limit: FrameLimit, frameBytesMax: Int) {
        self.fabric = fabric
        self.limit = limit
        self.frameBytesMax = frameBytesMax
    }

    func channelActive(context: ChannelHandlerContext) {
        let channel = context.channel
        let logger = fabric.logger
        timeout = context.eventLoop.scheduleTask(in: fabric.configuration.handshakeTimeout.timeAmount) {
            logger.warning("handshake from \(channel.remoteAddress?.description ?? "?") timed out")
            channel.close(promise: nil)
        }
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        timeout?.cancel()
        if case let .open(_, id) = phase { fabric.unregisterInbound(id) }
        if case let .awaitingResponse(h, _) = phase {
            // The connector checks our MAC first: one holding another cluster key hangs up here.
            fabric.logger.warning("rejected handshake from \(context.channel.remoteAddress?.description ?? "?") claiming node \(h.connector): it hung up after our challenge (a different cluster key?)")
        }
        phase = .closing
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        switch (phase, frame.type) {
        case (.awaitingHello, .hello):
            guard let h = Frames.parseHello(frame.body) else { return bad(context, "malformed hello") }
            guard h.version == TCPHandshake.version else { return reject(context, .badVersion, claimed: h.connector) }
            guard h.acceptor == fabric.localNode else { return reject(context, .wrongNode, claimed: h.connector) }
            guard fabric.isMember(h.connector) else { return reject(context, .unknownNode, claimed: h.connector) }
            guard fabric.rememberNonce(h.nonce) else { return reject(context, .replayed, claimed: h.connector) }
            let nonce = TCPHandshake.nonce()
            let mac = TCPHandshake.mac(key: fabric.key, role: .acceptor, connector: h.connector, acceptor: h.acceptor,
                                       connectorNonce: h.nonce, acceptorNonce: nonce)
            phase = .awaitingResponse(h, acceptorNonce: nonce)
            context.writeAndFlush(wrapOutboundOut(Frames.frame(.challenge, context.channel.allocator) { b in
                b.writeInteger(fabric.localNode); b.writeBytes(nonce); b.writeBytes(mac)
            }), promise: nil)

        case let (.awaitingResponse(h, nonce), .response):
            guard let (mac, _) = Frames.parseResponse(frame.body, connector: h.connector) else {
                return bad(context, "malformed response")
            }
            guard TCPHandshake.verify(mac, key: fabric.key, role: .connector, connector: h.connector,
                                      acceptor: h.acceptor, connectorNonce: h.nonce, acceptorNonce: nonce) else {
                return reject(context, .badMAC, claimed: h.connector)
            }
            guard let exported = fabric.exportedRegion(),
                  let id = fabric.registerInbound(peer: h.connector, channel: context.channel) else {
                return reject(context, .notReady, claimed: h.connector)
            }
            timeout?.cancel()
            phase = .open(peer: h.connector, id: id)
            limit.bytesMax = frameBytesMax
            fabric.logger.info("accepted queue pair from node \(h.connector)")
            context.writeAndFlush(wrapOutboundOut(Frames.frame(.accept, context.channel.allocator) { b in
                Frames.writeRegion(exported, into: &b)
            }), promise: nil)

        case let (.open(peer, id), .write):
            guard let w = Frames.parseWrite(frame.body) else { return bad(context, "malformed write") }
            guard let landed = fabric.land(w, from: peer, inbound: id) else {
                // Access revoked: drop everything from here on.
                phase = .closing
                context.close(promise: nil)
                return
            }
            // Only what the writer asked about, and every write that did not land, is answered.
            guard w.acknowledge || !landed else { return }
            context.write(wrapOutboundOut(Frames.frame(.ack, context.channel.allocator, capacity: 9) { b in
                b.writeInteger(w.sequence); b.writeInteger(UInt8(landed ? 0 : 1))
            }), promise: nil)
            unflushed = true

        case (.closing, _):
            return
        default:
            bad(context, "unexpected \(frame.type) frame")
        }
    }

    /// Acknowledgements of one read batch leave in one flush.
    func channelReadComplete(context: ChannelHandlerContext) {
        if unflushed {
            unflushed = false
            context.flush()
        }
        context.fireChannelReadComplete()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        bad(context, "\(error)")
    }

    private func reject(_ context: ChannelHandlerContext, _ reason: RejectReason, claimed: NodeID) {
        fabric.noteRejected()
        fabric.logger.warning("rejected handshake from \(context.channel.remoteAddress?.description ?? "?") claiming node \(claimed): \(reason)")
        phase = .closing
        timeout?.cancel()
        let channel = context.channel
        channel.writeAndFlush(Frames.frame(.reject, channel.allocator) { $0.writeInteger(reason.rawValue) })
            .whenComplete { _ in channel.close(promise: nil) }
    }

    private func bad(_ context: ChannelHandlerContext, _ reason: String) {
        if case .closing = phase { return }
        fabric.noteBadFrame()
        fabric.logger.warning("closing connection from \(context.channel.remoteAddress?.description ?? "?"): \(reason)")
        phase = .closing
        context.close(promise: nil)
    }
}

/// Connector side: authenticates the acceptor and itself, then hands acknowledgements to the queue pair.
final class ConnectorHandler: ChannelInboundHandler {
    typealias InboundIn = Frame
    typealias OutboundOut = ByteBuffer

    private enum Phase {
        case awaitingChallenge(nonce: [UInt8])
        case awaitingAccept
        case open(TCPQueuePair)
        case done
    }

    private let fabric: TCPFabric
    private let peer: NodeID
    private let exported: RemoteRegion
    private let limit: FrameLimit
    private let frameBytesMax: Int
    private let promise: EventLoopPromise<TCPQueuePair>
    private var phase: Phase
    private var timeout: Scheduled<Void>?

    init(fabric: TCPFabric, peer: NodeID, exported: RemoteRegion, limit: FrameLimit, frameBytesMax: Int,
         promise: EventLoopPromise<TCPQueuePair>) {
        self.fabric = fabric
        self.peer = peer
        self.exported = exported
        self.limit = limit
        self.frameBytesMax = frameBytesMax
        self.promise = promise
        self.phase = .awaitingChallenge(nonce: TCPHandshake.nonce())
    }

    func channelActive(context: ChannelHandlerContext) {
        guard case let .awaitingChallenge(nonce) = phase else { return }
        let channel = context.channel, promise = self.promise, peer = self.peer
        timeout = context.eventLoop.scheduleTask(in: fabric.configuration.handshakeTimeout.timeAmount) {
            promise.fail(FabricError.connectFailed(peer: peer, reason: "handshake timed out"))
            channel.close(promise: nil)
        }
        context.writeAndFlush(wrapOutboundOut(Frames.frame(.hello, context.channel.allocator) { b in
            b.writeInteger(TCPHandshake.version); b.writeInteger(fabric.localNode); b.writeInteger(peer); b.writeBytes(nonce)
        }), promise: nil)
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        finish(context, failing: "connection closed during the handshake")
        context.fireChannelInactive()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        finish(context, failing: "connection torn down during the handshake")
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        switch (phase, frame.type) {
        case let (.awaitingChallenge(nonce), .challenge):
            guard let c = Frames.parseChallenge(frame.body) else { return fail(context, "malformed challenge") }
            guard c.acceptor == peer else { return fail(context, "the peer is node \(c.acceptor), not node \(peer)") }
            guard TCPHandshake.verify(c.mac, key: fabric.key, role: .acceptor, connector: fabric.localNode,
                                      acceptor: peer, connectorNonce: nonce, acceptorNonce: c.nonce) else {
                fabric.noteRejected()
                return fail(context, "node \(peer) failed authentication (cluster keys differ)")
            }
            let mac = TCPHandshake.mac(key: fabric.key, role: .connector, connector: fabric.localNode, acceptor: peer,
                                       connectorNonce: nonce, acceptorNonce: c.nonce)
            phase = .awaitingAccept
            context.writeAndFlush(wrapOutboundOut(Frames.frame(.response, context.channel.allocator) { b in
                b.writeBytes(mac); Frames.writeRegion(exported, into: &b)
            }), promise: nil)

        case (.awaitingAccept, .accept):
            guard let remote = Frames.parseAccept(frame.body, acceptor: peer) else { return fail(context, "malformed accept") }
            let qp = TCPQueuePair(fabric: fabric, peer: peer, remote: remote, channel: context.channel)
            guard fabric.track(qp) else { return fail(context, "the fabric closed") }
            timeout?.cancel()
            limit.bytesMax = frameBytesMax
            phase = .open(qp)
            fabric.logger.info("connected queue pair to node \(peer)")
            promise.succeed(qp)

        case (.awaitingChallenge, .reject), (.awaitingAccept, .reject):
            var b = frame.body
            let reason = b.readInteger(as: UInt8.self).flatMap(RejectReason.init(rawValue:))
            fail(context, "node \(peer) refused the connection: \(reason?.description ?? "unknown reason")")

        case let (.open(qp), .ack):
            guard let (seq, landed) = Frames.parseAck(frame.body), qp.acknowledged(sequence: seq, landed: landed) else {
                return protocolError(context, "acknowledgement matches no outstanding write")
            }
        case (.done, _):
            return
        default:
            protocolError(context, "unexpected \(frame.type) frame")
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        protocolError(context, "\(error)")
    }

    private func protocolError(_ context: ChannelHandlerContext, _ reason: String) {
        fabric.noteBadFrame()
        fail(context, reason)
    }

    private func fail(_ context: ChannelHandlerContext, _ reason: String) {
        if case .done = phase { return }
        fabric.logger.warning("queue pair to node \(peer): \(reason)")
        finish(context, failing: reason)
        context.close(promise: nil)
    }

    private func finish(_ context: ChannelHandlerContext, failing reason: String) {
        timeout?.cancel()
        switch phase {
        case let .open(qp): qp.connectionLost()
        case .awaitingChallenge, .awaitingAccept: promise.fail(FabricError.connectFailed(peer: peer, reason: reason))
        case .done: break
        }
        phase = .done
    }
}
