"""A Consul client library against NetSel's Consul-compatible API (tests/consul.rs).

Usage: client.py HOST PORT SERVICE. Runs with whichever library `import consul` finds:
Debian's python3-consul (0.7.1), PyPI's python-consul2 or py-consul. Registers SERVICE
with a TTL check, passes it while a blocking health query waits for it, reads the
catalog, fails and warns the check, deregisters, and asserts each answer. Prints "ok".
"""

import sys
import threading

import consul

host, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
c = consul.Consul(host=host, port=port)
sid = name + "-1"
check_id = "service:" + sid

# The agent and the leader.
me = c.agent.self()
assert me["Config"]["Datacenter"] == "dc1", me
assert c.status.leader() == "%s:%d" % (host, port), c.status.leader()

# Register with a TTL check: listed, critical until its first pass.
assert c.agent.service.register(
    name, service_id=sid, address="127.0.0.1", port=8080, tags=["blue"],
    check=consul.Check.ttl("30s"))
index, nodes = c.health.service(name)
assert len(nodes) == 1, nodes
assert nodes[0]["Service"]["ID"] == sid, nodes
statuses = {ch["CheckID"]: ch["Status"] for ch in nodes[0]["Checks"]}
assert statuses[check_id] == "critical", statuses
index, nodes = c.health.service(name, passing=True)
assert nodes == [], nodes
assert int(index) > 0, index

# A blocking query for passing instances, answered when the check passes.
result = {}


def blocking_query():
    result["answer"] = c.health.service(name, index=index, wait="30s", passing=True)


waiter = threading.Thread(target=blocking_query)
waiter.start()
assert c.agent.check.ttl_pass(check_id)
waiter.join(60)
assert not waiter.is_alive(), "the blocking query never returned"
new_index, nodes = result["answer"]
assert int(new_index) > int(index), (index, new_index)
assert [n["Service"]["ID"] for n in nodes] == [sid], nodes
assert nodes[0]["Service"]["Port"] == 8080, nodes
assert nodes[0]["Service"]["Address"] == "127.0.0.1", nodes

# The catalog agrees, and filters by tag.
index, services = c.catalog.services()
assert services.get(name) == ["blue"], services
index, entries = c.catalog.service(name)
assert [e["ServiceID"] for e in entries] == [sid], entries
index, entries = c.catalog.service(name, tag="green")
assert entries == [], entries
index, nodes = c.health.service(name, tag="blue", passing=True)
assert len(nodes) == 1, nodes

# Fail takes it out of the passing list; warn keeps it in.
assert c.agent.check.ttl_fail(check_id)
index, nodes = c.health.service(name, passing=True)
assert nodes == [], nodes
assert c.agent.check.ttl_warn(check_id)
index, nodes = c.health.service(name, passing=True)
assert len(nodes) == 1, nodes

# Deregister: gone.
assert c.agent.service.deregister(sid)
index, nodes = c.health.service(name)
assert nodes == [], nodes
index, services = c.catalog.services()
assert name not in services, services
print("ok", consul.__name__, getattr(consul, "__version__", "?"))
