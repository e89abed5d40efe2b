// A view of a VM's RAM as fixed-size pages.
//
// QEMU's `memory-backend-file,share=on` keeps guest RAM in an ordinary file that any other
// process can map; syncvm hashes and rewrites that mapping directly. An anonymous buffer of
// the same shape stands in for it in tests and benchmarks.

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Why a guest-memory view could not be created. Each case names the file and the problem.
public enum GuestMemoryError: Error, Equatable, Sendable, CustomStringConvertible {
    /// No file exists at `path`.
    case fileMissing(path: String)
    /// Opening or `fstat`ing the file failed with `errno`.
    case openFailed(path: String, errno: Int32)
    /// The file's size, `bytes`, is not a whole number of `pageSize`-byte pages.
    case sizeNotPageMultiple(path: String, bytes: Int, pageSize: Int)
    /// The file is zero bytes long.
    case empty(path: String)
    /// Mapping `bytes` bytes failed with `errno` (`path` is "(anonymous)" for anonymous memory).
    case mmapFailed(path: String, bytes: Int, errno: Int32)
    /// The page size is not a power of two, the page count is not positive or too large, or
    /// `trailingBytes` is out of range (`pageCount` is 0 when mapping a file).
    case invalidGeometry(pageCount: Int, pageSize: Int)

    public var description: String {
        switch self {
        case .fileMissing(let path):
            return "guest RAM file \(path) does not exist"
        case .openFailed(let path, let e):
            return "cannot open guest RAM file \(path): \(String(cString: strerror(e)))"
        case .sizeNotPageMultiple(let path, let bytes, let pageSize):
            return "guest RAM file \(path) is \(bytes) bytes, not a multiple of the \(pageSize)-byte page size"
        case .empty(let path):
            return "guest RAM file \(path) is empty"
        case .mmapFailed(let path, let bytes, let e):
            return "cannot map \(bytes) bytes of guest RAM file \(path): \(String(cString: strerror(e)))"
        case .invalidGeometry(let pageCount, let pageSize):
            return "invalid guest memory shape: \(pageCount) pages of \(pageSize) bytes"
        }
    }
}

/// Guest RAM as `pageCount` pages of `pageSize` bytes, backed by a shared file mapping or by
/// anonymous memory. The mapping lives as long as this object.
///
/// `@unchecked Sendable`: every stored property is immutable; the mapped bytes are shared
/// memory that the guest (another process) writes anyway, so Swift cannot own them. syncvm
/// touches them under a protocol rule instead: hashing threads only read, each a disjoint
/// range of pages, and pages are written only into a backup that is paused, by one writer.
public final class GuestMemory: @unchecked Sendable {
    /// syncvm works in x86 base pages, the granularity of QEMU's dirty log.
    public static let defaultPageSize = 4096

    /// Bytes per page (a power of two).
    public let pageSize: Int
    /// Number of pages of RAM.
    public let pageCount: Int
    /// Whether pages may be written (anonymous memory always may).
    public let isWritable: Bool
    /// The file behind the mapping, or nil for anonymous memory.
    public let path: String?
    /// Zeroed, writable bytes mapped right after the RAM, at `trailerOffset`; not guest memory
    /// and not in the file. A transport keeps its mailbox there, so that RAM and mailbox are one
    /// contiguous range it can register as one region (`FabricSyncChannel`).
    public let trailingBytes: Int
    /// Where the trailer starts: the RAM's size, rounded up to the system page size when there
    /// is a trailer (so the file mapping never shares a system page with it).
    public let trailerOffset: Int
    let base: UnsafeMutableRawPointer

    /// Bytes of RAM, `pageCount * pageSize`; the trailer is not included.
    public var byteCount: Int { pageCount * pageSize }
    /// Everything mapped: RAM, padding, trailer.
    var mappedBytes: Int { trailerOffset + trailingBytes }

