// Crashed leaders' connections closing, as followers' transports see them.

extension Simulation {
    /// As the runtime sees a killed process's connections close (`RingTransport.isLinkDown`):
    /// the transports of the nodes following a crashed node that can still hear from it say its
    /// link is down, three times in four (the rest wait out their election timeout), until it
    /// restarts; the node acts on it at its next tick.
    mutating func tellLinkDown() {
        let down = linksDown
        linksDown = []
        for d in down where nodes[d]!.replica == nil {
            for id in ids where id != d && !cut.contains([d, id]) {
                guard let r = nodes[id]!.replica, r.leader == d, linkRandom.below(4) != 0 else { continue }
                report.linkDownNotices += 1
                log("\(id): sees leader \(d)'s connection closed")
                nodes[id]!.process!.transport.linksDown.insert(d)
            }
        }
    }
}
