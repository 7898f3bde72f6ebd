#!/usr/bin/env bash
# DNS with a large catalog (issue #19, item 4): NetSel with SERVICES services and
# INSTANCES instances against knot, nsd and unbound serving exactly NetSel's answers, and
# the same NetSel machinery at SMALL_SERVICES names, so "the large catalog is within 10 %
# of the 1,000-name figure" reads off one run.
#
# What it does, for each THREADS value:
#  1. starts NetSel (in memory, VIP listeners off) and fills it over the line protocol
#     (benches/scale_fill.py: FILL_CONNS connections, pipelined; plan below), then a
#     second NetSel ("netsel-small") with SMALL_SERVICES names and the same
#     instances-per-service plan, scaled;
#  2. reads the catalog back (GET /v1/services?detail=true) and writes, from NetSel's own
#     VIPs and instance ids (benches/dns_large_zones.py), for knot and nsd a zone
#     "netsel." and the reverse zone of the VIP pool, for unbound the same local-data:
#     NAME A VIP; _NAME._tcp SRV 0 1 PORT ID.NAME.netsel. per instance; ID.NAME A ADDR
#     (the SRV targets NetSel adds as glue); PTR VIP -> NAME.netsel.; TTL 5 everywhere;
#  3. starts knot, nsd, unbound (same thread count: knot udp-workers, nsd server-count,
#     unbound num-threads; NetSel [dns] udp_workers and TOKIO_WORKER_THREADS);
#  4. checks correctness before any load: for a few names (the service with the most
#     instances, the fewest, the median, three random) it digs every server over TCP
#     (A, the whole SRV RRset, PTR, an SRV target's A, an NXDOMAIN) and requires every
#     peer's answer to equal NetSel's and the record counts to equal the catalog's, so a
#     server with an empty zone cannot look fast; it also prints, as INFO, what each server
#     sends over UDP without EDNS for those SRV RRsets (size, TC flag, answer count);
#  5. runs dnsperf (-c CLIENTS -q OUTSTANDING -T 1 -t 2 -l DURATION, as
#     /work/shared/bench/dns_bench.sh) RUNS times per server, servers alternating within
#     each round, and keeps the median.
# Query mix (MIX, fixed seed, 100,000 lines): 50 % A NAME.netsel, 25 % SRV
# _NAME._tcp.netsel, 15 % PTR of a VIP, 10 % NXDOMAIN (nxK.netsel A); names uniformly
# over the catalog.
# Plan: 10 % of services draw 10-100 instances, 90 % draw 1-10, then adjusted to sum to
# INSTANCES exactly (mean 10 at 10,000/100,000: "10-100 per service" cannot also sum to
# 100,000 unless every service has exactly 10; MIN_INST=10 MAX_INST=10 gives that).
# Addresses: instance g at 127.(16+g/64000).x.y:300NN, distinct, never contacted.
#
# Usage (after `cargo build --release`):
#   bash benches/dns_large.sh                                  # full scale, THREADS=2
#   THREADS="1 2" RUNS=3 DURATION=10 bash benches/dns_large.sh
#   SERVICES=100 INSTANCES=1000 SMALL_SERVICES=10 DURATION=2 RUNS=1 bash benches/dns_large.sh  # smoke
# Env: SERVICES (10000), INSTANCES (100000), SMALL_SERVICES (1000; 0 = no small run),
#   SMALL_INSTANCES (INSTANCES*SMALL_SERVICES/SERVICES), MIN_INST/MAX_INST (1/100),
#   THREADS ("2"; "1 2" for both; THREADS=1 pins servers to CPU 0 and dnsperf to CPU 1
#   unless PIN=0), SERVERS ("netsel knot nsd unbound netsel-small"), RUNS (3),
#   DURATION (10, max 60), CLIENTS (8), OUTSTANDING (100), QUERIES (100000),
#   MIX ("50 25 15 10" = A SRV PTR NX %), EDNS (0; 1 = dnsperf -e, answers up to 1232 B),
#   FILL_CONNS (4), VIP_CIDR (127.77.0.0/16), VIP_LISTENERS (false: 10,000 services x
#   workers listening sockets is many_services.sh's subject, and needs that many fds),
#   STORE (memory | disk: a temp --data-dir), CACHE_ENTRIES (NetSel [dns] cache_entries,
#   default NetSel's own, 16384 per UDP worker, cleared when full: the 10,000-service query
#   file has ~40,000 distinct questions, the 1,000-service one ~13,000), NICE (-10), NETSEL (target/release/netsel),
#   WORK (/tmp/netsel-dns-large).
# Ports (127.0.0.1): NetSel 16401-16405, netsel-small 16411-16415, knot 16421, nsd 16422,
#   unbound 16423.
# Output: CHECK/INFO lines, then per server and THREADS
#   RESULT dns_large server=S services=N instances=M threads=T pin=P qps_median=Q
#     avg_lat_ms_median=L qps_runs=a,b,c lost_runs=... rcodes=NOERROR:x%,NXDOMAIN:y%
#     rss_kb=R (NetSel: rss_kb_empty, rss_kb_filled, rss_kb_after_load, hwm_kb,
#     fill_secs, fill_per_s, cache_entries; peers: ready_secs = time to load the zone)
#   RESULT dns_large_ratio threads=T netsel_large_qps=.. netsel_small_qps=.. ratio=..
# Raw outputs in $WORK/t<T>/<server>/dnsperf-<run>.txt.
# Expected time at full scale: ~1 min fill and setup + 5 servers x RUNS x (DURATION+2) s
#   per THREADS value (about 4 min with the defaults).
set -euo pipefail
cd "$(dirname "$0")/.."

