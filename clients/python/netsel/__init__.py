"""A small client for NetSel's HTTP/JSON API, using only the standard library.

Register an instance, keep it alive with heartbeats from a background thread (registering
again if the registry forgot it), deregister it, and find or watch services::

    import netsel

    client = netsel.Client("127.0.0.1:9001")
    with client.register("web", port=8000, tags=["v2"], ttl="30s") as reg:
        reg.start_heartbeats()
        print(reg.vip, reg.service_port)
        web = client.resolve("web")
        ...                       # serve; on leaving the block it deregisters

Addresses are ``HOST:PORT`` or ``http://HOST:PORT``; several (a list, or a comma-separated
string as in ``NETSEL_API_ADDR``) are tried in turn when one cannot be reached. The token
(``NETSEL_TOKEN``) is sent as ``Authorization: Bearer``. The instance secret and the token
are kept in memory and never appear in ``repr``, ``str`` or log records.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import re
import threading
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

__all__ = [
    "Client",
    "Registration",
    "Service",
    "Instance",
    "Event",
    "NetselError",
    "NetselConnectionError",
]
__version__ = "0.2.0"

log = logging.getLogger("netsel")

DEFAULT_API = "127.0.0.1:9001"
Duration = Union[int, float, str]


class NetselError(Exception):
    """The API refused a request: ``status`` is the HTTP status, ``message`` the API's
    ``error``, ``field`` the invalid input it names (400 only), ``retry_after`` the
    seconds to wait after a 429."""

    def __init__(
        self,
        status: Optional[int],
        message: str,
        field: Optional[str] = None,
        retry_after: Optional[float] = None,
    ) -> None:
        super().__init__(status, message, field)
        self.status = status
        self.message = message
        self.field = field
        self.retry_after = retry_after

    def __str__(self) -> str:
        where = f" (field {self.field})" if self.field else ""
        return f"{self.message}{where} (HTTP {self.status})"


class NetselConnectionError(NetselError):
    """No API address could be reached (``status`` is None)."""

    def __init__(self, message: str) -> None:
        super().__init__(None, message)

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Instance:
    """One instance of a service, as ``GET /v1/services/{name}`` shows it."""

    id: str
    service: str
    address: str
    port: int
    endpoint: str
    tags: List[str] = field(default_factory=list)
    meta: Dict[str, str] = field(default_factory=dict)
    weight: int = 1
    protocol: str = "tcp"
    health: str = "passing"
    ttl: int = 0
    lease_remaining_ms: int = field(default=0, compare=False)

    @classmethod
    def _from_json(cls, d: Dict[str, Any]) -> "Instance":
        return cls(
            id=d["id"],
            service=d["service"],
            address=d["address"],
            port=d["port"],
            endpoint=d["endpoint"],
            tags=list(d.get("tags", [])),
            meta=dict(d.get("meta", {})),
            weight=d.get("weight", 1),
            protocol=d.get("protocol", "tcp"),
            health=d.get("health", "passing"),
            ttl=d.get("ttl_secs", 0),
            lease_remaining_ms=d.get("lease_remaining_ms", 0),
        )


@dataclass(frozen=True)
class Service:
    """A service: its VIP and port (``vip:port`` balances over its healthy instances),
    health, and instances (every one, with its health; see :attr:`healthy`)."""

    name: str
    vip: str
    port: int
    health: str
    tags: List[str] = field(default_factory=list)
    instances: List[Instance] = field(default_factory=list)
    modify_index: int = 0

    @property
    def healthy(self) -> List[Instance]:
        """The instances that pass their checks: those DNS and the proxies use."""
        return [i for i in self.instances if i.health == "passing"]

    @classmethod
    def _from_json(cls, d: Dict[str, Any]) -> "Service":
        return cls(
            name=d["name"],
            vip=d["vip"],
            port=d["port"],
            health=d.get("health", "passing"),
            tags=list(d.get("tags", [])),
            instances=[Instance._from_json(i) for i in d.get("instances") or []],
            modify_index=d.get("modify_index", 0),
        )


@dataclass(frozen=True)
class Event:
    """A catalog change from ``GET /v1/events``: ``kind`` is ``instance_registered``,
    ``instance_deregistered``, ``instance_expired``, ``health_changed``, … or ``resync``
    (the stream fell behind: read :meth:`Client.services` again)."""

    kind: str
    index: int
    service: Optional[str] = None
    instance: Optional[str] = None


def parse_seconds(value: Duration) -> float:
    """Seconds from a number or a duration such as ``"30s"``, ``"1500ms"``, ``"2m"``."""
    if isinstance(value, (int, float)):
        return float(value)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", value)
    if not m:
        raise ValueError(f"{value!r} is not a duration like 30s, 1500ms or 2m")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2) or "s"]
    return float(m.group(1)) * scale


def _parse_addr(addr: str) -> Tuple[str, int]:
    """``HOST:PORT``, ``http://HOST:PORT`` or ``[V6]:PORT`` as (host, port)."""
    a = addr.strip()
    if a.startswith("http://"):
        a = a[len("http://") :]
    a = a.rstrip("/")
    host, sep, port = a.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"API address {addr!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


