#!/usr/bin/env bash
# Side-by-side transfer benchmark on loopback: ferry seed against the tools
# an operator would otherwise use, in the same run, on the same dataset.
#
#   benches/transfer.sh [RUNS]
#
# Environment:
#   FERRY_BENCH_DATA    dataset directory (default /tmp/ferry-bench/dataset-VALUES);
#                       created when missing
#   FERRY_BENCH_VALUES  dbbench (db_bench fillrandom, default) or realistic
#                       (structured records, about 2x compressible)
#   FERRY_BENCH_SIZE    size of a new dataset (default 2GiB)
#   FERRY_BENCH_OUT     also write the markdown table to this file
#   FERRY_BENCH_SETTLE  seconds to wait after clearing the target, before
#                       each timed run (default 0; see below)
#
# Every method copies the same files into an empty target on the same
# filesystem, with the source in the page cache. ferry fsyncs every byte it
# installs; of the others only `cp -a + fsync` (the disk's floor for a
# durable copy) and `rsync --fsync` do, so those two rows show what
# durability costs on this disk. Methods are interleaved
# (run 1 of every method, then run 2, ...), so a noisy neighbour hits all of
# them alike; the table gives medians. Read the ratios, not the times.
# CPU: "client" is the receiving side (the command's own processes),
# "server" the rest of the machine during the run (the ferry leader, sshd
# and rsync's sender, the rsync daemon, the tar side of nc).
#
# Each timed run starts FERRY_BENCH_SETTLE seconds after the previous copy
# was deleted. This VM's balloon driver reports freed memory to the host
# ("Free page reporting enabled" at boot), which takes it back within
# seconds; a copy that writes into pages the host has taken back spends
# about 4x the kernel time in the page-cache copy (a 1 GB ferry seed: 3.2-
# 3.7 s instead of 1.4-1.7 s, measured with and without a 6 s wait). At 0,
# a method writes into the pages the delete just freed, as on a host
# without the balloon, for as long as they last; at 8, every method starts
# on cold pages, as on a host that has just been given the memory.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
VALUES=${FERRY_BENCH_VALUES:-dbbench}
DATA=${FERRY_BENCH_DATA:-/tmp/ferry-bench/dataset-$VALUES}
SIZE=${FERRY_BENCH_SIZE:-2GiB}
SETTLE=${FERRY_BENCH_SETTLE:-0}
WORK=$(mktemp -d /tmp/ferry-bench-run.XXXXXX)
FERRY_BENCH_TOOLS=1 scripts/setup
cargo build --release --locked -p ferry >&2
FERRY=$PWD/target/release/ferry
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
. benches/common.sh

ensure_dataset "$DATA" "$SIZE" "$VALUES"

PORT_FERRY=7471 PORT_RSYNC=7472 PORT_NC=7473 PORT_SSH=7474
"$FERRY" serve --data "$DATA" --listen 127.0.0.1:$PORT_FERRY --log "${FERRY_TRANSFER_LOG:-warn}" 2> "${FERRY_TRANSFER_LEADER_LOG:-/dev/stderr}" &
LEADER=$!
PIDS+=($LEADER)
for _ in $(seq 100); do [ -f "$DATA/.ferry/tls/join-token" ] && break; sleep 0.1; done
TOKEN=$("$FERRY" token --data "$DATA")

# RocksDB 10 compacts a db_bench (7.8) database when it first opens it: wait
# until the file set is stable so no compaction runs during the timings.
prev="" stable=0
for _ in $(seq 600); do
  cur=$(ls "$DATA" | md5sum)
  if [ "$cur" = "$prev" ]; then stable=$((stable + 1)); else stable=0; fi
  prev=$cur
  [ $stable -ge 15 ] && break
  sleep 1
done

SRC=$WORK/src
mkdir -p "$SRC"
cat > "$WORK/rsyncd.conf" <<CONF
use chroot = no
[data]
  path = $SRC
  read only = yes
CONF
rsync --daemon --no-detach --config="$WORK/rsyncd.conf" --port=$PORT_RSYNC --address=127.0.0.1 &
PIDS+=($!)

