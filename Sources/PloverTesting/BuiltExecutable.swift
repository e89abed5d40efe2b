import Foundation

extension DemoCluster {
    /// The path of the executable product `name` built beside the running test bundle (`swift
    /// build` and `swift test` put both in the same products directory), for a cluster's
    /// `executable`. Throws, naming the places it looked, when the product is not built.
    public static func builtExecutable(_ name: String) throws -> String {
        let bundle = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        let candidates = [bundle.appendingPathComponent(name).path,
                          bundle.deletingLastPathComponent().appendingPathComponent(name).path]
        guard let path = candidates.first(where: { FileManager.default.isExecutableFile(atPath: $0) }) else {
            throw CLIError("the executable \(name) is not built next to the tests (looked at \(candidates.joined(separator: ", "))); run `swift build` first")
        }
        return path
    }
}
