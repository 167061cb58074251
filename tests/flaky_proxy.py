"""A fault-injecting TCP proxy on 127.0.0.1 for the object-store tests (test helper; threads, standard library only).

Clients connect to the proxy instead of the S3 endpoint; each connection is relayed to the upstream. Faults are
deterministic and bounded, so a test knows what it caused:
- every `every`-th connection is reset (RST: SO_LINGER 0, then close), cycling through `kinds`:
  - "request": after the request arrived, before any byte of the response (the client sees a reset connection), and
  - "body": after the response headers and `body_bytes` bytes of the body (a download broken off mid-stream);
  at most `max_resets` in all; a fault that cannot happen as planned (a "body" fault on a response too short to
  cut, such as a HEAD's) is owed to the next connection, so the count of resets does not depend on which request
  of several concurrent ones a connection happens to carry;
- every response is held back `latency_s` before its first byte;
- at most `max_connections` connections are accepted (later ones are closed at once), and every socket read or
  write gives up after `io_timeout_s`: requests are bounded in count and time.

One request per connection: the proxy adds `Connection: close` to each request, so the server closes after its
response and the client's next request opens the next connection (otherwise keep-alive would let a single connection
carry everything, past every fault).
"""

from __future__ import annotations

import socket
import struct
import threading
import time


class FlakyProxy:
    def __init__(self, upstream: tuple[str, int], *, every: int = 3, max_resets: int = 8, latency_s: float = 0.02,
                 body_bytes: int = 100, max_connections: int = 500, io_timeout_s: float = 10.0,
                 kinds: tuple[str, ...] = ("request", "body")):
        self.upstream = upstream
        self.every, self.max_resets, self.latency_s, self.body_bytes = every, max_resets, latency_s, body_bytes
        self.max_connections, self.io_timeout_s = max_connections, io_timeout_s
        self.kinds = kinds
        self.connections = 0
        self.resets = {"request": 0, "body": 0}
        self.refused = 0
        self._owed: list[str] = []  # faults planned for a connection that could not take them
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self.port = self._server.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, name="flaky-proxy", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def total_resets(self) -> int:
        return sum(self.resets.values())

    def __enter__(self) -> "FlakyProxy":
        self._acceptor.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._acceptor.join(timeout=5)
        self._server.close()
        for t in self._threads:
            t.join(timeout=self.io_timeout_s + 1)

    # ------------------------------------------------------------------------------------------------------ internals

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
                n = self.connections
                fault = None
                if n > self.max_connections:
                    self.refused += 1
                    fault = "refuse"
                elif self.total_resets < self.max_resets:
                    if n % self.every == 0:
                        self._owed.append(self.kinds[(n // self.every - 1) % len(self.kinds)])
                    fault = self._owed.pop(0) if self._owed else None
            if fault == "refuse":
                client.close()
                continue
            t = threading.Thread(target=self._relay, args=(client, fault), daemon=True)
            self._threads.append(t)
            t.start()

    @staticmethod
    def _reset(sock: socket.socket) -> None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        sock.close()

    def _count(self, kind: str) -> bool:
        with self._lock:
            if self.total_resets >= self.max_resets:
                return False
            self.resets[kind] += 1
            return True

    def _owe(self, kind: str) -> None:
        with self._lock:
            self._owed.insert(0, kind)

    def _relay(self, client: socket.socket, fault: str | None) -> None:
        client.settimeout(self.io_timeout_s)
        upstream = None
        try:
            request = client.recv(65536)
            if not request:  # the client gave up before asking: a planned fault is owed, like a body too short
                if fault:
                    self._owe(fault)
                client.close()
                return
            if fault == "request" and self._count("request"):
                self._reset(client)
                return
            head, sep, rest = request.partition(b"\r\n")
            request = head + sep + b"Connection: close\r\n" + rest
            upstream = socket.create_connection(self.upstream, timeout=self.io_timeout_s)
            upstream.sendall(request)
            pump = threading.Thread(target=self._pump, args=(client, upstream), daemon=True)
            pump.start()
            time.sleep(self.latency_s)
            header_end = -1
            buffered = b""
            while True:
                chunk = upstream.recv(65536)
                if not chunk:
                    break
                if fault == "body":
                    buffered += chunk
                    if header_end < 0:
                        i = buffered.find(b"\r\n\r\n")
                        header_end = -1 if i < 0 else i + 4
                    if header_end >= 0 and len(buffered) > header_end + self.body_bytes and self._count("body"):
                        client.sendall(buffered[: header_end + self.body_bytes])
                        self._reset(client)
                        return
                    continue  # held until the cut point is known
                client.sendall(chunk)
            if buffered:  # a "body" fault on a response too short to cut: relayed whole, owed to the next one
                client.sendall(buffered)
                self._owe("body")
            client.shutdown(socket.SHUT_WR)
            client.close()
        except OSError:
            client.close()
        finally:
            if upstream is not None:
                upstream.close()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        """The rest of the request body (client -> upstream)."""
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    break
                upstream.sendall(data)
        except OSError:
            pass
