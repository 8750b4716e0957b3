"""Fixtures shared by several test modules. Keep each one small and generic."""
from __future__ import annotations

import http.server
import shutil
import threading
import warnings

import pytest


def pytest_configure(config):
    """One torch thread, and the optional C++ kernel built once before any test needs it.

    The tests' tensors are tiny: splitting each operation over several threads costs more in
    hand-offs than it gains, and on a busy machine a waiting thread spins (the unit run took
    about 10x longer in its backend tests with two threads on two loaded cores). Tests that
    spawn processes (distributed ranks) load the kernel from the cache instead of compiling it
    in each process."""
    import torch
    torch.set_num_threads(1)
    if shutil.which("c++") or shutil.which("g++"):
        from metamap.nets import kernels
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")     # without ninja the kernel tests report it themselves
            kernels.build()


class _FileHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files[path] -> bytes``; ``server.truncated`` paths send half their bytes
    after announcing the full length, as a dropped connection would."""

    def do_GET(self):
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
    server.daemon_threads = True
    server.files, server.truncated = {}, set()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
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


# -- small synthetic data, for tests of the core that must not depend on a real data set --------

def _make_image_folder(root, classes: int = 10, per_class: int = 6, size: int = 20, seed: int = 0):
    """One sub-folder per class; each class is a random pattern plus per-image noise (PNG, grey)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class{c:02d}"
        d.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, (size, size)).astype(float)
        for i in range(per_class):
            img = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"img{i}.png")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """A 10-class image folder (6 images each, 20x20 grey PNG)."""
    return _make_image_folder(tmp_path_factory.mktemp("folder") / "data")


@pytest.fixture
def tiny_dataset():
    """A ClassDataset of 12 classes x 5 random 1x8x8 uint8 images, with a plain ImageSpec."""
    import torch

    from metamap.data.dataset import ClassDataset
    from metamap.data.images import ImageSpec

    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (60, 1, 8, 8), generator=g, dtype=torch.uint8)
    labels = torch.arange(12).repeat_interleave(5)
    return ClassDataset(data, labels, [f"c{i}" for i in range(12)], ImageSpec(size=8), "tiny synthetic")