SERVICES=${SERVICES:-10000}
INSTANCES=${INSTANCES:-100000}
SMALL_SERVICES=${SMALL_SERVICES:-1000}
SMALL_INSTANCES=${SMALL_INSTANCES:-$(( INSTANCES * SMALL_SERVICES / SERVICES ))}
MIN_INST=${MIN_INST:-1}
MAX_INST=${MAX_INST:-100}
THREADS=${THREADS:-2}
PIN=${PIN:-auto}
SERVERS=${SERVERS:-"netsel knot nsd unbound netsel-small"}
(( SMALL_SERVICES > 0 )) || SERVERS=${SERVERS//netsel-small/}
RUNS=${RUNS:-3}
DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-8}
OUTSTANDING=${OUTSTANDING:-100}
QUERIES=${QUERIES:-100000}
MIX=${MIX:-"50 25 15 10"}
EDNS=${EDNS:-0}
FILL_CONNS=${FILL_CONNS:-4}
VIP_CIDR=${VIP_CIDR:-127.77.0.0/16}
VIP_LISTENERS=${VIP_LISTENERS:-false}
STORE=${STORE:-memory}
CACHE_ENTRIES=${CACHE_ENTRIES:-}
NETSEL=${NETSEL:-$PWD/target/release/netsel}
WORK=${WORK:-/tmp/netsel-dns-large}
ADDR=127.0.0.1
declare -A BASE=([netsel]=16400 [netsel-small]=16410)
declare -A PORT=([netsel]=16403 [netsel-small]=16413 [knot]=16421 [nsd]=16422 [unbound]=16423)

(( DURATION <= 60 )) || { echo "DURATION capped at 60 s" >&2; exit 2; }
[[ -x $NETSEL ]] || { echo "build first: cargo build --release ($NETSEL)" >&2; exit 2; }
for t in dnsperf dig curl python3 knotd nsd unbound taskset; do
  command -v "$t" >/dev/null || { echo "missing: $t" >&2; exit 2; }
done
renice -n "${NICE:--10}" -p $$ >/dev/null 2>&1 || true
EDNS_FLAG=(); (( EDNS )) && EDNS_FLAG=(-e)

