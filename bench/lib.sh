# Shared by bench/*.sh: running wrk with the scripts in bench/wrk and printing one table.
# shellcheck shell=bash

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BENCH_DURATION=${BENCH_DURATION:-10s}
BENCH_CONNECTIONS=${BENCH_CONNECTIONS:-"16 64"}
BENCH_THREADS=${BENCH_THREADS:-2}
BENCH_KEYS=${BENCH_KEYS:-10000}
BENCH_VALUE_SIZE=${BENCH_VALUE_SIZE:-100}
BENCH_ROWS=()

need_wrk() {
  command -v wrk >/dev/null || { echo "wrk is not installed (apt-get install wrk)" >&2; exit 1; }
}

# bench_wrk SYSTEM OP CONNECTIONS URL SCRIPT: runs wrk and appends a table row.
bench_wrk() {
  local system=$1 op=$2 conns=$3 url=$4 script=$5 out line
  out=$(wrk -t "$BENCH_THREADS" -c "$conns" -d "$BENCH_DURATION" --timeout 10s \
    -s "$BENCH_DIR/wrk/$script" "$url" -- "$BENCH_KEYS" "$BENCH_VALUE_SIZE")
  line=$(grep '^RESULT ' <<<"$out") || { echo "$out" >&2; echo "wrk printed no RESULT line" >&2; exit 1; }
  # RESULT requests=N secs=S rps=R p50_ms=X p99_ms=Y errors=E status_errors=F
  local rps p50 p99 errors
  rps=$(sed -E 's/.* rps=([^ ]+).*/\1/' <<<"$line")
  p50=$(sed -E 's/.* p50_ms=([^ ]+).*/\1/' <<<"$line")
  p99=$(sed -E 's/.* p99_ms=([^ ]+).*/\1/' <<<"$line")
  errors=$(sed -E 's/.* errors=([^ ]+).*/\1/' <<<"$line")
  echo "  $system $op c=$conns: $rps req/s, p50 $p50 ms, p99 $p99 ms, errors $errors" >&2
  BENCH_ROWS+=("$(printf '| %-7s | %-3s | %5s | %9s | %8s | %8s | %6s |' "$system" "$op" "$conns" "$rps" "$p50" "$p99" "$errors")")
}

print_table() {
  echo
  echo "wrk, $BENCH_THREADS threads, $BENCH_DURATION per row, $BENCH_KEYS keys, $BENCH_VALUE_SIZE-byte values, $(nproc) cores shared by client and servers"
  printf '| %-7s | %-3s | %5s | %9s | %8s | %8s | %6s |\n' system op conns "req/s" "p50 ms" "p99 ms" errors
  printf '|%s|%s|%s|%s|%s|%s|%s|\n' ---------  ----- ------- ----------- ---------- ---------- --------
  printf '%s\n' "${BENCH_ROWS[@]}"
}

# wait_for TIMEOUT_SECS DESCRIPTION COMMAND...: polls COMMAND every 0.2 s.
wait_for() {
  local timeout=$1 what=$2 deadline
  shift 2
  deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      echo "timed out after ${timeout}s waiting for $what" >&2
      return 1
    fi
    sleep 0.2
  done
}

# Binaries; release builds by default since debug builds measure the wrong thing.
BENCH_ROOT=$(cd "$BENCH_DIR/.." && pwd)
DISTKV_BIN=${DISTKV_BIN:-$BENCH_ROOT/target/release/distkv}
LOADTEST_BIN=${LOADTEST_BIN:-$BENCH_ROOT/target/release/distkv-loadtest}
PLAYGROUND_PID=""
PLAYGROUND_URL=""

need_bins() {
  local b
  for b in "$DISTKV_BIN" "$LOADTEST_BIN"; do
    [[ -x $b ]] || {
      echo "$b not found: cargo build --release -p dataplane -p loadtest (or set DISTKV_BIN/LOADTEST_BIN)" >&2
      exit 1
    }
  done
}

# start_playground DATA_DIR [EXTRA ARGS...]: 3 shards x 2 replicas on a free port, in its
# own session so stop_playground can take every child down with it.
start_playground() {
  local dir=$1
  shift
  mkdir -p "$dir"
  setsid "$DISTKV_BIN" playground --shards 3 --replicas 2 --port 0 --data-dir "$dir" "$@" \
    >"$dir/../playground.out" 2>&1 &
  PLAYGROUND_PID=$!
  wait_for 90 "the playground's router line" grep -q '^router: ' "$dir/../playground.out" || {
    tail -20 "$dir/../playground.out" >&2
    return 1
  }
  PLAYGROUND_URL=$(sed -nE 's/^router: (http[^ ]*).*/\1/p' "$dir/../playground.out" | head -1)
  echo "playground up: $PLAYGROUND_URL (pid $PLAYGROUND_PID, data in $dir)" >&2
}

stop_playground() {
  [[ -n $PLAYGROUND_PID ]] || return 0
  kill -TERM "$PLAYGROUND_PID" 2>/dev/null || true
  local deadline=$((SECONDS + 15))
  while kill -0 "$PLAYGROUND_PID" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
  if kill -0 "$PLAYGROUND_PID" 2>/dev/null; then
    echo "playground still running 15s after SIGTERM; killing its process group" >&2
    kill -KILL -- "-$PLAYGROUND_PID" 2>/dev/null || true
  fi
  wait "$PLAYGROUND_PID" 2>/dev/null || true
  PLAYGROUND_PID=""
}
