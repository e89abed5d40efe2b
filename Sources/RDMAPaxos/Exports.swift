// Users of RDMAPaxos see the pure core's types (Replica, LogIndex, Actions, ...) without a second import.
@_exported import RDMAPaxosCore
