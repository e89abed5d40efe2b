import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Registered memory: a fixed-length block that peers write into with one-sided WRITEs while its
/// owner reads it. `Fabric.registerRegion(lengthBytes:)` allocates a zeroed, page-aligned block;
/// `Fabric.registerRegion(wrapping:retaining:)` registers memory the caller already has (guest
/// RAM, say) without copying or zeroing it.
///
/// `@unchecked Sendable`: the block is shared with the fabric the way DMA memory is shared with
/// a NIC. The software fabrics land bytes under `lock`, and the owner reads and stores under the
/// same lock, so they never race; under `VerbsFabric` the NIC writes without the lock, which is
/// why every record read from a ring is validated (sequence + checksum) before it is trusted.
/// Wrapped memory may also be read by its owner without the lock (through its own view of it);
/// that is safe only under a protocol that keeps those reads apart from remote writes, as
/// syncvm's does (the backup reads its pages only after the "pages done" record arrived).
/// `keepAlive` is immutable and never touched; it only holds the wrapped memory's owner.
public final class MemoryRegion: @unchecked Sendable, CustomStringConvertible {
    /// The node whose memory this is.
    public let owner: NodeID
    /// Size of the region in bytes.
    public let lengthBytes: Int
    /// Start of the block; handed to `ibv_reg_mr` by `VerbsFabric`.
    let base: UnsafeMutableRawPointer
    /// False for wrapped memory: the region neither allocated nor frees it.
    private let ownsMemory: Bool
    /// Keeps wrapped memory mapped as long as the region (and so the fabric holding it) lives.
    private let keepAlive: AnyObject?
    private let lock = Mutex<UInt32>(0)

    init(owner: NodeID, lengthBytes: Int, key: UInt32) throws(FabricError) {
        guard lengthBytes > 0, lengthBytes <= Self.lengthBytesMax else {
            throw .badConfiguration("region length \(lengthBytes) outside 1...\(Self.lengthBytesMax)")
        }
        var p: UnsafeMutableRawPointer?
        guard posix_memalign(&p, 4096, lengthBytes) == 0, let p else {
            throw .badConfiguration("cannot allocate \(lengthBytes) bytes for a region")
        }
        memset(p, 0, lengthBytes)
        self.owner = owner
        self.lengthBytes = lengthBytes
        self.base = p
        self.ownsMemory = true
        self.keepAlive = nil
        lock.withLock { $0 = key }
    }

    /// A region over existing memory: `bytes` stay as they are and are not freed here.
    init(owner: NodeID, wrapping bytes: UnsafeMutableRawBufferPointer, retaining keepAlive: AnyObject?,
         key: UInt32) throws(FabricError) {
        guard let p = bytes.baseAddress, bytes.count > 0, bytes.count <= Self.wrappedLengthBytesMax else {
            throw .badConfiguration("wrapped region of \(bytes.count) bytes outside 1...\(Self.wrappedLengthBytesMax)")
        }
        self.owner = owner
        self.lengthBytes = bytes.count
        self.base = p
        self.ownsMemory = false
        self.keepAlive = keepAlive
        lock.withLock { $0 = key }
    }

    deinit { if ownsMemory { free(base) } }

    /// Largest region any fabric allocates (1 GiB): a bad configuration, not a memory hog.
    public static let lengthBytesMax = 1 << 30
    /// Largest region that wraps existing memory (1 TiB: guest RAM), and so the largest region a
    /// peer may announce in a connect exchange.
    public static let wrappedLengthBytesMax = 1 << 40

    /// The current remote key.
    public var key: UInt32 { lock.withLock { $0 } }

    /// What a peer needs to write here (handed over in the connect exchange).
    public var remote: RemoteRegion {
        RemoteRegion(node: owner, base: UInt64(UInt(bitPattern: base)), key: key, lengthBytes: lengthBytes)
    }

    public var description: String { "region of node \(owner) (\(lengthBytes) bytes, key \(key))" }

    func setKey(_ k: UInt32) { lock.withLock { $0 = k } }

    /// Copies `count` bytes starting at `offset`.
    public func read(offset: Int, count: Int) -> [UInt8] {
        precondition(offset >= 0 && count >= 0 && offset + count <= lengthBytes, "read outside the region")
        return lock.withLock { _ in Array(UnsafeRawBufferPointer(start: base + offset, count: count)) }
    }

    /// Runs `body` over `count` bytes at `offset` without copying them out.
    public func withBytes<R>(offset: Int, count: Int, _ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        precondition(offset >= 0 && count >= 0 && offset + count <= lengthBytes, "read outside the region")
        return try lock.withLock { _ in try body(UnsafeRawBufferPointer(start: base + offset, count: count)) }
    }

    /// The owner's own store into its memory (no fabric involved).
    public func store(_ bytes: [UInt8], at offset: Int) {
        precondition(offset >= 0 && offset + bytes.count <= lengthBytes, "store outside the region")
        lock.withLock { _ in
            bytes.withUnsafeBytes { src in
                if let s = src.baseAddress { (base + offset).copyMemory(from: s, byteCount: src.count) }
            }
        }
    }

    /// A remote write landing: checks the key and bounds the way a responder NIC does.
    /// Returns false (remote access error) instead of writing when either is wrong.
    func land(_ bytes: UnsafeRawBufferPointer, at offset: Int, key k: UInt32) -> Bool {
        lock.withLock { current in
            guard k == current, offset >= 0, bytes.count <= lengthBytes, offset <= lengthBytes - bytes.count else {
                return false
            }
            if let s = bytes.baseAddress, bytes.count > 0 { (base + offset).copyMemory(from: s, byteCount: bytes.count) }
            return true
        }
    }
}
