#!/usr/bin/env python3
"""Turns NetSel's catalog (GET /v1/services?detail=true, as JSON) into the same DNS data
for the peers, a dnsperf query file and a list of names to check.

Usage:
  python3 benches/dns_large_zones.py SERVICES_JSON VIP_CIDR OUTDIR [QUERIES] [SEED] [MIX]

Writes, in OUTDIR:
  netsel.zone     RFC 1035 zone "netsel." for knot and nsd: per service NAME A VIP,
                  _NAME._tcp SRV 0 WEIGHT PORT ID.NAME.netsel. (one per healthy instance),
                  ID.NAME A ADDRESS (the SRV targets, which NetSel sends as glue)
  reverse.zone    the reverse zone of the VIP pool (named as NetSel names it: the pool
                  rounded down to whole octets), PTR VIP -> NAME.netsel.
  reverse.name    that zone's name
  localdata.conf  the same records as unbound local-zone/local-data
  queries.txt     QUERIES (default 100000) dnsperf lines, fixed seed (default 42), mix
                  MIX = "A SRV PTR NX" percentages (default "50 25 15 10"): A NAME.netsel,
                  SRV _NAME._tcp.netsel, PTR of a VIP, NX: nxK.netsel A (NXDOMAIN)
  check.txt       names to compare across servers: "qname qtype expected-count"
                  (the services with the most and the fewest instances, and a few others)
Every record carries TTL 5, as NetSel's answers do.
Prints "zones services=S instances=I srv_max=M queries=Q mix=..." on stdout.
"""
import ipaddress
import json
import os
import random
import sys

src, cidr, out = sys.argv[1], sys.argv[2], sys.argv[3]
nq = int(sys.argv[4]) if len(sys.argv) > 4 else 100000
seed = int(sys.argv[5]) if len(sys.argv) > 5 else 42
mix = [int(x) for x in (sys.argv[6] if len(sys.argv) > 6 else "50 25 15 10").split()]
assert len(mix) == 4 and sum(mix) == 100, "MIX is four percentages summing to 100"
TTL = 5

with open(src) as f:
    data = json.load(f)
services = []
for s in data["services"]:
    inst = [i for i in s.get("instances") or [] if i.get("health") == "passing"]
    if not inst:
        continue
    services.append((s["name"], s["vip"], inst))
services.sort(key=lambda t: t[0])

net = ipaddress.ip_network(cidr, strict=False)
assert net.version == 4, "IPv4 pools only"
octets = net.prefixlen // 8
rev_labels = list(reversed(str(net.network_address).split(".")[:octets]))
rev_zone = ".".join(rev_labels + ["in-addr", "arpa"]) + "."


def ptr_name(ip):
    return ".".join(reversed(ip.split("."))) + ".in-addr.arpa."


os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "netsel.zone"), "w") as z, \
        open(os.path.join(out, "reverse.zone"), "w") as r, \
        open(os.path.join(out, "localdata.conf"), "w") as u:
    z.write("$ORIGIN netsel.\n$TTL 5\n")
    z.write("@ IN SOA ns.netsel. hostmaster.netsel. 1 3600 600 86400 5\n@ IN NS ns.netsel.\n"
            "ns IN A 127.0.0.1\n")
    r.write(f"$ORIGIN {rev_zone}\n$TTL 5\n")
    r.write("@ IN SOA ns.netsel. hostmaster.netsel. 1 3600 600 86400 5\n@ IN NS ns.netsel.\n")
    u.write('local-zone: "netsel." static\n')
    u.write('local-data: "netsel. 5 IN SOA ns.netsel. hostmaster.netsel. 1 3600 600 86400 5"\n')
    u.write('local-data: "netsel. 5 IN NS ns.netsel."\nlocal-data: "ns.netsel. 5 IN A 127.0.0.1"\n')
    u.write(f'local-zone: "{rev_zone}" static\n')
    u.write(f'local-data: "{rev_zone} 5 IN SOA ns.netsel. hostmaster.netsel. 1 3600 600 86400 5"\n')
    u.write(f'local-data: "{rev_zone} 5 IN NS ns.netsel."\n')
    for name, vip, inst in services:
        z.write(f"{name} IN A {vip}\n")
        u.write(f'local-data: "{name}.netsel. {TTL} IN A {vip}"\n')
        for i in inst:
            tgt = f"{i['id']}.{name}.netsel."
            z.write(f"_{name}._tcp IN SRV 0 {i['weight']} {i['port']} {tgt}\n")
            z.write(f"{i['id']}.{name} IN A {i['address']}\n")
            u.write(f'local-data: "_{name}._tcp.netsel. {TTL} IN SRV 0 {i["weight"]} {i["port"]} {tgt}"\n')
            u.write(f'local-data: "{tgt} {TTL} IN A {i["address"]}"\n')
        r.write(f"{ptr_name(vip)} IN PTR {name}.netsel.\n")
        u.write(f'local-data: "{ptr_name(vip)} {TTL} IN PTR {name}.netsel."\n')
with open(os.path.join(out, "reverse.name"), "w") as f:
    f.write(rev_zone.rstrip(".") + "\n")

rng = random.Random(seed)
a_pct, srv_pct, ptr_pct, _nx = mix
with open(os.path.join(out, "queries.txt"), "w") as q:
    for _ in range(nq):
        x = rng.random() * 100
        if x < a_pct + srv_pct + ptr_pct:
            name, vip, _inst = services[rng.randrange(len(services))]
            if x < a_pct:
                q.write(f"{name}.netsel A\n")
            elif x < a_pct + srv_pct:
                q.write(f"_{name}._tcp.netsel SRV\n")
            else:
                q.write(f"{ptr_name(vip)} PTR\n")
        else:
            q.write(f"nx{rng.randrange(1000000)}.netsel A\n")

by_size = sorted(services, key=lambda t: (len(t[2]), t[0]))
picks = [by_size[-1], by_size[0], by_size[len(by_size) // 2]]
picks += [services[rng.randrange(len(services))] for _ in range(3)]
with open(os.path.join(out, "check.txt"), "w") as c:
    for name, vip, inst in picks:
        c.write(f"{name}.netsel A 1\n_{name}._tcp.netsel SRV {len(inst)}\n{ptr_name(vip)} PTR 1\n")
        c.write(f"{inst[0]['id']}.{name}.netsel A 1\n")
    c.write("nx424242.netsel A 0\n")

n_inst = sum(len(t[2]) for t in services)
print(f"zones services={len(services)} instances={n_inst} srv_max={len(by_size[-1][2])} "
      f"srv_min={len(by_size[0][2])} queries={nq} mix=A{a_pct}/SRV{srv_pct}/PTR{ptr_pct}/NX{mix[3]} "
      f"reverse_zone={rev_zone}")
