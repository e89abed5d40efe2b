import Foundation

extension ReplicaNode {
    /// A snapshot of this replica's state machine as applied now, with the configuration in
    /// force: what `plover snapshot save` writes. Any role but a witness (which keeps no state)
    /// answers; a follower's copy may lag the leader's.
    public func backup() async throws -> Snapshot {
        try await withCheckedThrowingContinuation { c in
            if !enqueue(.backup(c)) { c.resume(throwing: NodeError.stopped) }
        }
    }

    func takeBackup(_ c: CheckedContinuation<Snapshot, any Error>) {
        guard !replica.isWitness else {
            let e = NodeError.refused(.invalidMembershipChange("node \(options.replica.id) is a witness: it keeps no state to back up; ask a voter"))
            completions.append { c.resume(throwing: e) }
            return
        }
        let index = replica.appliedIndex
        let s = Snapshot(index: index, ballot: replica.entry(at: index)?.ballot ?? .zero, membership: replica.membership, data: machine.snapshot())
        completions.append { c.resume(returning: s) }
    }
}

/// Restoring a backup (`plover snapshot restore`): the data directory of one member of a new
/// cluster, holding the backup's state at its index and the new cluster's configuration.
public enum BackupRestore {
    /// Writes `backup` into `config`'s empty data directory with `config`'s members as the
    /// configuration: the replica starts at the backup's index. Every member of the new cluster
    /// restores the same file. Throws if the directory already holds a store or a snapshot.
    public static func restore(_ backup: Snapshot, into config: NodeConfig) throws {
        guard config.durability != .memory else {
            throw ConfigError(file: "config", key: "durability", problem: "a backup is restored into a data directory on disk: use durability fsync or async")
        }
        let fm = FileManager.default
        let dir = config.dataDir
        if let contents = try? fm.contentsOfDirectory(atPath: dir), !contents.isEmpty {
            throw ConfigError(file: "config", key: "data_dir", problem: "\(dir) is not empty: a backup is restored only into a new member's empty data directory (move the old one aside first)")
        }
        try fm.createDirectory(atPath: dir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        let membership = config.membership
        // The new cluster's ballots start over: its first leader's ballots must exceed the point's.
        let point = Snapshot(index: backup.index, ballot: .zero, membership: membership, data: backup.data)
        try FileSnapshotStore(directory: dir, sync: config.durability == .fsync).save(point)
        // fsync whatever the member's mode: the restored state is on disk before anything starts.
        let log = try BerkeleyDBLog.open(path: dir, durability: .fsync)
        do {
            try log.compactPrefix(through: backup.index, ballot: .zero)
            try log.saveHardState(HardState(promised: .zero, commitIndex: backup.index, membership: membership))
            try log.close()
        } catch {
            try? log.close()
            throw error
        }
        try StateTrust.writeMarker(dir, clean: true)
    }
}
