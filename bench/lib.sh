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
