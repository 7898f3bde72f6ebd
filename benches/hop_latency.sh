#!/usr/bin/env bash
# The cost of one hop (issue #19 item 3): the latency NetSel's HTTP proxy, nginx and
# haproxy each add over going straight to the backend, at a fixed low rate, all at the
# same thread count. benches/hop_latency.rs sends the load (open loop, no coordinated
# omission) and prints the percentiles; this script starts the backend and the proxies.
#
# Every proxy forwards HTTP/1.1 keep-alive to one nginx backend on 127.0.0.1:19180 that
# answers a fixed 200; the proxies are configured as /work/shared/bench/http_bench.sh
# configures them (nginx upstream keepalive, haproxy http-reuse always), on their own
# ports (19181 nginx, 19182 haproxy, 19183 NetSel), so this can run beside nothing else.
#
# Usage (after `cargo build --release`):
#   bash benches/hop_latency.sh
#   WORKERS=1 RATE=2000 DURATION=10 ROUNDS=3 bash benches/hop_latency.sh
# Env: WORKERS (threads of every proxy and the backend, default one per CPU), RATE,
#   DURATION, ROUNDS, CONNS (see benches/hop_latency.rs), NETSEL (the binary),
#   VARIANT_B (`[http_proxy]` lines, e.g. "pin_workers = false": a second NetSel with
#   them, target netsel-b on :19193, for an A/B of a setting in the same run), NETSEL_B
#   (the binary of netsel-b, for an A/B of two builds; default NETSEL).
# Output: `RESULT hop ...` lines, one per target; the first (direct) is the baseline.
set -euo pipefail
cd "$(dirname "$0")/.."
WORKERS=${WORKERS:-$(nproc)}
NETSEL=${NETSEL:-$PWD/target/release/netsel}
W=${WORK:-/tmp/netsel-hop}
[[ -x $NETSEL ]] || { echo "build first: cargo build --release" >&2; exit 2; }
rm -rf "$W"; mkdir -p "$W"/{backend,nginx,haproxy}
for p in 19180 19181 19182 19183 19184 19185 19186 19187 19193 19194 19195 19196 19197; do
  ss -Hltn "sport = :$p" | grep -q . && { echo "port $p busy" >&2; exit 1; }
done
cargo bench --bench hop_latency --no-run -q 2>/dev/null || cargo bench --bench hop_latency --no-run

PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]:-}"; do [[ -n $p ]] && kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]:-}"; do [[ -n $p ]] && wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM
renice -n "${NICE:--10}" -p $$ >/dev/null 2>&1 || true
wait_tcp() {
  local i; for i in $(seq 100); do ss -Hltn "sport = :$1" | grep -q . && return 0; sleep 0.1; done
  echo "nothing listening on $1" >&2; return 1
}
nginx_common() {
  cat <<CONF
worker_processes $WORKERS;
pid $W/$1/nginx.pid;
error_log $W/$1/error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path $W/$1/tmp_body;
  proxy_temp_path $W/$1/tmp_proxy;
  fastcgi_temp_path $W/$1/tmp_fcgi;
  uwsgi_temp_path $W/$1/tmp_uwsgi;
  scgi_temp_path $W/$1/tmp_scgi;
  keepalive_requests 100000000;
  keepalive_timeout 60s;
CONF
}
{ nginx_common backend; cat <<CONF
  server {
    listen 127.0.0.1:19180 backlog=4096;
    location / { default_type text/plain; return 200 "netsel peer backend ok\n"; }
  }
}
CONF
} > "$W/backend/nginx.conf"
{ nginx_common nginx; cat <<CONF
  upstream be { server 127.0.0.1:19180; keepalive 128; keepalive_requests 100000000; }
  server {
    listen 127.0.0.1:19181 backlog=4096;
    location / { proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
CONF
} > "$W/nginx/nginx.conf"
cat > "$W/haproxy/haproxy.cfg" <<CONF
global
    nbthread $WORKERS
    maxconn 8000
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    option http-keep-alive
frontend fe
    bind 127.0.0.1:19182
    default_backend be
backend be
    http-reuse always
    server s1 127.0.0.1:19180
CONF
cat > "$W/netsel.toml" <<CONF
registry_addr = "127.0.0.1:19184"
http_proxy_addr = "127.0.0.1:19183"
tcp_proxy_addr = "127.0.0.1:19185"
dns_addr = "127.0.0.1:19186"
api_addr = "127.0.0.1:19187"
max_ttl_secs = 86400
[http_proxy]
default_service = "bench"
workers = $WORKERS
[tcp_proxy]
vip_listeners = false
CONF

B=${VARIANT_B:-}${NETSEL_B:-}
if [[ -n $B ]]; then
  sed -e 's/19184/19194/; s/19183/19193/; s/19185/19195/; s/19186/19196/; s/19187/19197/' \
    "$W/netsel.toml" > "$W/netsel-b.toml"
  printf '%s\n' "${VARIANT_B:-}" > "$W/variant-b.lines"
  awk -v f="$W/variant-b.lines" '{print} /^\[http_proxy\]/{while((getline l < f)>0) print l}' \
    "$W/netsel-b.toml" > "$W/netsel-b.tmp" && mv "$W/netsel-b.tmp" "$W/netsel-b.toml"
fi

nginx -p "$W/backend" -e "$W/backend/error.log" -c "$W/backend/nginx.conf" -g 'daemon off;' & PIDS+=($!)
nginx -p "$W/nginx" -e "$W/nginx/error.log" -c "$W/nginx/nginx.conf" -g 'daemon off;' & PIDS+=($!)
haproxy -db -f "$W/haproxy/haproxy.cfg" > "$W/haproxy/out.log" 2>&1 & PIDS+=($!)
"$NETSEL" serve --in-memory --config "$W/netsel.toml" > "$W/netsel.log" 2>&1 & PIDS+=($!)
TARGETS="direct=127.0.0.1:19180 nginx=127.0.0.1:19181 haproxy=127.0.0.1:19182 netsel=127.0.0.1:19183"
REGISTRIES=19184; PROXIES="19180 19181 19182 19183"
if [[ -n $B ]]; then
  "${NETSEL_B:-$NETSEL}" serve --in-memory --config "$W/netsel-b.toml" > "$W/netsel-b.log" 2>&1 & PIDS+=($!)
  TARGETS="$TARGETS netsel-b=127.0.0.1:19193"; REGISTRIES="19184 19194"; PROXIES="$PROXIES 19193"
fi
for p in 19180 19181 19182 $PROXIES $REGISTRIES; do wait_tcp $p; done
for r in $REGISTRIES; do
  exec 3<>/dev/tcp/127.0.0.1/$r
  printf 'REGISTER|bench|127.0.0.1:19180|ttl=86400s\n' >&3
  IFS= read -r reply <&3; exec 3<&- 3>&-
  [[ $reply == REGISTERED* ]] || { echo "register: $reply" >&2; exit 1; }
done
for p in $PROXIES; do
  curl -fsS --max-time 5 -H 'Host: bench' "http://127.0.0.1:$p/" | grep -q 'netsel peer backend ok' \
    || { echo "sanity failed on :$p" >&2; exit 1; }
done
echo "workers=$WORKERS backend=nginx :19180; proxies nginx :19181 haproxy :19182 netsel :19183"
[[ -n $B ]] && echo "netsel-b: ${NETSEL_B:-$NETSEL} [http_proxy] ${VARIANT_B:-}"
TARGETS="$TARGETS" cargo bench -q --bench hop_latency 2>"$W/progress.log" | sed "s/\$/ workers=$WORKERS/"
