"""A loopback HTTP proxy in front of a real server that corrupts chosen bytes of its answers.

Radicale repairs or drops malformed iCalendar both when it stores and when it serves it, so
it never hands out broken data the way other servers (or a damaged store) can. The proxy keeps
every request and answer real and only rewrites the body, to stand for such a server.
"""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FaultProxy:
    def __init__(self, upstream_port: int, replacements: dict[bytes, bytes]):
        self.upstream_port = upstream_port
        self.replacements = replacements
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=30)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "content-length", "accept-encoding")}
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                for old, new in proxy.replacements.items():
                    data = data.replace(old, new)
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_DELETE = do_PROPFIND = do_REPORT = do_MKCALENDAR = do_OPTIONS = _forward

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


class CuttingProxy:
    """A loopback TCP proxy in front of a real server that cuts the connection once the server
    has sent `cut_after` bytes, and then refuses every new connection (the server seems gone).

    A test that must drop a connection in the middle of an import can do it at a byte count,
    not at a moment, so the result does not depend on how busy the machine is."""

    def __init__(self, upstream_port: int, cut_after: int):
        import socket

        self.upstream_port = upstream_port
        self.cut_after = cut_after
        self.sent = 0
        self.cut = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        import socket

        while not self.cut.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.cut.is_set():
                client.close()
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source, target, from_server: bool) -> None:
        try:
            while not self.cut.is_set():
                data = source.recv(65536)
                if not data:
                    break
                if from_server:
                    self.sent += len(data)
                    if self.sent >= self.cut_after:
                        self._cut(source, target)
                        return
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                try:
                    sock.close()
                except OSError:
                    pass

    def _cut(self, *sockets) -> None:
        import socket

        self.cut.set()
        for sock in (*sockets, self.listener):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def __enter__(self) -> CuttingProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._cut()
