#!/usr/bin/env python3
"""Admission latency with and without a cluster, side by side in one run.

Starts a redis-server (persistence off), Postfix's smtp-sink as the backend, and two mxgate
processes in front of it: one counting alone, one in a cluster. Then, in alternating rounds,
opens sequential connections to each and times connect() to the first byte of the greeting,
the wait a client sees. The difference is the cluster's admission round trip.

    python3 benches/cluster_latency.py [ROUNDS] [PER_ROUND]

Prints p50 and p99 per mode (medians over rounds), and mxgate's own histogram of the Redis
round trip. Loopback only; bounded in count.
"""
import os
import shutil
import socket
import subprocess
import sys
import time

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MXGATE = os.path.join(ROOT, "target", "release", "mxgate")


def one(port, source):
    s = socket.socket()
    s.bind((source, 0))
    t0 = time.perf_counter()
    s.connect(("127.0.0.1", port))
    s.recv(1)
    t = time.perf_counter() - t0
    s.sendall(b"QUIT\r\n")
    s.close()
    return t


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    per = int(sys.argv[2]) if len(sys.argv) > 2 else 400
    for tool in ("redis-server", "smtp-sink"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed")
    procs = []
    try:
        rport = common.free_port()
        procs.append(subprocess.Popen(
            ["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL))
        sport = common.free_port()
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        procs.append(subprocess.Popen(["smtp-sink"] + user + [f"127.0.0.1:{sport}", "256"]))
        common.wait_port(rport)
        common.wait_port(sport)
        modes = {}
        for name, extra in (("alone", []),
                            ("cluster", ["--cluster-redis", f"redis://127.0.0.1:{rport}/0",
                                         "--cluster-instance", "bench"])):
            port, mport = common.free_port(), common.free_port()
            procs.append(subprocess.Popen(
                [MXGATE, "run", "--backend", f"127.0.0.1:{sport}", "--listen",
                 f"127.0.0.1:{port}", "--metrics", f"127.0.0.1:{mport}", "--hostname",
                 "mx.test", "--pregreet", "off", "--max-per-source", "1000"] + extra,
                env=dict(os.environ, RUST_LOG="error")))
            common.wait_port(port)
            common.wait_port(mport)
            modes[name] = (port, mport)
        # The cluster instance registers in the background: wait for it.
        end = time.time() + 10
        while "mxgate_cluster_connected 1" not in common.metrics_text(modes["cluster"][1]):
            if time.time() > end:
                raise SystemExit("the cluster instance never connected")
            time.sleep(0.05)
        results = {m: {"p50": [], "p99": []} for m in modes}
        for r in range(rounds):
            for m, (port, _) in (modes.items() if r % 2 == 0 else reversed(modes.items())):
                ts = [one(port, f"127.0.{r % 250}.{i % 250 + 1}") for i in range(per)]
                results[m]["p50"].append(pct(ts, 0.5))
                results[m]["p99"].append(pct(ts, 0.99))
        print(f"{rounds} alternating rounds of {per} sequential sessions; connect to greeting")
        for m, v in results.items():
            p50 = sorted(v["p50"])[len(v["p50"]) // 2] * 1e6
            p99 = sorted(v["p99"])[len(v["p99"]) // 2] * 1e6
            print(f"  {m:8} p50 {p50:7.0f} us   p99 {p99:7.0f} us")
        text = common.metrics_text(modes["cluster"][1])
        for line in text.splitlines():
            if line.startswith("mxgate_cluster_admission_seconds_") and not line.startswith("#"):
                if "_bucket" in line and 'le="0.0005"' not in line and 'le="0.001"' not in line \
                        and 'le="0.00025"' not in line and 'le="+Inf"' not in line:
                    continue
                print("  " + line)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()


if __name__ == "__main__":
    main()
