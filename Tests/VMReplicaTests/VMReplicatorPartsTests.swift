// The VM replica's parts that run without QEMU: log entries, the input log state machine,
// guest frames, the output guard, the [vm] config table, the CPU meter, the backup's
// refusal of a sync session other than its checkpoint's, and how a killed QEMU is seen dead.

import Foundation
import RDMAPaxos
import Synchronization
import Testing
@testable import VMReplica

@Suite struct VMReplicatorPartsTests {
    /// A restarted replica numbers its QEMUs on from the logs an earlier run left, so pruning
    /// the oldest keeps reaching them.
    @Test func qemuLogNumberingGoesOnFromAnEarlierRun() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("qemu-logs-\(UUID())").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        #expect(VMReplicator.highestQEMULog(in: dir) == 0)
        for f in ["qemu-3.log", "qemu-12.log", "qemu-12.serial.log", "qemu-40.serial.log", "qemu-41.qmp", "qemu-x.log", "checkpoints.log"] {
            #expect(FileManager.default.createFile(atPath: dir + "/" + f, contents: Data()))
        }
        #expect(VMReplicator.highestQEMULog(in: dir) == 12)
    }

    @Test func logEntriesRoundTripAndBadOnesAreRefused() throws {
        let frame = GuestLink().requestFrame(payload: Array("INC a 1\n".utf8))
        for e in [VMLogEntry.input(frame: frame), .checkpoint(epoch: 0x0102_0304_0506_0708, proposer: 0xA0B0_C0D0), .takeOver(by: 0x0A0B_0C0D), .unprotected(by: 7)] {
            #expect(try VMLogEntry(decoding: e.encoded()) == e)
        }
        for bad: [UInt8] in [[], [1], [1, 2, 3], [2] + [UInt8](repeating: 0, count: 11), [3] + [UInt8](repeating: 0, count: 20), [3, 0, 0, 1], [4, 0, 0, 1], [4, 0, 0, 0, 0, 1], [5, 0, 0, 0, 1]] {
            #expect(throws: DecodeError.self, "\(bad)") { try VMLogEntry(decoding: bad) }
        }
    }

    @Test func inputLogDeliversInOrderCountsAndRestoresCounters() throws {
        let seen = Mutex<[(LogIndex, VMLogEntry)]>([])
        let restored = Mutex<LogIndex?>(nil)
        let log = VMInputLog(deliver: { i, e in seen.withLock { $0.append((i, e)) } },
                             onRestore: { i in restored.withLock { $0 = i } })
        let frame = GuestLink().requestFrame(payload: Array("x\n".utf8))
        #expect(log.apply(VMLogEntry.input(frame: frame).encoded(), index: 1) == [1])
        #expect(log.apply([9, 9], index: 2) == [0])
        #expect(log.apply(VMLogEntry.checkpoint(epoch: 1, proposer: 1).encoded(), index: 3) == [1])
        #expect(seen.withLock { $0.map(\.0) } == [1, 3])
        #expect(String(decoding: log.query([]), as: UTF8.self) == "inputs=1\ncheckpoints=1\nmalformed=1\napplied_index=3")
        let copy = VMInputLog(onRestore: { i in restored.withLock { $0 = i } })
        try copy.restore(log.snapshot(), index: 3)
        #expect(copy.inputs == 1 && copy.checkpoints == 1 && copy.malformed == 1 && copy.appliedIndex == 3)
        #expect(restored.withLock { $0 } == 3, "a restore must tell the replicator its VM missed inputs")
        #expect(throws: DecodeError.self) { try copy.restore([1, 2, 3], index: 4) }
    }

    @Test func requestFramesAreValidIPv4AndOnlyTheGuestsAnswersAreUnwrapped() {
        let link = GuestLink()
        let payload = Array("INC c 7\n".utf8)
        let f = link.requestFrame(payload: payload)
        #expect(f.count == 14 + 20 + 8 + payload.count)
        #expect(Array(f[0..<6]) == link.guestMAC && Array(f[6..<12]) == link.frontMAC)
        #expect(GuestLink.checksum(Array(f[14..<34])) == 0, "IPv4 header checksum does not verify")
        // The same frame is a request, not an answer: it goes to the guest.
        #expect(link.answerPayload(f) == nil)
        // Swap the addresses and ports: now it is the guest answering the front.
        var a = link.frontMAC + link.guestMAC + [0x08, 0x00] + Array(f[14..<26]) + link.guestIP + link.frontIP
        a += [UInt8(link.guestPort >> 8), UInt8(link.guestPort & 0xff), UInt8(link.frontPort >> 8), UInt8(link.frontPort & 0xff)]
        a += Array(f[38...])
        #expect(link.answerPayload(a) == payload)
        var otherPort = a
        otherPort[35] ^= 1
        #expect(link.answerPayload(otherPort) == nil)
        #expect(link.answerPayload(Array(a.prefix(40))) == nil)
        var arp = a
        arp[13] = 0x06
        #expect(link.answerPayload(arp) == nil)
    }

    @Test func outputGuardReleasesExactlyWhatCameBeforeTheCut() {
        let g = OutputGuard(releaseOnMatch: false)
        let out = Mutex<[[UInt8]]>([])
        g.setDelivery { f in out.withLock { $0.append(f) } }
        #expect(g.oldestHeld == nil)
        for i in 0..<3 { g.hold([UInt8(i)]) }
        let cut = g.cut()
        for i in 3..<5 { g.hold([UInt8(i)]) }
        #expect(g.checkpointEnded(epoch: 1, completed: true, cut: cut) == 3)
        #expect(out.withLock { $0 } == [[0], [1], [2]])
        #expect(g.checkpointEnded(epoch: 1, completed: true, cut: cut) == 0, "a cut releases once")
        #expect(g.heldCount == 2 && g.releasedCount == 3)
        let cut2 = g.cut()
        #expect(g.checkpointEnded(epoch: 2, completed: false, cut: cut2) == 0, "a failed checkpoint releases nothing")
        #expect(g.checkpointEnded(epoch: 3, completed: true, cut: g.cut()) == 2)
        #expect(out.withLock { $0 } == [[0], [1], [2], [3], [4]])
        g.drop()
        #expect(g.droppedCount == 1 && g.heldCount == 0)
    }

    @Test func vmTableParsesResolvesPathsAndNamesBadKeys() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("vmcfg-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        for f in ["k", "i"] { _ = FileManager.default.createFile(atPath: dir + "/" + f, contents: Data([0])) }
        let node = """
            id = 1
            data_dir = "d"
            [[members]]
            id = 1
            address = "127.0.0.1:1"
            client_address = "127.0.0.1:2"

            """
        let vm = """
            [vm]
            kernel = "k"
            initrd = "i"
            ram_file = "/dev/shm/x.ram"
            run_dir = "run"
            front_address = "127.0.0.1:3"
            sync_address = "127.0.0.1:4"
            migration_address = "127.0.0.1:5"
            peer = 2
            peer_sync_address = "127.0.0.1:6"
            peer_migration_address = "127.0.0.1:7"
            idle_cpu_percent = 25

            """
        let path = dir + "/c.toml"
        try (node + vm).write(toFile: path, atomically: true, encoding: .utf8)
        _ = try NodeConfig.load(path: path)  // the node's reader leaves [vm] alone
        let c = try VMConfig.load(path: path)
        #expect(c.qemu.kernel == dir + "/k" && c.runDir == dir + "/run" && c.peer == 2 && c.idleCPUPercent == 25)
        #expect(c.backupIdleMaxMilliseconds == 1000 && !c.logDivergentPages, "defaults")
        try (node + vm + "backup_idle_max_ms = 250\nlog_divergent_pages = true\n").write(toFile: path, atomically: true, encoding: .utf8)
        let tuned = try VMConfig.load(path: path)
        #expect(tuned.backupIdleMaxMilliseconds == 250 && tuned.logDivergentPages)
        // No disk unless disk_image names one; relative to the config file, default 64 MiB.
        #expect(c.qemu.diskImage == nil && !c.qemu.arguments(nicSocket: "n", qmpSocket: "q", serialLog: "s", pidFile: "p", incoming: false).contains("-blockdev"))
        try (node + vm + "disk_image = \"vm,1.img\"\n").write(toFile: path, atomically: true, encoding: .utf8)
        let withDisk = try VMConfig.load(path: path)
        #expect(withDisk.qemu.diskImage == dir + "/vm,1.img" && withDisk.diskSizeMiB == 64)
        let diskArgs = withDisk.qemu.arguments(nicSocket: "n", qmpSocket: "q", serialLog: "s", pidFile: "p", incoming: true)
        #expect(diskArgs.contains("driver=raw,node-name=plover-disk0,file.driver=file,file.filename=\(dir)/vm,,1.img,file.locking=off"))
        #expect(diskArgs.contains("virtio-blk-pci,drive=plover-disk0"))
        try (node + vm + "disk_image = \"d.img\"\ndisk_size_mb = 0\n").write(toFile: path, atomically: true, encoding: .utf8)
        #expect { try VMConfig.load(path: path) } throws: { ($0 as? ConfigError)?.key == "vm.disk_size_mb" }
        try (node + vm + "disk_image = \"\"\n").write(toFile: path, atomically: true, encoding: .utf8)
        #expect { try VMConfig.load(path: path) } throws: { ($0 as? ConfigError)?.key == "vm.disk_image" }
        try (node + vm + "backup_idle_max_ms = -1\n").write(toFile: path, atomically: true, encoding: .utf8)
        #expect { try VMConfig.load(path: path) } throws: { ($0 as? ConfigError)?.key == "vm.backup_idle_max_ms" }
        try (node + vm + "idle_cpu_percnt = 3\n").write(toFile: path, atomically: true, encoding: .utf8)
        #expect(throws: ConfigError(file: path, key: "vm.idle_cpu_percnt", problem: "unknown key (misspelt?)")) { try VMConfig.load(path: path) }
        try node.write(toFile: path, atomically: true, encoding: .utf8)
        #expect { try VMConfig.load(path: path) } throws: { ($0 as? ConfigError)?.key == "vm" }
        try (node + vm.replacingOccurrences(of: "kernel = \"k\"", with: "kernel = \"missing\"")).write(toFile: path, atomically: true, encoding: .utf8)
        #expect { try VMConfig.load(path: path) } throws: { ($0 as? ConfigError)?.key == "vm.kernel" }
        // QEMU's accelerator, CPUs and extra arguments; the failover keys.
        #expect(c.qemu.accel == .tcg && !c.accelAuto && c.qemu.cpus == 1 && c.qemu.extraArguments.isEmpty && c.backupLostMilliseconds == 1000 && c.peerFrontAddress == nil)
        try (node + vm + "accel = \"auto\"\ncpus = 2\nqemu_args = \"-rtc base=utc  -no-hpet\"\nbackup_lost_ms = 300\npeer_front_address = \"127.0.0.1:9\"\n")
            .write(toFile: path, atomically: true, encoding: .utf8)
        let q = try VMConfig.load(path: path)
        #expect(q.accelAuto && q.qemu.cpus == 2 && q.qemu.extraArguments == ["-rtc", "base=utc", "-no-hpet"])
        #expect(q.backupLostMilliseconds == 300 && q.peerFrontAddress == "127.0.0.1:9")
        // Release on match: on by default, 100 ms hold; both keys named when wrong.
        #expect(c.releaseOnMatch && c.outputHoldMaxMilliseconds == 100)
        try (node + vm + "release_on_match = false\noutput_hold_max_ms = 40\n").write(toFile: path, atomically: true, encoding: .utf8)
        let m = try VMConfig.load(path: path)
        #expect(!m.releaseOnMatch && m.outputHoldMaxMilliseconds == 40)
        let args = q.qemu.arguments(nicSocket: "n", qmpSocket: "q", serialLog: "s", pidFile: "p", incoming: false)
        #expect(args.contains("q35,accel=tcg,memory-backend=mem") && args.suffix(3) == ["-rtc", "base=utc", "-no-hpet"])
        for (bad, key) in [("accel = \"xen\"", "vm.accel"), ("cpus = 0", "vm.cpus"), ("backup_lost_ms = 5", "vm.backup_lost_ms"),
                           ("output_hold_max_ms = 0", "vm.output_hold_max_ms"), ("release_on_match = 1", "vm.release_on_match"),
                           ("peer_front_address = \"nowhere\"", "vm.peer_front_address")] {
            try (node + vm + bad + "\n").write(toFile: path, atomically: true, encoding: .utf8)
            #expect(performing: { try VMConfig.load(path: path) }, throws: { ($0 as? ConfigError)?.key == key })
        }
    }

    /// `accel = "auto"` takes KVM only when a guest kernel started under it; a QEMU that
    /// hangs (as guests do under this machine's /dev/kvm) or fails means TCG. Stand-ins for QEMU
    /// play both parts.
    @Test(.enabled(if: access("/dev/kvm", R_OK | W_OK) == 0, "needs /dev/kvm"))
    func autoAccelTakesKVMOnlyWhenAGuestMakesProgressUnderIt() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("accel-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        func stub(_ name: String, _ body: String) throws -> QEMUSettings {
            let path = dir + "/" + name
            try "#!/bin/sh\n\(body)\n".write(toFile: path, atomically: true, encoding: .utf8)
            chmod(path, 0o755)
            var s = QEMUSettings(kernel: "k", initrd: "i", ramFile: "r")
            s.binary = path
            return s
        }
        // Writes the kernel's banner to the file named by "-serial file:PATH", as a booting guest does.
        let talks = try stub("talks", #"for a; do case "$a" in file:*) echo "Linux version" > "${a#file:}";; esac; done; exec sleep 30"#)
        let hangs = try stub("hangs", "exec sleep 30")
        let fails = try stub("fails", "exit 3")
        #expect(AccelProbe.choose(talks, scratch: dir, timeout: .seconds(5)).0 == .kvm)
        let (h, why) = AccelProbe.choose(hangs, scratch: dir, timeout: .milliseconds(500))
        #expect(h == .tcg && why.contains("did not start"), "\(why)")
        #expect(AccelProbe.choose(fails, scratch: dir, timeout: .seconds(5)).0 == .tcg)
    }

    @Test func checkpointFailpointsParseAndNameWhatIsWrong() throws {
        #expect(try CheckpointFailpoint.parse("primary:pages\n") == CheckpointFailpoint(role: .primary, phase: .pages))
        #expect(try CheckpointFailpoint.parse("backup:resume") == CheckpointFailpoint(role: .backup, phase: .resume))
        for bad in ["primary", "witness:pages", "backup:sync", "primary:pages:3", ""] {
            #expect(performing: { try CheckpointFailpoint.parse(bad) }, throws: { "\($0)".contains("is not ROLE:PHASE") })
        }
        // Without PLOVER_VM_FAILPOINTS nothing is armed, whatever the run directory holds.
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("fp-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try "primary:hashes".write(toFile: dir + "/crash-at", atomically: true, encoding: .utf8)
        #expect(CheckpointFailpoints(runDir: dir, environment: [:], killQEMUs: {}).arm(as: .primary) == nil)
        let on = CheckpointFailpoints(runDir: dir, environment: ["PLOVER_VM_FAILPOINTS": "1"], killQEMUs: {})
        #expect(on.arm(as: .backup) == nil, "armed for the other role: kept")
        #expect(on.arm(as: .primary) == .hashes)
        #expect(on.arm(as: .primary) == nil, "an armed checkpoint consumes the file")
    }

    @Test func undoLogPutsBackExactlyThePagesItSaved() throws {
        let m = try GuestMemory(pageCount: 8)
        for p in 0..<8 { m.withMutablePage(p) { $0.initializeMemory(as: UInt8.self, repeating: UInt8(p)) } }
        let undo = PageUndoLog()
        undo.save([1, 5], of: m)
        #expect(undo.count == 2)
        for p in [1, 5, 6] { m.withMutablePage(p) { $0.initializeMemory(as: UInt8.self, repeating: 0xEE) } }
        #expect(undo.restore(into: m) == 2)
        #expect(m.page(1).allSatisfy { $0 == 1 } && m.page(5).allSatisfy { $0 == 5 })
        #expect(m.page(6).allSatisfy { $0 == 0xEE }, "a page it did not save is left alone")
        #expect(undo.count == 0 && undo.restore(into: m) == 0, "a restore empties the log")
    }

    @Test func cpuMeterSeesThisProcessWorking() {
        var m = CPUMeter(pid: getpid())
        #expect(m.sample() == nil, "the first sample has nothing to compare with")
        let end = ContinuousClock.now + .milliseconds(60)
        var x: UInt64 = 1
        while ContinuousClock.now < end { x = x &* 6_364_136_223_846_793_005 &+ 1 }
        let rate = m.sample()
        #expect(x != 0)
        #expect((rate ?? 0) > 0.2, "busy for 60 ms but measured \(String(describing: rate)) cores")
        #expect(CPUMeter.cpuNanoseconds(pid: -5) == nil)
    }

    @Test func cpuUsedBetweenSamplesNeverRunsBackwardsWhenAThreadExits() {
        // Thread 11 exited (its 900 ns leave the sum), 12 grew by 30, 13 is new with 5.
        #expect(CPUMeter.used(from: [11: 900, 12: 100], to: [12: 130, 13: 5]) == 35)
        // A reused thread id with a smaller count is a new thread: all of it counts.
        #expect(CPUMeter.used(from: [7: 500], to: [7: 40]) == 40)
        #expect(CPUMeter.used(from: [:], to: [:]) == 0)
    }

    @Test func backupRefusesASessionOtherThanItsCheckpointBeforeWritingAnything() async throws {
        let pages = 64
        let primary = try GuestMemory(pageCount: pages)
        let backup = try GuestMemory(pageCount: pages)
        primary.withMutablePage(3) { $0[0] = 7 }
        let (pc, bc) = InMemorySyncChannel.pair(backupMemory: backup)
        let state = MemorySyncStateStore(.inSync(session: 4))
        let p = SyncPrimary(memory: primary, pool: PageHashPool(threadCount: 1))
        let b = SyncBackup(memory: backup, pool: PageHashPool(threadCount: 1), state: state)
        let all = DirtyBitmap.all(pageCount: pages)
        async let backupSide: Result<SyncResult, any Error> = {
            do { return .success(try await b.run(dirty: all, over: bc, expectedSession: 6)) } catch { return .failure(error) }
        }()
        let pe: (any Error)? = await { do { _ = try await p.run(dirty: all, over: pc, session: 5); return nil } catch { return error } }()
        guard case .failure(let be) = await backupSide else { Issue.record("backup accepted session 5 while expecting 6"); return }
        #expect(be as? SyncError == .wrongSession(expected: 6, got: 5))
        #expect(pe != nil, "the primary must see the refusal")
        #expect(state.load() == .inSync(session: 4), "the refusal came before anything could be written")
        #expect(backup.page(3)[0] == 0)
    }

    @Test func primaryWaitsForThisCheckpointsReadySkippingStaleOnes() async throws {
        let backupMemory = try GuestMemory(pageCount: 4)
        var (p, b) = InMemorySyncChannel.pair(backupMemory: backupMemory)
        try await b.send(VMReplicator.readyFrame(epoch: 3))
        try await b.send(VMReplicator.readyFrame(epoch: 4))
        try await VMReplicator.awaitReady(p, epoch: 4)  // the stale ready of 3 is skipped...
        // ...and answered with a skip, so the late backup drops checkpoint 3 at once.
        let answer = try await b.receive()
        #expect(answer == VMReplicator.skipFrame(epoch: 3))
        #expect(VMReplicator.handshakeEpoch(answer, kind: 0xEF) == 3)
        #expect(VMReplicator.handshakeEpoch(answer, kind: 0xEE) == nil)
        #expect(VMReplicator.handshakeEpoch(VMReplicator.readyFrame(epoch: 0x0102030405060708), kind: 0xEE) == 0x0102030405060708)
        try await b.send(VMReplicator.readyFrame(epoch: 9))
        await #expect(throws: SyncError.wrongSession(expected: 5, got: 9)) { try await VMReplicator.awaitReady(p, epoch: 5) }
        (p, b) = InMemorySyncChannel.pair(backupMemory: backupMemory)
        try await b.send([1, 2, 3])
        await #expect(throws: SyncError.self) { try await VMReplicator.awaitReady(p, epoch: 1) }
    }

    /// One replica with a disk and one without: the primary refuses the backup's ready with an
    /// error naming `vm.disk_image`, and answers it with a skip so the backup does not wait.
    @Test(arguments: [(true, false), (false, true)])
    func aPairWithADiskOnOneSideIsRefusedNamingDiskImage(primaryDisk: Bool, backupDisk: Bool) async throws {
        let (p, b) = InMemorySyncChannel.pair(backupMemory: try GuestMemory(pageCount: 4))
        try await b.send(VMReplicator.readyFrame(epoch: 6, disk: backupDisk))
        do {
            try await VMReplicator.awaitReady(p, epoch: 6, disk: primaryDisk, peer: 2)
            Issue.record("a primary with disk \(primaryDisk) accepted a backup with disk \(backupDisk)")
            return  // no skip frame follows: waiting for one would hang
        } catch {
            #expect("\(error)".hasPrefix("vm.disk_image: "), "\(error)")
            #expect("\(error)".contains(primaryDisk ? "node 2's has none" : "node 2's VM has a disk"), "\(error)")
        }
        #expect(try await b.receive() == VMReplicator.skipFrame(epoch: 6))
        // Both with a disk: accepted.
        try await b.send(VMReplicator.readyFrame(epoch: 7, disk: true))
        try await VMReplicator.awaitReady(p, epoch: 7, disk: true, peer: 2)
    }

    @Test func theBackupsReaderSeesTheFrameItAlreadyReadFirst() async throws {
        let backupMemory = try GuestMemory(pageCount: 4)
        let (p, b) = InMemorySyncChannel.pair(backupMemory: backupMemory)
        try await p.send([7])
        let replay = FirstFrameReplay([5, 6], then: b)
        #expect(try await replay.receive() == [5, 6])
        #expect(try await replay.receive() == [7])
        try await replay.send([8])
        #expect(try await p.receive() == [8])
        replay.close()
        await #expect(throws: SyncChannelError.closed) { try await p.receive() }
    }

    /// `QEMUInstance.kill` waits for death as /proc shows it, not for Foundation to notice: a
    /// killed child is dead while still an unreaped zombie.
    @Test func aKilledChildIsDeadWhileStillAZombie() throws {
        #expect(QEMUInstance.alive(getpid()))
        var pid: pid_t = 0
        let argv: [UnsafeMutablePointer<CChar>?] = [strdup("/bin/sleep"), strdup("30"), nil]
        defer { argv.forEach { free($0) } }
        try #require(posix_spawn(&pid, "/bin/sleep", nil, nil, argv, environ) == 0 && pid > 0)
        var reaped = false
        defer {
            if !reaped {
                kill(pid, SIGKILL)
                waitpid(pid, nil, 0)
            }
        }
        #expect(QEMUInstance.alive(pid))
        kill(pid, SIGKILL)
        let deadline = ContinuousClock.now + .seconds(5)
        while QEMUInstance.alive(pid), ContinuousClock.now < deadline { usleep(1000) }
        #expect(!QEMUInstance.alive(pid), "pid \(pid) still alive 5 s after SIGKILL")
        // Not reaped yet: /proc still lists it, as a zombie.
        let state = ProcStat.fields(of: pid)?.first
        #expect(state == "Z", "state of pid \(pid): \(state.map(String.init) ?? "gone")")
        var status: Int32 = 0
        #expect(waitpid(pid, &status, 0) == pid)
        reaped = true
        #expect(!QEMUInstance.alive(pid))
    }

    /// Each connection's requests carry a source port of its own, and an answer goes to the
    /// connection whose port it is addressed to, never to another client.
    @Test func frontSendsEachAnswerOnlyToTheConnectionThatAsked() throws {
        let seen = Mutex<[UInt16]>([])
        let front = try ClientFront(address: "127.0.0.1:0", sourcePorts: 40001..<40003) { _, port, _ in seen.withLock { $0.append(port) } }
        defer { front.stop() }
        func waitFor(_ n: Int) { for _ in 0..<500 where seen.withLock({ $0.count }) < n { usleep(2000) } }
        let a = try Sockets.connectTCP(host: "127.0.0.1", port: front.port)
        let b = try Sockets.connectTCP(host: "127.0.0.1", port: front.port)
        defer { close(a); close(b) }
        _ = Sockets.writeAll(a, Array("INC a 1\n".utf8))
        waitFor(1)
        _ = Sockets.writeAll(b, Array("INC b 1\n".utf8))
        waitFor(2)
        let ports = seen.withLock { $0 }
        #expect(ports.count == 2 && ports[0] != ports[1] && ports.allSatisfy { (40001..<40003).contains($0) })
        guard ports.count == 2 else { return }
        front.deliver(GuestAnswer(port: ports[0], payload: Array("a 1 7\n".utf8)))
        front.deliver(GuestAnswer(port: 40000, payload: Array("nobody\n".utf8)))
        guard case let .bytes(got) = Sockets.readExactly(a, 6, deadline: .now + .seconds(2)) else {
            Issue.record("the client that asked got no answer")
            return
        }
        #expect(got == Array("a 1 7\n".utf8))
        var p = pollfd(fd: b, events: Int16(POLLIN), revents: 0)
        #expect(poll(&p, 1, 200) == 0, "the other client got an answer that was not its own")
        #expect(front.undeliverable == 1)
        // A third connection finds no free source port: it is told so and closed.
        let c = try Sockets.connectTCP(host: "127.0.0.1", port: front.port)
        defer { close(c) }
        var buf = [UInt8](repeating: 0, count: 200)
        var pc = pollfd(fd: c, events: Int16(POLLIN), revents: 0)
        _ = poll(&pc, 1, 2000)
        let n = buf.withUnsafeMutableBytes { read(c, $0.baseAddress!, 200) }
        #expect(n > 0 && String(decoding: buf[..<max(0, n)], as: UTF8.self).hasPrefix("ERR too many connections"))
    }

    /// The failure detector's probe says "nothing listens" only when the connect is refused.
    @Test func peerProbeIsFalseOnlyWhenRefused() throws {
        let listener = try Sockets.listenTCP(HostPort(host: "127.0.0.1", port: 0))
        let port = listener.localPort
        #expect(PeerProbe.listens(at: HostPort(host: "127.0.0.1", port: port), timeout: .seconds(2)))
        #expect(PeerProbe.listens(at: HostPort(host: "localhost", port: port), timeout: .seconds(2)))
        listener.close()
        #expect(!PeerProbe.listens(at: HostPort(host: "127.0.0.1", port: port), timeout: .seconds(2)))
        // No answer (or no route) within the timeout is not a refusal.
        #expect(PeerProbe.listens(at: HostPort(host: "10.255.255.1", port: 9), timeout: .milliseconds(50)))
    }
}