# ---------------------------------------------------------------- processes
declare -A SPID=()
PIDS=()
stop_pid() {  # stop one process we started, by PID (bash builtin kill only)
  local pid=$1 i
  kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() { local p; for p in "${PIDS[@]:-}"; do [[ -n $p ]] && stop_pid "$p"; done; PIDS=(); SPID=(); }
trap cleanup EXIT
trap 'exit 130' INT TERM

port_busy() { ss -Hlun "sport = :$1" | grep -q . || ss -Hltn "sport = :$1" | grep -q .; }
median() { sort -g | awk '{a[NR]=$1} END{ if(NR==0){print "nan"} else if(NR%2){print a[(NR+1)/2]} else {printf "%.2f\n",(a[NR/2]+a[NR/2+1])/2} }'; }
rss_of() {  # KiB of a process and its direct children (nsd forks its servers)
  local pid=$1
  { awk '/VmRSS/{print $2}' "/proc/$pid/status" 2>/dev/null
    for c in $(cat /proc/$pid/task/*/children 2>/dev/null); do awk '/VmRSS/{print $2}' "/proc/$c/status" 2>/dev/null; done
  } | awk '{s+=$1} END{print s+0}'
}
hwm_of() { awk '/VmHWM/{print $2}' "/proc/$1/status" 2>/dev/null || echo nan; }
wait_answer() {  # PORT NAME: until the server answers NAME's A (zone loaded); 180 s max
  local port=$1 name=$2 i
  for i in $(seq 900); do
    dig +tries=1 +time=1 -p "$port" @$ADDR "$name" A +short 2>/dev/null | grep -q . && return 0
    kill -0 "$3" 2>/dev/null || { echo "server on port $port exited" >&2; return 1; }
    sleep 0.2
  done
  echo "server on port $port did not answer $name within 180 s" >&2; return 1
}

# ---------------------------------------------------------------- NetSel
declare -A FILLINFO=() RSS_EMPTY=() RSS_FILLED=()
start_netsel() {  # KIND THREADS SERVICES INSTANCES PREFIX-CMD...
  local kind=$1 t=$2 ns=$3 ni=$4; shift 4
  local b=${BASE[$kind]} d=$W/$kind
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
vip_cidr = "$VIP_CIDR"
[dns]
udp_workers = $t
$([[ -n $CACHE_ENTRIES ]] && echo "cache_entries = $CACHE_ENTRIES")
[tcp_proxy]
vip_listeners = $VIP_LISTENERS
[api]
rate_limit_per_sec = 0
EOF
  local store=(--in-memory)
  [[ $STORE == disk ]] && store=(--data-dir "$d/data")
  TOKIO_WORKER_THREADS=$t "$@" "$NETSEL" serve --config "$d/netsel.toml" "${store[@]}" \
    --log-level warn > "$d/serve.log" 2>&1 &
  SPID[$kind]=$!; PIDS+=("$!")
  local i
  for i in $(seq 150); do grep -q '^ready' "$d/serve.log" && break; sleep 0.1; done
  grep -q '^ready' "$d/serve.log" || { echo "$kind did not start:"; cat "$d/serve.log"; exit 1; } >&2
  sleep 1
  RSS_EMPTY[$kind]=$(rss_of "${SPID[$kind]}")
  local out
  out=$(python3 benches/scale_fill.py "$ADDR:$((b+1))" "$ns" "$ni" --conns "$FILL_CONNS" \
        --min "$MIN_INST" --max "$MAX_INST" --ttl 3600s) || { echo "$kind fill failed: $out" >&2; exit 1; }
  echo "$kind: $out"
  FILLINFO[$kind]="fill_secs=$(sed -E 's/.*secs=([^ ]+).*/\1/' <<<"$out") fill_per_s=$(sed -E 's/.*per_s=([^ ]+).*/\1/' <<<"$out")"
  curl -fsS --max-time 300 "http://$ADDR:$((b+2))/v1/services?detail=true" > "$d/services.json"
  python3 benches/dns_large_zones.py "$d/services.json" "$VIP_CIDR" "$d/zones" "$QUERIES" 42 "$MIX" | sed "s/^/$kind: /"
  local got
  got=$(grep -c '' "$d/zones/queries.txt")
  (( got == QUERIES )) || { echo "$kind: query file has $got lines" >&2; exit 1; }
  RSS_FILLED[$kind]=$(rss_of "${SPID[$kind]}")
}

# ---------------------------------------------------------------- peers
write_peer_conf() {  # SERVER THREADS ZONEDIR
  local s=$1 t=$2 z=$3 p=${PORT[$1]} d=$W/$1 rev
  rev=$(cat "$z/reverse.name")
  mkdir -p "$d"
  case $s in
  knot) cat > "$d/knot.conf" <<EOF
server:
    listen: $ADDR@$p
    rundir: $d
    udp-workers: $t
    tcp-workers: 1
    background-workers: 1
log:
  - target: stderr
    any: warning
database:
    storage: $d/db
template:
  - id: default
    storage: $z
    semantic-checks: off
    journal-content: none
    zonefile-sync: -1
zone:
  - domain: netsel
    file: netsel.zone
  - domain: $rev
    file: reverse.zone
EOF
  ;;
  nsd) cat > "$d/nsd.conf" <<EOF
server:
    ip-address: $ADDR
    port: $p
    do-ip6: no
    server-count: $t
    username: ""
    chroot: ""
    zonesdir: "$z"
    database: ""
    zonelistfile: "$d/zone.list"
    xfrdfile: "$d/xfrd.state"
    xfrdir: "$d"
    pidfile: "$d/nsd.pid"
    logfile: "$d/nsd.log"
    verbosity: 0
    reuseport: yes
    rrl-ratelimit: 0
    rrl-whitelist-ratelimit: 0
remote-control:
    control-enable: no
zone:
    name: netsel
    zonefile: netsel.zone
zone:
    name: $rev
    zonefile: reverse.zone
EOF
  ;;
  unbound) cat > "$d/unbound.conf" <<EOF
server:
    interface: $ADDR
    port: $p
    do-ip6: no
    do-tcp: yes
    do-daemonize: no
    username: ""
    chroot: ""
    directory: "$d"
    pidfile: "$d/unbound.pid"
    use-syslog: no
    logfile: ""
    verbosity: 0
    num-threads: $t
    so-reuseport: yes
    access-control: 127.0.0.0/8 allow
    module-config: "iterator"
    include: "$z/localdata.conf"
remote-control:
    control-enable: no
EOF
  ;;
  esac
}
declare -A READY=()
start_peer() {  # SERVER THREADS ZONEDIR PREFIX-CMD...
  local s=$1 t=$2 z=$3; shift 3
  local d=$W/$s t0 probe
  write_peer_conf "$s" "$t" "$z"
  t0=$(date +%s.%N)
  case $s in
  knot)    "$@" knotd -c "$d/knot.conf" > "$d/out.log" 2>&1 & ;;
  nsd)     "$@" nsd -d -c "$d/nsd.conf" > "$d/out.log" 2>&1 & ;;
  unbound) "$@" unbound -d -c "$d/unbound.conf" > "$d/out.log" 2>&1 & ;;
  esac
  SPID[$s]=$!; PIDS+=("$!")
  probe=$(awk '$2=="A" && $3==1 {print $1; exit}' "$z/check.txt")
  wait_answer "${PORT[$s]}" "$probe" "${SPID[$s]}" || { cat "$d/out.log" >&2; exit 1; }
  READY[$s]=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
}

