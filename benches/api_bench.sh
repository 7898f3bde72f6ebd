#!/usr/bin/env bash
# HTTP API throughput with wrk, loopback, release build. Compare with the etcd grpc-gateway
# figures of /work/shared/bench/etcd_bench.sh (keepalive_gateway, put_gateway: wrk -c16).
#   api_heartbeat  PUT /v1/instances/{id}/heartbeat over 1000 instances (≈ etcd keepalive_gateway)
#   api_register   POST /v1/instances, a new instance each time (1000 services) (≈ etcd put_gateway)
#   api_get        GET /v1/services/{name} (3 instances)
#   api_list       GET /v1/services with 1000 services
# Usage: DURATION=10 RUNS=3 bash benches/api_bench.sh   (prints "RESULT netsel-api ..." lines)
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}; RUNS=${RUNS:-3}; CONNS=${CONNS:-16}
WORK=${WORK:-/tmp/netsel-api-bench}; rm -rf "$WORK"; mkdir -p "$WORK"
BIN=${BIN:-target/release/netsel}
[ -x "$BIN" ] || cargo build --release --bin netsel
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

cat > "$WORK/netsel.toml" <<TOML
registry_addr = "127.0.0.1:0"
api_addr = "127.0.0.1:0"
max_heartbeat_age = 600
# Durable, as a deployment runs, in a store of its own (never ./netsel-data).
data_dir = "$WORK/data"
[api]
rate_limit_per_sec = 0        # measure the API, not the limiter
TOML

start() {
  "$BIN" serve --config "$WORK/netsel.toml" > "$WORK/serve.log" 2>&1 &
  PID=$!
  for _ in $(seq 100); do grep -q '^ready' "$WORK/serve.log" && break; sleep 0.05; done
  API=$(awk '/^api:/{print $2}' "$WORK/serve.log")
}
stop() { kill "$PID"; wait "$PID" 2>/dev/null || true; }
trap 'kill $PID 2>/dev/null || true' EXIT

reg() { curl -s "http://$API/v1/instances" -H 'content-type: application/json' -d "$1"; }

cat > "$WORK/heartbeat.lua" <<'LUA'
local lines = {}
for l in io.lines(os.getenv("LEASES")) do lines[#lines + 1] = l end
local i = 0
request = function()
  i = i % #lines + 1
  local id, secret = lines[i]:match("(%S+) (%S+)")
  return wrk.format("PUT", "/v1/instances/" .. id .. "/heartbeat", { ["X-Netsel-Secret"] = secret })
end
LUA
cat > "$WORK/register.lua" <<'LUA'
local n, t = 0, 0
setup = function(thread) t = t + 1; thread:set("tid", t) end
request = function()
  n = n + 1
  -- a new instance each time, spread over 1000 services
  local body = string.format('{"name":"r%d-%d","address":"127.%d.%d.1","port":%d,"ttl_secs":600}',
    tid, n % 500, 10 + tid, math.floor(n / 60000) % 250, 1 + n % 60000)
  return wrk.format("POST", "/v1/instances", { ["Content-Type"] = "application/json" }, body)
end
LUA

run_wrk() { # name, url, [script]
  local name=$1 url=$2 script=${3:-} vals=() r out
  for r in $(seq "$RUNS"); do
    start
    prepare "$name"
    if [ -n "$script" ]; then
      out=$(LEASES=$WORK/leases.txt wrk -t2 -c"$CONNS" -d"${DURATION}s" -s "$script" "http://$API$url")
    else
      out=$(wrk -t2 -c"$CONNS" -d"${DURATION}s" "http://$API$url")
    fi
    echo "$out" > "$WORK/wrk-$name-$r.txt"
    if grep -q 'Non-2xx' <<<"$out"; then echo "WARN $name: non-2xx responses (run $r)"; fi
    vals+=("$(awk '/Requests\/sec/{print $2}' <<<"$out")")
    p99=$(awk '/99%/{print $2}' <<<"$out")
    stop
  done
  echo "RESULT netsel-api $name rps_median=$(printf '%s\n' "${vals[@]}" | median) runs=$(IFS=,; echo "${vals[*]}") conns=$CONNS duration=${DURATION}s"
}

prepare() {
  case $1 in
    api_heartbeat)
      : > "$WORK/leases.txt"
      for i in $(seq 1000); do
        out=$(reg "{\"name\":\"hb$((i % 50))\",\"address\":\"127.0.0.1\",\"port\":$((10000 + i)),\"ttl_secs\":600}")
        sed -E 's/.*"id":"([^"]+)","secret":"([^"]+)".*/\1 \2/' <<<"$out" >> "$WORK/leases.txt"
      done ;;
    api_get)
      for p in 1 2 3; do reg "{\"name\":\"web\",\"address\":\"127.0.0.1\",\"port\":$((8000 + p))}" >/dev/null; done ;;
    api_list)
      for i in $(seq 1000); do reg "{\"name\":\"svc$i\",\"address\":\"127.0.0.1\",\"port\":$((20000 + i))}" >/dev/null; done ;;
  esac
}

ONLY=${ONLY:-api_heartbeat api_register api_get api_list}
for b in $ONLY; do
  case $b in
    api_heartbeat) run_wrk api_heartbeat / "$WORK/heartbeat.lua" ;;
    api_register) run_wrk api_register / "$WORK/register.lua" ;;
    api_get) run_wrk api_get /v1/services/web ;;
    api_list) run_wrk api_list /v1/services ;;
  esac
done
