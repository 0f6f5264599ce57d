"""A real local HTTP endpoint standing in for a webhook receiver, an alert sink, or a server
that misbehaves on purpose: every request is recorded (method, path, headers, body, the
status answered, time)."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import httpx

# respond(request) -> (status, headers, body)
Respond = Callable[[dict], tuple[int, dict, bytes]]


class Receiver:
    """Answers the statuses queued in `statuses` first, in order (empty body), then what
    `respond` returns, or `default` with an empty body. `headers` of a recorded request is
    case-insensitive (httpx.Headers)."""

    def __init__(self, default: int = 200, respond: Respond | None = None):
        self.requests: list[dict] = []
        self.statuses: list[int] = []
        self.default, self.respond = default, respond
        self.lock = threading.Lock()
        self.got = threading.Condition(self.lock)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                req = {"method": self.command, "path": self.path, "headers": httpx.Headers(list(self.headers.items())),
                       "body": body, "t": time.time()}
                with receiver.lock:
                    queued = receiver.statuses.pop(0) if receiver.statuses else None
                if queued is not None:
                    status, headers, out = queued, {}, b""
                elif receiver.respond is not None:
                    status, headers, out = receiver.respond(req)
                else:
                    status, headers, out = receiver.default, {}, b""
                with receiver.got:
                    receiver.requests.append({**req, "status": status})
                    receiver.got.notify_all()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _any

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def delivered(self) -> list[dict]:
        """The requests answered 2xx."""
        with self.lock:
            return [r for r in self.requests if 200 <= r["status"] < 300]

    def wait_for(self, n: int, timeout: float = 5.0) -> list[dict]:
        """The requests so far, once there are `n` (or at the timeout: the caller checks)."""
        with self.got:
            self.got.wait_for(lambda: len(self.requests) >= n, timeout)
            return list(self.requests)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "Receiver":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
