#!/usr/bin/env python3
"""The pregreet test against a bot flood: do bots reach the backend, and how long do real senders
wait for the greeting?

A backend that takes 50 sessions (mxgate's max_connections = 50, its queue on) and holds each
one 500 ms. It reads the PROXY v1 header mxgate sends it, so it knows which client each session
is for. Load, all on loopback, each client from its own address:
- BOTS sources (127.60.x.y) that speak at once after connecting, then hold the connection HOLD s;
- SLOW sources (127.61.x.y) that speak after 1 s, then hold it HOLD s;
  (the bots run in two processes of their own, with blocking sockets, so that their timing
  does not depend on the event loop that drives the senders: see `flood`)
- GOOD well-behaved senders (127.62.0.x), each a first contact: they wait for the whole greeting
  (its `220 ` line), say EHLO, MAIL, RCPT, DATA, QUIT, timing connect -> the greeting's final
  line. Then each sends once more (cached);
- SWAKS runs of swaks, each from its own address (127.64.0.x), each a first contact;
- a real Postfix (a private instance, run as root, relaying everything to mxgate from 127.63.0.1)
  given MESSAGES messages at the start of the flood.
Measured for each `pregreet` action: backend sessions bots got, Postfix's deferrals, the
senders' connect -> final greeting line (first contact, then cached), swaks' deliveries,
mxgate's largest RSS and descriptor count while the flood lasts (sampled every 0.5 s).

    cargo build --release --bin mxgate
    sudo python3 benches/pregreet_bots.py                                  # the issue's sizes
    BOTS=200 SLOW=20 GOOD=10 SWAKS=5 MESSAGES=10 HOLD=3 WAIT=2s python3 benches/pregreet_bots.py

Without root (or without postfix or swaks installed) those parts are left out, and said so.
"""

import asyncio
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MXGATE = os.environ.get("MXBIN") or os.path.join(ROOT, "target/release/mxgate")
BOTS = int(os.environ.get("BOTS") or 2000)
SLOW = int(os.environ.get("SLOW") or 200)
GOOD = int(os.environ.get("GOOD") or 50)
HOLD = float(os.environ.get("HOLD") or 30)
WAIT = os.environ.get("WAIT") or "6s"
ACTIONS = (os.environ.get("ACTIONS") or "drop,ignore").split(",")
SWAKS = int(os.environ.get("SWAKS") or 50)
MESSAGES = int(os.environ.get("MESSAGES") or 100)
SLOTS = 50
SESSION = 0.5


def addr(prefix, i):
    return f"127.{prefix}.{i // 250}.{i % 250 + 1}"


class Backend:
    """Greets, holds each session SESSION s (or until QUIT), records who each was for."""

    def __init__(self):
        self.sessions = {"bot": 0, "slow": 0, "good": 0, "postfix": 0, "swaks": 0}
        self.delivered = {"postfix": 0, "swaks": 0, "good": 0}

    async def handle(self, r, w):
        try:
            header = await asyncio.wait_for(r.readline(), 5)
            src = header.split()[2].decode() if header.startswith(b"PROXY") else "?"
            kind = {"60": "bot", "61": "slow", "62": "good", "63": "postfix",
                    "64": "swaks"}.get(src.split(".")[1], "good")
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
                    if kind in self.delivered:
                        self.delivered[kind] += 1
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


def flood(prefix, count, port, after, out):
    """A process of its own: `count` bots from 127.`prefix`.x.y, each connecting and then
    speaking `after` s later, then holding the connection HOLD s (or until mxgate closes it).
    Blocking sockets, the first line written right after connect() returns: a bot's timing
    does not depend on an event loop getting round to it. (In an asyncio loop shared with the
    senders, a run on a host at load 10 wrote most bots' first line over 6 s after the
    connect; quiet that long, they passed the test, as any quiet client does.) Puts on `out`
    how late each bot spoke: seconds from the start of its connect to its write, past `after`."""
    import selectors
    bots, late = [], []
    for i in range(count):
        s = socket.socket()
        try:
            s.bind((addr(prefix, i), 0))
            t0 = time.monotonic()
            s.connect(("127.0.0.1", port))
            if not after:
                s.send(b"EHLO bot\r\n")
                late.append(time.monotonic() - t0)
            bots.append((s, t0))
        except OSError:
            s.close()
    for s, t0 in bots if after else ():
        time.sleep(max(0.0, t0 + after - time.monotonic()))
        try:
            s.send(b"EHLO bot\r\n")
            late.append(time.monotonic() - t0 - after)
        except OSError:
            pass
    sel = selectors.DefaultSelector()
    for s, _ in bots:
        sel.register(s, selectors.EVENT_READ)
    end = time.monotonic() + HOLD
    while sel.get_map() and time.monotonic() < end:
        for key, _ in sel.select(max(0.0, end - time.monotonic())):
            try:
                gone = not key.fileobj.recv(4096)
            except OSError:
                gone = True
            if gone:
                sel.unregister(key.fileobj)
                key.fileobj.close()
    for s, _ in bots:
        s.close()
    out.put(late)


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


