import Foundation
import Synchronization
import Testing
@testable import RDMAPaxos

/// Where threads get their names and where a snapshot's capture is let go of.
@Suite struct ThreadPlacementTests {
    /// The name the calling thread has in the kernel.
    static func kernelName() -> String {
        (try? String(contentsOfFile: "/proc/thread-self/comm", encoding: .utf8))?
            .trimmingCharacters(in: .newlines) ?? "unreadable"
    }

    /// Foundation's `Thread.name` alone leaves the kernel's name as the starting thread's; a
    /// thread made with `Thread(named:)` carries its own, cut to 15 bytes.
    @Test(.enabled(if: FileManager.default.fileExists(atPath: "/proc/thread-self/comm")))
    func aNamedThreadCarriesItsNameInTheKernel() {
        let names = Mutex<[String]>([])
        let done = DispatchSemaphore(value: 0)
        for name in ["log-writer", "a-name-longer-than-fifteen", "vm-nic-tête-à-tête", "abcdefghijklmné"] {
            Thread(named: name) {
                names.withLock { $0.append(Self.kernelName()) }
                done.signal()
            }.start()
            done.wait()
        }
        // The third ends with a two-byte "à" at bytes 14–15; the fourth's "é" would straddle the
        // 15th byte, so it is left out.
        #expect(names.withLock { $0 } == ["log-writer", "a-name-longer-t", "vm-nic-t\u{EA}te-\u{E0}", "abcdefghijklmn"])
    }

    final class Tracked: Sendable {}

    /// `release()` drops the captured state wherever it is called, even while another thread
    /// (the encoder) still holds the box: the state goes where the runtime chooses.
    @Test func aCaptureIsDroppedByReleaseNotByTheLastHolderOfTheBox() {
        weak var watched: Tracked?
        let box: CapturedSnapshot = {
            let state = Tracked()
            watched = state
            return CapturedSnapshot { [state] in withExtendedLifetime(state) { [1, 2, 3] } }
        }()
        #expect(box.encode() == [1, 2, 3])
        #expect(watched != nil)
        box.release()
        #expect(watched == nil)
        #expect(box.encode() == [])
    }
}
