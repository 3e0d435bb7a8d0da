"""Bounded load test on loopback: `ruclip-index serve` in its own process, 50 concurrent clients, 2,000 mixed
requests (text, image upload, similar, metadata, thumbnails, files, info), zero errors; prints p50/p99.

Also a script: `python tests/test_load.py --index DIR [--url http://127.0.0.1:8000]`.
"""

from __future__ import annotations

import asyncio
import io
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.load  # run with -m load (.ci/run does)

QUERIES = ["синий квадрат", "красный круг", "жёлтый треугольник", "зелёный круг", "кот на диване", "квадрат"]
MIX = [
    ("search", 40),
    ("similar", 15),
    ("meta", 10),
    ("thumb", 15),
    ("file", 8),
    ("image", 5),
    ("info", 4),
    ("health", 3),
]


def _upload() -> bytes:
    from fixture_images import draw

    buf = io.BytesIO()
    draw("синий круг", seed=5, size=96).save(buf, "PNG")
    return buf.getvalue()


async def run_load(base_url: str, clients: int = 50, requests: int = 2000, seed: int = 0) -> dict:
    """Fire `requests` mixed requests from `clients` concurrent connections; returns latencies and failures."""
    rng = random.Random(seed)
    kinds = rng.choices([k for k, _ in MIX], weights=[w for _, w in MIX], k=requests)
    upload = _upload()
    latencies: dict[str, list[float]] = {k: [] for k, _ in MIX}
    failures: list[str] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
        ids = [h["id"] for h in (await client.get("/search", params={"q": "круг", "k": 48})).json()["hits"]]
        queue: asyncio.Queue[str] = asyncio.Queue()
        for k in kinds:
            queue.put_nowait(k)

        async def one(kind: str) -> httpx.Response:
            image_id = rng.choice(ids)
            if kind == "search":
                params = {"q": rng.choice(QUERIES), "k": rng.choice([5, 20, 48]), "offset": rng.choice([0, 0, 10])}
                return await client.get("/search", params=params)
            if kind == "similar":
                return await client.get(f"/similar/{image_id}", params={"k": 10})
            if kind == "meta":
                return await client.get(f"/images/{image_id}")
            if kind == "thumb":
                return await client.get(f"/images/{image_id}/thumbnail", params={"size": rng.choice([64, 128, 256])})
            if kind == "file":
                return await client.get(f"/images/{image_id}/file")
            if kind == "image":
                return await client.post("/search/image", files={"file": ("q.png", upload, "image/png")})
            return await client.get(f"/{kind}")

        async def worker() -> None:
            while not queue.empty():
                kind = queue.get_nowait()
                t0 = time.perf_counter()
                try:
                    r = await one(kind)
                    if r.status_code != 200:
                        failures.append(f"{kind}: HTTP {r.status_code} {r.text[:200]}")
                except httpx.HTTPError as e:
                    failures.append(f"{kind}: {type(e).__name__} {e}")
                latencies[kind].append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    every = sorted(x for v in latencies.values() for x in v)
    return {"requests": len(every), "failures": failures, "wall_s": wall, "latencies": latencies, "all": every}


def _pct(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))] * 1000 if values else float("nan")


def report(result: dict) -> str:
    lines = [
        f"{result['requests']} requests in {result['wall_s']:.1f} s ({result['requests'] / result['wall_s']:.0f} req/s), "
        f"{len(result['failures'])} errors; p50 {_pct(result['all'], 50):.1f} ms, p99 {_pct(result['all'], 99):.1f} ms"
    ]
    for kind, values in result["latencies"].items():
        v = sorted(values)
        lines.append(f"  {kind:8s} n={len(v):4d}  p50 {_pct(v, 50):7.1f} ms  p99 {_pct(v, 99):7.1f} ms")
    return "\n".join(lines)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index_dir: Path, port: int) -> subprocess.Popen:
    """`ruclip-index serve` in a child process; returns once /health answers."""
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "ruclip_search.cli", "serve", "--index", str(index_dir), "--port", str(port)]
    env = {**os.environ, "PYTHONPATH": str(root), "RUCLIP_SEARCH_TOKEN": ""}
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode(errors='replace')}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start in 60 s")


def test_load_50_clients_2000_requests(search_index):
    port = _free_port()
    proc = start_server(search_index[0], port)
    try:
        result = asyncio.run(run_load(f"http://127.0.0.1:{port}"))
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()
    print("\n" + report(result))
    assert result["requests"] == 2000
    assert not result["failures"], result["failures"][:5]
    assert proc.returncode is not None


if __name__ == "__main__":  # pragma: no cover
    import argparse

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", type=Path, help="start a server on this index")
    ap.add_argument("--url", help="or load an already running server")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--requests", type=int, default=2000)
    args = ap.parse_args()
    server = None
    if args.url is None:
        if args.index is None:
            ap.error("give --index or --url")
        port = _free_port()
        server = start_server(args.index, port)
        args.url = f"http://127.0.0.1:{port}"
    try:
        res = asyncio.run(run_load(args.url, args.clients, args.requests))
        print(report(res))
        for f in res["failures"][:10]:
            print("  ", f)
    finally:
        if server is not None:
            server.terminate()
    sys.exit(1 if res["failures"] else 0)
