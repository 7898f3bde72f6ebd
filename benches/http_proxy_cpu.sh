#!/usr/bin/env bash
# CPU per proxied HTTP/1.1 request, interleaved A/B: nginx proxy vs one or two NetSel builds,
# all in front of the same nginx backend (the configs of ../shared/bench/http_bench.sh).
#
#   bash benches/http_proxy_cpu.sh NEW_BIN [OLD_BIN]
#   ROUNDS=4 SECS=4 bash benches/http_proxy_cpu.sh target/release/netsel /tmp/netsel-before
#   H2=1 ...   also h2load over h2c (`h2load -D SECS -c 64 -m 10 -t 2`) against haproxy
#              (`proto h2` frontend on :18183, the script's config) and the NetSel builds
#
# Ports: backend 127.0.0.1:18180, nginx proxy :18181, NetSel proxies :19181 (old) and
# :19182 (new) with registries on :19180 / :19190. For each round and target: one
# `wrk -t2 -c64 -d${SECS}s --latency` run; CPU is utime+stime of the proxy process (all
# threads; the nginx worker) from /proc/PID/stat, divided by the requests served.
# Every proxy runs WORKERS threads (default 1): nginx worker_processes, haproxy nbthread
# and NetSel's `[http_proxy] workers` alike, so ratios are at equal threads; nginx's CPU is
# summed over its workers.
# Everything started is stopped by PID on exit.
set -euo pipefail
WORKERS=${WORKERS:-1}
NEW=$(realpath "$1"); OLD=${2:+$(realpath "$2")}
ROUNDS=${ROUNDS:-4}; SECS=${SECS:-4}
W=$(mktemp -d /tmp/netsel-http-cpu.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM
for p in 18180 18181 18183 19180 19181 19182 19190; do
  if ss -Hltn "sport = :$p" | grep -q .; then echo "port $p busy" >&2; exit 1; fi
done

nginx_conf() {  # $1 dir, $2 server block
  mkdir -p "$W/$1"
  cat > "$W/$1/nginx.conf" <<C
worker_processes $WORKERS;
pid $W/$1/nginx.pid;
error_log $W/$1/error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path $W/$1/tb; proxy_temp_path $W/$1/tp; fastcgi_temp_path $W/$1/tf;
  uwsgi_temp_path $W/$1/tu; scgi_temp_path $W/$1/ts;
  keepalive_requests 100000000;
  keepalive_timeout 60s;
  $2
}
C
  nginx -p "$W/$1" -c "$W/$1/nginx.conf" -g 'daemon off;' >/dev/null 2>&1 & PIDS+=($!)
}
nginx_conf backend 'server { listen 127.0.0.1:18180 backlog=4096;
    location / { default_type text/plain; return 200 "netsel peer backend ok\n"; } }'
nginx_conf proxy 'upstream be { server 127.0.0.1:18180; keepalive 128; keepalive_requests 100000000; }
  server { listen 127.0.0.1:18181 backlog=4096;
    location / { proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection ""; } }'
NGINX_MASTER=${PIDS[1]}

declare -A PID URL
start_netsel() {  # $1 name, $2 binary, $3 registry port, $4 proxy port
  cat > "$W/$1.toml" <<T
registry_addr = "127.0.0.1:$3"
data_dir = "$W/data-$1"
http_proxy_addr = "127.0.0.1:$4"
tcp_proxy_addr = "127.0.0.1:0"
dns_addr = "127.0.0.1:0"
api_addr = "127.0.0.1:0"
[http_proxy]
default_service = "bench"
workers = $WORKERS
[tcp_proxy]
vip_listeners = false
T
  "$2" serve --config "$W/$1.toml" > "$W/$1.out" 2>&1 & PIDS+=($!); PID[$1]=$!
  URL[$1]=http://127.0.0.1:$4/
  for _ in $(seq 50); do ss -Hltn "sport = :$3" | grep -q . && break; sleep 0.1; done
  exec 3<>"/dev/tcp/127.0.0.1/$3"; printf 'REGISTER|bench|127.0.0.1:18180|ttl=2h\n' >&3
  read -r _ <&3; exec 3>&-
}
TARGETS=(nginx)
[[ -n $OLD ]] && { start_netsel before "$OLD" 19180 19181; TARGETS+=(before); }
start_netsel new "$NEW" 19190 19182; TARGETS+=(new)
sleep 0.5
PID[nginx]=nginx; URL[nginx]=http://127.0.0.1:18181/
for t in "${TARGETS[@]}"; do curl -fsS --max-time 5 "${URL[$t]}" | grep -q 'backend ok'; done

