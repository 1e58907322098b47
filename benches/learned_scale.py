#!/usr/bin/env python3
"""The learned limit at production scale: how fast `max_connections = auto` reaches a hidden
limit of hundreds from a cold start, what it costs the backend, and how fast a restart with
the same state directory is back.

The backend is mxgate's embedded sink in its Exchange-like mode: it serves at most 400
sessions at once, holds each one 500 ms before its greeting, and greets the 401st with
Exchange's `421 4.3.2 ... exceeded a limit`. In front of it, mxgate with
`--backend ADDR,max_connections=auto --max-connections 1000`, the wait queue on (30 s,
2000 waiting), and a state directory. Load: `mxgate load` with 600 clients at a time.

Each round:
1. cold: a fresh state directory, 20 s of load. The learned limit is read from
   `mxgate_backend_limit` every 0.2 s: the time to 85 % of the hidden limit, and the busy
   greetings (`mxgate_backend_busy_total`) as a share of the backend connections
   (`mxgate_backend_selected_total`) from then on.
2. restart: SIGTERM (mxgate writes its state as it stops), a new mxgate on the same state
   directory, 10 s of load: the time from its start to 85 %.
The sink counts every 421 it sent; those mxgate did not absorb reached a client.

    cargo build --release --bin mxgate
    python3 benches/learned_scale.py                # 3 rounds
    ROUNDS=1 COLD=8 python3 benches/learned_scale.py  # a smoke test

Writes docs/learned-scale.md and docs/learned-scale.json.
"""

import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime, timezone

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MXGATE = os.environ.get("MXBIN") or os.path.join(ROOT, "target/release/mxgate")
ROUNDS = int(os.environ.get("ROUNDS") or 3)
COLD = int(os.environ.get("COLD") or 20)
WARM = int(os.environ.get("WARM") or 10)
HIDDEN = 400
SESSION = "500ms"
CONCURRENCY = 600
TARGET = HIDDEN * 85 // 100
DOCS = os.path.join(ROOT, "docs")


def start_sink(port):
    p = subprocess.Popen(
        [MXGATE, "sink", "--listen", f"127.0.0.1:{port}", "--limit", str(HIDDEN),
         "--hold", SESSION],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    common.wait_port(port)
    return p


def sink_counts(p):
    """Stops the sink and returns its last counts line as a dict."""
    os.killpg(p.pid, signal.SIGINT)
    p.wait()
    last = {}
    for line in p.stdout.read().splitlines():
        if line.startswith("delivered="):
            last = {k: int(v) for k, v in (kv.split("=") for kv in line.split())}
    return last


def start_mxgate(port, metrics, sink_port, state):
    p = subprocess.Popen(
        [MXGATE, "run", "--listen", f"127.0.0.1:{port}",
         "--backend", f"127.0.0.1:{sink_port},max_connections=auto",
         "--metrics", f"127.0.0.1:{metrics}", "--hostname", "mx.bench", "--pregreet", "off",
         "--max-connections", "1000", "--max-per-source", "1000",
         "--max-per-ipv6-network", "1000", "--queue-timeout", "30s", "--max-queued", "2000",
         "--state-dir", state],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "RUST_LOG": "warn"})
    return p


def scrape(metrics):
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=2).read()
    except OSError:
        return None
    values = {}
    for line in text.decode().splitlines():
        for name in ("mxgate_backend_limit", "mxgate_backend_busy_total",
                     "mxgate_backend_selected_total"):
            if line.startswith(name + "{"):
                values[name] = float(line.rsplit(" ", 1)[1])
    return values


def load(port, seconds, out):
    r = subprocess.run(
        [MXGATE, "load", "--target", f"127.0.0.1:{port}", "--sources", "127.61.0.0/16",
         "--concurrency", str(CONCURRENCY), "--duration", f"{seconds}s",
         "--message-size", "1024", "--json"],
        capture_output=True, text=True, timeout=seconds + 120)
    out.update(json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr[-500:]})


def phase(port, metrics, seconds, started):
    """Runs the load for `seconds` while sampling; returns the samples and the load's stats."""
    stats = {}
    t = threading.Thread(target=load, args=(port, seconds, stats))
    t.start()
    samples = []
    while t.is_alive():
        v = scrape(metrics)
        if v:
            samples.append((time.monotonic() - started, v))
        time.sleep(0.2)
    t.join()
    last = scrape(metrics)
    if last:
        samples.append((time.monotonic() - started, last))
    return samples, stats


def reached(samples):
    for t, v in samples:
        if v.get("mxgate_backend_limit", 0) >= TARGET:
            return t, v
    return None, None


