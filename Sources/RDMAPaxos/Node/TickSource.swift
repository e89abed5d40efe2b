import Foundation

/// The node's clock: calls `onTick` at a fixed interval. One tick is the core's unit of time
/// (election timeouts and heartbeats are counted in ticks).
public protocol TickSource: AnyObject, Sendable {
    /// Starts calling `onTick` once per tick until `stop()`.
    func start(_ onTick: @escaping @Sendable () -> Void)
    /// Stops ticking; no `onTick` call starts after it returns (idempotent).
    func stop()
    /// Whether ticks stand for real time, so that ticks the node could not run on time (its
    /// thread starved of CPU) count as one: true for a timer, false for a clock driven by hand,
    /// whose every tick counts.
    var dropsLateTicks: Bool { get }
}

extension TickSource {
    /// A tick source drops no late ticks unless it says so.
    public var dropsLateTicks: Bool { false }
}

/// Ticks from a background thread every `interval`.
public final class TimerTickSource: TickSource, @unchecked Sendable {
    // @unchecked Sendable: `timer` is only touched under `lock`.
    private let interval: Duration
    private let lock = NSLock()
    private var timer: DispatchSourceTimer?

    /// A tick source firing every `interval` on its own dispatch queue.
    public init(interval: Duration) { self.interval = interval }

    /// A timer's ticks stand for real time: late ones count as one.
    public var dropsLateTicks: Bool { true }

    public func start(_ onTick: @escaping @Sendable () -> Void) {
        let t = DispatchSource.makeTimerSource(queue: DispatchQueue(label: "plover.tick"))
        let ns = Int(interval.wholeNanoseconds)
        t.schedule(deadline: .now() + .nanoseconds(ns), repeating: .nanoseconds(ns), leeway: .nanoseconds(ns / 10))
        t.setEventHandler(handler: onTick)
        // Starting again replaces the timer: the old one must not keep firing.
        let previous = lock.withLock { () -> DispatchSourceTimer? in
            defer { timer = t }
            return timer
        }
        previous?.cancel()
        t.resume()
    }

    public func stop() {
        lock.withLock {
            timer?.cancel()
            timer = nil
        }
    }
}

/// Ticks only when the test calls `fire()`: the in-memory twin of `TimerTickSource`.
public final class ManualTickSource: TickSource, @unchecked Sendable {
    // @unchecked Sendable: `onTick` is only touched under `lock`.
    private let lock = NSLock()
    private var onTick: (@Sendable () -> Void)?

    /// A tick source that fires only from `fire(_:)`.
    public init() {}
    public func start(_ onTick: @escaping @Sendable () -> Void) { lock.withLock { self.onTick = onTick } }
    public func stop() { lock.withLock { onTick = nil } }
    /// Calls the registered `onTick` `times` times on the caller's thread; nothing when not
    /// started.
    public func fire(_ times: Int = 1) {
        let f = lock.withLock { onTick }
        for _ in 0..<times { f?() }
    }
}