tick=$(getconf CLK_TCK)
# utime+stime of a process, or of every nginx proxy worker for "nginx".
cpu() {
  if [[ $1 == nginx ]]; then
    local c; for c in $(pgrep -P "$NGINX_MASTER"); do cat "/proc/$c/stat"; done | awk '{s+=$14+$15} END{print s}'
  else awk '{print $14+$15}' "/proc/$1/stat"; fi
}
if [[ ${H2:-0} == 1 ]]; then
  mkdir -p "$W/haproxy"
  cat > "$W/haproxy/haproxy.cfg" <<C
global
    nbthread $WORKERS
    maxconn 8000
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    option http-keep-alive
frontend fe_h2c
    bind 127.0.0.1:18183 proto h2
    default_backend be
backend be
    http-reuse always
    server s1 127.0.0.1:18180
C
  haproxy -db -f "$W/haproxy/haproxy.cfg" > "$W/haproxy/out.log" 2>&1 & PIDS+=($!); PID[haproxy]=$!
  URL[haproxy]=http://127.0.0.1:18183/
  for _ in $(seq 50); do ss -Hltn "sport = :18183" | grep -q . && break; sleep 0.1; done
  H2T=(haproxy "${TARGETS[@]:1}")
  for r in $(seq "$ROUNDS"); do
    for t in "${H2T[@]}"; do
      a=$(cpu "${PID[$t]}")
      out=$(h2load -D "$SECS" -c 64 -m 10 -t 2 "${URL[$t]}" 2>&1)
      b=$(cpu "${PID[$t]}")
      reqs=$(awk '/^requests:/{print $8}' <<<"$out")
      rps=$(awk '/^finished in/{print $4}' <<<"$out")
      failed=$(awk '/^requests:/{print $10}' <<<"$out")
      awk -v r="$r" -v n="$t" -v a="$a" -v b="$b" -v t="$tick" -v q="$reqs" -v rps="$rps" -v f="$failed" \
        'BEGIN{printf "RESULT h2c-cpu round=%s target=%s rps=%s failed=%s cpu_us_per_req=%.2f\n", r, n, rps, f, (b-a)/t*1e6/q}'
    done
  done
fi
for r in $(seq "$ROUNDS"); do
  for t in "${TARGETS[@]}"; do
    a=$(cpu "${PID[$t]}")
    out=$(wrk -t2 -c64 -d"${SECS}s" --latency "${URL[$t]}")
    b=$(cpu "${PID[$t]}")
    reqs=$(awk '/requests in/{print $1}' <<<"$out")
    rps=$(awk '/^Requests\/sec/{print $2}' <<<"$out")
    p99=$(awk '$1=="99%"{print $2}' <<<"$out")
    errs=$(grep -E "Non-2xx|Socket errors" <<<"$out" | tr '\n' ' ' || true)
    awk -v r="$r" -v n="$t" -v a="$a" -v b="$b" -v t="$tick" -v q="$reqs" -v rps="$rps" -v p="$p99" -v e="$errs" \
      'BEGIN{printf "RESULT http-cpu round=%s target=%s rps=%s p99=%s cpu_us_per_req=%.2f %s\n", r, n, rps, p, (b-a)/t*1e6/q, e}'
  done
done
