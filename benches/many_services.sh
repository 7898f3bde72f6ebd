#!/usr/bin/env bash
# Many services, each with its VIP listener (issue #19, items 5 and 7).
#
# What it measures (PARTS, default "mem accept ready"):
#  mem     NetSel's RSS and open fds with no service, then after SERVICES services holding
#          INSTANCES instances are registered (benches/scale_fill.py over FILL_CONNS
#          pipelined line-protocol connections; one "hot" service points at a real nginx,
#          the SERVICES-1 others at distinct never-contacted 127.16.x.y addresses, all on
#          service port SVC_PORT, so each opens VIP:SVC_PORT, one socket per proxy worker).
#          It waits until SERVICES x WORKERS sockets listen on SVC_PORT, settles SETTLE s,
#          and reports the difference per service and per instance. With
#          INSTANCES=100000 SERVICES=1000 this is item 7: memory per instance (goal 1 KiB).
#          Done for each store in STORES (memory: --in-memory; disk: a temp --data-dir).
#  accept  connection rate and p99 through ONE VIP (the hot service; the others idle):
#          wrk -t WRK_THREADS -c CONN_C -d DURATION --latency -H 'Connection: close', as
#          /work/shared/bench/tcp_bench.sh, against: netsel-many (this NetSel), netsel-one
#          (a second NetSel holding only the hot service) and direct (nginx itself);
#          targets alternate within each of RUNS rounds; medians. First store only.
#  ready   READY_N registrations of new services (one at a time, READY_GAP_MS apart): the
#          time from writing REGISTER to the answer (ack), and to the first successful
#          connect to the new VIP:SVC_PORT (benches/vip_ready.py); p50/p99. Each store.
#
# Usage (after `cargo build --release`):
#   bash benches/many_services.sh                                   # 1,000 services
#   INSTANCES=100000 SERVICES=1000 STORES="memory disk" PARTS=mem bash benches/many_services.sh
#   SERVICES=100 DURATION=2 RUNS=1 READY_N=20 bash benches/many_services.sh   # smoke
# Env: SERVICES (1000), INSTANCES (SERVICES: one each; spread evenly), STORES ("memory";
#   "memory disk"), PARTS ("mem accept ready"), WORKERS (NetSel proxy workers and
#   TOKIO_WORKER_THREADS, nginx worker_processes; default nproc), RUNS (3), DURATION (10,
#   max 60), CONN_C (32), WRK_THREADS (2), READY_N (200), READY_GAP_MS (20),
#   FILL_CONNS (4), SETTLE (2 s), LATER (10 s: RSS read again this long after the first
#   reading; within_goal judges that later figure), VIP_CIDR (127.77.0.0/16; the single-service NetSel uses
#   127.79.0.0/24), NICE (-10), NETSEL (target/release/netsel), WORK (/tmp/netsel-many).
# Ports (127.0.0.1 unless said): NetSel 16501-16505, single-service NetSel 16511-16515,
#   nginx 16520, service port on every VIP 16530.
# Output:
#   RESULT many_services store=S services=N instances=M workers=W rss_kb_empty=..
#     rss_kb_filled=.. rss_kb_delta=.. bytes_per_service=.. bytes_per_instance=..
#     rss_kb_<LATER>s_later=.. fds_empty=.. fds_filled=.. fds_per_service=.. vip_listen_sockets=..
#     fill_secs=.. fill_per_s=.. listeners_ready_secs=..
#   RESULT mem_per_instance store=S instances=M services=N rss_kb_empty=.. rss_kb_filled=..
#     bytes_per_instance=.. rss_kb_<LATER>s_later=.. bytes_per_instance_<LATER>s_later=..
#     goal_bytes=1024 within_goal=yes|no   (bytes = (RSS filled - RSS empty) * 1024 / INSTANCES)
#   RESULT vip_accept target=T conn_per_s_median=.. p99_ms_median=.. runs=.. errors=..
#   RESULT vip_ready store=S services_before=N n=.. ok=.. ack_p50_ms=.. ack_p99_ms=..
#     ready_p50_ms=.. ready_p99_ms=.. ready_max_ms=..
# Expected time at full scale: mem ~1 min per store (100,000 instances: a few min with
#   the disk store), accept 3 targets x RUNS x (DURATION+2) s (~2 min), ready ~30 s.
set -euo pipefail
cd "$(dirname "$0")/.."

