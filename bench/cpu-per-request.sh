#!/usr/bin/env bash
# cpu-per-request.sh: user and system CPU time per request of HAProxy, NGINX and Switchyard,
# each alone on cpu 1 under the shared benchmark's load, in alternating rounds.
#
# The shared benchmark gives requests per second and per core; this says where each proxy's
# time goes (see "Where we stand against the goals" in bench/README.md). It reuses the
# configurations of a peer-bench run kept with KEEP_TMP=1:
#
#   KEEP_TMP=1 PORT_OFFSET=200 SCENARIOS=l7-small-keepalive OURS_L7_CMD=... \
#     bash ../shared/bench/peer-bench.sh          # prints "kept /tmp/peer-bench.XXXX"
#   bench/cpu-per-request.sh /tmp/peer-bench.XXXX target/release/switchyard [ROUNDS]
#   NEW_CONN=1 bench/cpu-per-request.sh ...       # a new connection per request
#
# Needs root (pinning), nginx, haproxy and wrk. Ports: those of the kept run (offset 200:
# backends 19201 and 19202, HAProxy 18380, NGINX 18480, ours 18280). Each measurement is bounded
# by wrk's duration.
set -euo pipefail

WORK=${1:?usage: cpu-per-request.sh PEER_BENCH_WORK_DIR SWITCHYARD_BINARY [ROUNDS]}
BIN=${2:?usage: cpu-per-request.sh PEER_BENCH_WORK_DIR SWITCHYARD_BINARY [ROUNDS]}
ROUNDS=${3:-3}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [[ -n ${NEW_CONN:-} ]]; then
  LOAD=(-c32 -H "Connection: close")
else
  LOAD=(-c64)
fi

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# The two backends of the kept run, on cpu 0 with the load generator.
BACKENDS=()
for conf in "$WORK"/backend-*.conf; do
  port=${conf##*backend-}; port=${port%.conf}
  BACKENDS+=("127.0.0.1:$port")
  taskset -c 0 nginx -p "$WORK/prefix-backend-$port/" -c "$conf" >/dev/null 2>&1 &
  PIDS+=($!)
done
sleep 0.5

# ticks PID: utime and stime, in clock ticks.
ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{print $12, $13}'; }

# measure NAME PORT PID: one warm-up second, then five measured.
measure() {
  local name=$1 port=$2 pid=$3 hz requests before after
  hz=$(getconf CLK_TCK)
  taskset -c 0 wrk -t1 "${LOAD[@]}" -d1s "http://127.0.0.1:$port/" >/dev/null
  read -ra before < <(ticks "$pid")
  requests=$(taskset -c 0 wrk -t1 "${LOAD[@]}" -d5s "http://127.0.0.1:$port/" |
    awk '/requests in/{print $1}')
  read -ra after < <(ticks "$pid")
  awk -v n="$name" -v r="$requests" -v hz="$hz" \
    -v u=$((after[0] - before[0])) -v s=$((after[1] - before[1])) 'BEGIN {
      us = 1e6 / hz / r
      printf "%-8s %7d req/s  user %5.2f us  system %5.2f us  total %5.2f us per request\n",
        n, r / 5, u * us, s * us, (u + s) * us
    }'
}

# start NAME PORT CMD...: runs a proxy on cpu 1 until it listens.
start() {
  local port=$2
  shift 2
  taskset -c 1 "$@" >/dev/null 2>&1 &
  PIDS+=($!)
  for _ in $(seq 50); do
    curl -s -o /dev/null "http://127.0.0.1:$port/" && return
    sleep 0.1
  done
  echo "not listening on $port" >&2
  exit 1
}

stop() { kill "$1"; wait "$1" 2>/dev/null || true; }

for _ in $(seq "$ROUNDS"); do
  start haproxy 18380 haproxy -f "$WORK/haproxy.cfg"
  pid=${PIDS[-1]}
  measure haproxy 18380 "$pid"
  stop "$pid"

  start nginx 18480 nginx -p "$WORK/prefix-nginx-proxy/" -c "$WORK/nginx-proxy.conf"
  pid=${PIDS[-1]}
  # The worker does the work; the master only watches it.
  measure nginx 18480 "$(pgrep -P "$pid" | head -1)"
  stop "$pid"

  OURS_L7_LISTEN=127.0.0.1:18280 OURS_BACKEND_1=${BACKENDS[0]} OURS_BACKEND_2=${BACKENDS[1]} \
    start ours 18280 "$BIN" run --threads 1 --log-level warn --config "$HERE/l7.toml"
  pid=${PIDS[-1]}
  measure ours 18280 "$pid"
  stop "$pid"
done
