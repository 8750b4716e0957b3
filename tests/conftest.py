"""Fixtures shared by several test modules. Keep each one small and generic."""
from __future__ import annotations

import http.server
import threading

import pytest


class _FileHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files[path] -> bytes``; ``server.truncated`` paths send half their bytes
    after announcing the full length, as a dropped connection would."""

    def do_GET(self):  # noqa: N802 (name fixed by BaseHTTPRequestHandler)
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path in self.server.truncated:
            body = body[: len(body) // 2]
            self.close_connection = True
        self.wfile.write(body)

    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture
def http_files():
    """A local HTTP server on 127.0.0.1 (never the internet).

    Yields ``serve(path, data, truncate=False) -> url``; other paths answer 404, and
    ``serve.base`` is the server's base URL.
    """
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FileHandler)
    server.files, server.truncated = {}, set()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"

    def serve(path: str, data: bytes, truncate: bool = False) -> str:
        path = "/" + path.lstrip("/")
        server.files[path] = data
        if truncate:
            server.truncated.add(path)
        return base + path

    serve.base = base
    try:
        yield serve
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
