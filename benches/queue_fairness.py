#!/usr/bin/env python3
"""The wait queue beside HAProxy's, in one run: who waits how long when one source floods.

Both proxies sit in front of the same backend, which greets, holds each session about 100 ms,
then says 221 and closes. HAProxy runs in TCP mode with `maxconn 20` on its server and
`timeout queue 30s` (its FIFO queue); mxgate runs with a global limit of 20 and its fair queue.

Load, the same for each proxy: a greedy source (127.50.0.1) opens 200 connections at once;
100 ms later, 20 light sources (127.51.0.1-20) connect once each. Every client measures
connect -> greeting. Rounds alternate which proxy goes first. Writes docs/queue-fairness.md,
docs/queue-fairness.json and docs/queue-fairness.svg.

    sudo apt-get install -y haproxy
    cargo build --release --bin mxgate
    python3 benches/queue_fairness.py            # 5 rounds
    ROUNDS=1 python3 benches/queue_fairness.py   # a smoke test
"""

import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MXGATE = os.environ.get("MXBIN") or os.path.join(ROOT, "target/release/mxgate")
ROUNDS = int(os.environ.get("ROUNDS") or 5)
LIMIT = 20
HOLD = 0.1
GREEDY = 200
LIGHT = 20
LIGHT_AFTER = 0.1
GREETING = b"220 bench.test ESMTP\r\n"
DOCS = os.path.join(ROOT, "docs")


async def backend(port, ready):
    async def session(r, w):
        try:
            w.write(GREETING)
            await w.drain()
            await asyncio.sleep(HOLD)  # the session's work
            w.write(b"221 2.0.0 bye\r\n")
            await w.drain()
        except OSError:
            pass
        finally:
            w.close()

    server = await asyncio.start_server(session, "127.0.0.1", port, backlog=1024)
    ready.set()
    async with server:
        await server.serve_forever()


async def client(port, source):
    """One session: (waited seconds to the greeting, delivered?)."""
    start = time.monotonic()
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    except OSError:
        return None, False
    try:
        line = await asyncio.wait_for(r.readline(), 60)
        waited = time.monotonic() - start
        if line != GREETING:
            return waited, False
        rest = await asyncio.wait_for(r.read(), 60)
        return waited, rest.startswith(b"221")
    except (OSError, asyncio.TimeoutError):
        return None, False
    finally:
        w.close()


async def load(port):
    greedy = [asyncio.create_task(client(port, "127.50.0.1")) for _ in range(GREEDY)]
    await asyncio.sleep(LIGHT_AFTER)  # the load's shape: the light sources come 100 ms later
    light = [asyncio.create_task(client(port, f"127.51.0.{i + 1}")) for i in range(LIGHT)]
    return [await t for t in greedy], [await t for t in light]


def quantile(values, q):
    values = sorted(values)
    if not values:
        return None
    return values[min(len(values) - 1, int(q * len(values)))]


def summarise(greedy, light):
    waits = lambda rs: [w for w, ok in rs if ok and w is not None]
    out = {
        "delivered": sum(ok for _, ok in greedy + light),
        "refused": sum(not ok for _, ok in greedy + light),
    }
    for name, rs in (("light", light), ("greedy", greedy)):
        ws = waits(rs)
        out[f"{name}_p50_ms"] = 1000 * quantile(ws, 0.5) if ws else None
        out[f"{name}_p99_ms"] = 1000 * quantile(ws, 0.99) if ws else None
        out[f"{name}_max_ms"] = 1000 * max(ws) if ws else None
        out[f"{name}_waits_ms"] = [round(1000 * w, 2) for w in ws]
    return out


def start_mxgate(port, backend_port):
    return subprocess.Popen(
        [MXGATE, "run", "--listen", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{backend_port}",
         "--metrics", "off", "--hostname", "mx.bench", "--pregreet", "off",
         "--max-connections", str(LIMIT),
         "--max-per-source", "1000", "--queue-timeout", "30s", "--max-queued", "1000"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "RUST_LOG": "error"})


async def main():
    if not shutil.which("haproxy"):
        sys.exit("queue_fairness: haproxy is not installed")
    if not os.path.exists(MXGATE):
        sys.exit(f"queue_fairness: build mxgate first ({MXGATE})")
    backend_port = common.free_port()
    ready = asyncio.Event()
    server = asyncio.create_task(backend(backend_port, ready))
    await ready.wait()
    tmp = tempfile.mkdtemp(prefix="mxgate-queue-")
    starters = {"mxgate": lambda p: start_mxgate(p, backend_port),
                "haproxy": lambda p: common.start_haproxy(tmp, p, backend_port, LIMIT)}
    rounds = []
    try:
        for r in range(ROUNDS):
            order = list(starters) if r % 2 == 0 else list(reversed(starters))
            result = {}
            for name in order:
                port = common.free_port()
                proc = starters[name](port)
                try:
                    common.wait_port(port)
                    result[name] = summarise(*await load(port))
                finally:
                    common.stop(proc)
                s = result[name]
                ms = lambda v: "–" if v is None else f"{v:.0f}"
                print(f"round {r + 1}/{ROUNDS} {name}: delivered {s['delivered']}, refused "
                      f"{s['refused']}, light p50/p99 {ms(s['light_p50_ms'])}/{ms(s['light_p99_ms'])} ms, "
                      f"greedy p50/p99 {ms(s['greedy_p50_ms'])}/{ms(s['greedy_p99_ms'])} ms",
                      file=sys.stderr)
            rounds.append(result)
    finally:
        server.cancel()
        shutil.rmtree(tmp, ignore_errors=True)
    meta = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "kernel": platform.release(),
        "cores": os.cpu_count(),
        "haproxy": subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.split()[2],
    }
    os.makedirs(DOCS, exist_ok=True)
    with open(os.path.join(DOCS, "queue-fairness.json"), "w") as f:
        json.dump({"meta": meta, "rounds": rounds}, f, indent=1)
        f.write("\n")
    report(rounds, meta)


