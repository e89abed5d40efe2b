// The frames of the VM hooks protocol between a patched QEMU (libinterpose.so,
// Sources/Interpose/include/interpose_vm.h, which documents the format) and the agent: a u32
// little-endian body length, a type byte, the body. Only what the agent needs to build, read
// and check them.

#if canImport(Glibc)
import Glibc
#endif

/// Frame types of the VM hooks protocol (interpose_vm.h).
enum HooksFrame: UInt8 {
    // QEMU -> agent
    case hello = 0x01, dirtyLog = 0x02, ok = 0x03, state = 0x04, error = 0x05
    // agent -> QEMU
    case welcome = 0x81, refuse = 0x82, stop = 0x83, cont = 0x84, syncDirty = 0x85, save = 0x86, load = 0x87

    /// The version of the protocol and of interpose_vm.h this agent speaks.
    static let abiVersion: UInt32 = 1
    /// INTERPOSE_VM_MAX_FRAME: the largest body either side accepts.
    static let maxBody = 64 << 20
    /// The codes QEMU's library puts into ERROR frames (INTERPOSE_VM_E*).
    static let codeNames: [Int32: String] = [-1: "EINVAL", -9: "ENOHOOK", -10: "EHOOK", -11: "ETOOBIG"]

    /// The name interpose_vm.h gives the frame type.
    var name: String {
        switch self {
        case .hello: "HELLO"
        case .dirtyLog: "DIRTY_LOG"
        case .ok: "OK"
        case .state: "STATE"
        case .error: "ERROR"
        case .welcome: "WELCOME"
        case .refuse: "REFUSE"
        case .stop: "STOP"
        case .cont: "CONT"
        case .syncDirty: "SYNC_DIRTY"
        case .save: "SAVE"
        case .load: "LOAD"
        }
    }

    /// A frame's bytes: header and body.
    static func encode(_ type: HooksFrame, _ body: [UInt8]) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(5 + body.count)
        out.le32(UInt32(body.count))
        out.append(type.rawValue)
        return out + body
    }

    /// A request frame: the request number, then `payload`.
    static func request(_ type: HooksFrame, seq: UInt32, _ payload: [UInt8] = []) -> [UInt8] {
        var body: [UInt8] = []
        body.reserveCapacity(4 + payload.count)
        body.le32(seq)
        return encode(type, body + payload)
    }
}

/// One frame as read: its raw type byte (possibly unknown) and body.
struct RawHooksFrame {
    var type: UInt8
    var body: [UInt8]
}

/// Why a frame could not be read.
enum HooksReadFailure: Error {
    case closed
    case timedOut
    case failed(Int32)
    case tooLarge(Int, type: UInt8)
}

extension HooksFrame {
    /// Reads one frame before `deadline`; a body over `maxBody` is refused before it is read.
    static func read(_ fd: Int32, deadline: ContinuousClock.Instant) -> Result<RawHooksFrame, HooksReadFailure> {
        let header: [UInt8]
        switch Sockets.readExactly(fd, 5, deadline: deadline) {
        case .bytes(let b): header = b
        case .closed: return .failure(.closed)
        case .timedOut: return .failure(.timedOut)
        case .failed(let e): return .failure(.failed(e))
        }
        let length = Int(header.le32(at: 0))
        guard length <= maxBody else { return .failure(.tooLarge(length, type: header[4])) }
        switch Sockets.readExactly(fd, length, deadline: deadline) {
        case .bytes(let b): return .success(RawHooksFrame(type: header[4], body: b))
        case .closed: return .failure(.closed)
        case .timedOut: return .failure(.timedOut)
        case .failed(let e): return .failure(.failed(e))
        }
    }
}

extension [UInt8] {
    mutating func le32(_ v: UInt32) { for i in 0..<4 { append(UInt8(truncatingIfNeeded: v >> (8 * UInt32(i)))) } }

    func le32(at i: Int) -> UInt32 {
        var v: UInt32 = 0
        for k in (0..<4).reversed() { v = v << 8 | UInt32(self[i + k]) }
        return v
    }

    func le64(at i: Int) -> UInt64 {
        var v: UInt64 = 0
        for k in (0..<8).reversed() { v = v << 8 | UInt64(self[i + k]) }
        return v
    }
}
