"""The transport ceiling: a plain blocking TLS socket stream between two processes.

No websocket framing and no event loop, only OpenSSL over loopback TCP with
1 MiB writes, as fast as Python can drive it. didomagic's large transfers are
compared with this (issue 16: at least 0.75x), beside the asyncio websocket.
"""

from __future__ import annotations

import multiprocessing
import socket
import ssl
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

CHUNK = 1 << 20


def _sink(certfile: str, keyfile: str, total: int, rounds: int, ports: Any) -> None:
    """(A separate process.) Accept one TLS connection; answer one byte per ``total`` read."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certfile, keyfile)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ports.put(listener.getsockname()[1])
        raw, _ = listener.accept()
        with context.wrap_socket(raw, server_side=True) as conn:
            buffer = bytearray(CHUNK)
            for _ in range(rounds):
                received = 0
                while received < total:
                    n = conn.recv_into(buffer)
                    if not n:
                        return
                    received += n
                conn.sendall(b"k")


def blocking_tls_throughput(total: int, rounds: int = 3) -> list[float]:
    """Seconds to send ``total`` bytes, ``rounds`` times, client to server process."""
    from runner import certs

    certfile, keyfile, _ = certs.generate(Path(tempfile.mkdtemp()), ["127.0.0.1"])
    ports: Any = multiprocessing.Queue()
    server = multiprocessing.Process(
        target=_sink, args=(str(certfile), str(keyfile), total, rounds, ports), daemon=True
    )
    server.start()
    port = ports.get(timeout=60)
    payload = memoryview(np.ones(CHUNK // 8).view(np.uint8))
    context = ssl.create_default_context(cafile=str(certfile))
    context.check_hostname = False
    samples = []
    try:
        with (
            socket.create_connection(("127.0.0.1", port)) as raw,
            context.wrap_socket(raw) as conn,
        ):
            for _ in range(rounds):
                started = time.perf_counter()
                sent = 0
                while sent < total:
                    conn.sendall(payload[: min(CHUNK, total - sent)])
                    sent += CHUNK
                conn.recv(1)
                samples.append(time.perf_counter() - started)
    finally:
        server.join(timeout=60)
        if server.is_alive():
            server.terminate()
    return samples