    /// Anonymous, zero-filled, writable memory of the given shape, with `trailingBytes` more after it.
    public init(pageCount: Int, pageSize: Int = GuestMemory.defaultPageSize,
                trailingBytes: Int = 0) throws(GuestMemoryError) {
        guard pageCount > 0, pageSize > 0, pageSize.nonzeroBitCount == 1,
              pageCount <= (Int.max >> 2) / pageSize, trailingBytes >= 0, trailingBytes <= Int.max >> 2 else {
            throw .invalidGeometry(pageCount: pageCount, pageSize: pageSize)
        }
        let bytes = pageCount * pageSize
        let offset = Self.trailerOffset(bytes: bytes, trailingBytes: trailingBytes)
        guard let p = mmap(nil, offset + trailingBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
              p != MAP_FAILED else {
            throw .mmapFailed(path: "(anonymous)", bytes: offset + trailingBytes, errno: errno)
        }
        self.base = p
        self.pageSize = pageSize
        self.pageCount = pageCount
        self.isWritable = true
        self.path = nil
        self.trailingBytes = trailingBytes
        self.trailerOffset = offset
    }

    /// Maps a guest RAM file (QEMU `memory-backend-file`) shared, so writes reach the file and
    /// any VM mapping it. The file's size must be a whole number of pages. With `trailingBytes`,
    /// an anonymous range is reserved first and the file mapped over its start, so the trailer
    /// follows the RAM directly.
    public init(mappingFile path: String, writable: Bool,
                pageSize: Int = GuestMemory.defaultPageSize, trailingBytes: Int = 0) throws(GuestMemoryError) {
        guard pageSize > 0, pageSize.nonzeroBitCount == 1, trailingBytes >= 0, trailingBytes <= Int.max >> 2 else {
            throw .invalidGeometry(pageCount: 0, pageSize: pageSize)
        }
        let fd = open(path, writable ? O_RDWR : O_RDONLY)
        if fd < 0 {
            let e = errno
            throw e == ENOENT ? .fileMissing(path: path) : .openFailed(path: path, errno: e)
        }
        // The mapping keeps the file alive; the descriptor is not needed afterwards.
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw .openFailed(path: path, errno: errno) }
        let bytes = Int(st.st_size)
        guard bytes > 0 else { throw .empty(path: path) }
        guard bytes % pageSize == 0 else {
            throw .sizeNotPageMultiple(path: path, bytes: bytes, pageSize: pageSize)
        }
        let prot = writable ? PROT_READ | PROT_WRITE : PROT_READ
        let offset = Self.trailerOffset(bytes: bytes, trailingBytes: trailingBytes)
        var hint: UnsafeMutableRawPointer?
        var flags = MAP_SHARED
        if trailingBytes > 0 {
            guard let r = mmap(nil, offset + trailingBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
                  r != MAP_FAILED else {
                throw .mmapFailed(path: path, bytes: offset + trailingBytes, errno: errno)
            }
            hint = r
            flags |= MAP_FIXED
        }
        guard let p = mmap(hint, bytes, prot, flags, fd, 0), p != MAP_FAILED else {
            let e = errno
            if let hint { munmap(hint, offset + trailingBytes) }
            throw .mmapFailed(path: path, bytes: bytes, errno: e)
        }
        self.base = p
        self.pageSize = pageSize
        self.pageCount = bytes / pageSize
        self.isWritable = writable
        self.path = path
        self.trailingBytes = trailingBytes
        self.trailerOffset = offset
    }

    deinit { munmap(base, mappedBytes) }

    private static func trailerOffset(bytes: Int, trailingBytes: Int) -> Int {
        guard trailingBytes > 0 else { return bytes }
        let page = max(1, Int(sysconf(Int32(_SC_PAGESIZE))))
        return (bytes + page - 1) / page * page
    }

    /// The whole mapping — RAM, padding, trailer — for registering it with a fabric.
    var mappedRange: UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(start: base, count: mappedBytes)
    }

    /// Start of page `index`. Out-of-range indices are a caller bug and trap.
    @inline(__always)
    public func pointer(toPage index: Int) -> UnsafeRawPointer {
        precondition(index >= 0 && index < pageCount, "page \(index) outside 0..<\(pageCount)")
        return UnsafeRawPointer(base + index * pageSize)
    }

    /// The bytes of page `index`.
    public func page(_ index: Int) -> UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(start: pointer(toPage: index), count: pageSize)
    }

    /// The whole image, for bulk comparisons.
    public var bytes: UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(start: base, count: byteCount)
    }

    /// Overwrites page `index` with `source` (exactly one page). Writing a read-only view is a
    /// caller bug and traps: the engine checks `isWritable` before a sync starts.
    public func writePage(_ index: Int, from source: UnsafeRawBufferPointer) {
        precondition(isWritable, "write to read-only guest memory \(path ?? "(anonymous)")")
        precondition(index >= 0 && index < pageCount, "page \(index) outside 0..<\(pageCount)")
        precondition(source.count == pageSize, "page write of \(source.count) bytes, page is \(pageSize)")
        (base + index * pageSize).copyMemory(from: source.baseAddress!, byteCount: pageSize)
    }

    /// Mutable access to page `index`, for tests and for loading images.
    public func withMutablePage<R>(_ index: Int, _ body: (UnsafeMutableRawBufferPointer) throws -> R) rethrows -> R {
        precondition(isWritable, "write to read-only guest memory \(path ?? "(anonymous)")")
        precondition(index >= 0 && index < pageCount, "page \(index) outside 0..<\(pageCount)")
        return try body(UnsafeMutableRawBufferPointer(start: base + index * pageSize, count: pageSize))
    }
}
