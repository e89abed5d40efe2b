@_exported import RDMAPaxos