class Client:
    """The NetSel API at one or more addresses.

    ``api`` is ``"HOST:PORT"``, ``"http://HOST:PORT"``, a comma-separated list of them or a
    sequence; default ``NETSEL_API_ADDR``, else ``127.0.0.1:9001``. ``token`` (default
    ``NETSEL_TOKEN``) is the ACL token. ``timeout`` bounds connecting and each answer, in
    seconds. A request that cannot reach an address moves on to the next, which then stays
    current."""

    def __init__(
        self,
        api: Union[str, Sequence[str], None] = None,
        token: Optional[str] = None,
        timeout: float = 5.0,
    ) -> None:
        if api is None:
            api = os.environ.get("NETSEL_API_ADDR") or DEFAULT_API
        if isinstance(api, str):
            api = api.split(",")
        self.addrs = [_parse_addr(a) for a in api if a.strip()]
        if not self.addrs:
            raise ValueError("no API address given")
        self._token = token if token is not None else os.environ.get("NETSEL_TOKEN")
        self.timeout = timeout
        self._current = 0  # index of the address that answered last

    def __repr__(self) -> str:
        addrs = ",".join(f"{h}:{p}" for h, p in self.addrs)
        token = "***" if self._token else None
        return f"Client(api={addrs!r}, token={token!r}, timeout={self.timeout})"

    # -- HTTP ---------------------------------------------------------------------------

    def _order(self) -> List[int]:
        """Address indexes to try: the current one (the last that answered), then the
        rest in turn."""
        start, n = self._current, len(self.addrs)
        return [(start + k) % n for k in range(n)]

    def _request(
        self,
        method: str,
        path: str,
        body: Optional[Dict[str, Any]] = None,
        headers: Optional[Dict[str, str]] = None,
        timeout: Optional[float] = None,
    ) -> Tuple[int, Dict[str, str], Any]:
        """Sends one request, failing over on connection errors; returns status,
        headers (lower-case names) and the decoded JSON body, whatever the status."""
        hdrs = {"Accept": "application/json"}
        if self._token:
            hdrs["Authorization"] = f"Bearer {self._token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        hdrs.update(headers or {})
        errors = []
        for i in self._order():
            host, port = self.addrs[i]
            conn = http.client.HTTPConnection(host, port, timeout=timeout or self.timeout)
            try:
                conn.request(method, path, body=data, headers=hdrs)
                resp = conn.getresponse()
                raw = resp.read()
                status, rh = resp.status, {k.lower(): v for k, v in resp.getheaders()}
            except (OSError, http.client.HTTPException) as e:
                errors.append(f"{host}:{port}: {e or type(e).__name__}")
                log.debug("NetSel API at %s:%s unreachable: %s", host, port, e)
                continue
            finally:
                conn.close()
            self._current = i  # the next request starts here
            try:
                decoded = json.loads(raw) if raw else None
            except ValueError:
                decoded = {"error": raw.decode("utf-8", "replace")[:200]}
            return status, rh, decoded
        raise NetselConnectionError("cannot reach the NetSel API: " + "; ".join(errors))

    def _call(self, method: str, path: str, **kw: Any) -> Tuple[Dict[str, str], Any]:
        """Like :meth:`_request`, raising :class:`NetselError` for a non-2xx status."""
        status, headers, body = self._request(method, path, **kw)
        if not 200 <= status < 300:
            raise _error(status, headers, body)
        return headers, body

    # -- registering --------------------------------------------------------------------

    def register(
        self,
        name: str,
        port: Optional[int] = None,
        address: Optional[str] = None,
        tags: Sequence[str] = (),
        meta: Optional[Dict[str, str]] = None,
        weight: Optional[int] = None,
        ttl: Optional[Duration] = None,
        check: Union[str, Dict[str, str], None] = None,
        protocol: Optional[str] = None,
        service_port: Optional[int] = None,
        replace: Optional[bool] = None,
    ) -> "Registration":
        """Registers an instance of ``name`` and returns its :class:`Registration`.

        ``address`` defaults to the address the server sees the request come from;
        without ``port`` the server assigns one from its port pool. ``ttl`` is whole
        seconds or a duration string (``"30s"``; default the server's
        ``max_heartbeat_age``). ``check`` is ``"tcp"``, ``"http:/healthz"`` or the API's
        ``{"type": ..., "path": ...}``. ``protocol`` is ``tcp``, ``http1`` or ``http2``.
        An instance already registered at the same endpoint is taken over (same id, new
        secret) unless ``replace=False``, which registers a new instance beside it."""
        body: Dict[str, Any] = {"name": name, "tags": list(tags), "meta": dict(meta or {})}
        if address is not None:
            body["address"] = address
        if port is not None:
            body["port"] = port
        if weight is not None:
            body["weight"] = weight
        if ttl is not None:
            secs = parse_seconds(ttl)
            if secs != int(secs):
                raise ValueError(f"ttl {ttl!r} is not a whole number of seconds")
            body["ttl_secs"] = int(secs)
        if check is not None:
            body["check"] = _check(check)
        if protocol is not None:
            body["protocol"] = protocol
        if service_port is not None:
            body["service_port"] = service_port
        if replace is not None:
            body["replace"] = replace
        reg = Registration(self, body)
        reg._register()
        return reg

    def deregister(self, instance_id: str, secret: Optional[str] = None) -> None:
        """Deregisters any instance by id: with its secret, or (ACLs on) with an operator
        token that may write its service. An instance already gone is not an error."""
        headers = {"X-Netsel-Secret": secret} if secret else {}
        status, h, body = self._request("DELETE", _instance_path(instance_id), headers=headers)
        if status != 404 and not 200 <= status < 300:
            raise _error(status, h, body)

    # -- discovery ----------------------------------------------------------------------

    def services(self, detail: bool = False) -> List[Service]:
        """Every service the token may read; with ``detail``, their instances too."""
        _, body = self._call("GET", "/v1/services" + ("?detail=true" if detail else ""))
        return [Service._from_json(s) for s in body["services"]]

    def resolve(self, name: str) -> Service:
        """One service with its instances; :class:`NetselError` 404 if it is unknown."""
        _, body = self._call("GET", "/v1/services/" + urllib.parse.quote(name, safe=""))
        return Service._from_json(body)

    def watch(
        self, name: Optional[str] = None, index: int = 0, wait: Duration = "30s"
    ) -> Iterator[Tuple[int, Any]]:
        """Yields ``(index, state)`` now and after each change, using blocking queries.

        With ``name``, ``state`` is that :class:`Service` (None while it does not exist)
        and only changes to it count; without, it is the list of every service. Pass a
        yielded index back as ``index`` to resume. Each query waits at most ``wait``
        before asking again; the generator runs until the caller stops iterating."""
        wait_s = parse_seconds(wait)
        wait_q = f"{max(1, round(wait_s * 1000))}ms"
        base = "/v1/services" if name is None else "/v1/services/" + urllib.parse.quote(name, safe="")
        query = {"detail": "true"} if name is None else {}
        last: Any = object()
        first = True
        while True:
            q = dict(query)
            if not (first and index == 0):  # index 0: the current state at once
                q.update(index=str(index), wait=wait_q)
            first = False
            path = base + ("?" + urllib.parse.urlencode(q) if q else "")
            status, headers, body = self._request("GET", path, timeout=wait_s + self.timeout)
            if name is not None and status == 404:
                state: Any = None
            elif 200 <= status < 300:
                if name is None:
                    state = [Service._from_json(s) for s in body["services"]]
                else:
                    state = Service._from_json(body)
            else:
                raise _error(status, headers, body)
            new_index = int(headers.get("x-netsel-index", "0"))
            # Skip answers that only say the wait ran out (or, for one service, that
            # another one changed).
            key = new_index if name is None else _key(state)
            if new_index < index:
                last = object()  # the server restarted: whatever it says is news
            index = new_index
            if key != last:
                last = key
                yield index, state

    def events(self, service: Optional[str] = None, timeout: float = 60.0) -> Iterator[Event]:
        """Yields catalog changes from the ``/v1/events`` server-sent-event stream
        (optionally of one service), starting now. ``timeout`` bounds the silence between
        two lines (the server sends a keep-alive every 15 s)."""
        path = "/v1/events" + (f"?service={urllib.parse.quote(service)}" if service else "")
        headers = {"Accept": "text/event-stream"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        conn, resp = self._open_stream(path, headers, timeout)
        try:
            if resp.status != 200:
                raw = resp.read()
                hdrs = {k.lower(): v for k, v in resp.getheaders()}
                raise _error(resp.status, hdrs, _json_or_none(raw))
            kind, data = "message", ""
            for raw_line in iter(resp.readline, b""):
                line = raw_line.decode("utf-8").rstrip("\r\n")
                if line.startswith("event:"):
                    kind = line[len("event:") :].strip()
                elif line.startswith("data:"):
                    data += line[len("data:") :].strip()
                elif line == "" and data:
                    if kind in ("change", "resync"):
                        d = json.loads(data)
                        yield Event(
                            kind=d.get("kind", kind),
                            index=d.get("index", 0),
                            service=d.get("service"),
                            instance=d.get("instance"),
                        )
                    kind, data = "message", ""
        finally:
            conn.close()

    def _open_stream(
        self, path: str, headers: Dict[str, str], timeout: float
    ) -> Tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Opens a long-lived GET on the first address that answers."""
        errors = []
        for i in self._order():
            host, port = self.addrs[i]
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
            try:
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                errors.append(f"{host}:{port}: {e or type(e).__name__}")
                continue
            self._current = i
            return conn, resp
        raise NetselConnectionError("cannot reach the NetSel API: " + "; ".join(errors))


class Registration:
    """A registered instance: ``id``, ``service``, ``vip``, ``service_port``,
    ``endpoint``, ``ttl`` (seconds). Its secret stays private. As a context manager it
    deregisters (and stops its heartbeats) on exit."""

    def __init__(self, client: Client, body: Dict[str, Any]) -> None:
        self._client = client
        self._body = body
        self._lock = threading.RLock()
        self._secret: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.id = ""
        self.service = body["name"]
        self.vip = ""
        self.service_port = 0
        self.endpoint = ""
        self.ttl = 0
        self.registrations = 0  # how often it registered (more after the registry forgot)

    def __repr__(self) -> str:
        return (
            f"Registration(id={self.id!r}, service={self.service!r}, vip={self.vip!r}, "
            f"service_port={self.service_port}, endpoint={self.endpoint!r}, ttl={self.ttl})"
        )

    def __enter__(self) -> "Registration":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.deregister()

    def _register(self) -> None:
        _, r = self._client._call("POST", "/v1/instances", body=self._body)
        with self._lock:
            self._secret = r["secret"]
            self.id = r["id"]
            self.service = r["service"]
            self.vip = r["vip"]
            self.service_port = r["service_port"]
            self.endpoint = r["endpoint"]
            self.ttl = r["ttl_secs"]
            self.registrations += 1

    def heartbeat(self) -> None:
        """Renews the lease. If the registry no longer knows the instance (its lease ran
        out, it was deregistered, or the server lost its state) or another registration
        superseded it, registers again as a new instance (``id`` changes) and succeeds."""
        with self._lock:
            if self._secret is None:
                raise NetselError(None, "not registered")
            status, headers, body = self._client._request(
                "PUT",
                _instance_path(self.id) + "/heartbeat",
                headers={"X-Netsel-Secret": self._secret},
            )
            if status in (403, 404):
                log.warning(
                    "instance %s of %s is gone or superseded (HTTP %s); registering again",
                    self.id, self.service, status,
                )
                # Never take over an instance that replaced this one meanwhile.
                self._body["replace"] = False
                self._register()
                log.info("registered %s again as %s", self.service, self.id)
            elif not 200 <= status < 300:
                raise _error(status, headers, body)

    def interval(self) -> float:
        """Seconds between heartbeats: a third of the TTL, between 0.3 s and 10 s."""
        return min(max(self.ttl / 3.0, 0.3), 10.0)

    def start_heartbeats(self, interval: Optional[float] = None) -> "Registration":
        """Heartbeats from a daemon thread every ``interval`` seconds (default
        :meth:`interval`) until :meth:`stop_heartbeats` or :meth:`deregister`. Failures
        are logged and retried with backoff (the API's ``Retry-After`` after a 429)."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return self
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._heartbeat_loop,
                args=(interval,),
                name=f"netsel-heartbeat-{self.service}",
                daemon=True,
            )
            self._thread.start()
        return self

    def _heartbeat_loop(self, interval: Optional[float]) -> None:
        failures = 0
        delay = interval or self.interval()
        while not self._stop.wait(delay):
            every = interval or self.interval()
            try:
                self.heartbeat()
                failures, delay = 0, every
            except Exception as e:  # noqa: BLE001 - the loop must outlive any failure
                failures += 1
                # Exponential backoff with jitter, capped at the interval.
                delay = min(0.2 * 2 ** min(failures - 1, 16), every) * random.uniform(0.5, 1)
                retry_after = getattr(e, "retry_after", None)
                if retry_after:
                    delay = max(delay, retry_after)
                log.warning(
                    "heartbeat of %s %s failed (%s); retrying in %.1f s",
                    self.service, self.id, e, delay,
                )

    def stop_heartbeats(self, timeout: Optional[float] = None) -> None:
        """Stops the heartbeat thread and waits for it (at most ``timeout`` seconds)."""
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout if timeout is not None else self._client.timeout + 1)
        self._thread = None

    def deregister(self) -> None:
        """Stops the heartbeats and removes the instance; already gone is fine."""
        self.stop_heartbeats()
        with self._lock:
            secret, self._secret = self._secret, None
            if secret is not None:
                self._client.deregister(self.id, secret)


def _key(service: Optional[Service]) -> Any:
    """What a watch of one service compares to decide whether it changed."""
    if service is None:
        return None
    return (service.modify_index, tuple((i.id, i.health) for i in service.instances))


def _check(check: Union[str, Dict[str, str]]) -> Dict[str, str]:
    if isinstance(check, dict):
        return check
    if check == "tcp":
        return {"type": "tcp"}
    if check.startswith("http:"):
        return {"type": "http", "path": check[len("http:") :]}
    raise ValueError(f"check {check!r} is not 'tcp' or 'http:/path'")


def _instance_path(instance_id: str) -> str:
    return "/v1/instances/" + urllib.parse.quote(instance_id, safe="")


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def _error(status: int, headers: Dict[str, str], body: Any) -> NetselError:
    """The :class:`NetselError` for an API error answer."""
    message, fld = f"HTTP {status}", None
    if isinstance(body, dict):
        message = str(body.get("error") or message)
        fld = body.get("field")
    retry = headers.get("retry-after") or headers.get("Retry-After")
    try:
        retry_after = float(retry) if retry else None
    except ValueError:
        retry_after = None
    return NetselError(status, message, fld, retry_after)