def one_round(n):
    state = tempfile.mkdtemp(prefix="mxgate-scale-")
    sink_port, port, metrics = common.free_port(), common.free_port(), common.free_port()
    sink = start_sink(sink_port)
    started = time.monotonic()
    mx = start_mxgate(port, metrics, sink_port, state)
    common.wait_port(port)
    cold, cold_stats = phase(port, metrics, COLD, started)
    t85, at = reached(cold)
    end = cold[-1][1]
    after = None
    if at:
        busy = end["mxgate_backend_busy_total"] - at["mxgate_backend_busy_total"]
        conns = end["mxgate_backend_selected_total"] - at["mxgate_backend_selected_total"]
        after = busy / conns if conns else 0.0
    absorbed = end.get("mxgate_backend_busy_total", 0)
    os.killpg(mx.pid, signal.SIGTERM)
    mx.wait()
    # The restart: the same state directory and ports.
    restarted = time.monotonic()
    mx = start_mxgate(port, metrics, sink_port, state)
    common.wait_port(port)
    warm, warm_stats = phase(port, metrics, WARM, restarted)
    w85, _ = reached(warm)
    absorbed += warm[-1][1].get("mxgate_backend_busy_total", 0)
    os.killpg(mx.pid, signal.SIGTERM)
    mx.wait()
    counts = sink_counts(sink)
    refused = sum(s.get("refused_later", 0) + sum(s.get("refused", {}).values())
                  for s in (cold_stats, warm_stats))
    row = {
        "round": n,
        "cold_to_85_percent_s": round(t85, 2) if t85 is not None else None,
        "busy_share_after_85_percent": round(after, 4) if after is not None else None,
        "learned_at_end_of_cold": int(end.get("mxgate_backend_limit", 0)),
        "restart_to_85_percent_s": round(w85, 2) if w85 is not None else None,
        "backend_421_sent": counts.get("busy", 0),
        "backend_421_absorbed": int(absorbed),
        "backend_421_seen_by_clients": max(0, counts.get("busy", 0) - int(absorbed)),
        "clients_refused": refused,
        "delivered": cold_stats.get("delivered", 0) + warm_stats.get("delivered", 0),
        "backend_peak": counts.get("peak", 0),
    }
    print(json.dumps(row), flush=True)
    return row


def median(values):
    v = sorted(x for x in values if x is not None)
    if not v:
        return None
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def report(rows):
    def col(key):
        vals = [r[key] for r in rows]
        return median(vals), min(v for v in vals if v is not None) if any(
            v is not None for v in vals) else None, max(
            (v for v in vals if v is not None), default=None)

    lines = [
        "# The learned limit at scale",
        "",
        f"Generated by `python3 benches/learned_scale.py` on "
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, a "
        f"{os.cpu_count()}-core host, kernel {platform.release().split('-')[0]}: a backend with a hidden limit "
        f"of {HIDDEN} and {SESSION} sessions, {CONCURRENCY} clients at a time, "
        f"{len(rows)} rounds (median, with the range).",
        "",
        "| measure | target | median (range) |",
        "| --- | --- | --- |",
    ]
    for key, label, target, unit in [
        ("cold_to_85_percent_s", "cold start to ≥ 85 % of the hidden limit", "≤ 10 s", " s"),
        ("busy_share_after_85_percent", "backend 421s after that, share of its connections",
         "≤ 5 %", ""),
        ("restart_to_85_percent_s", "restart with the same state directory, to ≥ 85 %",
         "≤ 2 s", " s"),
        ("backend_421_seen_by_clients", "clients that saw the backend's own 421", "none", ""),
        ("learned_at_end_of_cold", "learned limit at the end of the cold run", "", ""),
    ]:
        m, lo, hi = col(key)
        if key == "busy_share_after_85_percent" and m is not None:
            text = f"{m * 100:.2f} % ({lo * 100:.2f}–{hi * 100:.2f})"
        elif m is None:
            text = "not reached"
        else:
            text = f"{m}{unit} ({lo}–{hi})"
        lines.append(f"| {label} | {target} | {text} |")
    lines += ["", "Per round:", "", "```"] + [json.dumps(r) for r in rows] + ["```", ""]
    return "\n".join(lines)


def main():
    if not os.path.exists(MXGATE):
        sys.exit(f"learned_scale: build mxgate first ({MXGATE})")
    rows = [one_round(n + 1) for n in range(ROUNDS)]
    with open(os.path.join(DOCS, "learned-scale.json"), "w") as f:
        json.dump(rows, f, indent=1)
    text = report(rows)
    with open(os.path.join(DOCS, "learned-scale.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
