// Users of VMReplica see RDMAPaxos (and through it the core) without a second import.
@_exported import RDMAPaxos
