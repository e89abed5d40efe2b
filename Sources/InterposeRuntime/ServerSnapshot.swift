import CXXHash
import Foundation
import Interpose
import RDMAPaxos

/// A server's own snapshot file as the replica's snapshot (APUS mode with `INTERPOSE_SNAPSHOT`,
/// docs/design/interpose.md, "Snapshots"): the shim hands over the file its server saved at a
/// SNAPSHOT entry, the log is compacted through that entry, and a replica that restores the
/// snapshot (after a restart, or sent by a peer) gets the file back for its server to load.
///
/// Bytes: magic `PLVRSRV1` | entry index (u64 LE) | file length (u64 LE) | XXH3-64 of the file
/// (u64 LE) | the file. The index and checksum make a snapshot restored at another index, or one
/// damaged on the way, an error that names what is wrong, never a file the server loads.
enum ServerSnapshot {
    static let magic = Array("PLVRSRV1".utf8)
    static let headerBytes = 8 + 8 + 8 + 8

    static func checksum(_ b: UnsafeRawBufferPointer) -> UInt64 { XXH3_64bits(b.baseAddress, b.count) }

    static func encode(index: LogIndex, file: UnsafeRawBufferPointer) -> [UInt8] {
        var out = magic
        out.reserveCapacity(headerBytes + file.count)
        for v in [index, UInt64(file.count), checksum(file)] { withUnsafeBytes(of: v.littleEndian) { out += $0 } }
        out += file
        return out
    }

    struct Invalid: Error, CustomStringConvertible { let description: String }

    /// The file inside `bytes`, checked against the index the replica restores it at.
    static func file(in bytes: [UInt8], index: LogIndex) throws -> ArraySlice<UInt8> {
        guard bytes.count >= headerBytes, Array(bytes[0..<8]) == magic else {
            throw Invalid(description: "the snapshot at index \(index) (\(bytes.count) bytes) is not a server snapshot of libinterpose (no PLVRSRV1 header): was it taken by a replica without INTERPOSE_SNAPSHOT, or by another program?")
        }
        func u64(_ at: Int) -> UInt64 { bytes[at..<(at + 8)].withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) } }
        let (taken, length, sum) = (u64(8), u64(16), u64(24))
        guard taken == index else {
            throw Invalid(description: "the server snapshot restored at index \(index) was taken at index \(taken)")
        }
        guard length == UInt64(bytes.count - headerBytes) else {
            throw Invalid(description: "the server snapshot at index \(index) says its file has \(length) bytes but carries \(bytes.count - headerBytes): it is cut short or padded")
        }
        let file = bytes[headerBytes...]
        guard file.withUnsafeBytes({ checksum($0) }) == sum else {
            throw Invalid(description: "the server snapshot at index \(index) fails its checksum: the file is corrupt")
        }
        return file
    }
}

/// Loads a snapshot's file into the server (the shim's restore function): 0 once queued for the
/// server thread, anything else if it cannot be.
public typealias RestoreFunction = @convention(c) (UInt64, UnsafeRawPointer?, Int) -> Int32

/// Before `interpose_init`: the shim's function that loads a restored snapshot's file into its
/// server. Without one, a replica refuses a non-empty snapshot (no program state to put it in).
@_cdecl("interpose_apus_set_restore")
public func interpose_apus_set_restore(_ fn: RestoreFunction?) -> Int32 {
    Runtime.shared.setRestore(fn)
}

/// The shim's server saved `file` at log entry `index` (replayed on this replica): compacts the
/// log through it. The node copies and encodes the bytes before this returns.
@_cdecl("interpose_apus_snapshot_taken")
public func interpose_apus_snapshot_taken(_ index: UInt64, _ file: UnsafeRawPointer?, _ length: Int) -> Int32 {
    guard let node = Runtime.shared.node else {
        return fail(INTERPOSE_ESTATE, "interpose_apus_snapshot_taken: no replica is running")
    }
    guard let file, length > 0 else {
        return fail(INTERPOSE_EINVAL, "interpose_apus_snapshot_taken: the snapshot file of entry \(index) is empty")
    }
    node.compact(through: index, snapshot: ServerSnapshot.encode(index: index, file: UnsafeRawBufferPointer(start: file, count: length)))
    return INTERPOSE_OK
}
