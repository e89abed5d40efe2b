import CVerbs
import Foundation
import PloverCheck
import SoftRDMA
import VerbsTestSupport
import Testing
@testable import RDMAPaxos

#if canImport(Glibc)
import Glibc
#endif

private let noRDMADevice = (try? VerbsProbe.deviceNames()) == nil

/// `VerbsFabric` itself. Its conformance, ring and cluster behaviour is in the shared suites
/// (`FabricKind.verbs`: the software RDMA device of `Tests/SoftRDMA`); here is what is particular to
/// verbs: device discovery without hardware, the connect exchanges, addressing, teardown, and the
/// software device across processes.
@Suite struct VerbsFabricTests {
    @Test func deviceDiscoveryNamesDevicesOrExplainsTheirAbsence() {
        do {
            let names = try VerbsProbe.deviceNames()
            #expect(!names.isEmpty)
        } catch {
            #expect(error.operation == "ibv_get_device_list")
            #expect(error.message.hasPrefix("no RDMA device: ibv_get_device_list found none"))
            #expect(error.message.hasSuffix("— use fabric = tcp"))
            if error.code == ENOSYS {
                #expect(error.message.contains("errno ENOSYS: the kernel has no InfiniBand/RDMA support"))
            }
        }
    }

    @Test(.enabled(if: noRDMADevice))
    func openingTheFabricWithoutADeviceThrowsInsteadOfCrashing() {
        #expect(throws: VerbsError.self) { try VerbsFabric(node: 1, configuration: .init(clusterKey: testClusterKey, members: [1, 2])) }
    }

    @Test(.enabled(if: noRDMADevice))
    func connectionManagerAbsenceIsReportedWithItsErrno() {
        do {
            try VerbsProbe.connectionManager()
            Issue.record("rdma_create_event_channel succeeded without a device")
        } catch {
            #expect(error.operation == "rdma_create_event_channel")
            #expect(error.message.contains("rdma_create_event_channel failed (errno"))
        }
    }

    @Test func regionDescriptorSurvivesTheConnectPrivateData() throws {
        let r = RemoteRegion(node: 3, base: 0x7F00_1234_5000, key: 0xDEAD_BEEF, lengthBytes: 1 << 20)
        let bytes = VerbsFabric.privateData(node: 3, region: r)
        #expect(bytes.count <= 56)  // rdma_connect's private data limit for RC
        let (node, back) = try #require(VerbsFabric.parsePrivateData(bytes))
        #expect(node == 3 && back == r)
        #expect(VerbsFabric.parsePrivateData(Array(bytes.prefix(10))) == nil)
    }
}

