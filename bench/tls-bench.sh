#!/usr/bin/env bash
# tls-bench.sh: TLS handshakes per second and TLS keep-alive requests per second, Switchyard
# beside HAProxy, with the pinning rules of the shared benchmark (../shared/bench/peer-bench.sh):
#
#  * One worker per proxy: haproxy `nbthread 1`, Switchyard `--threads 1`; both pinned with
#    `taskset -c 1`. The load generator (wrk) and the backend (one nginx, worker_processes 1)
#    are pinned with `taskset -c 0`.
#  * The same certificate for both: ECDSA P-256, made for each run with openssl. TLS 1.2 and
#    1.3 allowed on both; wrk's OpenSSL negotiates TLS 1.3 with both (checked and printed).
#  * Backend: "/" answers 200 with a 100-byte body, keep-alive on; the proxies keep backend
#    connections alive (haproxy `http-reuse always`), access logs off.
#  * handshakes: wrk with `Connection: close`, so every request is a new TCP connection and a
#    full TLS handshake (wrk does not resume sessions). keepalive: wrk on 64 keep-alive
#    connections. Same order, duration and WARMUP seconds of the same load for every target.
#  * "per core" = requests/s divided by the proxy's CPU use (user + system, from /proc) in cores
#    during the measurement, since the load generator may saturate its own core first.
#  * Every load run is bounded by DURATION and timeout(1); only processes this script started
#    are stopped, by process group.
#
# Usage (as root, from the repository root, after `cargo build --release`):
#   bash bench/tls-bench.sh
# Environment: DURATION=8, WARMUP=1, SWITCHYARD=target/release/switchyard, KEEP_TMP=0.
# Ports: backend 19101, haproxy 18443, ours 18444 (all on 127.0.0.1).
set -uo pipefail

DURATION=${DURATION:-8}
WARMUP=${WARMUP:-1}
SWITCHYARD=${SWITCHYARD:-target/release/switchyard}
KEEP_TMP=${KEEP_TMP:-0}
HERE=$(cd "$(dirname "$0")" && pwd)
BACKEND_PORT=19101
declare -A PORT=([haproxy]=18443 [ours]=18444)
LG_CPU=0
PROXY_CPU=1
BODY=$(printf 'x%.0s' $(seq 100))
declare -A PID=()