def median(values):
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def fmt3(v):
    return "–" if v is None else f"{v:.3f}"


def report(rounds, meta):
    med = lambda name, key: median(r[name][key] for r in rounds)
    ratios = [r["mxgate"]["light_p99_ms"] / r["haproxy"]["light_p99_ms"] for r in rounds
              if r["mxgate"]["light_p99_ms"] is not None and r["haproxy"]["light_p99_ms"]]
    ratio = median(ratios)
    delivered_all = all(r[n]["delivered"] == GREEDY + LIGHT for r in rounds for n in r)
    out = ["# The wait queue beside HAProxy's\n",
           f"Run on {meta['date']}, kernel {meta['kernel']}, {meta['cores']} cores, by "
           f"`benches/queue_fairness.py`, {len(rounds)} rounds with the two proxies in turn "
           "(alternating which goes first), against the same backend.\n",
           f"The backend greets, holds each session {HOLD * 1000:.0f} ms, then says 221 and "
           f"closes. HAProxy {meta['haproxy']}: TCP mode, `maxconn {LIMIT}` on its server, "
           f"`timeout queue 30s`. mxgate: `--max-connections {LIMIT} --queue-timeout 30s`. "
           f"A greedy source opens {GREEDY} connections at once; {LIGHT_AFTER * 1000:.0f} ms "
           f"later {LIGHT} light sources connect once each. Waits are connect → greeting, in "
           "ms, the median over the rounds.\n",
           "| | mxgate | HAProxy |", "|---|---|---|"]
    fmt = lambda v: "–" if v is None else f"{v:.0f}"
    for label, key in (("delivered", "delivered"), ("refused", "refused"),
                       ("light sources' wait p50", "light_p50_ms"),
                       ("light sources' wait p99", "light_p99_ms"),
                       ("greedy source's wait p50", "greedy_p50_ms"),
                       ("greedy source's wait p99", "greedy_p99_ms"),
                       ("greedy source's longest wait", "greedy_max_ms")):
        out.append(f"| {label} | {fmt(med('mxgate', key))} | {fmt(med('haproxy', key))} |")
    out.append("")
    out.append(f"Light sources' p99 wait, mxgate ÷ HAProxy: median {fmt3(ratio)} "
               f"(rounds {', '.join(f'{x:.3f}' for x in ratios)}). Target: both deliver "
               f"everything ({'yes' if delivered_all else '**no**'}), and the ratio at most 0.2 "
               f"({'yes' if ratio is not None and ratio <= 0.2 else '**no**'}).\n")
    out.append("![every client's wait, last round](queue-fairness.svg)\n")
    out.append("The chart shows every client's wait in the last round, in the order the "
               "clients started: the greedy source's 200, then the 20 light sources. Behind "
               "HAProxy's FIFO the light sources wait behind the whole flood; behind mxgate they "
               "are served in the next round of freed slots, and the greedy source waits "
               "a little longer, by the light sources' turns.\n")
    with open(os.path.join(DOCS, "queue-fairness.md"), "w") as f:
        f.write("\n".join(out) + "\n")
    write_svg(rounds[-1])
    print("\n".join(out))


def write_svg(last):
    w, h, pad = 720, 300, 40
    top = max(max(last[n]["greedy_waits_ms"] + last[n]["light_waits_ms"] or [1]) for n in last)
    rows = []
    colours = {"haproxy": "#c0504d", "mxgate": "#4f81bd"}
    for name in ("haproxy", "mxgate"):
        points = [("greedy", v) for v in last[name]["greedy_waits_ms"]] + \
                 [("light", v) for v in last[name]["light_waits_ms"]]
        n = max(1, len(points) - 1)
        for i, (kind, v) in enumerate(points):
            x = pad + (w - 2 * pad) * i / n
            y = h - pad - (h - 2 * pad) * v / top
            r = 3.5 if kind == "light" else 1.8
            opacity = "" if kind == "light" else ' fill-opacity="0.5"'
            rows.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" fill="{colours[name]}"{opacity}/>')
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#333"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="#333"/>',
           f'<text x="{pad}" y="{pad - 10}">connect → greeting, ms (0 to {top:.0f}); '
           'small dots: greedy source, large dots: light sources</text>',
           f'<text x="{w - pad - 160}" y="{pad + 10}" fill="{colours["haproxy"]}">HAProxy (FIFO)</text>',
           f'<text x="{w - pad - 160}" y="{pad + 26}" fill="{colours["mxgate"]}">mxgate (fair)</text>',
           f'<text x="{pad}" y="{h - pad + 18}">clients in the order they started</text>',
           *rows, "</svg>"]
    with open(os.path.join(DOCS, "queue-fairness.svg"), "w") as f:
        f.write("\n".join(svg) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
