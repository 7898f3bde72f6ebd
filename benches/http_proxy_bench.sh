#!/usr/bin/env bash
# NetSel's HTTP proxy against direct, nginx and haproxy, in one run of the shared peer
# benchmark (http_bench.sh: wrk -t2 -c64 --latency, h2load -c 64 -m 10 -t 2 over h2c),
# all proxying to the script's nginx backend on 127.0.0.1:18080.
#
# NetSel runs with the backend registered as service `bench`; the script sends a bare
# URL (Host 127.0.0.1:PORT), so `[http_proxy] default_service = "bench"` routes it. The
# shared script runs its EXTRA_TARGET through the same wrk and h2load runs as the peers.
# NetSel runs at the peers' priority (the script renices itself and its children to -10).
# VIP listeners are off: the service port 18080 would otherwise also be bound on the VIP,
# and the script refuses to start while anything listens on a port it uses.
#
# Usage (after `cargo build --release`):
#   bash benches/http_proxy_bench.sh
#   RUNS=3 DURATION=10 QUIET_WAIT=60 bash benches/http_proxy_bench.sh
# Env: BENCH_DIR (where http_bench.sh is), NETSEL (the binary), WORKERS (threads of every
#   proxy and the backend, NetSel's `[http_proxy] workers` and the peers' alike: compare
#   only at equal threads; default one per CPU, as http_bench.sh), plus every knob of
#   http_bench.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_DIR=${BENCH_DIR:-/work/shared/bench}
NETSEL=${NETSEL:-$PWD/target/release/netsel}
W=${NETSEL_WORK:-/tmp/netsel-http-bench}
export WORKERS=${WORKERS:-$(nproc)}
rm -rf "$W"; mkdir -p "$W"
[[ -x $NETSEL ]] || { echo "build first: cargo build --release" >&2; exit 2; }

cat > "$W/netsel.toml" <<TOML
registry_addr = "127.0.0.1:19080"
http_proxy_addr = "127.0.0.1:19081"
tcp_proxy_addr = "127.0.0.1:19082"
dns_addr = "127.0.0.1:19083"
api_addr = "127.0.0.1:19084"
max_ttl_secs = 86400
[http_proxy]
default_service = "bench"
workers = $WORKERS
[tcp_proxy]
vip_listeners = false
TOML

nice -n "${NICE:--10}" "$NETSEL" serve --in-memory --config "$W/netsel.toml" > "$W/netsel.log" 2>&1 &
NPID=$!
trap 'kill -TERM $NPID 2>/dev/null; wait $NPID 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q '^ready' "$W/netsel.log" && break; sleep 0.1; done
grep -q '^ready' "$W/netsel.log" || { cat "$W/netsel.log"; exit 1; }
exec 3<>/dev/tcp/127.0.0.1/19080
printf 'REGISTER|bench|127.0.0.1:18080|ttl=86400s\n' >&3
IFS= read -r reply <&3; exec 3<&- 3>&-
[[ $reply == REGISTERED* || $reply == SUCCESS* ]] || { echo "register: $reply" >&2; exit 1; }
echo "netsel (pid $NPID): $reply"

EXTRA_TARGET="netsel http://127.0.0.1:19081/" bash "$BENCH_DIR/http_bench.sh"
