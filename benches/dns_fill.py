#!/usr/bin/env python3
"""Registers svc0..svc{N-1} (the names /work/shared/bench/dns_bench.sh queries) with a
NetSel registry over the line protocol, one instance each, with a one-hour lease.

Usage: python3 benches/dns_fill.py REGISTRY_ADDR [N]
"""
import socket
import sys

host, port = sys.argv[1].rsplit(":", 1)
n = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
s = socket.create_connection((host, int(port)))
f = s.makefile("rw")
ok = 0
for i in range(n):
    f.write(f"REGISTER|svc{i}|127.10.{i // 256}.{i % 256}:80|ttl=3600s\n")
    f.flush()
    line = f.readline()
    if line.startswith("REGISTERED|"):
        ok += 1
    else:
        print(line.strip(), file=sys.stderr)
print(f"registered {ok}/{n}")
sys.exit(0 if ok == n else 1)
