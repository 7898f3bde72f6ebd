#!/usr/bin/env bash
# NetSel's DNS under the same dnsperf load as the peers of /work/shared/bench/dns_bench.sh.
#
# Run dns_bench.sh first (it installs dnsperf and writes /tmp/peers-dns/queries.txt), then:
#   bash benches/dns_netsel.sh
# Env: MODES (unpinned pinned), RUNS (3), DURATION (10, max 60), CLIENTS (8),
#      OUTSTANDING (100), LAT_QPS (10000), LAT_DURATION (5), VARIANTS ("fast hickory"),
#      MEM_SECS (0 = skip; else a load of that many seconds sampling the server's RSS),
#      NETSEL (binary, default target/release/netsel).
# Output: "RESULT dns server=netsel-<variant> ..." lines in the peers' format.
set -euo pipefail
cd "$(dirname "$0")/.."

MODES=${MODES:-"unpinned pinned"}
RUNS=${RUNS:-3}
DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-8}
OUTSTANDING=${OUTSTANDING:-100}
LAT_QPS=${LAT_QPS:-10000}
LAT_DURATION=${LAT_DURATION:-5}
VARIANTS=${VARIANTS:-"fast hickory"}
MEM_SECS=${MEM_SECS:-0}
NETSEL=${NETSEL:-target/release/netsel}
QUERIES=${QUERIES:-/tmp/peers-dns/queries.txt}
WORK=${WORK:-/tmp/netsel-dns-bench}
(( DURATION <= 60 )) || { echo "DURATION capped at 60 s" >&2; exit 2; }
[[ -f $QUERIES ]] || { echo "$QUERIES missing: run /work/shared/bench/dns_bench.sh first" >&2; exit 2; }
renice -n "${NICE:--10}" -p $$ >/dev/null 2>&1 || true
rm -rf "$WORK"; mkdir -p "$WORK"

SRV_PID=
stop() {
  [[ -n $SRV_PID ]] || return 0
  kill -TERM "$SRV_PID" 2>/dev/null || true
  wait "$SRV_PID" 2>/dev/null || true
  SRV_PID=
}
trap stop EXIT INT TERM

median() { sort -g | awk '{a[NR]=$1} END{ if(NR==0){print "nan"} else if(NR%2){print a[(NR+1)/2]} else {printf "%.2f\n",(a[NR/2]+a[NR/2+1])/2} }'; }

for variant in $VARIANTS; do
  for mode in $MODES; do
    case $mode in
      pinned) SP=(taskset -c 0); CP=(taskset -c 1); threads=1 ;;
      unpinned1) SP=(env); CP=(env); threads=1 ;;
      *) SP=(env); CP=(env); threads=2 ;;
    esac
    fast=true; [[ $variant == hickory ]] && fast=false
    cat > "$WORK/netsel.toml" <<EOF
[dns]
udp_workers = $threads
fast_path = $fast
EOF
    out="$WORK/$variant-$mode"
    mkdir -p "$out"
    # In memory: a store left in ./netsel-data by another run would add its instances.
    TOKIO_WORKER_THREADS=$threads "${SP[@]}" "$NETSEL" serve --in-memory --config "$WORK/netsel.toml" \
      --registry-addr 127.0.0.1:0 --dns-addr 127.0.0.1:0 --api-addr 127.0.0.1:0 \
      --tcp-proxy-addr 127.0.0.1:0 --http-proxy-addr 127.0.0.1:0 > "$out/serve.log" 2>&1 &
    SRV_PID=$!
    for _ in $(seq 100); do grep -q '^ready' "$out/serve.log" && break; sleep 0.1; done
    reg=$(awk '/^registry:/{print $2}' "$out/serve.log")
    dns=$(awk '/^dns:/{print $2}' "$out/serve.log")
    port=${dns##*:}
    python3 benches/dns_fill.py "$reg" 1000 >/dev/null
    # Same sanity check as the peers: an A, an SRV, an NXDOMAIN.
    a=$(dig +short -p "$port" @127.0.0.1 svc5.netsel A)
    srv=$(dig +short -p "$port" @127.0.0.1 _svc5._tcp.netsel SRV)
    nx=$(dig -p "$port" @127.0.0.1 nx1.netsel A | awk '/status:/{gsub(",","",$6); print $6}')
    [[ -n $a && $srv == "0 1 80 "* && $nx == NXDOMAIN ]] || { echo "sanity failed: A=$a SRV=$srv NX=$nx" >&2; exit 1; }
    rss0=$(awk '/VmRSS/{print $2}' /proc/$SRV_PID/status)
    qps=(); lat=(); lost=()
    for r in $(seq "$RUNS"); do
      o=$(timeout $((DURATION+20)) "${CP[@]}" dnsperf -s 127.0.0.1 -p "$port" -d "$QUERIES" \
            -l "$DURATION" -c "$CLIENTS" -T 1 -q "$OUTSTANDING" -t 2 2>&1)
      echo "$o" > "$out/dnsperf-$r.txt"
      q=$(awk '/Queries per second/{print $4}' <<<"$o")
      l=$(awk '/Average Latency/{printf "%.3f", $4*1000}' <<<"$o")
      lo=$(awk '/Queries lost/{print $3}' <<<"$o")
      qps+=("${q:-0}"); lat+=("${l:-nan}"); lost+=("${lo:-nan}")
    done
    timeout $((LAT_DURATION+20)) "${CP[@]}" dnsperf -s 127.0.0.1 -p "$port" -d "$QUERIES" \
        -l "$LAT_DURATION" -c "$CLIENTS" -T 1 -Q "$LAT_QPS" -t 2 -v > "$out/dnsperf-lat.txt" 2>&1 || true
    pct=$(awk '/^> /{print $NF*1000}' "$out/dnsperf-lat.txt" | sort -g |
          awk '{a[NR]=$1} END{ if(NR==0){print "nan nan"} else {i=int(NR*0.5); if(i<1)i=1; j=int(NR*0.99); if(j<1)j=1; printf "%.3f %.3f", a[i], a[j]} }')
    read -r p50 p99 <<<"$pct"
    mem=""
    if (( MEM_SECS > 0 )); then
      : > "$out/rss.txt"
      "${CP[@]}" dnsperf -s 127.0.0.1 -p "$port" -d "$QUERIES" -l "$MEM_SECS" -c "$CLIENTS" -T 1 \
          -q "$OUTSTANDING" -t 2 > "$out/dnsperf-mem.txt" 2>&1 &
      load=$!
      for _ in $(seq $((MEM_SECS / 5))); do sleep 5; awk '/VmRSS/{print $2}' /proc/$SRV_PID/status >> "$out/rss.txt"; done
      wait $load || true
      mem=" rss_kb_before=$rss0 rss_kb_every5s=$(paste -sd, "$out/rss.txt") mem_load_qps=$(awk '/Queries per second/{print $4}' "$out/dnsperf-mem.txt")"
    fi
    rss1=$(awk '/VmRSS/{print $2}' /proc/$SRV_PID/status)
    echo "RESULT dns server=netsel-$variant mode=$mode threads=$threads qps_median=$(printf '%s\n' "${qps[@]}" | median) avg_lat_ms_median=$(printf '%s\n' "${lat[@]}" | median) p50_ms@${LAT_QPS}qps=$p50 p99_ms@${LAT_QPS}qps=$p99 qps_runs=$(IFS=,; echo "${qps[*]}") lost_runs=$(IFS=,; echo "${lost[*]}") rss_kb_start=$rss0 rss_kb_end=$rss1$mem" | tee -a "$WORK/results.txt"
    stop
  done
done
