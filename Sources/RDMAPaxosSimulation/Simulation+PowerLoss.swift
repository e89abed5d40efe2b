import RDMAPaxosCore

// A leader loses power right after it commits while its own disk is slow, and the followers that
// hold the entries its disk had not written yet are cut off: the others must elect a leader with
// the restarted one. Correct code loses nothing, since a leader counts itself toward a commit only
// once its own write is durable; a leader counting its undurable append loses an acknowledged write.
extension Simulation {
    /// Starts an episode (`SimulationOptions.leaderPowerLossRate`): the leader's disk turns slow
    /// for 4 to 7 ticks (below the disk-stall detector's 8); or, during one, crashes the leader
    /// as soon as it committed an entry its disk does not hold yet (only a leader that counts
    /// its undurable append, or followers enough to commit without it, can), or when its disk
    /// would have caught up.
    mutating func leaderPowerLoss() {
        if let p = powerLoss {
            guard let r = nodes[p.leader]!.replica, nodes[p.leader]!.incarnation == p.incarnation, r.role == .leader else {
                powerLoss = nil
                return
            }
            guard r.commitIndex > nodes[p.leader]!.storage.lastIndex || now >= p.until else { return }
            powerLoss = nil
            // Only while no other member is down, as for every crash that keeps the run live.
            guard ids.allSatisfy({ $0 == p.leader || nodes[$0]!.replica != nil || nodes[$0]!.removed }) else { return }
            cutLeaderOff(p.leader, r)
            return
        }
        guard options.leaderPowerLossRate > 0, cut.isEmpty,
              Double(lossRandom.next() % 1_000_000) < options.leaderPowerLossRate * 1_000_000,
              let l = liveLeader(),
              ids.allSatisfy({ nodes[$0]!.replica != nil || nodes[$0]!.removed }) else { return }
        let until = now + 4 + lossRandom.below(4)
        nodes[l]!.storage.stalledUntil = max(nodes[l]!.storage.stalledUntil, UInt64(until))
        powerLoss = (l, nodes[l]!.incarnation, until)
        log("disk slow on leader \(l) until \(until), its power to fail")
    }

    /// Crashes the leader, losing its writes in flight, restarts it soon, and cuts off the voting
    /// followers it knew to hold entries past what its disk holds.
    mutating func cutLeaderOff(_ l: NodeID, _ r: Replica) {
        let durable = nodes[l]!.storage.lastIndex
        let voting = Set(r.membership.voting)
        let holders = r.followerMatch.filter { $0.value > durable && voting.contains($0.key) }.keys.sorted()
        crash(l)
        nodes[l]!.restartAt = now + 2 + lossRandom.below(6)
        linksDown.append(l)
        report.crashes += 1
        report.leaderPowerLosses += 1
        if !holders.isEmpty, cut.isEmpty {
            for h in holders {
                for other in ids where other != h {
                    cut.insert([h, other])
                    cut.insert([other, h])
                }
            }
            healCutAt = now + 40 + lossRandom.below(41)
            report.partitions += 1
        }
        log("power loss on leader \(l) (commit \(r.commitIndex), disk \(durable))"
            + (holders.isEmpty ? "" : ", cutting off \(holders.map(String.init).joined(separator: ",")) until \(healCutAt)"))
    }
}
