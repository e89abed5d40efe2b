import Testing
@testable import RDMAPaxos

#if canImport(Glibc)
import Glibc
#endif

private let noRDMADevice = (try? VerbsProbe.deviceNames()) == nil

/// What can run without RDMA hardware: device discovery errors and the pure state machines.
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
        #expect(throws: VerbsError.self) { try VerbsFabric(node: 1, configuration: .init(members: [1, 2])) }
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
