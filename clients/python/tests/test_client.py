"""The Python client against the real ``netsel`` binary (``NETSEL_BIN``).

Run from the repository root::

    cargo build --bin netsel
    NETSEL_BIN=target/debug/netsel python3 -m unittest discover -s clients/python/tests -v

``cargo test --test python_client`` does exactly that. Every server listens on loopback
port 0 with a VIP pool of its own; waits poll a condition with a deadline.
"""

from __future__ import annotations

import io
import logging
import os
import queue
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from typing import Callable, Dict, List, Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import netsel  # noqa: E402
from netsel import Client, NetselConnectionError, NetselError  # noqa: E402

TOKEN = "deployer-token-0123456789abcdef"
READER = "reader-token-0123456789abcdef"
ACL_CONFIG = f"""
[acl]
enabled = true
anonymous_read = false
[[acl.tokens]]
name = "deployer"
token = "{TOKEN}"
read = ["*"]
write = ["acl-"]
[[acl.tokens]]
name = "reader"
token = "{READER}"
read = ["*"]
write = []
"""


def eventually(what: str, check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Polls ``check`` until it holds; fails the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def netsel_bin() -> str:
    path = os.environ.get("NETSEL_BIN") or shutil.which("netsel")
    if not path:
        raise unittest.SkipTest("set NETSEL_BIN to the netsel binary (cargo build --bin netsel)")
    return path


class Server:
    """``netsel serve --in-memory`` on loopback port 0, until :meth:`stop`."""

    def __init__(self, config: Optional[str] = None) -> None:
        args = [netsel_bin(), "serve", "--in-memory", "--log-level", "warn"]
        for flag in ("--registry-addr", "--api-addr", "--dns-addr", "--tcp-proxy-addr",
                     "--http-proxy-addr"):
            args += [flag, "127.0.0.1:0"]
        args += ["--vip-cidr", f"127.{random.randint(1, 250)}.{random.randint(0, 255)}.0/24"]
        args += ["--health-check-interval", "1"]
        self.dir = tempfile.mkdtemp(prefix="netsel-py-")
        if config is not None:
            path = os.path.join(self.dir, "netsel.toml")
            with open(path, "w") as f:
                f.write(config)
            args += ["--config", path]
        self.stderr = open(os.path.join(self.dir, "stderr"), "w+")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        self.addrs: Dict[str, str] = {}
        lines: "queue.Queue[Optional[str]]" = queue.Queue()

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                lines.put(line.rstrip("\n"))
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + 30
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise RuntimeError("netsel serve printed no 'ready' within 30 s")
            if line is None:
                self.stop()
                raise RuntimeError(f"netsel serve exited before ready:\n{self.log()}")
            if line == "ready":
                break
            name, _, addr = line.partition(": ")
            self.addrs[name] = addr
        self.api = self.addrs["api"]

    def log(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def dead_addr() -> str:
    """A loopback address where nothing listens (connections are refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    addr = "127.0.0.1:%d" % s.getsockname()[1]
    s.close()
    return addr


def instance_ids(client: Client, name: str) -> List[str]:
    try:
        return [i.id for i in client.resolve(name).instances]
    except NetselError as e:
        if e.status == 404:
            return []
        raise


class OpenServer(unittest.TestCase):
    """A server without ACLs."""

    server: Server

    @classmethod
    def setUpClass(cls) -> None:
        cls.server = Server()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.server.stop()

    def setUp(self) -> None:
        self.client = Client(self.server.api, timeout=5)

    def test_register_with_options_shows_in_services_and_resolve(self) -> None:
        reg = self.client.register(
            "py-web", port=18000, address="127.0.0.1", tags=["v2", "blue"],
            meta={"zone": "a"}, weight=5, ttl="30s", protocol="http1",
        )
        with reg:
            self.assertEqual(reg.service, "py-web")
            self.assertEqual(reg.endpoint, "127.0.0.1:18000")
            self.assertEqual((reg.service_port, reg.ttl), (18000, 30))
            self.assertTrue(reg.vip.startswith("127."))
            listed = {s.name: s for s in self.client.services()}
            self.assertIn("py-web", listed)
            self.assertEqual(listed["py-web"].vip, reg.vip)
            self.assertEqual(listed["py-web"].tags, ["blue", "v2"])
            web = self.client.resolve("py-web")
            self.assertEqual((web.vip, web.port), (reg.vip, 18000))
            [inst] = web.instances
            self.assertEqual(inst.id, reg.id)
            self.assertEqual(inst.tags, ["v2", "blue"])
            self.assertEqual(inst.meta, {"zone": "a"})
            self.assertEqual((inst.weight, inst.protocol, inst.ttl), (5, "http1", 30))
            self.assertEqual(web.healthy, [inst])
        # Leaving the block deregistered it (the last instance: the service goes).
        with self.assertRaises(NetselError) as e:
            self.client.resolve("py-web")
        self.assertEqual(e.exception.status, 404)

    def test_a_port_from_the_pool_and_the_callers_address(self) -> None:
        with self.client.register("py-pool", ttl=30) as reg:
            host, _, port = reg.endpoint.rpartition(":")
            self.assertEqual(host, "127.0.0.1")
            self.assertGreater(int(port), 0)

    def test_heartbeats_keep_a_short_lease_alive_and_stopping_lets_it_expire(self) -> None:
        reg = self.client.register("py-beat", port=18001, address="127.0.0.1", ttl=1)
        reg.start_heartbeats()
        try:
            # Four TTLs: without the heartbeats it would be gone after one.
            until = time.monotonic() + 4.0
            while time.monotonic() < until:
                self.assertEqual(instance_ids(self.client, "py-beat"), [reg.id])
                time.sleep(0.1)
            self.assertEqual(reg.registrations, 1, "it never had to register again")
        finally:
            reg.stop_heartbeats()
        eventually("the lease ran out", lambda: instance_ids(self.client, "py-beat") == [],
                   timeout=5)

    def test_heartbeat_registers_again_after_the_lease_ran_out(self) -> None:
        reg = self.client.register("py-again", port=18002, address="127.0.0.1", ttl=1)
        first = reg.id
        eventually("the lease ran out", lambda: instance_ids(self.client, "py-again") == [],
                   timeout=5)
        reg.heartbeat()  # 404: registers again and succeeds
        self.assertNotEqual(reg.id, first)
        self.assertEqual(instance_ids(self.client, "py-again"), [reg.id])
        reg.deregister()
        self.assertEqual(instance_ids(self.client, "py-again"), [])
        reg.deregister()  # twice is fine

    def test_a_superseded_registration_registers_again_beside_its_replacement(self) -> None:
        old = self.client.register("py-fenced", port=18040, address="127.0.0.1", ttl=30)
        # The same endpoint registered again takes the instance over: same id, new secret.
        new = self.client.register("py-fenced", port=18040, address="127.0.0.1", ttl=30)
        self.assertEqual(new.id, old.id)
        old.heartbeat()  # 403: registers again as a new instance, never over the new one
        self.assertNotEqual(old.id, new.id)
        self.assertEqual(sorted(instance_ids(self.client, "py-fenced")), sorted([old.id, new.id]))
        new.heartbeat()
        self.assertEqual((old.registrations, new.registrations), (2, 1))
        old.deregister()
        new.deregister()
        self.assertEqual(instance_ids(self.client, "py-fenced"), [])

    def test_watch_returns_when_the_service_changes(self) -> None:
        seen: "queue.Queue[object]" = queue.Queue()

        def watch() -> None:
            try:
                for index, svc in self.client.watch("py-watched", wait="20s"):
                    seen.put((index, svc))
                    if svc is not None:
                        return
            except Exception as e:  # reported to the test thread
                seen.put(e)

        t = threading.Thread(target=watch, daemon=True)
        t.start()
        first = seen.get(timeout=10)  # the current state comes at once: absent
        self.assertIsInstance(first, tuple)
        self.assertIsNone(first[1])
        with self.client.register("py-watched", port=18003, address="127.0.0.1", ttl=30) as reg:
            index, svc = seen.get(timeout=10)
            t.join(timeout=10)
            self.assertFalse(t.is_alive())
            self.assertIsInstance(svc, netsel.Service)
            self.assertEqual([i.id for i in svc.instances], [reg.id])
            self.assertGreater(index, first[0])

    def test_watch_of_every_service_and_resuming_from_an_index(self) -> None:
        index, services = next(self.client.watch())
        self.assertIsInstance(services, list)
        out: "queue.Queue[object]" = queue.Queue()

        def watch() -> None:
            for i, svcs in self.client.watch(index=index, wait="20s"):
                out.put((i, svcs))
                if "py-all" in [s.name for s in svcs]:
                    return

        t = threading.Thread(target=watch, daemon=True)
        t.start()
        with self.client.register("py-all", port=18004, address="127.0.0.1", ttl=30):
            deadline = time.monotonic() + 10
            while True:
                i, svcs = out.get(timeout=max(0.0, deadline - time.monotonic()))
                self.assertGreater(i, index)
                if "py-all" in [s.name for s in svcs]:
                    break
        t.join(timeout=10)
        self.assertFalse(t.is_alive())

    def test_events_stream_reports_registrations(self) -> None:
        out: "queue.Queue[object]" = queue.Queue()

        def listen() -> None:
            try:
                for ev in self.client.events(service="py-events", timeout=20):
                    if ev.kind == "instance_registered":  # after service_created, maybe
                        out.put(ev)
                        return
            except Exception as e:
                out.put(e)

        t = threading.Thread(target=listen, daemon=True)
        t.start()
        # The stream subscribes before it answers, but the request may still be on its
        # way: register until the event arrives.
        regs = []
        deadline = time.monotonic() + 10
        ev = None
        while ev is None and time.monotonic() < deadline:
            regs.append(self.client.register("py-events", port=18005 + len(regs),
                                             address="127.0.0.1", ttl=30))
            try:
                ev = out.get(timeout=1)
            except queue.Empty:
                pass
        for r in regs:
            r.deregister()
        self.assertIsInstance(ev, netsel.Event)
        assert isinstance(ev, netsel.Event)
        self.assertEqual((ev.kind, ev.service), ("instance_registered", "py-events"))
        self.assertIn(ev.instance, [r.id for r in regs])
        t.join(timeout=10)

    def test_errors_carry_status_message_and_field(self) -> None:
        with self.assertRaises(NetselError) as e:
            self.client.register("bad_name!", port=18010, address="127.0.0.1")
        self.assertEqual((e.exception.status, e.exception.field), (400, "name"))
        self.assertIn("bad_name!", e.exception.message)
        with self.assertRaises(NetselError) as e:
            self.client.register("py-err", port=18010, address="127.0.0.1", weight=0)
        self.assertEqual((e.exception.status, e.exception.field), (400, "weight"))
        with self.assertRaises(NetselError) as e:
            self.client.resolve("py-nothing-here")
        self.assertEqual((e.exception.status, e.exception.field), (404, None))
        with self.assertRaises(ValueError):
            self.client.register("py-err", ttl="1.5s")

    def test_fails_over_past_a_dead_address(self) -> None:
        client = Client([dead_addr(), "http://" + self.server.api])
        with client.register("py-failover", port=18020, address="127.0.0.1", ttl=30) as reg:
            reg.heartbeat()
            self.assertEqual(instance_ids(client, "py-failover"), [reg.id])
        # A comma-separated string, as NETSEL_API_ADDR has it, works the same.
        self.assertIsInstance(Client(f"{dead_addr()},{self.server.api}").services(), list)
        with self.assertRaises(NetselConnectionError):
            Client([dead_addr(), dead_addr()], timeout=2).services()

    def test_the_secret_never_shows_in_repr_str_or_logs(self) -> None:
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        handler.setLevel(logging.DEBUG)
        logger = logging.getLogger("netsel")
        logger.addHandler(handler)
        old_level = logger.level
        logger.setLevel(logging.DEBUG)
        try:
            client = Client([dead_addr(), self.server.api])
            reg = client.register("py-secret", port=18030, address="127.0.0.1", ttl=1)
            secrets = [reg._secret]
            reg.start_heartbeats()
            # Removed behind its back, it registers again (a new secret) and logs that.
            client.deregister(reg.id, reg._secret)
            eventually("registered again", lambda: reg.registrations == 2)
            secrets.append(reg._secret)
            text = repr(reg) + str(reg) + repr(client) + str(client)
            reg.deregister()
        finally:
            logger.removeHandler(handler)
            logger.setLevel(old_level)
        logged = stream.getvalue()
        self.assertIn("registering again", logged)
        self.assertIn(reg.id, text)
        for secret in secrets:
            self.assertTrue(secret)
            self.assertNotIn(secret, text)
            self.assertNotIn(secret, logged)
            self.assertNotIn(secret, self.server.log())


class AclServer(unittest.TestCase):
    """A server with ACLs on: a deployer token may write ``acl-*``, a reader may read."""

    server: Server

    @classmethod
    def setUpClass(cls) -> None:
        cls.server = Server(ACL_CONFIG)

    @classmethod
    def tearDownClass(cls) -> None:
        cls.server.stop()

    def test_refused_without_token_accepted_with(self) -> None:
        anonymous = Client(self.server.api)
        with self.assertRaises(NetselError) as e:
            anonymous.register("acl-web", port=18100, address="127.0.0.1")
        self.assertEqual(e.exception.status, 401)
        with self.assertRaises(NetselError) as e:
            anonymous.services()
        self.assertEqual(e.exception.status, 401)
        with self.assertRaises(NetselError) as e:
            Client(self.server.api, token="not-a-token-at-all-000").services()
        self.assertEqual(e.exception.status, 403)
        with self.assertRaises(NetselError) as e:
            Client(self.server.api, token=READER).register("acl-web", port=18100,
                                                           address="127.0.0.1")
        self.assertEqual(e.exception.status, 403)
        deployer = Client(self.server.api, token=TOKEN)
        self.assertNotIn(TOKEN, repr(deployer))
        with deployer.register("acl-web", port=18100, address="127.0.0.1", ttl=30) as reg:
            reg.heartbeat()
            reader = Client(self.server.api, token=READER)
            self.assertEqual([i.id for i in reader.resolve("acl-web").instances], [reg.id])

    def test_heartbeat_loop_registers_again_after_an_operator_removed_it(self) -> None:
        deployer = Client(self.server.api, token=TOKEN)
        reg = deployer.register("acl-again", port=18101, address="127.0.0.1", ttl=2)
        first = reg.id
        reg.start_heartbeats()
        try:
            # Behind the client's back: an operator token deregisters without the secret.
            deployer.deregister(first)
            eventually("registered again under a new id",
                       lambda: reg.id != first and instance_ids(deployer, "acl-again") == [reg.id])
            self.assertEqual(reg.registrations, 2)
        finally:
            reg.deregister()
        self.assertEqual(instance_ids(deployer, "acl-again"), [])


if __name__ == "__main__":
    unittest.main()
