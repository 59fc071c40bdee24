#!/usr/bin/env bash
# Seeds over an impaired path: ferry's UDP proxy (benches' netsim) between
# the follower and the leader adds random loss and one-way delay. Prints a
# markdown table of seed time and speed, and each case's ratio
# clean seconds / impaired seconds at the same RTT (issue 9's targets:
# >= 0.8 at 0.1 % loss, >= 0.5 at 1 %).
#
#   benches/wan.sh [SIZE] [VALUES]      # default 128MiB realistic
#
# The seeds run with --no-busy-limit so that the write load does not steer
# them: this measures the path, not the foreground protection.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-128MiB}
VALUES=${2:-realistic}
FERRY=${FERRY:-target/release/ferry}
[ -x "$FERRY" ] || cargo build --release -p ferry
run() { # loss delay_ms
  "$FERRY" bench --size "$SIZE" --values "$VALUES" --loss "$1" --delay-ms "$2" \
    --live-secs 1 --pause-secs 1 --serve-arg=--no-busy-limit --json 2>/dev/null
}
echo "ferry bench over the UDP proxy: $SIZE of $VALUES values, $(date -u +%Y-%m-%d), $(nproc) cores"
echo
echo "| path | seed s | MiB/s | clean s / this s |"
echo "|---|---|---|---|"
clean20=""
clean150=""
for c in "clean, 20 ms RTT:0:10" "0.1% loss, 20 ms RTT:0.001:10" "1% loss, 20 ms RTT:0.01:10" \
         "3% loss, 20 ms RTT:0.03:10" "clean, 150 ms RTT:0:75" "1% loss, 150 ms RTT:0.01:75"; do
  IFS=: read -r name loss delay <<<"$c"
  read -r secs bps < <(run "$loss" "$delay" | python3 -c 'import json,sys; j=json.load(sys.stdin); print(j["seed_secs"], j["seed_bytes_per_sec"])')
  if [ "$loss" = 0 ] && [ "$delay" = 10 ]; then clean20=$secs; fi
  if [ "$loss" = 0 ] && [ "$delay" = 75 ]; then clean150=$secs; fi
  base=$clean20; [ "$delay" = 75 ] && base=$clean150
  python3 - "$name" "$secs" "$base" "$bps" <<'PY'
import sys
name, secs, base, bps = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
print(f"| {name} | {secs:.2f} | {bps / (1 << 20):.1f} | {base / secs:.2f} |")
PY
done
