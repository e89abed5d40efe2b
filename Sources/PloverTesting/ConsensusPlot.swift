import Foundation

/// The SVG plot of a consensus benchmark run: one row of panels per value size; puts/s (linear)
/// on the left, p50 latency (log scale, with the loopback round trip) on the right; clients on x.
extension ConsensusReport {
    func svg() -> String {
        let panelW = 420.0, panelH = 240.0, left = 80.0, top = 60.0, gapX = 110.0, gapY = 90.0
        let width = left + 2 * panelW + gapX + 40
        let height = top + Double(valueSizes.count) * (panelH + gapY) + 10
        var s = """
            <svg xmlns="http://www.w3.org/2000/svg" width="\(Int(width))" height="\(Int(height))" font-family="sans-serif" font-size="12">
            <rect width="100%" height="100%" fill="white"/>
            <text x="\(left)" y="24" font-size="15" font-weight="bold">3 replicas on loopback: plover vs etcd \(esc(etcdVersion)), closed-loop puts (\(esc(machine.cores)) cores, \(esc(machine.date)))</text>

            """
        // Legend.
        var lx = left
        for sys in systems {
            s += "<line x1=\"\(lx)\" y1=\"42\" x2=\"\(lx + 24)\" y2=\"42\" stroke=\"\(Self.color(sys))\" stroke-width=\"2.5\"/>"
            s += "<text x=\"\(lx + 30)\" y=\"46\">\(esc(sys.label))</text>\n"
            lx += 150
        }
        s += "<line x1=\"\(lx)\" y1=\"42\" x2=\"\(lx + 24)\" y2=\"42\" stroke=\"#777\" stroke-dasharray=\"5,4\"/><text x=\"\(lx + 30)\" y=\"46\">loopback RTT</text>\n"

        for (row, value) in valueSizes.enumerated() {
            let y0 = top + 20 + Double(row) * (panelH + gapY)
            s += panel(x0: left, y0: y0, w: panelW, h: panelH, value: value, latency: false)
            s += panel(x0: left + panelW + gapX, y0: y0, w: panelW, h: panelH, value: value, latency: true)
        }
        return s + "</svg>\n"
    }

    static func color(_ s: BenchSystem) -> String {
        switch s {
        case .ploverFsync: "#1f5fb4"
        case .ploverMemory: "#2a9d3a"
        case .etcdFsync: "#c83228"
        case .etcdTmpfs: "#f08a14"
        }
    }

    private func esc(_ t: String) -> String {
        t.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;").replacingOccurrences(of: ">", with: "&gt;")
    }

    private func panel(x0: Double, y0: Double, w: Double, h: Double, value: Int, latency: Bool) -> String {
        let counts = clientCounts
        func px(_ i: Int) -> Double { counts.count == 1 ? x0 + w / 2 : x0 + w * Double(i) / Double(counts.count - 1) }
        func metric(_ r: ConsensusRow) -> Double { latency ? r.result.latency.p50Micros : r.result.putsPerSecond }
        let points = rows.filter { $0.valueBytes == value }.map(metric).filter { $0 > 0 }
        var s = "<text x=\"\(x0)\" y=\"\(y0 - 10)\" font-weight=\"bold\">\(latency ? "p50 latency, µs (log)" : "puts/s"), \(Self.size(value)) values</text>\n"
        s += "<rect x=\"\(x0)\" y=\"\(y0)\" width=\"\(w)\" height=\"\(h)\" fill=\"none\" stroke=\"#999\"/>\n"

        // y mapping and ticks.
        let py: (Double) -> Double
        var ticks: [Double] = []
        if latency {
            let lo = floor(log10(max(1, min(points.min() ?? 1, roundTrip.p50Micros))))
            let hi = ceil(log10(max(10, points.max() ?? 10)))
            py = { y0 + h - h * (log10(max($0, 1)) - lo) / max(hi - lo, 1) }
            ticks = stride(from: lo, through: hi, by: 1).map { pow(10, $0) }
        } else {
            let top = niceCeiling(points.max() ?? 1)
            py = { y0 + h - h * $0 / top }
            ticks = (0...5).map { top * Double($0) / 5 }
        }
        for t in ticks {
            let y = py(t)
            s += "<line x1=\"\(x0)\" y1=\"\(y)\" x2=\"\(x0 + w)\" y2=\"\(y)\" stroke=\"#e4e4e4\"/>"
            s += "<text x=\"\(x0 - 6)\" y=\"\(y + 4)\" text-anchor=\"end\">\(tickLabel(t))</text>\n"
        }
        for (i, n) in counts.enumerated() {
            s += "<text x=\"\(px(i))\" y=\"\(y0 + h + 16)\" text-anchor=\"middle\">\(n)</text>\n"
        }
        s += "<text x=\"\(x0 + w / 2)\" y=\"\(y0 + h + 34)\" text-anchor=\"middle\">client threads</text>\n"
        if latency {
            let y = py(roundTrip.p50Micros)
            s += "<line x1=\"\(x0)\" y1=\"\(y)\" x2=\"\(x0 + w)\" y2=\"\(y)\" stroke=\"#777\" stroke-dasharray=\"5,4\"/>\n"
        }
        for sys in systems {
            let pts = counts.enumerated().compactMap { i, n in row(sys, value, n).map { (px(i), py(metric($0))) } }
            guard !pts.isEmpty else { continue }
            let path = pts.map { String(format: "%.1f,%.1f", $0.0, $0.1) }.joined(separator: " ")
            s += "<polyline points=\"\(path)\" fill=\"none\" stroke=\"\(Self.color(sys))\" stroke-width=\"2.5\"/>\n"
            for (x, y) in pts { s += String(format: "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3.5\" ", x, y) + "fill=\"\(Self.color(sys))\"/>" }
            s += "\n"
        }
        return s
    }

    /// 1, 2 or 5 times a power of ten, at or above `v`.
    private func niceCeiling(_ v: Double) -> Double {
        let p = pow(10, floor(log10(max(v, 1))))
        return [1.0, 2, 5, 10].map { $0 * p }.first { $0 >= v } ?? 10 * p
    }

    private func tickLabel(_ v: Double) -> String {
        if v >= 1_000_000 { return String(format: "%gM", v / 1_000_000) }
        if v >= 1000 { return String(format: "%gk", v / 1000) }
        return String(format: "%g", v)
    }
}
