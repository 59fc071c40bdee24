#!/usr/bin/env bash
# ferry against rsync over ssh (with and without -z) across one real link:
# a veth pair into a network namespace, shaped by tbf on both ends (netem is
# not available here; tbf is). The leader, sshd and the sources live in the
# namespace; the copies land on the host. Needs root, ip and tc.
#
#   benches/link.sh [RATE] [RUNS]        # default 1gbit 3
#
# Environment: FERRY_BENCH_VALUES (dbbench, the default; realistic; random),
# FERRY_BENCH_SIZE (default 256MiB), FERRY_BENCH_DATA (dataset directory,
# created when missing). Methods are interleaved; the table gives medians
# and each method's speed against rsync -z over ssh in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${1:-1gbit}
RUNS=${2:-3}
VALUES=${FERRY_BENCH_VALUES:-dbbench}
SIZE=${FERRY_BENCH_SIZE:-256MiB}
DATA=${FERRY_BENCH_DATA:-/tmp/ferry-bench/link-$VALUES-$SIZE}
FERRY=${FERRY:-$PWD/target/release/ferry}
[ -x "$FERRY" ] || cargo build --release --locked -p ferry >&2
WORK=$(mktemp -d /tmp/ferry-link.XXXXXX)
NS=ferry-link-$$
HIF=fl$$h NIF=fl$$n
NET=$((1 + $$ % 250))
OUTER=10.214.$NET.1 INNER=10.214.$NET.2
PIDS=()
cleanup() {
  [ -n "${FERRY_LINK_KEEP_LOG:-}" ] && cp "$WORK/leader.log" "$FERRY_LINK_KEEP_LOG" 2>/dev/null
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  ip netns pids "$NS" 2>/dev/null | xargs -r kill 2>/dev/null || true
  ip netns del "$NS" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
. benches/common.sh

ensure_dataset "$DATA" "$SIZE" "$VALUES"

# The link: tbf on both ends, a bucket of 10 ms of traffic, 20 ms of queue.
ip netns add "$NS"
ip link add "$HIF" type veth peer name "$NIF"
ip link set "$NIF" netns "$NS"
ip addr add "$OUTER/30" dev "$HIF"; ip link set "$HIF" up
INNS="ip netns exec $NS"
$INNS ip addr add "$INNER/30" dev "$NIF"; $INNS ip link set "$NIF" up; $INNS ip link set lo up
bits=$(python3 -c "import re,sys; m=re.fullmatch(r'(\d+)([kmg]?)bit', sys.argv[1].lower()); print(int(m[1])*{'':1,'k':10**3,'m':10**6,'g':10**9}[m[2]])" "$RATE")
burst=$(( bits / 8 / 100 > 65536 ? bits / 8 / 100 : 65536 ))
tc qdisc add dev "$HIF" root tbf rate "${bits}bit" burst "$burst" latency 20ms
$INNS tc qdisc add dev "$NIF" root tbf rate "${bits}bit" burst "$burst" latency 20ms

# The leader in the namespace.
$INNS "$FERRY" serve --data "$DATA" --listen "$INNER:7481" --http 127.0.0.1:0 --log "${FERRY_LINK_LOG:-warn}" 2> "$WORK/leader.log" &
PIDS+=($!)
for _ in $(seq 100); do [ -f "$DATA/.ferry/tls/join-token" ] && break; sleep 0.1; done
TOKEN=$("$FERRY" token --data "$DATA")

# sshd in the namespace, serving the files of the leader's seed checkpoint.
prepare_sshd "$INNER" 7482
$INNS /usr/sbin/sshd -D -f "$WORK/ssh/sshd_config" &
PIDS+=($!)
SSH="$SSH -c aes128-gcm@openssh.com"

ferry_seed() { # extra serve-side mode is fixed; the seed takes the defaults
  "$FERRY" seed --leader "$INNER:7481" --data "$WORK/dst" --token "$TOKEN" --json --no-progress
}
rm -rf "$WORK/dst"; ferry_seed > /dev/null   # the leader hashes every SST once
SRC=$WORK/src; mkdir -p "$SRC"
CP=$(ls -d "$DATA"/.ferry/checkpoints/cp-*-seed | tail -n 1)
for f in "$CP"/*; do
  [ -f "$f" ] || continue
  case "$(basename "$f")" in LOCK|LOG*) ;; *) ln "$f" "$SRC/" ;; esac
done
BYTES=$(du -sb --apparent-size "$SRC" | cut -f1)
cat "$SRC"/* > /dev/null
rsync_ssh() { rsync -a -e "$SSH" "root@$INNER:$SRC/" "$WORK/dst/"; }
rsync_ssh_z() { rsync -a -z -e "$SSH" "root@$INNER:$SRC/" "$WORK/dst/"; }
# What one plaintext TCP stream carries across this link: the link's usable
# rate on this machine, for the incompressible case.
tar_nc() {
  (nc -l -d -s "$OUTER" -p 7483 | tar -x -C "$WORK/dst") &
  local r=$!
  sleep 0.2
  $INNS sh -c "tar -c -C '$SRC' . | nc -N $OUTER 7483"
  wait $r
}

declare -A TIMES WIRE
timed() { # key command...
  local key=$1; shift
  rm -rf "$WORK/dst"; mkdir -p "$WORK/dst"; sync
  local b0 b1 t0 t1
  b0=$(cat /sys/class/net/$HIF/statistics/rx_bytes); t0=$(date +%s.%N)
  "$@" > "$WORK/last.out" 2> "$WORK/last.err" || { echo "$key failed:" >&2; cat "$WORK/last.err" >&2; exit 1; }
  t1=$(date +%s.%N); b1=$(cat /sys/class/net/$HIF/statistics/rx_bytes)
  got=$(du -sb --apparent-size --exclude=.ferry "$WORK/dst" | cut -f1)
  [ "$got" -ge "$BYTES" ] || { echo "$key copied $got of $BYTES bytes" >&2; exit 1; }
  TIMES[$key]+="$(echo "$t1 - $t0" | bc) "
  [ "$key" = ferry ] && cp "$WORK/last.out" "$WORK/ferry-$(echo "${TIMES[$key]}" | wc -w).json"
  WIRE[$key]+="$((b1 - b0)) "
  printf '%-12s %6.2fs\n' "$key" "$(echo "$t1 - $t0" | bc)" >&2
}
METHODS=(ferry rsync-ssh rsync-ssh-z tar-nc)
declare -A NAME=([ferry]='ferry seed (defaults)' [rsync-ssh]='rsync -a over ssh' [rsync-ssh-z]='rsync -a -z over ssh' [tar-nc]='tar \| nc (plaintext TCP)')
declare -A CMD=([ferry]=ferry_seed [rsync-ssh]=rsync_ssh [rsync-ssh-z]=rsync_ssh_z [tar-nc]=tar_nc)
for i in $(seq "$RUNS"); do
  echo "round $i of $RUNS" >&2
  for m in "${METHODS[@]}"; do timed "$m" "${CMD[$m]}"; done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
z=$(echo "${TIMES[rsync-ssh-z]}" | median)
MB=$(echo "scale=2; $BYTES/1000000" | bc)
echo "Link: veth + tbf at $RATE ($bits bit/s) into a network namespace. Dataset: $VALUES, $MB MB of checkpoint files. Runs: $RUNS, interleaved. Date: $(date -u +%F). Machine: $(nproc) cores."
echo
echo "| method | median s | MB/s of data | of link rate | wire MB | ratio (data / wire) | vs rsync -z over ssh | runs (s) |"
echo "|---|---:|---:|---:|---:|---:|---:|---|"
for m in "${METHODS[@]}"; do
  med=$(echo "${TIMES[$m]}" | median)
  wire=$(echo "${WIRE[$m]}" | median)
  runs=$(for t in ${TIMES[$m]}; do printf '%.2f ' "$t"; done)
  printf '| %s | %.2f | %.0f | %.2fx | %.1f | %.2f | %.2fx | %s|\n' "${NAME[$m]}" "$med" \
    "$(echo "$BYTES/1000000/$med" | bc -l)" "$(echo "$BYTES*8/$med/$bits" | bc -l)" "$(echo "$wire/1000000" | bc -l)" \
    "$(echo "$BYTES/$wire" | bc -l)" "$(echo "$z/$med" | bc -l)" "$runs"
done
# Where ferry's seconds went (the seed report's phases), median per phase;
# the rest of the command's time is process start and exit.
python3 - "$WORK" <<'PY'
import glob, json, statistics, sys
runs = [json.load(open(f))["phases"] for f in sorted(glob.glob(sys.argv[1] + "/ferry-*.json"))]
if runs:
    keys = ["connect", "manifest", "staging", "transfer", "sync", "install", "close"]
    print()
    print("ferry seed phases, median s: " + ", ".join(f"{k} {statistics.median(r[k] for r in runs):.3f}" for k in keys))
PY
