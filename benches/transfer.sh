#!/usr/bin/env bash
# Side-by-side transfer benchmark on loopback: ferry seed against the tools
# an operator would otherwise use, in the same run, on the same dataset.
#
#   benches/transfer.sh [RUNS]
#
# Environment:
#   FERRY_BENCH_DATA  dataset directory (default /tmp/ferry-bench/dataset);
#                     created with db_bench fillrandom when missing
#   FERRY_BENCH_KEYS  keys for a new dataset (default 25000000: about 2.25 GB)
#   FERRY_BENCH_OUT   where to write the markdown table (default: stdout only)
#
# Every method copies the same directory into an empty target on the same
# filesystem, with the source in the page cache. Times are wall-clock
# medians of RUNS runs (default 3). The machine is shared and noisy: read
# the ratios, not the absolute times.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
DATA=${FERRY_BENCH_DATA:-/tmp/ferry-bench/dataset}
KEYS=${FERRY_BENCH_KEYS:-25000000}
WORK=$(mktemp -d /tmp/ferry-bench-run.XXXXXX)
FERRY_BENCH_TOOLS=1 scripts/setup
cargo build --release --locked -p ferry >&2
FERRY=$PWD/target/release/ferry
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

if [ ! -f "$DATA/CURRENT" ]; then
  echo "generating the dataset: db_bench fillrandom, $KEYS keys, 200-byte values, LZ4" >&2
  mkdir -p "$(dirname "$DATA")"
  db_bench --benchmarks=fillrandom --num="$KEYS" --value_size=200 --compression_type=lz4 --threads=1 --db="$DATA" >/dev/null
fi

# The leader adopts the dataset (ferry serve opens it; its checkpoint hard-links the SSTs).
PORT_FERRY=7471 PORT_RSYNC=7472 PORT_NC=7473 PORT_SSH=7474
"$FERRY" serve --data "$DATA" --listen 127.0.0.1:$PORT_FERRY --log warn &
PIDS+=($!)
sleep 2
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

# The source directory of the other tools, filled after the first seed.
SRC=$WORK/src
mkdir -p "$SRC"

# rsync daemon
cat > "$WORK/rsyncd.conf" <<CONF
use chroot = no
[data]
  path = $SRC
  read only = yes
CONF
rsync --daemon --no-detach --config="$WORK/rsyncd.conf" --port=$PORT_RSYNC --address=127.0.0.1 &
PIDS+=($!)

# sshd on loopback with a throwaway host key and client key
mkdir -p "$WORK/ssh" /run/sshd
ssh-keygen -q -t ed25519 -N '' -f "$WORK/ssh/host" && ssh-keygen -q -t ed25519 -N '' -f "$WORK/ssh/client"
cat > "$WORK/ssh/sshd_config" <<CONF
Port $PORT_SSH
ListenAddress 127.0.0.1
HostKey $WORK/ssh/host
AuthorizedKeysFile $WORK/ssh/client.pub
PermitRootLogin prohibit-password
PasswordAuthentication no
StrictModes no
UsePAM no
CONF
/usr/sbin/sshd -D -f "$WORK/ssh/sshd_config" &
PIDS+=($!)
sleep 1
SSH="ssh -p $PORT_SSH -i $WORK/ssh/client -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"

run() { # name command...
  local name=$1; shift
  local times=()
  for i in $(seq "$RUNS"); do
    rm -rf "$WORK/dst"; mkdir -p "$WORK/dst"; sync
    local t0 t1
    t0=$(date +%s.%N)
    "$@" > "$WORK/last.out" 2> "$WORK/last.err" || { echo "$name failed:" >&2; cat "$WORK/last.err" >&2; exit 1; }
    t1=$(date +%s.%N)
    times+=("$(echo "$t1 - $t0" | bc)")
    check_copy "$name"
  done
  local med
  med=$(printf '%s\n' "${times[@]}" | sort -n | sed -n "$(( (RUNS + 1) / 2 ))p")
  RESULTS+=("$name;$med;${times[*]}")
  echo "$name: median ${med}s (runs: ${times[*]})" >&2
}

