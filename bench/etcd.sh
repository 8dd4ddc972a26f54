#!/usr/bin/env bash
# Measures a 3-member etcd on loopback the way bench/bench.sh measures distkv: PUT via
# /v3/kv/put and GET via /v3/kv/range (JSON gateway, base64), wrk at 16 and 64 connections,
# keys spread over 10,000 and filled first so reads hit. Prints the same table and removes
# everything it started.
#
# Env: BENCH_DURATION (10s), BENCH_CONNECTIONS ("16 64"), BENCH_KEYS (10000),
#      BENCH_VALUE_SIZE (100), ETCD_PORT_BASE (32379: clients on +0/+100/+200, peers +1).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
need_wrk

if ! command -v etcd >/dev/null; then
  if [[ $(id -u) == 0 ]]; then
    echo "installing etcd-server" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >/dev/null ||
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >/dev/null; }
  else
    echo "etcd is not installed (apt-get install etcd-server)" >&2
    exit 1
  fi
fi

base=${ETCD_PORT_BASE:-32379}
tmp=$(mktemp -d -t distkv-etcd-bench.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT INT TERM

cluster=""
for i in 0 1 2; do
  cluster+="${cluster:+,}m$i=http://127.0.0.1:$((base + 100 * i + 1))"
done
for i in 0 1 2; do
  client=http://127.0.0.1:$((base + 100 * i))
  peer=http://127.0.0.1:$((base + 100 * i + 1))
  etcd --name "m$i" --data-dir "$tmp/m$i" \
    --listen-client-urls "$client" --advertise-client-urls "$client" \
    --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
    --initial-cluster "$cluster" --initial-cluster-state new \
    --initial-cluster-token distkv-bench --logger zap --log-level error \
    >"$tmp/m$i.log" 2>&1 &
  pids+=($!)
done
url=http://127.0.0.1:$base
for i in 0 1 2; do
  wait_for 30 "etcd member m$i" \
    bash -c "curl -sf http://127.0.0.1:$((base + 100 * i))/health | grep -q '\"health\":\"true\"'"
done
echo "etcd $(etcd --version | head -1 | awk '{print $3}'): 3 members up, wrk against $url (m0)" >&2

# Counts keys "key-" .. "key." (base64 a2V5LQ== / a2V5Lg==).
count_keys() {
  curl -sf "$url/v3/kv/range" -d '{"key":"a2V5LQ==","range_end":"a2V5Lg==","count_only":true}' |
    sed -nE 's/.*"count":"?([0-9]+)"?.*/\1/p'
}
for attempt in 1 2 3; do
  wrk -t "$BENCH_THREADS" -c 32 -d 5s -s "$BENCH_DIR/wrk/etcd-fill.lua" "$url" \
    -- "$BENCH_KEYS" "$BENCH_VALUE_SIZE" "$BENCH_THREADS" >/dev/null
  n=$(count_keys)
  echo "filled: ${n:-0}/$BENCH_KEYS keys" >&2
  [[ ${n:-0} == "$BENCH_KEYS" ]] && break
  if [[ $attempt == 3 ]]; then echo "could not fill $BENCH_KEYS keys" >&2; exit 1; fi
done

for c in $BENCH_CONNECTIONS; do bench_wrk etcd PUT "$c" "$url" etcd-put.lua; done
for c in $BENCH_CONNECTIONS; do bench_wrk etcd GET "$c" "$url" etcd-get.lua; done
print_table
