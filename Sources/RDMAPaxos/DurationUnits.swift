import Foundation

// One conversion from `Duration` to the units C calls and reports take, instead of
// `components.attoseconds` arithmetic at each call site.
extension Duration {
    /// The span in whole nanoseconds, truncated toward zero (saturating at `Int64`'s range, about
    /// 292 years).
    public var wholeNanoseconds: Int64 {
        let (seconds, attoseconds) = components
        let (ns, overflow) = seconds.multipliedReportingOverflow(by: 1_000_000_000)
        if overflow { return seconds < 0 ? .min : .max }
        return ns.addingReportingOverflow(attoseconds / 1_000_000_000).overflow
            ? (seconds < 0 ? .min : .max) : ns + attoseconds / 1_000_000_000
    }

    /// The span in whole milliseconds, truncated toward zero.
    public var wholeMilliseconds: Int64 { wholeNanoseconds / 1_000_000 }

    /// The span in milliseconds, with the fraction (for reports).
    public var inMilliseconds: Double { inSeconds * 1_000 }

    /// The span in seconds, with the fraction.
    public var inSeconds: Double {
        let (seconds, attoseconds) = components
        return Double(seconds) + Double(attoseconds) * 1e-18
    }

    /// The span as a `timeval` (whole microseconds), for socket timeouts (`SO_RCVTIMEO`).
    public var timeval: Glibc.timeval {
        let (seconds, attoseconds) = components
        return Glibc.timeval(tv_sec: Int(seconds), tv_usec: Int(attoseconds / 1_000_000_000_000))
    }
}
