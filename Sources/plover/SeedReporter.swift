import Foundation
import Synchronization

/// The seed being simulated, so that a trap inside the core still names it.
let currentSeed = Atomic<UInt64>(0)

/// Prints "crashed while running seed N" if the process dies of a trap (SIGILL/SIGTRAP)
/// or an abort. Only async-signal-safe calls run in the handler.
func installSeedReporter() {
    for sig in [SIGILL, SIGTRAP, SIGABRT, SIGSEGV] {
        signal(sig) { s in
            // A stack buffer: no allocation inside a signal handler.
            withUnsafeTemporaryAllocation(of: UInt8.self, capacity: 24) { digits in
                var n = currentSeed.load(ordering: .relaxed)
                var i = digits.count
                repeat { i -= 1; digits[i] = UInt8(48 + n % 10); n /= 10 } while n > 0
                let prefix: StaticString = "\nsimulation crashed while running seed "
                _ = write(2, prefix.utf8Start, prefix.utf8CodeUnitCount)
                _ = write(2, digits.baseAddress! + i, digits.count - i)
            }
            let suffix: StaticString = "; replay: swift run plover simulate --seed <that seed> --trace\n"
            _ = write(2, suffix.utf8Start, suffix.utf8CodeUnitCount)
            signal(s, SIG_DFL)
            raise(s)
        }
    }
}
