// swift-tools-version: 6.1
import PackageDescription

// A replicated counter service built on RDMAPaxos, as a user's own package would be: it depends on
// plover by path (a user writes `.package(url: …, from: …)` instead).
let package = Package(
    name: "replicated-counter",
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "counter-server", targets: ["counter-server"]),
    ],
    dependencies: [
        .package(name: "plover", path: "../.."),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
    ],
    targets: [
        // The service: its state machine, its commands, and the replica as a ServiceLifecycle `Service`.
        .target(
            name: "Counter",
            dependencies: [
                .product(name: "RDMAPaxos", package: "plover"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ]),
        // One replica process: `counter-server node --config FILE`.
        .executableTarget(
            name: "counter-server",
            dependencies: [
                "Counter",
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ]),
        .testTarget(
            name: "CounterTests",
            dependencies: [
                "Counter", "counter-server",
                .product(name: "RDMAPaxos", package: "plover"),
                .product(name: "PloverTesting", package: "plover"),
            ]),
    ],
    swiftLanguageModes: [.v6]
)
