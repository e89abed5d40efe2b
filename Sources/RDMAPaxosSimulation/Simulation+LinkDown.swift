// Crashed leaders' connections closing, as followers' transports see them.

extension Simulation {
    /// As the runtime sees a killed process's connections close (`RingTransport.isLinkDown`):
    /// the nodes following a crashed node that can still hear from it are told, three times in
    /// four (the rest wait out their election timeout), through `Replica.leaderUnreachable`.
    mutating func tellLinkDown() throws(SimulationFailure) {
        let down = linksDown
        linksDown = []
        for d in down where nodes[d]!.replica == nil {
            for id in ids where id != d && !cut.contains([d, id]) {
                guard let r = nodes[id]!.replica, r.leader == d, linkRandom.below(4) != 0 else { continue }
                report.linkDownNotices += 1
                log("\(id): told that leader \(d)'s connection closed")
                let a = nodes[id]!.replica!.leaderUnreachable(d)
                try handle(id, a)
            }
        }
    }
}
