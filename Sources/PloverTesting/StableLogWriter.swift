import Foundation
import RDMAPaxos

/// What `plover _stablelog-writer` does: appends to a stable log, printing each index once it is
/// durable, so a crash test can SIGKILL it mid-append and check that every index it printed is
/// still there after the crash.
package enum StableLogWriter {
    /// The payload of entry `index`: derived from the index so a reader can check it.
    package static func payload(index: LogIndex, bytes: Int) -> [UInt8] {
        (0..<bytes).map { UInt8(truncatingIfNeeded: index &* 31 &+ UInt64($0)) }
    }

    /// Appends entries after `log`'s last index, `inflight` at a time, until `count` were appended
    /// (0: never stops), waiting `paceMicroseconds` before each; prints `INDEX` (or `INDEX NANOS`
    /// with `timestamps`, CLOCK_MONOTONIC) to standard output as each becomes durable, and exits
    /// the process with status 1 on the first failed append. With `compactEvery`, every that
    /// many appends it compacts the log through the entry that many appends back.
    package static func append(to log: BerkeleyDBLog, payloadBytes: Int, inflight: Int, count: Int,
                               paceMicroseconds: Int, timestamps: Bool, compactEvery: Int = 0) {
        let window = DispatchSemaphore(value: max(1, inflight))
        let start = log.lastIndex
        var index = start
        while count == 0 || index < start + LogIndex(count) {
            window.wait()
            if paceMicroseconds > 0 { usleep(UInt32(paceMicroseconds)) }
            index += 1
            let i = index
            if compactEvery > 0, i % LogIndex(compactEvery) == 0, i > LogIndex(compactEvery) {
                do { try log.compactPrefix(through: i - LogIndex(compactEvery), ballot: Ballot(term: 1, node: 1)) } catch {
                    let line = Array("error: compacting: \(error)\n".utf8)
                    _ = line.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
                    Foundation.exit(1)
                }
            }
            let e = LogEntry(index: i, ballot: Ballot(term: 1, node: 1), kind: .command,
                             payload: payload(index: i, bytes: payloadBytes))
            log.append([e]) { result in
                switch result {
                case .success:
                    let line = Array((timestamps ? "\(i) \(monotonicNanoseconds())\n" : "\(i)\n").utf8)
                    _ = line.withUnsafeBytes { write(1, $0.baseAddress, $0.count) }
                case let .failure(error):
                    let line = Array("error: \(error)\n".utf8)
                    _ = line.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
                    Foundation.exit(1)
                }
                window.signal()
            }
        }
    }

    /// CLOCK_MONOTONIC in nanoseconds: one clock for the writer and a test reading its output.
    package static func monotonicNanoseconds() -> UInt64 {
        var t = timespec()
        clock_gettime(CLOCK_MONOTONIC, &t)
        return UInt64(t.tv_sec) * 1_000_000_000 + UInt64(t.tv_nsec)
    }
}