/// The out-of-band connect path, addressing and object lifetimes, over the software RDMA device.
@Suite(.timeLimit(.minutes(1))) struct VerbsOverSoftDeviceTests {
    /// Two processes on one subnet: this one through `VerbsFabric`'s queue pair, the other
    /// (`soft-rdma-peer`) through the raw verbs calls. Writes land both ways with their immediates,
    /// and once the peer process is killed, a write to it fails instead of waiting forever.
    @Test func softDeviceCarriesWritesBetweenProcesses() async throws {
        let driver = try FabricWorld(.verbs).softVerbs()
        // It waits on the peer's output: on a thread of its own, not the test pool's.
        try await onOwnThread {
            let fabric = try VerbsFabric(node: 1, configuration: .init(clusterKey: testClusterKey, connection: .outOfBand, members: [1, 2]), driver: driver)
            defer { fabric.close() }
            let region = try fabric.registerRegion(lengthBytes: 4096)
            let peer = try Child(try builtExecutable("soft-rdma-peer"), [driver.subnet.path], withInput: true)
            defer { if peer.process.isRunning { peer.kill(SIGKILL) } }

            let e = try #require(peer.line(0)).split(separator: " ")
            try #require(e.count == 6 && e[0] == "endpoint", "peer said \(e)")
            let endpoint = VerbsEndpoint(queuePair: UInt32(e[1])!, psn: UInt32(e[3])!,
                                         port: VerbsPortAddress(lid: UInt16(e[2])!, gid: [UInt8](repeating: 0, count: 16), ethernet: false,
                                                                mtu: IBV_MTU_1024.rawValue))
            let qp = try fabric.makeQueuePair(peer: 2, inboundFrom: nil)
            try qp.connect(to: endpoint, region: RemoteRegion(node: 2, base: UInt64(e[4])!, key: UInt32(e[5])!, lengthBytes: 4096))
            peer.send("connect \(qp.number) \(fabric.device.address.lid) \(qp.psn)")
            #expect(peer.line(1) == "ok")

            try qp.postWrite(Array("hello".utf8), remoteOffset: 0, immediate: 7, workRequestID: 1)
            #expect(collect(fabric.completions, count: 1) == [Completion(kind: .write, status: .success, peer: 2, workRequestID: 1, immediate: nil)])
            peer.send("await")
            #expect(peer.line(2) == "received 0 7 hello")

            peer.send("write \(region.remote.base) \(region.key) 9 world")
            #expect(peer.line(3) == "sent 0")
            #expect(collect(fabric.completions, count: 1) == [Completion(kind: .writeImmediateReceived, status: .success, peer: 2,
                                                                         workRequestID: 0, immediate: 9)])
            #expect(region.read(offset: 0, count: 5) == Array("world".utf8))

            peer.kill(SIGKILL)
            try qp.postWrite([1], remoteOffset: 0, workRequestID: 2)
            #expect(collect(fabric.completions, count: 1).map(\.status) == [.transportError])
            #expect(!qp.isUsable)
        }
    }

    /// On an Ethernet link layer (RoCE) there are no LIDs: the exchange carries the GID and the
    /// address vector routes by it. A port of the other link layer cannot connect at all.
    @Test func roceQueuePairsAreAddressedByGID() async throws {
        let world = FabricWorld(.verbs)
        let roce = try world.softVerbs(ethernet: true)
        let config = VerbsFabric.Configuration(clusterKey: testClusterKey, connection: .outOfBand, members: [1, 2, 3])
        let a = try VerbsFabric(node: 1, configuration: config, driver: roce)
        let b = try VerbsFabric(node: 2, configuration: config, driver: roce)
        let ib = try VerbsFabric(node: 3, configuration: config, driver: try world.softVerbs())
        defer { a.close(); b.close(); ib.close() }
        #expect(a.device.address.ethernet && a.device.address.lid == 0 && a.device.address.gid != b.device.address.gid)

        let rb = try b.registerRegion(lengthBytes: 4096)
        let addressB = try await b.listen(at: world.listenAddress(2), exporting: rb)
        let qp = try await a.connect(to: addressB, exporting: try a.registerRegion(lengthBytes: 64))
        try qp.postWrite([4, 2], remoteOffset: 10, immediate: 1, workRequestID: 1)
        #expect(collect(a.completions, count: 1).map(\.status) == [.success])
        #expect(rb.read(offset: 10, count: 2) == [4, 2])

        await #expect(throws: FabricError.self) { try await ib.connect(to: addressB, exporting: try ib.registerRegion(lengthBytes: 64)) }
    }

    /// Closing the fabrics and dropping their queue pairs releases every verbs object in the order
    /// the device requires: queue pairs and registrations, then CQ and PD, then the context (the
    /// software device refuses to close a context with anything left, as hardware does). A fabric's
    /// polling and connecting threads hold it until they exit, so this also shows they stopped.
    @Test func closedFabricsReleaseEveryVerbsObject() async throws {
        let world = FabricWorld(.verbs)
        do {
            let p = try await FabricPair.make(world)
            try p.qp.postWrite([1], remoteOffset: 0, immediate: 1, workRequestID: 1)
            #expect(collect(p.a.completions, count: 1).map(\.status) == [.success])
            p.close()
        }
        #expect(world.softLedger.everOpened == 2)
        #expect(await eventually { world.softLedger.openContexts == 0 }, "\(world.softLedger.openContexts) contexts still open")
    }

    /// The same for a whole replica cluster over rings once its nodes stopped.
    @Test func stoppedClusterReleasesEveryVerbsObject() async throws {
        let ledger: SoftVerbsLedger
        do {
            let cluster = try await RingNodeCluster.start(.verbs)
            ledger = cluster.world.softLedger
            try await cluster.put("k", via: try await cluster.leader())
            cluster.stopAll()
        }
        #expect(ledger.everOpened == 3)
        #expect(await eventually { ledger.openContexts == 0 }, "\(ledger.openContexts) contexts still open")
    }

    /// `poll = .event`: an idle fabric's completion thread sleeps until the device raises an event;
    /// `.busy` keeps polling (counted by the thread's context switches over a second with nothing
    /// to complete: each of the busy loop's 50 µs naps is one).
    @Test(arguments: [VerbsFabric.Configuration.Poll.event, .busy])
    func anIdleCompletionThreadSleepsOnlyWhenWaitingForEvents(_ poll: VerbsFabric.Configuration.Poll) async throws {
        let world = FabricWorld(poll == .event ? .verbs : .verbsBusy)
        let pair = try await FabricPair.make(world)
        defer { pair.close() }
        // A message both ways first, so that the threads have done their work.
        try pair.qp.postWrite([1, 2, 3, 4], remoteOffset: 0, immediate: 7, workRequestID: 1)
        #expect(collect(pair.a.completions, count: 1).first?.status == .success)
        #expect(collect(pair.b.completions, count: 1).first?.immediate == 7)
        let fabrics = try [pair.a, pair.b].map { try #require($0 as? VerbsFabric) }
        let events = fabrics.map(\.statistics.completionEvents)
        // With `.event` the completions came by events, not by the wait's one-second bound.
        #expect(poll == .event ? events.allSatisfy { $0 > 0 } : events == [0, 0], "completion events taken: \(events)")
        let mine = try fabrics.map { try #require($0.completionThreadID, "no completion thread id") }
        let start = mine.map(Self.contextSwitches)
        try await Task.sleep(for: .seconds(1))
        let woke = zip(mine.map(Self.contextSwitches), start).map { $0 - $1 }
        if poll == .event {
            #expect(woke.allSatisfy { $0 <= 20 }, "idle completion threads woke \(woke) times in a second")
        } else {
            #expect(woke.allSatisfy { $0 >= 1000 }, "busy completion threads woke only \(woke) times in a second")
        }
    }

    /// Context switches of thread `task` of this process so far (voluntary and not).
    static func contextSwitches(_ task: Int32) -> Int {
        let status = (try? String(contentsOfFile: "/proc/self/task/\(task)/status", encoding: .utf8)) ?? ""
        return status.split(separator: "\n").filter { $0.contains("ctxt_switches") }
            .compactMap { Int($0.split(separator: ":").last?.trimmingCharacters(in: .whitespaces) ?? "") }.reduce(0, +)
    }

    /// The device double refuses what a device refuses, so a mistake in the control path fails here
    /// rather than on the first RDMA machine.
    @Test func softDeviceRefusesWhatHardwareRefuses() throws {
        let driver = try FabricWorld(.verbs).softVerbs()
        let device = try VerbsDevice(driver: driver, name: nil, port: 1, gidIndex: 0, completionQueueEntries: 16, completionEvents: true)
        let memory = OwnedBytes(count: 4096, fill: 0)
        withExtendedLifetime(device) {
            // Remote write without local write.
            #expect(driver.registerMemory(device.protectionDomain, memory.bytes.baseAddress!, 4096,
                                          Int32(IBV_ACCESS_REMOTE_WRITE.rawValue)) == nil)
            var attr = ibv_qp_init_attr()
            attr.send_cq = device.completionQueue
            attr.recv_cq = device.completionQueue
            attr.qp_type = IBV_QPT_RC
            attr.cap.max_send_wr = 4
            attr.cap.max_recv_wr = 4
            attr.cap.max_send_sge = 1
            attr.cap.max_recv_sge = 1
            guard let qp = driver.createQueuePair(device.protectionDomain, &attr) else { Issue.record("no queue pair"); return }
            var a = ibv_qp_attr()
            a.qp_state = IBV_QPS_INIT
            a.port_num = 1
            // INIT without the access flags and P_Key index verbs requires for it.
            #expect(driver.modifyQueuePair(qp, &a, Int32(IBV_QP_STATE.rawValue | IBV_QP_PORT.rawValue)) == EINVAL)
            // RESET straight to RTS.
            a.qp_state = IBV_QPS_RTS
            #expect(driver.modifyQueuePair(qp, &a, Int32(QueuePairStateMachine.requiredAttributes(to: .readyToSend).rawValue)) == EINVAL)
            // Posting a send before RTS.
            var wr = ibv_send_wr()
            wr.opcode = IBV_WR_RDMA_WRITE
            var bad: UnsafeMutablePointer<ibv_send_wr>?
            #expect(ibv_post_send(qp, &wr, &bad) == EINVAL)
            // A PD or CQ still in use cannot go.
            #expect(driver.deallocateProtectionDomain(device.protectionDomain) == EBUSY)
            #expect(driver.destroyCompletionQueue(device.completionQueue) == EBUSY)
            #expect(driver.destroyCompletionChannel(device.completionChannel!) == EBUSY)
            #expect(driver.destroyQueuePair(qp) == 0)
        }
    }
}

