#!/usr/bin/env bash
# Throughput and latency of distkv through the router: starts a playground (3 shards x 2
# replicas, sync replication), prefills 10,000 keys so GETs hit, then runs wrk PUT and
# GET at 16 and 64 connections and prints one table. bench/etcd.sh prints the same table
# for etcd.
#
# Env: BENCH_DURATION (10s), BENCH_CONNECTIONS ("16 64"), BENCH_KEYS (10000),
#      BENCH_VALUE_SIZE (100), DISTKV_BIN, LOADTEST_BIN (target/release/...),
#      BENCH_PLAYGROUND_ARGS (extra playground flags, e.g. "--mode async").
set -euo pipefail
source "$(dirname "$0")/lib.sh"
need_wrk
need_bins

tmp=$(mktemp -d -t distkv-bench.XXXXXX)
cleanup() {
  stop_playground
  rm -rf "$tmp"
}
trap cleanup EXIT INT TERM

# shellcheck disable=SC2086 # word splitting of the extra args is intended
start_playground "$tmp/data" ${BENCH_PLAYGROUND_ARGS:-}
"$LOADTEST_BIN" prefill --host "$PLAYGROUND_URL" --keys "$BENCH_KEYS" \
  --value-size "$BENCH_VALUE_SIZE" --concurrency 64

for c in $BENCH_CONNECTIONS; do bench_wrk distkv PUT "$c" "$PLAYGROUND_URL" put.lua; done
for c in $BENCH_CONNECTIONS; do bench_wrk distkv GET "$c" "$PLAYGROUND_URL" get.lua; done
print_table
