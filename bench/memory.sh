#!/usr/bin/env bash
# Memory and disk footprint of a playground (3 shards x 2 replicas) holding 1,000,000 keys
# with 100-byte values: loads them with distkv-loadtest prefill (many connections), then
# reports RSS per process from /proc and each data directory's size against the raw size.
#
# Env: MEM_KEYS (1000000), MEM_VALUE_SIZE (100), MEM_CONCURRENCY (128), DISTKV_BIN,
#      LOADTEST_BIN, BENCH_PLAYGROUND_ARGS.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
need_bins

keys=${MEM_KEYS:-1000000}
value_size=${MEM_VALUE_SIZE:-100}
concurrency=${MEM_CONCURRENCY:-128}
replicas=2

tmp=$(mktemp -d -t distkv-memory.XXXXXX)
cleanup() {
  stop_playground
  rm -rf "$tmp"
}
trap cleanup EXIT INT TERM

# shellcheck disable=SC2086 # word splitting of the extra args is intended
start_playground "$tmp/data" ${BENCH_PLAYGROUND_ARGS:-}

div() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
kib() { awk -v f="$2" '$1 == f":" {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

# Lines "ROLE PID DATA_DIR" for the router and every node, from playground.json and /proc.
processes() {
  local child
  for child in $(pgrep -P "$PLAYGROUND_PID"); do
    if tr '\0' ' ' <"/proc/$child/cmdline" | grep -qE '(^|/| )distkv router'; then
      echo "router $child -"
    fi
  done
  python3 - "$tmp/data/playground.json" "$tmp/data" <<'PY'
import json, sys
info = json.load(open(sys.argv[1]))
for n in info["nodes"]:
    print(f'{n["id"]} {n["pid"]} {sys.argv[2]}/{n["id"]}')
PY
}

declare -A before
while read -r role pid _; do before[$role]=$(kib "$pid" VmRSS); done < <(processes)

start=$SECONDS
"$LOADTEST_BIN" prefill --host "$PLAYGROUND_URL" --keys "$keys" --value-size "$value_size" \
  --concurrency "$concurrency"
load_secs=$((SECONDS - start))
# Let followers apply the tail of the log before measuring.
sleep 3

key_len=12 # key-%08d
raw=$((keys * (key_len + value_size)))
echo
echo "$keys keys x ($key_len-byte key + $value_size-byte value) = $((raw / 1024 / 1024)) MiB raw, loaded in ${load_secs}s ($((keys / (load_secs > 0 ? load_secs : 1))) keys/s, $concurrency connections)"
# "on disk" counts allocated blocks; "apparent" is the files' length (redb preallocates
# its file, and the unwritten part takes no disk space).
printf '| %-10s | %7s | %12s | %10s | %13s | %16s | %13s |\n' process pid "RSS MiB idle" "RSS MiB" "peak RSS MiB" "data on disk MiB" "apparent MiB"
printf '|%s|%s|%s|%s|%s|%s|%s|\n' ------------ --------- -------------- ------------ --------------- ------------------ ---------------
total_rss=0
total_disk=0
total_apparent=0
while read -r role pid dir; do
  rss=$(kib "$pid" VmRSS)
  hwm=$(kib "$pid" VmHWM)
  disk=0
  apparent=0
  if [[ $dir != - ]]; then
    disk=$(du -s --block-size=1 "$dir" | cut -f1)
    apparent=$(du -sb "$dir" | cut -f1)
  fi
  total_rss=$((total_rss + rss))
  total_disk=$((total_disk + disk))
  total_apparent=$((total_apparent + apparent))
  printf '| %-10s | %7s | %12.1f | %10.1f | %13.1f | %16.1f | %13.1f |\n' "$role" "$pid" \
    "$(div "${before[$role]:-0}" 1024)" "$(div "$rss" 1024)" "$(div "$hwm" 1024)" "$(div "$disk" 1048576)" "$(div "$apparent" 1048576)"
done < <(processes)
printf 'total RSS %.1f MiB; data on disk %.1f MiB = %.2fx the raw data x %d replicas (%.0f MiB); apparent %.1f MiB (%.2fx)\n' \
  "$(div "$total_rss" 1024)" "$(div "$total_disk" 1048576)" \
  "$(div "$total_disk" $((raw * replicas)))" "$replicas" "$(div $((raw * replicas)) 1048576)" \
  "$(div "$total_apparent" 1048576)" "$(div "$total_apparent" $((raw * replicas)))"
