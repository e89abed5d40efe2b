// How a checkpoint moves a VM's CPU and device state (everything but guest RAM, which syncvm
// moves) from the primary's QEMU to the backup's. Two mechanisms fit behind one protocol:
//
// - migration, unpatched QEMU (what VMReplicator+Checkpoint does today): the primary's QEMU
//   migrates with x-ignore-shared into a fresh `-incoming defer` QEMU on the backup, which then
//   replaces the backup's old QEMU;
// - hooks, patched QEMU (`QEMUHooksDeviceStateMover`): the primary's QEMU saves its device state
//   into a blob through interpose_vm.h, the replicas carry the blob (`DeviceStateLink`), and the
//   backup's running QEMU loads it in place: no fresh process, so no cold start either.

/// Moves the device state of one checkpoint from the primary's VM to the backup's. Both calls
/// run with the local VM stopped, after syncvm made the RAM equal; the caller resumes the VM.
public protocol DeviceStateMover: AnyObject {
    /// The mechanism's name for logs and configuration ("migration", "hooks").
    var mechanism: String { get }

    /// Primary: hands the stopped VM's device state for checkpoint `epoch` to the backup.
    /// Returns the bytes moved (for the checkpoint log).
    func sendDeviceState(epoch: UInt64) throws -> Int

    /// Backup: installs the device state the primary sent for checkpoint `epoch` into the local
    /// VM, which is left stopped. Returns the bytes moved. A throw means the VM may be
    /// inconsistent (the replica must not take over with it) unless the error says nothing was
    /// loaded.
    func receiveDeviceState(epoch: UInt64) throws -> Int
}

/// Carries a device-state blob between the primary's and the backup's replica processes (the
/// syncvm link, for instance). The hooks mechanism needs one; migration does not (QEMU connects
/// to QEMU).
public protocol DeviceStateLink: AnyObject {
    /// Primary: sends `state` as checkpoint `epoch`'s device state.
    func send(_ state: [UInt8], epoch: UInt64) throws
    /// Backup: the device state sent for checkpoint `epoch`; throws for another epoch or when it
    /// does not arrive in time.
    func receive(epoch: UInt64) throws -> [UInt8]
}

/// The hooks mechanism: QEMU's `save_device_state` on the primary, `load_device_state` on the
/// backup, through each replica's `QEMUHooksEndpoint`, with `link` carrying the blob between
/// them.
public final class QEMUHooksDeviceStateMover: DeviceStateMover {
    /// The local QEMU's endpoint.
    public let endpoint: QEMUHooksEndpoint
    /// The replica-to-replica path of the blob.
    public let link: any DeviceStateLink

    /// A mover over `endpoint` (this replica's QEMU) and `link` (to the other replica).
    public init(endpoint: QEMUHooksEndpoint, link: any DeviceStateLink) {
        self.endpoint = endpoint
        self.link = link
    }

    /// "hooks".
    public var mechanism: String { "hooks" }

    /// Saves the state in the local QEMU and sends it over `link`.
    public func sendDeviceState(epoch: UInt64) throws -> Int {
        let state = try endpoint.saveDeviceState()
        try link.send(state, epoch: epoch)
        return state.count
    }

    /// Receives the state over `link` and loads it into the local QEMU. A failure before the
    /// load (the link) leaves the VM untouched; a failed load (`QEMUHooksError`) may not.
    public func receiveDeviceState(epoch: UInt64) throws -> Int {
        let state = try link.receive(epoch: epoch)
        try endpoint.loadDeviceState(state)
        return state.count
    }
}
