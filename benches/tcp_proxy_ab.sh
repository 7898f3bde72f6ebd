#!/usr/bin/env bash
# Quick interleaved A/B of NetSel TCP proxy binaries against haproxy (same minute, same box).
# Starts nginx (:16280), iperf3 -s (:16201), haproxy (:16202 iperf, :16204 conn) and one
# NetSel per binary (each with its own ports and VIP range), then alternates short runs:
#   wrk -t2 -c32 -H 'Connection: close' (new connections/s) and iperf3 single stream (also
#   direct, client to server). Each iperf3 run also reports the box's TCP counters over the
#   run (nstat): segments retransmitted, segments queued out of order at a receiver, and
#   duplicate SACKs received (a retransmission that was not needed).
# Usage: bash benches/tcp_proxy_ab.sh BIN_A [BIN_B ...]
# Env: ROUNDS (3), DURATION (5 s), WORKERS (haproxy nbthread and NetSel threads, 1),
#      PARTS ("connrate throughput"), NETSEL_ENV (extra env for NetSel),
#      IPERF3_ARGS (extra iperf3 client arguments, e.g. "-C cubic"),
#      HOLD=N (keep everything up N s before the rounds, e.g. to attach perf/strace).
set -euo pipefail
renice -n "${NICE:--10}" -p $$ >/dev/null 2>&1 || true   # like tcp_bench.sh: less disturbed by other work
ROUNDS=${ROUNDS:-3}; DURATION=${DURATION:-5}; WORKERS=${WORKERS:-1}
PARTS=${PARTS:-"connrate throughput"}
W=${AB_WORK:-/tmp/netsel-tcp-ab}; rm -rf "$W"; mkdir -p "$W/nginx"
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do [[ -n $p ]] && kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM
cat > "$W/haproxy.cfg" <<CFG
global
    nbthread $WORKERS
    maxconn 8000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
listen iperf
    bind 127.0.0.1:16202
    server s1 127.0.0.1:16201
listen conn
    bind 127.0.0.1:16204 backlog 4096
    server s1 127.0.0.1:16280
CFG
cat > "$W/nginx/nginx.conf" <<CFG
worker_processes $WORKERS;
pid $W/nginx/nginx.pid;
error_log $W/nginx/error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path $W/nginx/tb; proxy_temp_path $W/nginx/tp; fastcgi_temp_path $W/nginx/tf;
  uwsgi_temp_path $W/nginx/tu; scgi_temp_path $W/nginx/ts;
  server { listen 127.0.0.1:16280 backlog=4096; location / { return 200 "ok\n"; } }
}
CFG
iperf3 -s -B 127.0.0.1 -p 16201 > "$W/iperf3.log" 2>&1 & PIDS+=($!)
haproxy -db -f "$W/haproxy.cfg" > "$W/haproxy.log" 2>&1 & PIDS+=($!)
nginx -p "$W/nginx" -e "$W/nginx/error.log" -c "$W/nginx/nginx.conf" -g 'daemon off;' & PIDS+=($!)
declare -A CONN=([haproxy]=127.0.0.1:16204) IPERF=([haproxy]=127.0.0.1:16202 [direct]=127.0.0.1:16201)
declare -A PID=([haproxy]=${PIDS[1]})
# CPU time (user+system clock ticks) of a process and all its threads.
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
# The TCP counters that tell reordering and loss apart, summed over a run.
tcp_counters() { nstat -z 2>/dev/null | awk '$1=="TcpRetransSegs"{r=$2} $1=="TcpExtTCPOFOQueue"{o=$2}
  $1=="TcpExtTCPDSACKRecv"{d=$2} END{printf "retrans_segs %d ofo_queued %d dsack_recv %d", r, o, d}'; }
ORDER="haproxy"
i=0
for bin in "$@"; do
  i=$((i+1)); n="n$i"; base=$((16300 + 10*i))
  cat > "$W/$n.toml" <<TOML
registry_addr = "127.0.0.1:$base"
tcp_proxy_addr = "127.0.0.1:$((base+1))"
http_proxy_addr = "127.0.0.1:$((base+2))"
dns_addr = "127.0.0.1:$((base+3))"
api_addr = "127.0.0.1:$((base+4))"
data_dir = "$W/$n-data"
max_ttl_secs = 86400
[network]
vip_cidr = "127.79.$i.0/24"
TOML
  env TOKIO_WORKER_THREADS=$WORKERS ${NETSEL_ENV:-} "$bin" serve --config "$W/$n.toml" > "$W/$n.log" 2>&1 & PIDS+=($!)
  for _ in $(seq 100); do grep -q '^ready' "$W/$n.log" && break; sleep 0.1; done
  reg() { exec 3<>/dev/tcp/127.0.0.1/$base; printf 'REGISTER|%s|%s|service_port=%s|ttl=86400s\n' "$1" "$2" "$3" >&3
          IFS= read -r r <&3; exec 3<&- 3>&-; grep -oE '127\.79\.[0-9]+\.[0-9]+' <<<"$r" | head -1; }
  CONN[$n]=$(reg web 127.0.0.1:16280 16212):16212
  IPERF[$n]=$(reg iperf 127.0.0.1:16201 16211):16211
  PID[$n]=${PIDS[-1]}; ORDER="$ORDER $n"; echo "$n = $bin (pid ${PIDS[-1]}) conn ${CONN[$n]} iperf ${IPERF[$n]}"
done
sleep 0.5
if [[ -n ${HOLD:-} ]]; then echo "holding ${HOLD} s"; sleep "$HOLD"; fi
for r in $(seq "$ROUNDS"); do
  for t in direct $ORDER; do
    if [[ " $PARTS " == *" connrate "* && $t != direct ]]; then
      for _ in 1 2 3 4 5 6 7 8 9 10; do (( $(ss -Hant state time-wait | wc -l) > 3000 )) || break; sleep 0.5; done
      c0=$(cpu_ticks "${PID[$t]}")
      out=$(wrk -t2 -c32 -d"${DURATION}s" --latency -H 'Connection: close' "http://${CONN[$t]}/" 2>&1)
      c1=$(cpu_ticks "${PID[$t]}"); n=$(awk '/requests in/{print $1}' <<<"$out")
      echo "round $r $t connrate $(awk '/^Requests\/sec/{print $2}' <<<"$out") p99 $(awk '$1=="99%"{print $2}' <<<"$out") proxy_cpu_us_per_conn $(awk -v d=$((c1-c0)) -v n="${n:-0}" -v hz="$(getconf CLK_TCK)" 'BEGIN{printf "%.1f", (n>0 ? d/hz*1e6/n : 0)}') $(awk '/Socket errors|Non-2xx/{printf "%s ", $0}' <<<"$out")"
    fi
    if [[ " $PARTS " == *" throughput "* ]]; then
      nstat -n >/dev/null 2>&1 || true
      # shellcheck disable=SC2086 # IPERF3_ARGS is a list of arguments
      g=$(iperf3 -c "${IPERF[$t]%:*}" -p "${IPERF[$t]#*:}" -t "$DURATION" ${IPERF3_ARGS:-} -J 2>/dev/null | jq -r '.end.sum_received.bits_per_second/1e9')
      echo "round $r $t iperf3 ${g} Gbit/s $(tcp_counters)"
    fi
  done
done