log() { printf '[tls-bench %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

for c in nginx haproxy wrk openssl taskset setsid timeout ss; do
  command -v "$c" >/dev/null || die "missing $c"
done
[[ -x $SWITCHYARD ]] || die "$SWITCHYARD not found: cargo build --release"
SWITCHYARD=$(cd "$(dirname "$SWITCHYARD")" && pwd)/$(basename "$SWITCHYARD")
WORK=$(mktemp -d /tmp/tls-bench.XXXXXX)

start_proc() {  # NAME CPU CMD...
  local name=$1 cpu=$2; shift 2
  setsid taskset -c "$cpu" "$@" >"$WORK/$name.log" 2>&1 </dev/null &
  PID[$name]=$!
}
stop_proc() {
  local pid=${PID[$1]:-} i
  [[ -n $pid ]] || return 0
  kill -TERM -- "-$pid" 2>/dev/null
  for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL -- "-$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
  unset "PID[$1]"
}
cleanup() {
  trap '' INT TERM; trap - EXIT
  local n
  for n in "${!PID[@]}"; do stop_proc "$n"; done
  if [[ $KEEP_TMP == 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_listen() {  # PORT NAME
  local i
  for i in $(seq 100); do
    ss -ltnH "sport = :$1" | grep -q . && return 0
    kill -0 "${PID[$2]}" 2>/dev/null || break
    sleep 0.1
  done
  tail -n 5 "$WORK/$2.log" >&2
  die "$2 is not listening on :$1"
}

for p in "$BACKEND_PORT" "${PORT[haproxy]}" "${PORT[ours]}"; do
  ss -ltnH "sport = :$p" | grep -q . && die "port $p is in use"
done

# The certificate, shared by both proxies (haproxy wants certificate and key in one file).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -sha256 -days 30 -nodes \
  -subj "/CN=localhost" -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
  -keyout "$WORK/site.key" -out "$WORK/site.pem" 2>/dev/null || die "openssl failed"
cat "$WORK/site.pem" "$WORK/site.key" >"$WORK/site-haproxy.pem"

mkdir -p "$WORK/tmp"
cat >"$WORK/backend.conf" <<CONF
worker_processes 1;
daemon off;
pid $WORK/backend.pid;
error_log $WORK/backend.err warn;
events { worker_connections 10240; }
http {
  access_log off;
  keepalive_timeout 75s;
  keepalive_requests 100000000;
  client_body_temp_path $WORK/tmp/body; proxy_temp_path $WORK/tmp/proxy;
  fastcgi_temp_path $WORK/tmp/fcgi; uwsgi_temp_path $WORK/tmp/uwsgi; scgi_temp_path $WORK/tmp/scgi;
  server {
    listen 127.0.0.1:$BACKEND_PORT;
    location = / { default_type text/plain; return 200 "$BODY"; }
  }
}
CONF
cat >"$WORK/haproxy.cfg" <<CONF
global
    nbthread 1
    maxconn 9000
    ssl-default-bind-options ssl-min-ver TLSv1.2
defaults
    mode http
    maxconn 9000
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
    http-reuse always
frontend tls
    bind 127.0.0.1:${PORT[haproxy]} ssl crt $WORK/site-haproxy.pem alpn http/1.1
    default_backend web
backend web
    server b1 127.0.0.1:$BACKEND_PORT
CONF

start_proc backend "$LG_CPU" nginx -c "$WORK/backend.conf"
wait_listen "$BACKEND_PORT" backend
start_proc haproxy "$PROXY_CPU" haproxy -db -f "$WORK/haproxy.cfg"
wait_listen "${PORT[haproxy]}" haproxy
start_proc ours "$PROXY_CPU" env OURS_TLS_LISTEN="127.0.0.1:${PORT[ours]}" \
  OURS_TLS_BACKEND="127.0.0.1:$BACKEND_PORT" OURS_TLS_CERT="$WORK/site.pem" \
  OURS_TLS_KEY="$WORK/site.key" "$SWITCHYARD" run --threads 1 --log-level warn \
  --config "$HERE/tls.toml"
wait_listen "${PORT[ours]}" ours

cpu_ticks() {  # utime + stime of PID, in clock ticks
  awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"
}
HZ=$(getconf CLK_TCK)

printf '%-10s %-9s %-22s %12s %8s %14s\n' scenario target negotiated "req/s" "cpu %" "req/s per core"
for scenario in handshakes keepalive; do
  for target in haproxy ours; do
    port=${PORT[$target]}
    url="https://localhost:$port/"
    # What wrk's OpenSSL negotiates with this target.
    negotiated=$(echo | timeout 5 openssl s_client -connect "127.0.0.1:$port" -servername localhost 2>/dev/null \
      | awk '/^New, /{ sub(/,$/, "", $2); v=$2 } /Server Temp Key/{ k=$4 } END { print v "/" k }' | tr -d ',')
    case $scenario in
      handshakes) args=(-c32 -H "Connection: close") ;;
      keepalive) args=(-c64) ;;
    esac
    ((WARMUP > 0)) && taskset -c "$LG_CPU" timeout -k 5 $((WARMUP + 10)) \
      wrk -t1 -d"${WARMUP}s" "${args[@]}" "$url" >/dev/null 2>&1
    # The process that listens (setsid may fork before taskset and the proxy exec).
    pid=$(ss -ltnpH "sport = :$port" | grep -o 'pid=[0-9]*' | head -n 1 | cut -d= -f2)
    t0=$(cpu_ticks "$pid"); s0=$(date +%s.%N)
    out=$(taskset -c "$LG_CPU" timeout -k 5 $((DURATION + 15)) wrk -t1 -d"${DURATION}s" "${args[@]}" "$url" 2>&1)
    t1=$(cpu_ticks "$pid"); s1=$(date +%s.%N)
    rps=$(grep -Eo 'Requests/sec: *[0-9.]+' <<<"$out" | awk '{ print $2 }')
    errors=$(grep -Eo 'Non-2xx.*|Socket errors.*' <<<"$out" | xargs)
    cpu=$(awk -v a="$t0" -v b="$t1" -v hz="$HZ" -v s0="$s0" -v s1="$s1" 'BEGIN { printf "%.0f", (b - a) / hz / (s1 - s0) * 100 }')
    per_core=$(awk -v r="${rps:-0}" -v c="$cpu" 'BEGIN { if (c > 0) printf "%.0f", r / (c / 100); else print "-" }')
    printf '%-10s %-9s %-22s %12s %8s %14s %s\n' "$scenario" "$target" "$negotiated" "${rps:-failed}" "$cpu" "$per_core" "$errors"
  done
done
