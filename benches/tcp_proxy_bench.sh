#!/usr/bin/env bash
# NetSel's TCP proxy against direct, haproxy and socat, in one run of the shared peer
# benchmark (tcp_bench.sh: iperf3 throughput, wrk Connection: close connection rate).
#
# NetSel runs with two services registered by explicit endpoint:
#   iperf -> 127.0.0.1:15201 (service port 15211), web -> 127.0.0.1:15280 (service port 15290)
# and is measured through their VIP listeners (VIP:15211, VIP:15290). The shared script
# dials its extra target on 127.0.0.1 only, so it is run from a copy patched to dial the
# VIPs (EXTRA_IPERF_HOST / EXTRA_CONN_HOST); nothing else in it changes.
#
# Usage (after `cargo build --release`):
#   bash benches/tcp_proxy_bench.sh
#   RELAY=copy WORKERS=1 RUNS=3 DURATION=10 bash benches/tcp_proxy_bench.sh
# Env: RELAY (splice|copy, default splice), WORKERS (threads of every proxy, NetSel's
#   `[tcp_proxy] workers` and the peers' alike: compare only at equal threads; default one
#   per CPU, as tcp_bench.sh), BENCH_DIR (where tcp_bench.sh is),
#   NETSEL (the binary), plus every knob of tcp_bench.sh (RUNS, DURATION, PARTS, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_DIR=${BENCH_DIR:-/work/shared/bench}
NETSEL=${NETSEL:-$PWD/target/release/netsel}
RELAY=${RELAY:-splice}
export WORKERS=${WORKERS:-$(nproc)}
W=${NETSEL_WORK:-/tmp/netsel-tcp-bench}
rm -rf "$W"; mkdir -p "$W"
[[ -x $NETSEL ]] || { echo "build first: cargo build --release" >&2; exit 2; }

cat > "$W/netsel.toml" <<TOML
registry_addr = "127.0.0.1:15290"
tcp_proxy_addr = "127.0.0.1:15291"
http_proxy_addr = "127.0.0.1:15292"
dns_addr = "127.0.0.1:15293"
api_addr = "127.0.0.1:15294"
data_dir = "$W/data"
max_ttl_secs = 86400
[network]
vip_cidr = "127.78.0.0/24"
[tcp_proxy]
relay = "$RELAY"
workers = $WORKERS
TOML

: > "$W/netsel.log"
# Same priority as the peers (tcp_bench.sh renices itself and its children to -10).
nice -n "${NICE:--10}" "$NETSEL" serve --config "$W/netsel.toml" > "$W/netsel.log" 2>&1 &
NPID=$!
trap 'kill -TERM $NPID 2>/dev/null; wait $NPID 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q '^ready' "$W/netsel.log" && break; sleep 0.1; done
grep -q '^ready' "$W/netsel.log" || { cat "$W/netsel.log"; exit 1; }

register() {  # NAME ENDPOINT SERVICE_PORT -> prints the VIP
  local reply
  exec 3<>/dev/tcp/127.0.0.1/15290
  printf 'REGISTER|%s|%s|service_port=%s|ttl=86400s\n' "$1" "$2" "$3" >&3
  IFS= read -r reply <&3; exec 3<&- 3>&-
  [[ $reply == REGISTERED* || $reply == SUCCESS* ]] || { echo "register $1: $reply" >&2; exit 1; }
  grep -oE '127\.78\.[0-9]+\.[0-9]+' <<<"$reply" | head -1
}
IVIP=$(register iperf 127.0.0.1:15201 15211)
CVIP=$(register web 127.0.0.1:15280 15212)
echo "netsel (pid $NPID, relay=$RELAY, workers=$WORKERS): iperf at $IVIP:15211, web at $CVIP:15212"

sed -e 's|^declare -A CPORT=\(.*\)$|declare -A CPORT=\1\ndeclare -A IHOST=() CHOST=()|' \
    -e 's|ORDER="$ORDER $xn"$|ORDER="$ORDER $xn"; IHOST[$xn]=${EXTRA_IPERF_HOST}; CHOST[$xn]=${EXTRA_CONN_HOST}|' \
    -e 's|iperf3 -c 127.0.0.1 -p|iperf3 -c "${IHOST[$t]:-127.0.0.1}" -p|' \
    -e 's|http://127.0.0.1:${CPORT\[$t\]}/|http://${CHOST[$t]:-127.0.0.1}:${CPORT[$t]}/|g' \
    "$BENCH_DIR/tcp_bench.sh" > "$W/tcp_bench_vip.sh"
grep -q 'CHOST\[$t\]' "$W/tcp_bench_vip.sh" || { echo "patching tcp_bench.sh failed" >&2; exit 1; }
EXTRA_TARGET="netsel 15211 15212" EXTRA_IPERF_HOST=$IVIP EXTRA_CONN_HOST=$CVIP \
  bash "$W/tcp_bench_vip.sh"