# ---------------------------------------------------------------- correctness
answer() {  # PORT NAME TYPE -> sorted answer lines over TCP ("NXDOMAIN" if so)
  local out st
  out=$(dig +tcp +tries=1 +time=5 -p "$1" @$ADDR "$2" "$3" +noall +answer +comments)
  st=$(awk '/status:/{gsub(",","",$6); print $6; exit}' <<<"$out")
  [[ $st == NOERROR ]] || { echo "$st"; return; }
  awk '!/^;/ && NF>=5 {$2=""; print tolower($0)}' <<<"$out" | sort
}
check_all() {  # ZONEDIR SERVER...: every server's answers equal NetSel's and the catalog's counts
  local z=$1; shift
  local ref=$1 fail=0 qn qt n s a r cnt line
  while read -r qn qt n; do
    r=$(answer "${PORT[$ref]}" "$qn" "$qt")
    if (( n == 0 )); then cnt=0; [[ $r == NXDOMAIN ]] || { echo "CHECK FAIL $ref $qn $qt: expected NXDOMAIN, got $r"; fail=1; }
    else cnt=$(grep -c . <<<"$r" || true); (( cnt == n )) || { echo "CHECK FAIL $ref $qn $qt: $cnt records, catalog has $n"; fail=1; }
    fi
    line="CHECK $qn $qt expected=$n $ref=$cnt"
    for s in "${@:2}"; do
      a=$(answer "${PORT[$s]}" "$qn" "$qt")
      if [[ $a == "$r" ]]; then line+=" $s=same"; else line+=" $s=DIFFERENT"; fail=1
        diff <(echo "$r") <(echo "$a") | head -5 | sed "s/^/  $s: /"; fi
    done
    echo "$line"
  done < "$z/check.txt"
  return $fail
}
udp_info() {  # ZONEDIR SERVER...: what a plain (no EDNS, as dnsperf sends by default) UDP
  # query gets for each SRV RRset of the check list: size, TC flag, answer count
  local z=$1; shift
  local qn n s out
  while read -r qn _ n; do
    for s in "$@"; do
      out=$(dig +noedns +ignore +tries=1 +time=2 -p "${PORT[$s]}" @$ADDR "$qn" SRV)
      echo "INFO udp-noedns $qn SRV instances=$n server=$s flags=\"$(awk -F'flags: ' '/flags:/{split($2,a,";"); print a[1]; exit}' <<<"$out")\" answers=$(awk -F'ANSWER: ' '/ANSWER:/{split($2,a,","); print a[1]; exit}' <<<"$out") additional=$(awk -F'ADDITIONAL: ' '/ADDITIONAL:/{print $2+0; exit}' <<<"$out") size=$(awk '/MSG SIZE/{print $NF; exit}' <<<"$out")"
    done
  done < <(awk '$2=="SRV"' "$z/check.txt" | sort -u)
}