SERVICES=${SERVICES:-1000}
INSTANCES=${INSTANCES:-$SERVICES}
STORES=${STORES:-memory}
PARTS=${PARTS:-"mem accept ready"}
WORKERS=${WORKERS:-$(nproc)}
RUNS=${RUNS:-3}
DURATION=${DURATION:-10}
CONN_C=${CONN_C:-32}
WRK_THREADS=${WRK_THREADS:-2}
READY_N=${READY_N:-200}
READY_GAP_MS=${READY_GAP_MS:-20}
FILL_CONNS=${FILL_CONNS:-4}
SETTLE=${SETTLE:-2}
LATER=${LATER:-10}
VIP_CIDR=${VIP_CIDR:-127.77.0.0/16}
VIP_CIDR1=127.79.0.0/24
NETSEL=${NETSEL:-$PWD/target/release/netsel}
WORK=${WORK:-/tmp/netsel-many}
ADDR=127.0.0.1
SVC_PORT=16530
BACKEND=16520
(( DURATION <= 60 )) || { echo "DURATION capped at 60 s" >&2; exit 2; }
(( SERVICES >= 2 && INSTANCES >= SERVICES )) || { echo "need SERVICES >= 2 and INSTANCES >= SERVICES" >&2; exit 2; }
[[ -x $NETSEL ]] || { echo "build first: cargo build --release ($NETSEL)" >&2; exit 2; }
for t in wrk nginx curl python3 ss; do command -v "$t" >/dev/null || { echo "missing: $t" >&2; exit 2; }; done
renice -n "${NICE:--10}" -p $$ >/dev/null 2>&1 || true
for p in 16501 16502 16503 16504 16505 16511 16512 16513 16514 16515 $BACKEND $SVC_PORT; do
  ss -Hltn "sport = :$p" | grep -q . && { echo "port $p busy" >&2; exit 1; }
done
rm -rf "$WORK"; mkdir -p "$WORK"

PIDS=()
stop_pid() {  # stop one process we started, by PID (bash builtin kill only)
  local pid=$1 i
  kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() { local p; for p in "${PIDS[@]:-}"; do [[ -n $p ]] && stop_pid "$p"; done; PIDS=(); }
trap cleanup EXIT
trap 'exit 130' INT TERM
median() { sort -g | awk '{a[NR]=$1} END{ if(NR==0){print "nan"} else if(NR%2){print a[(NR+1)/2]} else {printf "%.2f\n",(a[NR/2]+a[NR/2+1])/2} }'; }
to_ms() { awk '{v=$1; if (v ~ /us$/) {sub(/us$/,"",v); printf "%.3f\n", v/1000} else if (v ~ /ms$/) {sub(/ms$/,"",v); printf "%.3f\n", v} else if (v ~ /s$/) {sub(/s$/,"",v); printf "%.3f\n", v*1000} else print "nan"}'; }
rss_kb() { awk '/VmRSS/{print $2}' "/proc/$1/status"; }
fds() { ls "/proc/$1/fd" | wc -l; }
listening() { ss -Hltn "sport = :$SVC_PORT" | grep -c . || true; }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", b-a}'; }

# nginx backend (fixed 200, as tcp_bench.sh's)
mkdir -p "$WORK/nginx"
cat > "$WORK/nginx/nginx.conf" <<EOF
worker_processes $WORKERS;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx/tmp_body;
  proxy_temp_path $WORK/nginx/tmp_proxy;
  fastcgi_temp_path $WORK/nginx/tmp_fcgi;
  uwsgi_temp_path $WORK/nginx/tmp_uwsgi;
  scgi_temp_path $WORK/nginx/tmp_scgi;
  server {
    listen $ADDR:$BACKEND backlog=4096;
    location / { default_type text/plain; return 200 "netsel many-services backend ok\n"; }
  }
}
EOF
nginx -p "$WORK/nginx" -e "$WORK/nginx/error.log" -c "$WORK/nginx/nginx.conf" -g 'daemon off;' &
PIDS+=("$!")
for _ in $(seq 50); do curl -fsS -o /dev/null "http://$ADDR:$BACKEND/" 2>/dev/null && break; sleep 0.1; done

