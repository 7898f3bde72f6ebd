#!/usr/bin/env python3
"""Fills a NetSel registry with many services and instances over the line protocol, fast:
several connections in parallel, each pipelining WINDOW lines before reading the answers.

Usage:
  python3 benches/scale_fill.py REGISTRY_ADDR SERVICES INSTANCES [options]

The plan is deterministic (seed): service i is PREFIX<i>; its instance count comes from a
fixed pseudo-random draw in [--min, --max] adjusted so the counts sum to INSTANCES exactly
(--even: INSTANCES/SERVICES each, the remainder on the first services). The default draw
is a mixture: 90 % of services get 1-10 instances, 10 % get 10-100 (so the mean is about
10 and SRV RRsets of up to 100 records exist). Instance g (0-based, over all services) is
127.(16+g//64000).((g//250)%256).(g%250+1):(30000+j) with j its index in its service:
distinct addresses, none in a VIP pool (127.77-127.79), never contacted.

Options:
  --conns N         parallel connections (default 4)
  --window N        lines in flight per connection (default 512)
  --prefix P        service name prefix (default svc)
  --min/--max N     instances per service (default 1 / 100)
  --even            even split instead of the random draw (--min/--max ignored)
  --seed N          (default 19)
  --ttl D           lease (default 3600s; the server's max_ttl_secs must allow it)
  --service-port P  service_port= on every registration (the VIP listener's port)
  --endpoint A:P    every instance at this endpoint instead (one instance per service)
  --plan            print "name count" per service and exit (no registry contacted)
Prints one line: "fill services=S instances=I ok=N failed=F secs=T per_s=R".
Exit status 1 if any registration failed.
"""
import argparse
import random
import socket
import sys
import threading
import time


def plan_counts(services, instances, lo, hi, seed, even):
    if even:  # --min/--max do not apply
        q, r = divmod(instances, services)
        return [q + (1 if i < r else 0) for i in range(services)]
    if not (lo * services <= instances <= hi * services):
        sys.exit(f"cannot put {instances} instances in {services} services at {lo}..{hi} each")
    rng = random.Random(seed)
    c = []
    for _ in range(services):
        if rng.random() < 0.1:
            c.append(max(lo, min(hi, rng.randint(10, 100))))
        else:
            c.append(max(lo, min(hi, rng.randint(1, 10))))
    diff = instances - sum(c)
    step = 1 if diff > 0 else -1
    tries = 0
    while diff != 0:
        k = rng.randrange(services)
        if lo <= c[k] + step <= hi:
            c[k] += step
            diff -= step
        tries += 1
        if tries > 100 * (abs(instances) + services):
            sys.exit("could not balance the plan")
    return c


def endpoint(g, j):
    return f"127.{16 + g // 64000}.{(g // 250) % 256}.{g % 250 + 1}:{30000 + j}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("registry")
    ap.add_argument("services", type=int)
    ap.add_argument("instances", type=int)
    ap.add_argument("--conns", type=int, default=4)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--prefix", default="svc")
    ap.add_argument("--min", type=int, default=1)
    ap.add_argument("--max", type=int, default=100)
    ap.add_argument("--even", action="store_true")
    ap.add_argument("--seed", type=int, default=19)
    ap.add_argument("--ttl", default="3600s")
    ap.add_argument("--service-port", type=int)
    ap.add_argument("--endpoint")
    ap.add_argument("--plan", action="store_true")
    a = ap.parse_args()

    counts = plan_counts(a.services, a.instances, a.min, a.max, a.seed, a.even)
    if a.plan:
        for i, n in enumerate(counts):
            print(f"{a.prefix}{i} {n}")
        return
    extra = f"|ttl={a.ttl}" + (f"|service_port={a.service_port}" if a.service_port else "")
    lines = []
    g = 0
    for i, n in enumerate(counts):
        for j in range(n):
            ep = a.endpoint if a.endpoint else endpoint(g, j)
            lines.append(f"REGISTER|{a.prefix}{i}|{ep}{extra}\n")
            g += 1
    host, port = a.registry.rsplit(":", 1)
    # Connection k takes every conns-th service (all instances of a service on one
    # connection, in order, so the first instance sets the service port).
    per_conn = [[] for _ in range(a.conns)]
    k = 0
    for i, n in enumerate(counts):
        per_conn[i % a.conns].extend(lines[k:k + n])
        k += n
    ok = [0] * a.conns
    bad = [0] * a.conns
    first_err = []

    def worker(c):
        s = socket.create_connection((host, int(port)), timeout=60)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        f = s.makefile("r", encoding="ascii", newline="\n")
        mine = per_conn[c]
        for off in range(0, len(mine), a.window):
            batch = mine[off:off + a.window]
            s.sendall("".join(batch).encode())
            for _ in batch:
                line = f.readline()
                if line.startswith("REGISTERED|"):
                    ok[c] += 1
                else:
                    bad[c] += 1
                    if not first_err:
                        first_err.append(line.strip() or "connection closed")
                    if not line:
                        return
        s.close()

    t0 = time.monotonic()
    ts = [threading.Thread(target=worker, args=(c,)) for c in range(a.conns)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    dt = time.monotonic() - t0
    n_ok, n_bad = sum(ok), sum(bad)
    if first_err:
        print(f"first failure: {first_err[0]}", file=sys.stderr)
    print(f"fill services={a.services} instances={len(lines)} ok={n_ok} failed={n_bad} "
          f"secs={dt:.2f} per_s={n_ok / dt if dt > 0 else 0:.0f}")
    sys.exit(0 if n_ok == len(lines) else 1)


if __name__ == "__main__":
    main()
