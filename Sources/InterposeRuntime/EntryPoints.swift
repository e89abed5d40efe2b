import Foundation
import Interpose
import RDMAPaxos

// The C ABI (`include/interpose.h`), implemented in Swift. Every function here is exported from
// libinterpose.so under the name in its `@_cdecl`; the header documents them.

/// Largest input `interpose_propose*` takes (the log's batch limit bounds what can commit).
let inputBytesMax = 1 << 20

@_cdecl("interpose_abi_version")
public func interpose_abi_version() -> Int32 { INTERPOSE_ABI_VERSION }

@_cdecl("interpose_set_deliver")
public func interpose_set_deliver(_ deliver: interpose_deliver_fn?, _ context: UnsafeMutableRawPointer?) -> Int32 {
    Runtime.shared.setDeliver(deliver, context: UInt(bitPattern: context))
}

@_cdecl("interpose_init")
public func interpose_init(_ configPath: UnsafePointer<CChar>?) -> Int32 {
    guard let configPath else { return fail(INTERPOSE_EINVAL, "interpose_init: config_path is NULL") }
    return Runtime.shared.start(configPath: String(cString: configPath))
}

@_cdecl("interpose_shutdown")
public func interpose_shutdown() -> Int32 { Runtime.shared.shutdown() }

@_cdecl("interpose_is_leader")
public func interpose_is_leader() -> Int32 {
    guard let node = Runtime.shared.node else { return 0 }
    return node.status.role == .leader ? 1 : 0
}

@_cdecl("interpose_leader_term")
public func interpose_leader_term() -> UInt64 {
    guard let status = Runtime.shared.node?.status, status.role == .leader else { return 0 }
    return status.ballot.term
}

@_cdecl("interpose_leader_id")
public func interpose_leader_id() -> UInt64 {
    Runtime.shared.node?.status.leader.map { UInt64($0) } ?? 0
}

@_cdecl("interpose_propose")
public func interpose_propose(_ data: UnsafeRawPointer?, _ length: Int, _ index: UnsafeMutablePointer<UInt64>?) -> Int32 {
    guard let bytes = input(data, length, "interpose_propose") else { return INTERPOSE_EINVAL }
    return Runtime.shared.proposeAndWait(bytes, what: "interpose_propose", index: index)
}

@_cdecl("interpose_propose_async")
public func interpose_propose_async(_ data: UnsafeRawPointer?, _ length: Int, _ done: interpose_done_fn?,
                                    _ context: UnsafeMutableRawPointer?) -> Int32 {
    guard let bytes = input(data, length, "interpose_propose_async") else { return INTERPOSE_EINVAL }
    let ctx = UInt(bitPattern: context)
    return Runtime.shared.propose(bytes) { code, index in
        done?(UnsafeMutableRawPointer(bitPattern: ctx), code, index)
    }
}

@_cdecl("interpose_checkpoint")
public func interpose_checkpoint(_ index: UnsafeMutablePointer<UInt64>?) -> Int32 {
    Runtime.shared.proposeAndWait([UInt8(INTERPOSE_ENTRY_CHECKPOINT)], what: "interpose_checkpoint", index: index)
}

@_cdecl("interpose_status")
public func interpose_status(_ buffer: UnsafeMutablePointer<CChar>?, _ capacity: Int) -> Int32 {
    guard let node = Runtime.shared.node else { return fail(INTERPOSE_ESTATE, "interpose_status: no replica is running") }
    guard let buffer, capacity > 0 else { return fail(INTERPOSE_EINVAL, "interpose_status: buffer is NULL or capacity is 0") }
    let text = Array(node.status.text.utf8)
    let n = min(text.count, capacity - 1)
    text.withUnsafeBytes { UnsafeMutableRawPointer(buffer).copyMemory(from: $0.baseAddress!, byteCount: n) }
    buffer[n] = 0
    return Int32(clamping: text.count)
}

@_cdecl("interpose_last_error")
public func interpose_last_error() -> UnsafePointer<CChar>? {
    if let p = pthread_getspecific(lastErrorKey) { return UnsafePointer(p.assumingMemoryBound(to: CChar.self)) }
    return UnsafeRawPointer(emptyMessage.utf8Start).assumingMemoryBound(to: CChar.self)
}

/// Copies an input, refusing NULL, empty and oversized ones (with a message).
func input(_ data: UnsafeRawPointer?, _ length: Int, _ what: String) -> [UInt8]? {
    guard let data, length > 0 else { _ = fail(INTERPOSE_EINVAL, "\(what): the input is NULL or empty"); return nil }
    guard length <= inputBytesMax else {
        _ = fail(INTERPOSE_EINVAL, "\(what): the input has \(length) bytes, more than the \(inputBytesMax) allowed"); return nil
    }
    var bytes = [UInt8](repeating: 0, count: length + 1)
    bytes[0] = UInt8(INTERPOSE_ENTRY_INPUT)
    bytes.withUnsafeMutableBytes { ($0.baseAddress! + 1).copyMemory(from: data, byteCount: length) }
    return bytes
}

let emptyMessage: StaticString = ""

/// The calling thread's last error message (a malloc'd C string, freed when replaced or at thread exit).
let lastErrorKey: pthread_key_t = {
    var key = pthread_key_t()
    pthread_key_create(&key) { free($0) }
    return key
}()

/// Records `message` as this thread's last error and returns `code`.
func fail(_ code: Int32, _ message: String) -> Int32 {
    if let old = pthread_getspecific(lastErrorKey) { free(old) }
    pthread_setspecific(lastErrorKey, strdup(message))
    return code
}