# sshd on loopback with a throwaway host key and client key
prepare_sshd 127.0.0.1 $PORT_SSH
/usr/sbin/sshd -D -f "$WORK/ssh/sshd_config" &
PIDS+=($!)
sleep 1

ferry_seed() {
  "$FERRY" seed --leader 127.0.0.1:$PORT_FERRY --data "$WORK/dst" --token "$TOKEN" --json --no-progress
}
tar_nc() {
  (nc -l -d -p $PORT_NC | tar -x -C "$WORK/dst") &
  local r=$!
  sleep 0.2
  tar -c -C "$SRC" . | nc -N 127.0.0.1 $PORT_NC
  wait $r
}
rsync_daemon() { rsync -a "rsync://127.0.0.1:$PORT_RSYNC/data/" "$WORK/dst/"; }
rsync_over_ssh() { rsync -a "$@" -e "$SSH -c aes128-gcm@openssh.com" "root@127.0.0.1:$SRC/" "$WORK/dst/"; }
rsync_ssh() { rsync_over_ssh; }
rsync_ssh_z() { rsync_over_ssh -z; }
rsync_ssh_fsync() { rsync_over_ssh --fsync; }
cp_local() { cp -a "$SRC/." "$WORK/dst/"; }
# The disk's floor for a durable copy: the same bytes, copied and fsynced
# (as ferry fsyncs every installed byte before the database can open).
cp_fsync() { cp -a "$SRC/." "$WORK/dst/" && sync "$WORK/dst"/* "$WORK/dst"; }

# Busy CPU seconds of the whole machine (all cores), from /proc/stat.
machine_cpu() { awk '/^cpu /{printf "%.2f", ($2+$3+$4+$7+$8)/100}' /proc/stat; }
# CPU seconds of this shell's finished children (user + system). `times`
# must run in this shell, not in a $(...) subshell that has no children.
children_cpu_to() { times > "$WORK/times"; awk 'NR==2{split($1,u,"m");split($2,s,"m");printf "%.2f", u[1]*60+u[2]+s[1]*60+s[2]}' "$WORK/times" > "$1"; }

check_copy() { # the copy must hold every byte of the source
  local got
  got=$(du -sb --apparent-size --exclude=.ferry "$WORK/dst" | cut -f1)
  if [ "$got" -lt "$BYTES" ]; then echo "$1 copied $got of $BYTES bytes" >&2; exit 1; fi
}

declare -A TIMES CLIENT SERVER
timed() { # key command...
  local key=$1; shift
  rm -rf "$WORK/dst"; mkdir -p "$WORK/dst"; sync; sleep "$SETTLE"
  local t0 t1 m0 m1 c0 c1
  m0=$(machine_cpu); children_cpu_to "$WORK/c0"; t0=$(date +%s.%N)
  "$@" > "$WORK/last.out" 2> "$WORK/last.err" || { echo "$key failed:" >&2; cat "$WORK/last.err" >&2; exit 1; }
  t1=$(date +%s.%N); children_cpu_to "$WORK/c1"; m1=$(machine_cpu)
  c0=$(cat "$WORK/c0"); c1=$(cat "$WORK/c1")
  check_copy "$key"
  local secs client total
  secs=$(echo "$t1 - $t0" | bc)
  client=$(echo "$c1 - $c0" | bc)
  total=$(echo "$m1 - $m0" | bc)
  TIMES[$key]+="$secs "
  CLIENT[$key]+="$client "
  SERVER[$key]+="$(echo "if ($total > $client) $total - $client else 0" | bc) "
  if [ "$key" = ferry ]; then
    grep -o '"peak_rss_bytes":[0-9]*' "$WORK/last.out" | cut -d: -f2 >> "$WORK/ferry-rss"
  fi
  printf '%-14s %6.2fs\n' "$key" "$secs" >&2
}

# One untimed seed first: the leader takes its seed checkpoint and hashes
# every SST once (cached after). Later seeds reuse that checkpoint.
rm -rf "$WORK/dst"; mkdir -p "$WORK/dst"
t0=$(date +%s.%N); ferry_seed > "$WORK/first.json"; t1=$(date +%s.%N)
FIRST=$(echo "$t1 - $t0" | bc)
echo "first ferry seed (leader hashes every SST): ${FIRST}s" >&2
# The seeded directory opens at the checkpoint's sequence with its digest.
"$FERRY" digest --data "$WORK/dst" --json > "$WORK/digest.json"

# The other tools copy exactly the files ferry ships: the seed checkpoint's.
CP=$(ls -d "$DATA"/.ferry/checkpoints/cp-*-seed | tail -n 1)
for f in "$CP"/*; do
  [ -f "$f" ] || continue
  case "$(basename "$f")" in LOCK|LOG*) ;; *) ln "$f" "$SRC/" ;; esac
done
BYTES=$(du -sb --apparent-size "$SRC" | cut -f1)
FILES=$(ls "$SRC" | wc -l)
cat "$SRC"/* > /dev/null   # warm the page cache

METHODS=(cp cp-fsync ferry rsync-daemon tar-nc rsync-ssh rsync-ssh-fsync rsync-ssh-z)
declare -A NAME=(
  [cp]='cp -a (local, no network)'
  [cp-fsync]='cp -a + fsync (local, durable floor)'
  [ferry]='ferry seed'
  [rsync-daemon]='rsync daemon (plaintext TCP)'
  [tar-nc]='tar \| nc (plaintext)'
  [rsync-ssh]='rsync over ssh (aes128-gcm)'
  [rsync-ssh-fsync]='rsync --fsync over ssh (aes128-gcm)'
  [rsync-ssh-z]='rsync -z over ssh (aes128-gcm)'
)
declare -A CMD=(
  [cp]=cp_local [cp-fsync]=cp_fsync [ferry]=ferry_seed [rsync-daemon]=rsync_daemon
  [tar-nc]=tar_nc [rsync-ssh]=rsync_ssh [rsync-ssh-fsync]=rsync_ssh_fsync
  [rsync-ssh-z]=rsync_ssh_z
)
for i in $(seq "$RUNS"); do
  echo "round $i of $RUNS" >&2
  for m in "${METHODS[@]}"; do timed "$m" "${CMD[$m]}"; done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
ssh_med=$(echo "${TIMES[rsync-ssh]}" | median)
daemon_med=$(echo "${TIMES[rsync-daemon]}" | median)
floor_med=$(echo "${TIMES[cp-fsync]}" | median)
GB=$(echo "scale=4; $BYTES/1000000000" | bc)
{
  echo "Dataset: $VALUES, $FILES files, $BYTES bytes ($(printf '%.2f' "$GB") GB). Runs per method: $RUNS, interleaved, each $SETTLE s after the last delete. Date: $(date -u +%F). Machine: $(nproc) cores, $(free -g | awk '/Mem/{print $2}') GiB, loopback."
  echo
  echo "| method | median s | GB/s | vs rsync over ssh | vs rsync daemon | vs durable floor | client CPU s/GB | server CPU s/GB | runs (s) |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---|"
  for m in "${METHODS[@]}"; do
    med=$(echo "${TIMES[$m]}" | median)
    cl=$(echo "${CLIENT[$m]}" | median)
    sv=$(echo "${SERVER[$m]}" | median)
    runs=$(for t in ${TIMES[$m]}; do printf '%.2f ' "$t"; done)
    printf '| %s | %.2f | %.2f | %.2fx | %.2fx | %.2fx | %.2f | %.2f | %s|\n' \
      "${NAME[$m]}" "$med" "$(echo "$GB/$med" | bc -l)" "$(echo "$ssh_med/$med" | bc -l)" \
      "$(echo "$daemon_med/$med" | bc -l)" "$(echo "$floor_med/$med" | bc -l)" "$(echo "$cl/$GB" | bc -l)" "$(echo "$sv/$GB" | bc -l)" "$runs"
  done
  echo
  printf 'First ferry seed after the leader started (includes hashing every SST once): %.2f s. ' "$FIRST"
  printf 'Peak RSS of `ferry seed`: %s MiB (max over runs).\n' "$(sort -n "$WORK/ferry-rss" | tail -n1 | awk '{printf "%.0f", $1/1048576}')"
} | tee ${FERRY_BENCH_OUT:+"$FERRY_BENCH_OUT"}
