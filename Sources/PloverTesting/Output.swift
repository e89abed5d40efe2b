import Foundation

// Output and errors shared by the harness, the benchmarks and the `plover` command line.

/// Prints a line straight to standard output, unbuffered.
package func say(_ s: String) {
    // Straight to fd 1, unbuffered, so progress shows as it happens even through a pipe.
    let line = s + "\n"
    _ = line.utf8CString.withUnsafeBufferPointer { write(1, $0.baseAddress, $0.count - 1) }
}

/// A duration as whole milliseconds, e.g. "12 ms".
package func ms(_ d: Duration) -> String {
    String(format: "%.0f ms", d.inMilliseconds)
}

/// An error printed as `error: MESSAGE` with exit status 1.
package struct CLIError: Error, CustomStringConvertible {
    package var description: String
    package init(_ d: String) { description = d }
}

/// Signal sources must outlive the call that installed them.
nonisolated(unsafe) package var retainedSignalSources: [any DispatchSourceSignal] = []
