#!/usr/bin/env bash
# Builds the syncvm benchmark in release mode, runs it, and writes results.md and syncvm.svg
# next to this script. Takes about a minute on 2 cores; needs ~3 GiB of free memory.
#   SWIFT=…  the swift command (default: swift)   REPS=…  repetitions per case (default: 3)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"
${SWIFT:-swift} build -c release --product syncvm-bench
bin="$(${SWIFT:-swift} build -c release --show-bin-path)/syncvm-bench"
mkdir -p "$here/out"
load="$(cut -d" " -f1-3 /proc/loadavg)"
"$bin" --gib 1 --reps "${REPS:-3}" --json "$here/out/results.json" > "$here/out/tables.md"
{
  echo "# syncvm benchmark results"
  echo
  echo "Produced by \`make bench-syncvm\` (benchmarks/syncvm/run.sh). Plot: [syncvm.svg](syncvm.svg)."
  echo
  echo "Machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r), $(date -u +%Y-%m-%d)."
  echo
  echo "Load average when the run started: $load (other work on the machine shows up as noise in the times)."
  echo
  sed '1s/^# syncvm benchmark: /Run: /' "$here/out/tables.md"
} | cat -s > "$here/results.md"
python3 "$here/plot.py" "$here/out/results.json" "$here/syncvm.svg"
echo "wrote $here/results.md and $here/syncvm.svg"