NPID=
start_netsel() {  # NAME BASEPORT VIP_CIDR STORE -> NPID
  local d=$WORK/$1 b=$2
  mkdir -p "$d"
  cat > "$d/netsel.toml" <<EOF
registry_addr = "$ADDR:$((b+1))"
api_addr = "$ADDR:$((b+2))"
dns_addr = "$ADDR:$((b+3))"
tcp_proxy_addr = "$ADDR:$((b+4))"
http_proxy_addr = "$ADDR:$((b+5))"
max_ttl_secs = 86400
max_instances = 1000000
[network]
vip_cidr = "$3"
[tcp_proxy]
vip_listeners = true
workers = $WORKERS
[api]
rate_limit_per_sec = 0
EOF
  local store=(--in-memory)
  [[ $4 == disk ]] && store=(--data-dir "$d/data")
  TOKIO_WORKER_THREADS=$WORKERS "$NETSEL" serve --config "$d/netsel.toml" "${store[@]}" \
    --log-level warn > "$d/serve.log" 2>&1 &
  NPID=$!; PIDS+=("$NPID")
  local i
  for i in $(seq 150); do grep -q '^ready' "$d/serve.log" && break; sleep 0.1; done
  grep -q '^ready' "$d/serve.log" || { echo "$1 did not start:"; cat "$d/serve.log"; exit 1; } >&2
}
register_hot() {  # REGISTRY_PORT -> prints the hot service's VIP
  local reply
  exec 3<>"/dev/tcp/$ADDR/$1"
  printf 'REGISTER|hot|%s:%s|service_port=%s|ttl=3600s\n' "$ADDR" "$BACKEND" "$SVC_PORT" >&3
  IFS= read -r -t 10 reply <&3; exec 3<&- 3>&-
  [[ $reply == REGISTERED* ]] || { echo "register hot: $reply" >&2; exit 1; }
  cut -d'|' -f4 <<<"$reply"
}
wait_listeners() {  # COUNT: until COUNT sockets listen on SVC_PORT; 120 s max
  local i
  for i in $(seq 1200); do (( $(listening) >= $1 )) && return 0; sleep 0.1; done
  echo "only $(listening) of $1 VIP sockets listening after 120 s" >&2; return 1
}