MASTER_CF = """pickup unix n - n 60 1 pickup
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
smtp unix - - n - - smtp
relay unix - - n - - smtp
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
"""


class Postfix:
    """A private Postfix that relays everything to mxgate from 127.63.0.1; no smtpd listener."""

    def __init__(self, port):
        self.dir = tempfile.mkdtemp(prefix="mxgate-bench-postfix-")
        os.chmod(self.dir, 0o755)
        for sub in ("etc", "queue", "data"):
            os.mkdir(os.path.join(self.dir, sub))
        shutil.chown(os.path.join(self.dir, "data"), "postfix")
        d = self.dir
        with open(os.path.join(d, "etc/main.cf"), "w") as f:
            f.write(f"""compatibility_level = 3.6
queue_directory = {d}/queue
data_directory = {d}/data
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
relayhost = [127.0.0.1]:{port}
smtp_bind_address = 127.63.0.1
smtp_dns_support_level = disabled
smtp_tls_security_level = none
alias_maps =
alias_database =
maillog_file = {d}/maillog
maillog_file_prefixes = {d}
syslog_name = postfix-bench
""")
        with open(os.path.join(d, "etc/master.cf"), "w") as f:
            f.write(MASTER_CF)
        subprocess.run(["postfix", "-c", f"{d}/etc", "start"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def send(self, n):
        for i in range(n):
            subprocess.run(["sendmail", "-C", f"{self.dir}/etc", "-f", "a@postfix.bench",
                            f"rcpt{i}@example.net"], input=b"Subject: bench\n\nhi\n", check=True)

    def log(self):
        try:
            with open(os.path.join(self.dir, "maillog")) as f:
                return f.read()
        except OSError:
            return ""

    def stop(self):
        subprocess.run(["postfix", "-c", f"{self.dir}/etc", "stop"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(self.dir, ignore_errors=True)


async def swaks(src, port):
    p = await asyncio.create_subprocess_exec(
        "swaks", "--server", f"127.0.0.1:{port}", "--local-interface", src,
        "--from", "a@swaks.bench", "--to", "b@example.net", "--timeout", "120",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    return await p.wait() == 0


def have(tool):
    return shutil.which(tool) is not None


async def sample(pid, peak, stop):
    while not stop.is_set():
        try:
            rss, fds = usage(pid)
        except OSError:
            return
        peak[0], peak[1] = max(peak[0], rss), max(peak[1], fds)
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except asyncio.TimeoutError:
            pass


async def run(action):
    backend = Backend()
    server = await asyncio.start_server(backend.handle, "127.0.0.1", 0, backlog=4096)
    bport = server.sockets[0].getsockname()[1]
    port, mport = common.free_port(), common.free_port()
    mx = subprocess.Popen(
        [MXGATE, "run", "--hostname", "mx.bench", "--backend", f"127.0.0.1:{bport}",
         "--listen", f"127.0.0.1:{port}", "--metrics", f"127.0.0.1:{mport}",
         "--max-connections", str(SLOTS), "--max-per-source", "25", "--queue-timeout", "60s",
         "--max-queued", "5000",
         "--proxy-protocol", "v1", "--pregreet", action, "--pregreet-wait", WAIT,
         "--pregreet-wait-busy", WAIT],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={k: v for k, v in {**os.environ, "RUST_LOG": "error"}.items() if k != "STATE_DIRECTORY"})
    postfix = None
    try:
        for _ in range(500):
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                await asyncio.sleep(0.02)
        use_postfix = os.geteuid() == 0 and have("postfix") and MESSAGES > 0
        use_swaks = have("swaks") and SWAKS > 0
        peak, stop = [0, 0], asyncio.Event()
        sampler = asyncio.create_task(sample(mx.pid, peak, stop))
        spoke = multiprocessing.Queue()
        floods = [multiprocessing.Process(target=flood, args=(60, BOTS, port, 0, spoke)),
                  multiprocessing.Process(target=flood, args=(61, SLOW, port, 1.0, spoke))]
        for f in floods:
            f.start()
        await asyncio.sleep(0.5)
        if use_postfix:
            postfix = Postfix(port)
            await asyncio.get_running_loop().run_in_executor(None, postfix.send, MESSAGES)
        swaked = asyncio.gather(*(swaks(addr(64, i), port) for i in range(SWAKS))) if use_swaks else None
        first = await asyncio.gather(*(sender(addr(62, i), port) for i in range(GOOD)))
        again = await asyncio.gather(*(sender(addr(62, i), port) for i in range(GOOD)))
        swaks_ok = sum(await swaked) if swaked else None
        deadline = time.monotonic() + 120
        while postfix and backend.delivered["postfix"] < MESSAGES and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        loop = asyncio.get_running_loop()
        lateness = [x for _ in floods for x in await loop.run_in_executor(None, spoke.get)]
        for f in floods:
            f.join()
        stop.set()
        await sampler
        log = postfix.log() if postfix else ""
        counts = pregreet_counts(common.metrics_text(mport))
    finally:
        if postfix:
            postfix.stop()
        mx.terminate()
        mx.wait()
        server.close()
        await asyncio.sleep(0.1)
    ok1 = [x for x in first if x is not None]
    ok2 = [x for x in again if x is not None]
    print(f"pregreet = {action}: bots {BOTS} + slow {SLOW}, senders {GOOD} x 2, swaks {SWAKS}, "
          f"postfix {MESSAGES if postfix else 'left out'}, wait {WAIT}, hold {HOLD}s")
    s = backend.sessions
    print(f"  backend sessions: bots {s['bot']}, slow bots {s['slow']}, senders {s['good']}, "
          f"swaks {s['swaks']}, postfix {s['postfix']}")
    if postfix:
        sent = sum(1 for l in log.splitlines() if "status=sent" in l)
        deferred = sum(1 for l in log.splitlines() if "status=deferred" in l)
        print(f"  postfix: {backend.delivered['postfix']} of {MESSAGES} delivered, "
              f"{sent} sent, {deferred} deferrals")
    if swaks_ok is not None:
        print(f"  swaks: {swaks_ok} of {SWAKS} delivered")
    wait = float(WAIT.rstrip("s"))
    print(f"  bots that spoke, by the load generator's clock: {len(lateness)} of {BOTS + SLOW}; "
          f"latest {max(lateness, default=0) * 1000:.0f} ms past their time, "
          f"{sum(1 for x in lateness if x >= wait)} at or past the wait")
    print(f"  senders failed: first contact {GOOD - len(ok1)}, cached {GOOD - len(ok2)}")
    print(f"  greeting wait p99: first contact {p99(ok1) * 1000:.0f} ms, cached {p99(ok2) * 1000:.0f} ms")
    print(f"  mxgate during the flood, largest: RSS {peak[0] / 1024:.1f} MiB, {peak[1]} descriptors")
    print("  mxgate's counts: " + ", ".join(f"{k} {v:.0f}" for k, v in counts.items()))


def pregreet_counts(text):
    """mxgate's pregreet verdicts and its refusals by reason, from its /metrics text."""
    counts = {}
    for line in text.splitlines():
        if line.startswith("mxgate_pregreet_total{"):
            result = line.split('result="')[1].split('"')[0]
            counts[f"pregreet {result}"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("mxgate_connections_rejected_total{"):
            reason = line.split('reason="')[1].split('"')[0]
            counts[f"refused {reason}"] = float(line.rsplit(" ", 1)[1])
    return counts


def main():
    if not os.path.exists(MXGATE):
        sys.exit(f"pregreet_bots: build first: {MXGATE} is missing")
    print(f"load average before: {os.getloadavg()[0]:.2f} (a shared machine: figures under load)")
    for action in ACTIONS:
        asyncio.run(run(action))


if __name__ == "__main__":
    main()
