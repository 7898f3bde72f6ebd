#!/usr/bin/env python3
"""Time from a registration to its VIP listener accepting connections.

Usage:
  python3 benches/vip_ready.py REGISTRY_ADDR ENDPOINT SERVICE_PORT [N] [PREFIX] [GAP_MS]

For k in 0..N-1 (default 200): sends REGISTER|<PREFIX><k>|ENDPOINT|service_port=SERVICE_PORT
|ttl=3600s on one connection, reads the answer (ack), takes the VIP from it and connects to
VIP:SERVICE_PORT until a connect succeeds (refused: retry after 0.2 ms; at most 5 s per
registration), then closes that connection and waits GAP_MS (default 20) before the next.
Both times are measured from just before the REGISTER is written.
Prints one line:
  vip_ready n=N ok=K timeouts=T failed=F ack_p50_ms=.. ack_p99_ms=.. ready_p50_ms=..
  ready_p99_ms=.. ready_max_ms=.. attempts_p50=..
"""
import socket
import sys
import time

reg, ep, sport = sys.argv[1], sys.argv[2], int(sys.argv[3])
n = int(sys.argv[4]) if len(sys.argv) > 4 else 200
prefix = sys.argv[5] if len(sys.argv) > 5 else "ready"
gap = (float(sys.argv[6]) if len(sys.argv) > 6 else 20.0) / 1000
host, port = reg.rsplit(":", 1)
s = socket.create_connection((host, int(port)), timeout=10)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
f = s.makefile("r")
acks, readys, tries = [], [], []
timeouts = failed = 0
for k in range(n):
    t0 = time.perf_counter()
    s.sendall(f"REGISTER|{prefix}{k}|{ep}|service_port={sport}|ttl=3600s\n".encode())
    line = f.readline()
    t_ack = time.perf_counter()
    if not line.startswith("REGISTERED|"):
        failed += 1
        print(f"register {prefix}{k}: {line.strip()}", file=sys.stderr)
        continue
    vip = line.split("|")[3]
    attempts = 0
    deadline = t0 + 5.0
    ok = False
    while time.perf_counter() < deadline:
        attempts += 1
        c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        c.settimeout(1.0)
        try:
            c.connect((vip, sport))
            ok = True
        except OSError:
            pass
        finally:
            c.close()
        if ok:
            break
        time.sleep(0.0002)
    t_ready = time.perf_counter()
    acks.append((t_ack - t0) * 1000)
    if ok:
        readys.append((t_ready - t0) * 1000)
        tries.append(attempts)
    else:
        timeouts += 1
    time.sleep(gap)


def pct(v, p):
    if not v:
        return float("nan")
    v = sorted(v)
    return v[min(len(v) - 1, max(0, int(round(p / 100 * len(v) + 0.5)) - 1))]


print(f"vip_ready n={n} ok={len(readys)} timeouts={timeouts} failed={failed} "
      f"ack_p50_ms={pct(acks, 50):.3f} ack_p99_ms={pct(acks, 99):.3f} "
      f"ready_p50_ms={pct(readys, 50):.3f} ready_p99_ms={pct(readys, 99):.3f} "
      f"ready_max_ms={max(readys) if readys else float('nan'):.3f} attempts_p50={pct(tries, 50)}")
sys.exit(0 if len(readys) == n else 1)
