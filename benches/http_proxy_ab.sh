#!/usr/bin/env bash
# A/B of two NetSel builds' HTTP proxy in one run: both proxy to one nginx backend (the
# shared bench's config), and wrk runs against A and B in turn, ROUNDS times, so both
# meet the same background load. Prints each run and the median ratio B/A.
#
#   bash benches/http_proxy_ab.sh OLD_BINARY NEW_BINARY
# Env: ROUNDS (default 4), DURATION (s per run, default 5), CONNS (default 64),
#   WORKERS (nginx workers and NetSel proxy workers, default one per CPU).
set -euo pipefail
A=${1:?old netsel binary}; B=${2:?new netsel binary}
ROUNDS=${ROUNDS:-4}; DURATION=${DURATION:-5}; CONNS=${CONNS:-64}
WORKERS=${WORKERS:-$(nproc)}
W=$(mktemp -d /tmp/netsel-http-ab.XXXX)
PIDS=()
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT

mkdir -p "$W/backend"
cat > "$W/backend/nginx.conf" <<NGINX
worker_processes $WORKERS;
pid $W/backend/nginx.pid;
error_log $W/backend/error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path $W/backend/tmp_body;
  proxy_temp_path $W/backend/tmp_proxy;
  fastcgi_temp_path $W/backend/tmp_fcgi;
  uwsgi_temp_path $W/backend/tmp_uwsgi;
  scgi_temp_path $W/backend/tmp_scgi;
  keepalive_requests 100000000;
  keepalive_timeout 60s;
  server {
    listen 127.0.0.1:18180 backlog=4096;
    location / { default_type text/plain; return 200 "netsel peer backend ok\n"; }
  }
}
NGINX
nginx -p "$W/backend" -e "$W/backend/error.log" -c "$W/backend/nginx.conf" -g 'daemon off;' &
PIDS+=($!)

start_netsel() {  # $1 binary, $2 port base
  local dir="$W/n$2"; mkdir -p "$dir"
  cat > "$dir/netsel.toml" <<TOML
registry_addr = "127.0.0.1:$(( $2 ))"
http_proxy_addr = "127.0.0.1:$(( $2 + 1 ))"
tcp_proxy_addr = "127.0.0.1:$(( $2 + 2 ))"
dns_addr = "127.0.0.1:$(( $2 + 3 ))"
api_addr = "127.0.0.1:$(( $2 + 4 ))"
max_ttl_secs = 86400
[http_proxy]
default_service = "bench"
workers = $WORKERS
[tcp_proxy]
vip_listeners = false
TOML
  RUST_LOG=warn "$1" serve --config "$dir/netsel.toml" --in-memory > "$dir/out" 2> "$dir/err" &
  PIDS+=($!)
  for _ in $(seq 100); do grep -q '^ready' "$dir/out" 2>/dev/null && break; sleep 0.1; done
  exec 3<>"/dev/tcp/127.0.0.1/$2"
  printf 'REGISTER|bench|127.0.0.1:18180|ttl=24h\n' >&3
  read -r answer <&3
  echo "$1: $answer" | cut -c1-80 >&2
  # Keep the registration's connection open for the run.
  sleep 100000 <&3 & PIDS+=($!)
}
start_netsel "$A" 19180
start_netsel "$B" 19190
sleep 1
curl -sf "http://127.0.0.1:19181/" >/dev/null && curl -sf "http://127.0.0.1:19191/" >/dev/null \
  || { echo "a proxy does not answer" >&2; exit 1; }

run() {  # $1 label, $2 port
  local out; out=$(wrk -t2 -c"$CONNS" -d"${DURATION}s" --latency "http://127.0.0.1:$2/")
  local rps p99
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  echo "$1 rps=$rps p99=$p99"
}
results=()
for r in $(seq "$ROUNDS"); do
  if (( r % 2 )); then results+=("$(run A 19181)" "$(run B 19191)")
  else results+=("$(run B 19191)" "$(run A 19181)"); fi
done
printf '%s\n' "${results[@]}"
median() {  # $1 label: the median rps of its runs
  printf '%s\n' "${results[@]}" | awk -v l="$1" '$1==l {sub("rps=","",$2); print $2}' | sort -n \
    | awk '{v[NR]=$1} END {print (NR%2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'
}
ma=$(median A); mb=$(median B)
awk -v a="$ma" -v b="$mb" 'BEGIN {printf "median rps: A %.0f  B %.0f  B/A %.3f\n", a, b, b/a}'
