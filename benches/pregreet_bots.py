#!/usr/bin/env python3
"""The pregreet test against a bot flood: do bots reach the backend, and how long do real senders
wait for the greeting?

A backend that takes 50 sessions (mxgate's max_connections = 50, its queue on) and holds each
one 500 ms. It reads the PROXY v1 header mxgate sends it, so it knows which client each session
is for. Load, all on loopback, each client from its own address:
- BOTS sources (127.60.x.y) that speak at once after connecting, then hold the connection HOLD s;
- SLOW sources (127.61.x.y) that speak after 1 s, then hold it HOLD s;
- GOOD well-behaved senders (127.62.0.x), each a first contact: they wait for the whole greeting
  (its `220 ` line), say EHLO, MAIL, RCPT, DATA, QUIT. Then each sends once more (cached).
Measured for each `pregreet` action: backend sessions bots got, senders' failures, their
connect -> final greeting line (first contact, then cached), mxgate's RSS and descriptors at the
flood's peak.

    cargo build --release --bin mxgate
    python3 benches/pregreet_bots.py                                  # the issue's sizes
    BOTS=200 SLOW=20 GOOD=10 HOLD=3 WAIT=1s python3 benches/pregreet_bots.py   # brief

The issue's full set also has a real Postfix relaying 100 messages; this script's senders are
its own SMTP clients (no Postfix queue is set up here).
"""

import asyncio
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MXGATE = os.environ.get("MXBIN") or os.path.join(ROOT, "target/release/mxgate")
BOTS = int(os.environ.get("BOTS") or 2000)
SLOW = int(os.environ.get("SLOW") or 200)
GOOD = int(os.environ.get("GOOD") or 50)
HOLD = float(os.environ.get("HOLD") or 30)
WAIT = os.environ.get("WAIT") or "6s"
ACTIONS = (os.environ.get("ACTIONS") or "drop,ignore").split(",")
SLOTS = 50
SESSION = 0.5


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def addr(prefix, i):
    return f"127.{prefix}.{i // 250}.{i % 250 + 1}"


class Backend:
    """Greets, holds each session SESSION s (or until QUIT), records who each was for."""

    def __init__(self):
        self.sessions = {"bot": 0, "slow": 0, "good": 0}

    async def handle(self, r, w):
        try:
            header = await asyncio.wait_for(r.readline(), 5)
            src = header.split()[2].decode() if header.startswith(b"PROXY") else "?"
            kind = {"60": "bot", "61": "slow", "62": "good"}.get(src.split(".")[1], "good")
            self.sessions[kind] += 1
            w.write(b"220-backend.bench first\r\n220 backend.bench ready\r\n")
            await w.drain()
            end = time.monotonic() + SESSION
            while True:
                left = end - time.monotonic()
                line = await asyncio.wait_for(r.readline(), max(left, 0.01))
                if not line:
                    break
                verb = line[:4].upper()
                if verb == b"DATA":
                    w.write(b"354 go\r\n")
                    await w.drain()
                    while (await r.readline()) not in (b".\r\n", b""):
                        pass
                    w.write(b"250 2.0.0 queued\r\n")
                elif verb == b"QUIT":
                    w.write(b"221 bye\r\n")
                    await w.drain()
                    break
                else:
                    w.write(b"250 ok\r\n")
                await w.drain()
        except (asyncio.TimeoutError, asyncio.CancelledError, OSError, IndexError):
            pass
        finally:
            w.close()


async def open_from(src, port):
    sock = socket.socket()
    sock.setblocking(False)
    sock.bind((src, 0))
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock)


async def bot(src, port, after):
    try:
        r, w = await open_from(src, port)
        if after:
            await asyncio.sleep(after)
        w.write(b"EHLO bot\r\n")
        await w.drain()
        end = time.monotonic() + HOLD
        while time.monotonic() < end:
            if not await asyncio.wait_for(r.read(4096), max(end - time.monotonic(), 0.01)):
                break
        w.close()
    except (OSError, asyncio.TimeoutError):
        pass