/// On a machine with an RDMA device (`make test-rdma`): the real device answers the control path,
/// and every shared suite also runs its `verbs-hardware` cases (docs/design/fabric.md).
@Suite(.enabled(if: RDMAHardware.present, Comment(rawValue: RDMAHardware.absence)))
struct VerbsHardwareTests {
    @Test func deviceOpensWithAnActivePort() throws {
        let device = try VerbsDevice(driver: SystemVerbs(forConnectionManager: false), name: RDMAHardware.deviceName, port: 1,
                                     gidIndex: 0, completionQueueEntries: 64, completionEvents: true)
        #expect(device.address.gid.count == 16)
        #expect(device.address.ethernet || device.address.lid != 0, "an InfiniBand port without a LID: is a subnet manager running?")
    }
}

@Suite struct QueuePairStateMachineTests {
    @Test func reliableConnectionWalksResetInitRTRRTS() throws {
        var m = QueuePairStateMachine()
        #expect(!m.canPostReceive && !m.canPostSend)
        try m.move(to: .initialized)
        #expect(m.canPostReceive && !m.canPostSend)
        try m.move(to: .readyToReceive)
        #expect(!m.canPostSend)
        try m.move(to: .readyToSend)
        #expect(m.canPostSend && m.canPostReceive)
    }

