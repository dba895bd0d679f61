"""The embedded Hub under load: threads, memory and latency with many idle connections, and
memory during big concurrent commits.

Starts ``hf-taskarith hub serve --no-auth`` in a subprocess (loopback) and measures, from
``/proc/<pid>/status`` of that process:

1. threads, RSS and the latency of ``GET /api/whoami-v2`` (median and 95th percentile of 50)
   with no other connection open;
2. the same with ``--idle`` connections open that never send a byte (ratio to 1.);
3. peak RSS growth (``VmHWM``) while ``--commits`` clients each POST an NDJSON commit of
   ``--files`` regular files of ``--file-mib`` MiB (base64 in the body) at the same time, against
   the total body size.

Usage::

    python benchmarks/hub_server_load.py                    # 200 idle, 4 commits of 5 x 9 MiB
    python benchmarks/hub_server_load.py --idle 500 --commits 8
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Threads", "VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])  # kB for the memory lines
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port: int, method: str, path: str, body: bytes | None = None, ctype: str | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": ctype} if ctype else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def latencies(port: int, n: int = 50) -> tuple[float, float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        assert request(port, "GET", "/api/whoami-v2")[0] == 200
        times.append(time.perf_counter() - t0)
    times.sort()
    return statistics.median(times), times[int(0.95 * (n - 1))]


def commit_body(files: int, mib: float, seed: int) -> bytes:
    lines = [json.dumps({"key": "header", "value": {"summary": f"load {seed}"}})]
    for i in range(files):
        text = base64.b64encode(os.urandom(int(mib * 2**20 * 3 / 4)))  # ASCII text: a regular file, not LFS
        lines.append(json.dumps({"key": "file", "value": {"path": f"f{seed}-{i}.txt", "encoding": "base64",
                                                         "content": base64.b64encode(text).decode()}}))
    return ("\n".join(lines) + "\n").encode()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--idle", type=int, default=200, help="idle connections to hold open")
    p.add_argument("--commits", type=int, default=4, help="concurrent commits")
    p.add_argument("--files", type=int, default=5, help="regular files per commit")
    p.add_argument("--file-mib", type=float, default=9.0, help="size of each file (MiB; regular files <= 10 MiB)")
    args = p.parse_args()

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen([sys.executable, "-m", "hf_taskarith.cli.main", "hub", "serve", "--root", tmp,
                                 "--port", str(port), "--no-auth", "--max-request-size", "100MiB"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            for _ in range(600):
                try:
                    request(port, "GET", "/api/whoami-v2")
                    break
                except OSError:
                    time.sleep(0.1)
            base = status(proc.pid)
            lat0 = latencies(port)
            idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(args.idle)]
            time.sleep(1.0)
            loaded = status(proc.pid)
            lat1 = latencies(port)
            for s in idle:
                s.close()

            for i in range(args.commits):
                request(port, "POST", "/api/repos/create", json.dumps({"name": f"load{i}", "organization": "team",
                                                                       "type": "model"}).encode(),
                        "application/json")
            bodies = [commit_body(args.files, args.file_mib, i) for i in range(args.commits)]
            before = status(proc.pid)
            results: list[int] = []
            threads = [threading.Thread(target=lambda i=i: results.append(request(
                port, "POST", f"/api/models/team/load{i}/commit/main", bodies[i], "application/x-ndjson")[0]))
                for i in range(args.commits)]
            t0 = time.perf_counter()
            [t.start() for t in threads]
            [t.join() for t in threads]
            elapsed = time.perf_counter() - t0
            after = status(proc.pid)
        finally:
            proc.kill()
            proc.wait()
    total_mib = sum(len(b) for b in bodies) / 2**20
    growth_mib = (after["VmHWM"] - before["VmRSS"]) / 1024
    print(f"no other connection : threads {base['Threads']:4d}  RSS {base['VmRSS'] / 1024:7.1f} MiB  "
          f"latency median {lat0[0] * 1000:6.2f} ms  p95 {lat0[1] * 1000:6.2f} ms")
    print(f"{args.idle:4d} idle connections: threads {loaded['Threads']:4d}  RSS {loaded['VmRSS'] / 1024:7.1f} MiB  "
          f"latency median {lat1[0] * 1000:6.2f} ms  p95 {lat1[1] * 1000:6.2f} ms  "
          f"(median {lat1[0] / lat0[0]:.2f}x)")
    print(f"{args.commits} concurrent commits, {total_mib:.0f} MiB of bodies in all: statuses {sorted(results)}, "
          f"{elapsed:.1f} s, peak RSS growth {growth_mib:.0f} MiB ({growth_mib / total_mib:.2f}x the bodies)")
    print(json.dumps({"idle": args.idle, "threads": [base["Threads"], loaded["Threads"]],
                      "rss_mib": [base["VmRSS"] / 1024, loaded["VmRSS"] / 1024],
                      "latency_ms": [lat0[0] * 1000, lat0[1] * 1000, lat1[0] * 1000, lat1[1] * 1000],
                      "commit_bodies_mib": total_mib, "commit_peak_rss_growth_mib": growth_mib,
                      "commit_statuses": results}))


if __name__ == "__main__":
    main()