# ---------------------------------------------------------------- main
for t in $THREADS; do
  pin=$PIN; [[ $pin == auto ]] && { (( t == 1 )) && pin=1 || pin=0; }
  if (( pin )); then SP=(taskset -c 0); CP=(taskset -c 1); else SP=(env); CP=(env); fi
  W=$WORK/t$t
  rm -rf "$W"; mkdir -p "$W"
  for s in $SERVERS; do port_busy "${PORT[$s]}" && { echo "port ${PORT[$s]} ($s) busy" >&2; exit 1; }; done
  declare -A N_SVC=([netsel]=$SERVICES [netsel-small]=$SMALL_SERVICES)
  declare -A N_INST=([netsel]=$INSTANCES [netsel-small]=$SMALL_INSTANCES)
  ZBIG=$W/netsel/zones
  start_netsel netsel "$t" "$SERVICES" "$INSTANCES" "${SP[@]}"
  [[ " $SERVERS " == *" netsel-small "* ]] && start_netsel netsel-small "$t" "$SMALL_SERVICES" "$SMALL_INSTANCES" "${SP[@]}"
  peers=()
  for s in $SERVERS; do
    case $s in knot|nsd|unbound) start_peer "$s" "$t" "$ZBIG" "${SP[@]}"; peers+=("$s") ;; esac
  done
  echo "peers ready (s): $(for s in "${peers[@]}"; do printf '%s=%s ' "$s" "${READY[$s]}"; done)"
  check_all "$ZBIG" netsel "${peers[@]}" || { echo "correctness check failed: not measuring" >&2; exit 1; }
  if [[ " $SERVERS " == *" netsel-small "* ]]; then
    check_all "$W/netsel-small/zones" netsel-small || { echo "correctness check failed (netsel-small)" >&2; exit 1; }
  fi
  udp_info "$ZBIG" netsel "${peers[@]}"

  declare -A QPS=() LAT=() LOST=() RC=()
  for r in $(seq "$RUNS"); do
    for s in $SERVERS; do
      q=$W/netsel/zones/queries.txt; [[ $s == netsel-small ]] && q=$W/netsel-small/zones/queries.txt
      mkdir -p "$W/$s"
      o=$(timeout $((DURATION+20)) "${CP[@]}" dnsperf -s $ADDR -p "${PORT[$s]}" -d "$q" "${EDNS_FLAG[@]}" \
            -l "$DURATION" -c "$CLIENTS" -T 1 -q "$OUTSTANDING" -t 2 2>&1) || true
      echo "$o" > "$W/$s/dnsperf-$r.txt"
      QPS[$s]+="$(awk '/Queries per second/{print $4}' <<<"$o") "
      LAT[$s]+="$(awk '/Average Latency/{printf "%.3f", $4*1000}' <<<"$o") "
      LOST[$s]+="$(awk '/Queries lost/{print $3}' <<<"$o"),"
      RC[$s]=$(grep -m1 'Response codes:' <<<"$o" | grep -o '[A-Z]* [0-9]* ([0-9.]*%)' |
               awk '{gsub(/[()]/,"",$3); printf "%s%s:%s", (NR>1?",":""), $1, $3}' || true)
    done
  done
  for s in $SERVERS; do
    qm=$(tr ' ' '\n' <<<"${QPS[$s]}" | grep . | median)
    lm=$(tr ' ' '\n' <<<"${LAT[$s]}" | grep . | median)
    pid=${SPID[$s]}
    case $s in
      netsel|netsel-small)
        extra="services=${N_SVC[$s]} instances=${N_INST[$s]}"
        mem="rss_kb_empty=${RSS_EMPTY[$s]} rss_kb_filled=${RSS_FILLED[$s]} rss_kb_after_load=$(rss_of "$pid") hwm_kb=$(hwm_of "$pid") ${FILLINFO[$s]} store=$STORE cache_entries=${CACHE_ENTRIES:-default}" ;;
      *) extra="services=$SERVICES instances=$INSTANCES"
         mem="rss_kb=$(rss_of "$pid") ready_secs=${READY[$s]}" ;;
    esac
    echo "RESULT dns_large server=$s $extra threads=$t pin=$pin edns=$EDNS qps_median=$qm avg_lat_ms_median=$lm qps_runs=$(tr ' ' ',' <<<"${QPS[$s]% }") lost_runs=${LOST[$s]%,} rcodes=${RC[$s]} $mem" | tee -a "$WORK/results.txt"
  done
  if [[ " $SERVERS " == *" netsel-small "* && " $SERVERS " == *" netsel "* ]]; then
    a=$(tr ' ' '\n' <<<"${QPS[netsel]}" | grep . | median); b=$(tr ' ' '\n' <<<"${QPS[netsel-small]}" | grep . | median)
    echo "RESULT dns_large_ratio threads=$t netsel_${SERVICES}_qps=$a netsel_${SMALL_SERVICES}_qps=$b ratio=$(awk -v a="$a" -v b="$b" 'BEGIN{printf "%.3f", (b>0? a/b : 0)}')" | tee -a "$WORK/results.txt"
  fi
  cleanup
  unset QPS LAT LOST RC N_SVC N_INST
done