    @Test func skippingAStateIsRefused() throws {
        var m = QueuePairStateMachine()
        #expect(throws: VerbsError.self) { try m.move(to: .readyToSend) }
        try m.move(to: .initialized)
        #expect(throws: VerbsError.self) { try m.move(to: .readyToSend) }
        #expect(m.state == .initialized)
    }

    @Test func everyStateCanFailAndErrorOnlyLeadsToReset() throws {
        for s in QueuePairStateMachine.State.allCases {
            var m = QueuePairStateMachine()
            for step in [.initialized, .readyToReceive, .readyToSend] as [QueuePairStateMachine.State] where m.state != s {
                if m.canMove(to: step) { try m.move(to: step) }
            }
            try m.move(to: .error)
            #expect(!m.canPostSend && !m.canPostReceive)
            #expect(!m.canMove(to: .readyToSend) && !m.canMove(to: .initialized))
            try m.move(to: .reset)
            #expect(m.state == .reset)
        }
    }

    @Test func transitionsNameTheAttributesVerbsRequires() {
        #expect(QueuePairStateMachine.requiredAttributes(to: .initialized) == [.state, .pkeyIndex, .port, .accessFlags])
        #expect(QueuePairStateMachine.requiredAttributes(to: .readyToReceive).isSuperset(of: [.addressVector, .destQPNumber, .receivePSN]))
        #expect(QueuePairStateMachine.requiredAttributes(to: .readyToSend).isSuperset(of: [.sendPSN, .timeout, .retryCount, .rnrRetry]))
        #expect(QueuePairStateMachine.requiredAttributes(to: .error) == [.state])
    }

    /// The masks are passed to `ibv_modify_qp` as they are: they must be verbs' own bits.
    @Test func attributeMasksAreVerbsOwnBits() {
        func mask(_ target: QueuePairStateMachine.State) -> UInt32 { QueuePairStateMachine.requiredAttributes(to: target).rawValue }
        #expect(mask(.initialized) == IBV_QP_STATE.rawValue | IBV_QP_PKEY_INDEX.rawValue | IBV_QP_PORT.rawValue | IBV_QP_ACCESS_FLAGS.rawValue)
        #expect(mask(.readyToReceive) == IBV_QP_STATE.rawValue | IBV_QP_AV.rawValue | IBV_QP_PATH_MTU.rawValue | IBV_QP_DEST_QPN.rawValue
            | IBV_QP_RQ_PSN.rawValue | IBV_QP_MAX_DEST_RD_ATOMIC.rawValue | IBV_QP_MIN_RNR_TIMER.rawValue)
        #expect(mask(.readyToSend) == IBV_QP_STATE.rawValue | IBV_QP_SQ_PSN.rawValue | IBV_QP_TIMEOUT.rawValue | IBV_QP_RETRY_CNT.rawValue
            | IBV_QP_RNR_RETRY.rawValue | IBV_QP_MAX_QP_RD_ATOMIC.rawValue)
        #expect(mask(.error) == IBV_QP_STATE.rawValue && mask(.reset) == IBV_QP_STATE.rawValue)
    }
}

@Suite struct ConnectionStateMachineTests {
    @Test func activeConnectResolvesThenConnects() {
        var m = ConnectionStateMachine()
        #expect(m.handle(.start) == .resolveAddress)
        #expect(m.handle(.addressResolved) == .resolveRoute)
        #expect(m.handle(.routeResolved) == .createQueuePairAndConnect)
        #expect(m.handle(.established) == .reportEstablished)
        #expect(m.state == .established)
        #expect(m.handle(.disconnected) == .fail("peer disconnected"))
        #expect(m.handle(.established) == .none)
    }

    @Test func rejectionAndTimeoutFailOnceAndStayFailed() {
        var m = ConnectionStateMachine()
        _ = m.handle(.start)
        _ = m.handle(.addressResolved)
        _ = m.handle(.routeResolved)
        #expect(m.handle(.rejected(status: 28)) == .fail("peer rejected the connection (status 28)"))
        #expect(m.handle(.timeout) == .none)

        var t = ConnectionStateMachine()
        _ = t.handle(.start)
        guard case .fail = t.handle(.timeout) else { Issue.record("timeout did not fail the connect"); return }
        #expect(t.handle(.addressResolved) == .none)
    }

    @Test func outOfOrderEventsFailTheConnection() {
        var m = ConnectionStateMachine()
        _ = m.handle(.start)
        guard case .fail = m.handle(.established) else { Issue.record("established before route resolution was accepted"); return }
    }
}