check_copy() { # the copy must hold every byte of the source
  local got
  got=$(du -sb --apparent-size --exclude=.ferry "$WORK/dst" | cut -f1)
  if [ "$got" -lt "$BYTES" ]; then echo "$1 copied $got of $BYTES bytes" >&2; exit 1; fi
}

ferry_seed() {
  "$FERRY" seed --leader 127.0.0.1:$PORT_FERRY --data "$WORK/dst" --token "$TOKEN" --json --no-progress
  # The seeded directory must open at the checkpoint's sequence.
  "$FERRY" digest --data "$WORK/dst" --json >/dev/null
}
ferry_seed_only() { "$FERRY" seed --leader 127.0.0.1:$PORT_FERRY --data "$WORK/dst" --token "$TOKEN" --json --no-progress; }
tar_nc() {
  (nc -l -d -p $PORT_NC | tar -x -C "$WORK/dst") &
  local r=$!
  sleep 0.2
  tar -c -C "$SRC" . | nc -N 127.0.0.1 $PORT_NC
  wait $r
}

RESULTS=()
# One untimed seed first: the leader takes its seed checkpoint and hashes
# every SST once (cached after). Later seeds reuse that checkpoint.
rm -rf "$WORK/dst"; mkdir -p "$WORK/dst"
t0=$(date +%s.%N); ferry_seed_only > "$WORK/first.json"; t1=$(date +%s.%N)
FIRST=$(echo "$t1 - $t0" | bc)
echo "first ferry seed (leader hashes every SST): ${FIRST}s" >&2

# The other tools copy exactly the files ferry ships: the seed checkpoint's.
CP=$(ls -d "$DATA"/.ferry/checkpoints/cp-*-seed | tail -n 1)
SRC=$WORK/src
mkdir -p "$SRC"
for f in "$CP"/*; do
  [ -f "$f" ] || continue
  case "$(basename "$f")" in LOCK|LOG*) ;; *) ln "$f" "$SRC/" ;; esac
done
BYTES=$(du -sb --apparent-size "$SRC" | cut -f1)
FILES=$(ls "$SRC" | wc -l)
cat "$SRC"/* > /dev/null   # warm the page cache

run "cp -a (local, no network)" cp -a "$SRC/." "$WORK/dst/"
run "ferry seed" ferry_seed_only
run "rsync daemon (plaintext TCP)" rsync -a "rsync://127.0.0.1:$PORT_RSYNC/data/" "$WORK/dst/"
run "tar | nc (plaintext)" tar_nc
run "rsync over ssh (aes128-gcm)" rsync -a -e "$SSH -c aes128-gcm@openssh.com" "root@127.0.0.1:$SRC/" "$WORK/dst/"
# The last ferry run is verified: the seeded directory opens at the checkpoint's sequence.
rm -rf "$WORK/dst"; mkdir -p "$WORK/dst"; ferry_seed >/dev/null && echo "verified: the seeded directory opens and digests" >&2

ssh_med=$(printf '%s\n' "${RESULTS[@]}" | grep '^rsync over ssh' | cut -d';' -f2)
{
  echo "Dataset: $FILES files, $BYTES bytes ($(echo "scale=2; $BYTES/1000000000" | bc) GB). Runs per method: $RUNS. Date: $(date -u +%F). Machine: $(nproc) cores, $(free -g | awk '/Mem/{print $2}') GiB."
  echo
  echo "| method | median s | GB/s | speed vs rsync over ssh | runs (s) |"
  echo "|---|---|---|---|---|"
  for r in "${RESULTS[@]}"; do
    IFS=';' read -r name med all <<< "$r"
    echo "| $name | $med | $(echo "scale=2; $BYTES/$med/1000000000" | bc) | $(echo "scale=2; $ssh_med/$med" | bc)x | $all |"
  done
  echo
  echo "First ferry seed after the leader started (includes hashing every SST once): ${FIRST}s."
} | tee ${FERRY_BENCH_OUT:+"$FERRY_BENCH_OUT"}
