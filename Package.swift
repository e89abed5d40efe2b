// swift-tools-version: 6.1
import Foundation
import PackageDescription

// Layout and the reasons for it: docs/design.md ("Package layout").
let package = Package(
    name: "plover",
    platforms: [.macOS(.v14)],
    products: [
        .library(name: "RDMAPaxos", targets: ["RDMAPaxos"]),
        .library(name: "RDMAPaxosCore", targets: ["RDMAPaxosCore"]),
        .library(name: "RDMAPaxosSimulation", targets: ["RDMAPaxosSimulation"]),
        .library(name: "VMReplica", targets: ["VMReplica"]),
        // libinterpose.so: the C ABI (include/interpose.h), the LD_PRELOAD hooks and the VM hooks
        // a patched QEMU calls (include/interpose_vm.h).
        .library(name: "interpose", type: .dynamic, targets: ["InterposeRuntime"]),
        .library(name: "PloverCheck", targets: ["PloverCheck"]),
        // Real `plover node` clusters (and etcd, VM) on loopback for tests, the demo and the benchmarks.
        .library(name: "PloverTesting", targets: ["PloverTesting"]),
        .executable(name: "plover", targets: ["plover"]),
        .executable(name: "paxos-log", targets: ["paxos-log"]),
        .executable(name: "syncvm-bench", targets: ["syncvm-bench"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/LebJe/TOMLKit", from: "0.6.0"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.3"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
    ],
    targets: [
        // C libraries from Debian: module maps only.
        .systemLibrary(name: "CVerbs", path: "Sources/CVerbs"),
        .systemLibrary(name: "CBerkeleyDB", path: "Sources/CBerkeleyDB"),
        .systemLibrary(name: "CXXHash", path: "Sources/CXXHash"),
        // Berkeley DB's log-record hash, computed 32 bytes at a time. libdb calls it through its
        // PLT, so the linker exports the definition from every executable that links libdb and
        // libdb's calls bind to it (docs/design/stable-log.md, "The log's checksum").
        .target(name: "CBerkeleyDBHash", linkerSettings: [.linkedLibrary("dl")]),

        // The pure consensus state machine: its own module so the compiler
        // enforces "no I/O, no clocks, no C" (it cannot import what it does not depend on).
        .target(name: "RDMAPaxosCore"),
        // Seeded fault simulator over the core (used by tests and `plover simulate`).
        .target(name: "RDMAPaxosSimulation", dependencies: ["RDMAPaxos", .product(name: "Metrics", package: "swift-metrics")]),
        // Storage, fabrics and the runtime; re-exports the core.
        .target(
            name: "RDMAPaxos",
            dependencies: [
                "RDMAPaxosCore", "CBerkeleyDB", "CBerkeleyDBHash", "CVerbs", "CXXHash",
                .product(name: "TOMLKit", package: "TOMLKit"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ]),
        .target(
            name: "VMReplica",
            dependencies: ["RDMAPaxos", "CXXHash", .product(name: "Logging", package: "swift-log")]),
        // The C half of libinterpose.so: the public headers, libc hooks, the APUS replay logic and
        // the VM hooks (vmhooks.c, pure C, independent of the rest).
        // It calls the Swift half (InterposeRuntime) only through the C ABI it declares, so it
        // links only as part of the `interpose` product.
        .target(name: "Interpose", path: "Sources/Interpose", exclude: ["exports.map"],
                linkerSettings: [.linkedLibrary("dl"), .linkedLibrary("pthread")]),
        // The Swift half: `@_cdecl` entry points of the C ABI over a `ReplicaServer`. The version
        // script keeps every symbol but the hooks and `interpose_*` local (docs/design/interpose.md).
        .target(
            name: "InterposeRuntime",
            dependencies: ["Interpose", "RDMAPaxos", "CXXHash", .product(name: "Logging", package: "swift-log")],
            linkerSettings: [.unsafeFlags(["-Xlinker", "--version-script=Sources/Interpose/exports.map"])]),
        // Test support with no dependencies: a linearizability checker for register histories and
        // a seeded input fuzzer (used by the bad-input and end-to-end tests).
        .target(name: "PloverCheck", dependencies: ["RDMAPaxosCore"]),

        // The cluster harness over real processes (DemoCluster, VMCluster, EtcdCluster, loads) and
        // the benchmarks that drive it; `plover bench` mounts the benchmarks' commands.
        .target(
            name: "PloverTesting",
            dependencies: [
                "RDMAPaxos", "VMReplica",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]),

        .executableTarget(
            name: "plover",
            dependencies: [
                "RDMAPaxos", "RDMAPaxosSimulation", "VMReplica", "PloverTesting",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ]),
        .executableTarget(
            name: "paxos-log",
            dependencies: [
                "RDMAPaxos",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]),
        // benchmarks/syncvm: page hashing and syncvm against sending every dirty page.
        .executableTarget(name: "syncvm-bench", dependencies: ["VMReplica", "RDMAPaxos"]),

        // Test support, not a product: a software RDMA device behind the public verbs structures, so
        // VerbsFabric's own code runs in `make test` (docs/design/fabric.md, "Verbs under test"),
        // and a peer process for the device's cross-process tests.
        .target(name: "SoftRDMA", path: "Tests/SoftRDMA"),
        .executableTarget(name: "soft-rdma-peer", dependencies: ["SoftRDMA"], path: "Tests/SoftRDMAPeer"),
        // `VerbsFabric` over that device, for every test target that runs fabrics (its types are
        // `package`: they reach `VerbsFabric`'s driver seam, which no product exposes).
        .target(name: "VerbsTestSupport", dependencies: ["RDMAPaxos", "SoftRDMA"], path: "Tests/VerbsTestSupport"),

        .testTarget(
            name: "RDMAPaxosCoreTests",
            dependencies: ["RDMAPaxosCore", "RDMAPaxosSimulation", "RDMAPaxos"],
            resources: [.copy("testdata")]),
        .testTarget(name: "SimulationTests", dependencies: ["RDMAPaxosSimulation"]),
        .testTarget(
            name: "RDMAPaxosTests",
            dependencies: [
                "RDMAPaxos", "RDMAPaxosSimulation", "PloverCheck", "SoftRDMA", "VerbsTestSupport", "soft-rdma-peer",
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ]),
        .testTarget(name: "VMReplicaTests", dependencies: ["VMReplica", "VerbsTestSupport"]),
        // Real `plover node` processes on loopback (kill -9, SIGSTOP, restarts).
        // Also libinterpose.so: C programs built by the tests (a replica, a stand-in for a patched
        // QEMU) and Redis under LD_PRELOAD.
        .testTarget(name: "EndToEndTests", dependencies: ["plover", "PloverTesting", "PloverCheck", "VMReplica"], exclude: ["interpose-c", "powercut-fs"]),
        .testTarget(name: "PloverCheckTests", dependencies: ["PloverCheck"]),
    ],
    swiftLanguageModes: [.v6]
)

// `make docs` (swift package generate-documentation) needs the DocC plugin; only that command
// sets PLOVER_DOCS, so other builds neither fetch nor resolve it.
if ProcessInfo.processInfo.environment["PLOVER_DOCS"] != nil {
    package.dependencies.append(.package(url: "https://github.com/swiftlang/swift-docc-plugin", from: "1.5.0"))
}
