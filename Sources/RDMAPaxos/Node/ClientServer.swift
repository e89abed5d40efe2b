import NIOCore
import NIOPosix

/// Serves the client protocol (`ClientFrame`) for one `ReplicaNode` on a TCP address.
public final class ClientServer: Sendable {
    let listener: TCPListener
    /// The port actually bound (useful when asked for port 0).
    public var boundPort: Int { listener.boundPort }

    /// Listens on `host`:`port` (0: any free port) and serves `node`; throws when the address
    /// cannot be bound. Connections are served on the node's event loop when it has one
    /// (`NodeOptions.eventLoop`: a request is stepped and answered on the thread that read it),
    /// else on a loop of the server's own.
    public static func start(node: ReplicaNode, host: String, port: Int) throws -> ClientServer {
        ClientServer(listener: try TCPListener(host: host, port: port, backlog: 256, on: node.options.eventLoop) { ch in
            try ch.pipeline.syncOperations.addHandler(ClientFrameHandler(node: node))
        })
    }

    init(listener: TCPListener) { self.listener = listener }

    /// Closes the listener and waits for its event loops to shut down.
    public func stop() { listener.stop() }
}

/// Splits the byte stream into frames and answers each one when the node does.
final class ClientFrameHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    let node: ReplicaNode
    var pending = ByteBuffer()
    /// The connection's answers; made when the handler joins its pipeline, before any read.
    var answers: AnswerChannel!

    init(node: ReplicaNode) { self.node = node }

    func handlerAdded(context: ChannelHandlerContext) {
        // The node's pass flushes this connection's answers itself when it runs on this loop.
        let samePass = node.options.eventLoop.map { $0 === context.eventLoop } ?? false
        answers = AnswerChannel(context.channel, pass: samePass ? node.passFlushes : nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var incoming = unwrapInboundIn(data)
        pending.writeBuffer(&incoming)
        while let length = pending.getInteger(at: pending.readerIndex, as: UInt32.self) {
            guard Int(length) <= ClientFrame.bytesMax else {
                context.close(promise: nil)  // A client that sends an oversized frame is broken or hostile.
                return
            }
            guard pending.readableBytes >= 4 + Int(length) else { break }
            pending.moveReaderIndex(forwardBy: 4)
            let body = pending.readBytes(length: Int(length))!
            handle(body, channel: answers)
        }
        pending.discardReadBytes()
    }

    func handle(_ body: [UInt8], channel: AnswerChannel) {
        let frame: ClientFrame
        do {
            frame = try ClientFrame(body: body)
        } catch {
            reply(.error(id: 0, code: .badRequest, leader: nil, message: "\(error)"), on: channel)
            return
        }
        let node = self.node
        let id = frame.id
        switch frame {
        // The hot requests are answered by the node's thread itself: it hands the encoded answer
        // to the connection's event loop, with no task or continuation between.
        case let .propose(_, command):
            node.propose(command) { Self.reply(id: id, $0, on: channel) }
        case let .read(_, query):
            node.read(query) { Self.reply(id: id, $0, on: channel) }
        case let .localRead(_, query):
            node.localRead(query) { Self.reply(id: id, $0, on: channel) }
        case let .status(id):
            // The log's size rides along (the status itself is the node's published view).
            reply(.statusReply(id: id, text: node.status.text + "\nlog_bytes=\(node.log.heldBytes)"), on: channel)
        case let .configuration(id):
            let s = node.status
            reply(.ok(id: id, result: ConfigurationReply(leader: s.leader, membership: s.membership).wireBytes), on: channel)
        case .changeMembership, .backup:
            Self.spawnAnswer(frame, node: node, on: channel)
        default:
            reply(.error(id: frame.id, code: .badRequest, leader: nil, message: "not a request"), on: channel)
        }
    }

    static func spawnAnswer(_ frame: ClientFrame, node: ReplicaNode, on channel: AnswerChannel) {
        Task { await answer(frame, node: node, on: channel) }
    }

    /// The rare requests (membership changes, backups) go through the node's async interface.
    static func answer(_ frame: ClientFrame, node: ReplicaNode, on channel: AnswerChannel) async {
        let result: Result<[UInt8], any Error>
        do {
            switch frame {
            case let .changeMembership(_, change): result = .success(try await node.changeMembership(change).wireBytes)
            case .backup: result = .success(FileSnapshotStore.encode(try await node.backup()))
            default: return
            }
        } catch {
            result = .failure(error)
        }
        reply(id: frame.id, result, on: channel)
    }

    /// Answers request `id` with the node's result or error.
    static func reply(id: UInt64, _ result: Result<[UInt8], any Error>, on channel: AnswerChannel) {
        switch result {
        case let .success(bytes):
            reply(.ok(id: id, result: bytes), on: channel)
        case let .failure(e as NodeError):
            var leader: NodeID?
            if case let .notLeader(l) = e { leader = l }
            reply(.error(id: id, code: ClientErrorCode(e), leader: leader, message: e.description), on: channel)
        case let .failure(error):
            reply(.error(id: id, code: .other, leader: nil, message: "\(error)"), on: channel)
        }
    }

    static func reply(_ f: ClientFrame, on channel: AnswerChannel) { channel.write(f) }

    func reply(_ f: ClientFrame, on channel: AnswerChannel) { Self.reply(f, on: channel) }
}

extension NodeStatus {
    /// `key=value` lines, stable order, for `plover status` and scripts.
    public var text: String {
        var lines = [
            "id=\(id)", "role=\(recovery != nil ? "recovering" : isWitness && role == .follower ? "witness" : role.rawValue)", "ballot=\(ballot)",
            "leader=\(leader.map(String.init) ?? "none")", "first_index=\(firstIndex)", "last_index=\(lastIndex)",
            "durable_index=\(durableIndex)", "commit_index=\(commitIndex)", "applied_index=\(appliedIndex)",
            "members=" + membership.members.map { "\($0.id):\($0.role):\($0.priority)" }.joined(separator: ","),
        ]
        if !followerMatch.isEmpty {
            lines.append("follower_match=" + followerMatch.sorted { $0.key < $1.key }.map { "\($0.key):\($0.value)" }.joined(separator: ","))
        }
        if let f = failure { lines.append("failure=\(f)") }
        if let w = storageWarning { lines.append("storage_warning=\(w)") }
        if let r = removed { lines.append("removed=\(r)") }
        if let r = recovery { lines.append("recovery=\(r)") }
        return lines.joined(separator: "\n")
    }
}