first=1
for store in $STORES; do
  start_netsel "many-$store" 16500 "$VIP_CIDR" "$store"
  MPID=$NPID; reg=16501
  sleep "$SETTLE"
  rss0=$(rss_kb "$MPID"); fd0=$(fds "$MPID"); l0=$(listening)
  HOT=$(register_hot $reg)
  t0=$(now)
  out=$(python3 benches/scale_fill.py "$ADDR:$reg" $((SERVICES-1)) $((INSTANCES-1)) --even \
        --conns "$FILL_CONNS" --service-port $SVC_PORT --ttl 3600s) || { echo "fill failed: $out" >&2; exit 1; }
  t1=$(now)
  echo "many-$store: $out"
  wait_listeners $(( l0 + SERVICES * WORKERS ))
  t2=$(now)
  sleep "$SETTLE"
  rss1=$(rss_kb "$MPID"); fd1=$(fds "$MPID"); l1=$(listening)
  if [[ " $PARTS " == *" mem "* ]]; then
    # RSS again LATER s on: the embedded store moves the log into redb within a second,
    # and the allocator may return memory; the figure that stays is the one that counts.
    sleep "$LATER"; rss2=$(rss_kb "$MPID")
    d=$((rss1 - rss0))
    echo "RESULT many_services store=$store services=$SERVICES instances=$INSTANCES workers=$WORKERS rss_kb_empty=$rss0 rss_kb_filled=$rss1 rss_kb_delta=$d bytes_per_service=$((d * 1024 / SERVICES)) bytes_per_instance=$((d * 1024 / INSTANCES)) rss_kb_${LATER}s_later=$rss2 fds_empty=$fd0 fds_filled=$fd1 fds_per_service=$(awk -v a="$fd0" -v b="$fd1" -v n="$SERVICES" 'BEGIN{printf "%.2f", (b-a)/n}') vip_listen_sockets=$((l1 - l0)) fill_secs=$(secs "$t0" "$t1") fill_per_s=$(sed -E 's/.*per_s=([^ ]+).*/\1/' <<<"$out") listeners_ready_secs=$(secs "$t1" "$t2")" | tee -a "$WORK/results.txt"
    if (( INSTANCES > SERVICES )); then
      bpi=$((d * 1024 / INSTANCES)); bpi2=$(((rss2 - rss0) * 1024 / INSTANCES))
      echo "RESULT mem_per_instance store=$store instances=$INSTANCES services=$SERVICES rss_kb_empty=$rss0 rss_kb_filled=$rss1 bytes_per_instance=$bpi rss_kb_${LATER}s_later=$rss2 bytes_per_instance_${LATER}s_later=$bpi2 goal_bytes=1024 within_goal=$( (( bpi2 <= 1024 )) && echo yes || echo no)" | tee -a "$WORK/results.txt"
    fi
  fi

  if [[ " $PARTS " == *" accept "* ]] && (( first )); then
    start_netsel one 16510 "$VIP_CIDR1" memory
    OPID=$NPID
    HOT1=$(register_hot 16511)
    wait_listeners $(( l1 + WORKERS ))
    declare -A URL=([netsel-many]="http://$HOT:$SVC_PORT/" [netsel-one]="http://$HOT1:$SVC_PORT/" [direct]="http://$ADDR:$BACKEND/")
    ORDER="netsel-many netsel-one direct"
    for t in $ORDER; do
      curl -fsS --max-time 5 "${URL[$t]}" | grep -q 'many-services backend ok' || { echo "sanity failed: $t ${URL[$t]}" >&2; exit 1; }
    done
    declare -A RPS=() P99=() ERRS=()
    for r in $(seq "$RUNS"); do
      for t in $ORDER; do
        sleep 1
        o=$(timeout $((DURATION+20)) wrk -t"$WRK_THREADS" -c"$CONN_C" -d"${DURATION}s" --latency -H 'Connection: close' "${URL[$t]}" 2>&1) || true
        echo "$o" > "$WORK/wrk-$t-$r.txt"
        RPS[$t]+="$(awk '/^Requests\/sec/{print $2}' <<<"$o") "
        P99[$t]+="$(awk '$1=="99%"{print $2}' <<<"$o" | to_ms) "
        e=$(awk '/Non-2xx|Socket errors/{printf "%s;", $0}' <<<"$o"); ERRS[$t]+="${e:-0}|"
      done
    done
    for t in $ORDER; do
      echo "RESULT vip_accept target=$t idle_services=$([[ $t == netsel-many ]] && echo $((SERVICES-1)) || echo 0) conn_per_s_median=$(tr ' ' '\n' <<<"${RPS[$t]}" | grep . | median) p99_ms_median=$(tr ' ' '\n' <<<"${P99[$t]}" | grep . | median) runs=$(tr ' ' ',' <<<"${RPS[$t]% }") p99_runs=$(tr ' ' ',' <<<"${P99[$t]% }") errors=${ERRS[$t]%|} workers=$WORKERS conns=$CONN_C" | tee -a "$WORK/results.txt"
    done
    stop_pid "$OPID"
  fi

  if [[ " $PARTS " == *" ready "* ]]; then
    o=$(python3 benches/vip_ready.py "$ADDR:$reg" "$ADDR:$BACKEND" $SVC_PORT "$READY_N" ready "$READY_GAP_MS") || echo "vip_ready: not every listener came up: $o" >&2
    echo "RESULT vip_ready store=$store services_before=$SERVICES ${o#vip_ready }" | tee -a "$WORK/results.txt"
  fi
  stop_pid "$MPID"
  first=0
done
