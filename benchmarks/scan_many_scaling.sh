#!/usr/bin/env bash
# Wall time of `trigscan scan-many` on the standard zoo with N local Ray workers,
# with the machine's load average (every 15 s) and busy/idle CPU time beside it.
# usage: benchmarks/scan_many_scaling.sh WORKERS OUT [ZOO]   (docs/scale.md, "Scaling")
set -euo pipefail
W=$1; OUT=$2; ZOO=${3:-/tmp/zoo_std}
busy() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $5+$6}' /proc/stat; }
read -r b0 i0 < <(busy); t0=$(date +%s.%N)
( while true; do echo "$(date +%T) $(cat /proc/loadavg)"; sleep 15; done ) > "$OUT.load" &
LP=$!
trap 'kill $LP' EXIT
nice -n 10 trigscan scan-many "$ZOO" --out "$OUT" --ray local --workers "$W" --method nc \
    --option nc.max_steps=10 > "$OUT.log" 2>&1
read -r b1 i1 < <(busy); t1=$(date +%s.%N)
hz=$(getconf CLK_TCK)
python3 -c "print(f'workers=$W wall={$t1-$t0:.1f}s machine busy cpu-s={($b1-$b0)/$hz:.1f} idle cpu-s={($i1-$i0)/$hz:.1f}')"
echo "load averages: $(awk '{print $2}' "$OUT.load" | tr '\n' ' ')"