async def sender(src, port):
    """One message; returns seconds from connect to the greeting's final line, or None."""
    try:
        t0 = time.monotonic()
        r, w = await open_from(src, port)
        while True:
            line = await asyncio.wait_for(r.readline(), 60)
            if not line.startswith(b"220"):
                return None
            if line[3:4] != b"-":
                break
        waited = time.monotonic() - t0
        for cmd in (b"EHLO good\r\n", b"MAIL FROM:<a@x>\r\n", b"RCPT TO:<b@y>\r\n", b"DATA\r\n"):
            w.write(cmd)
            await w.drain()
            reply = await asyncio.wait_for(r.readline(), 60)
            if not reply[:1] in (b"2", b"3"):
                return None
        w.write(b"Subject: t\r\n\r\nhi\r\n.\r\nQUIT\r\n")
        await w.drain()
        ok = (await asyncio.wait_for(r.readline(), 60)).startswith(b"250")
        w.close()
        return waited if ok else None
    except (OSError, asyncio.TimeoutError):
        return None


def p99(xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * 0.99))] if xs else float("nan")


def usage(pid):
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


async def run(action):
    backend = Backend()
    server = await asyncio.start_server(backend.handle, "127.0.0.1", 0)
    bport = server.sockets[0].getsockname()[1]
    port, mport = free_port(), free_port()
    mx = subprocess.Popen(
        [MXGATE, "run", "--hostname", "mx.bench", "--backend", f"127.0.0.1:{bport}",
         "--listen", f"127.0.0.1:{port}", "--metrics", f"127.0.0.1:{mport}",
         "--max-connections", str(SLOTS), "--max-per-source", "5", "--queue-timeout", "60s",
         "--proxy-protocol", "v1", "--pregreet", action, "--pregreet-wait", WAIT,
         "--pregreet-wait-busy", WAIT],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={k: v for k, v in {**os.environ, "RUST_LOG": "error"}.items() if k != "STATE_DIRECTORY"})
    try:
        for _ in range(500):
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                await asyncio.sleep(0.02)
        flood = [asyncio.create_task(bot(addr(60, i), port, 0)) for i in range(BOTS)]
        flood += [asyncio.create_task(bot(addr(61, i), port, 1.0)) for i in range(SLOW)]
        await asyncio.sleep(0.5)
        first = await asyncio.gather(*(sender(addr(62, i), port) for i in range(GOOD)))
        peak = usage(mx.pid)
        again = await asyncio.gather(*(sender(addr(62, i), port) for i in range(GOOD)))
        peak = max(peak, usage(mx.pid))
        for t in flood:
            t.cancel()
        await asyncio.gather(*flood, return_exceptions=True)
    finally:
        mx.terminate()
        mx.wait()
        server.close()
        await asyncio.sleep(0.1)
    ok1 = [x for x in first if x is not None]
    ok2 = [x for x in again if x is not None]
    print(f"pregreet = {action}: bots {BOTS} + slow {SLOW}, senders {GOOD} x 2, wait {WAIT}, hold {HOLD}s")
    print(f"  backend sessions: bots {backend.sessions['bot']}, slow bots {backend.sessions['slow']}, senders {backend.sessions['good']}")
    print(f"  senders failed: first contact {GOOD - len(ok1)}, cached {GOOD - len(ok2)}")
    print(f"  greeting wait p99: first contact {p99(ok1) * 1000:.0f} ms, cached {p99(ok2) * 1000:.0f} ms")
    print(f"  mxgate at the flood: RSS {peak[0] / 1024:.1f} MiB, {peak[1]} descriptors")


def main():
    if not os.path.exists(MXGATE):
        sys.exit(f"pregreet_bots: build first: {MXGATE} is missing")
    for action in ACTIONS:
        asyncio.run(run(action))


if __name__ == "__main__":
    main()
