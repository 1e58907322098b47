#!/usr/bin/env python3
"""How fairly a full cluster serves its hosts: 3 mxgate processes sharing one global limit
through one redis-server, in front of one unlimited backend (Postfix's smtp-sink).

Each host gets closed-loop clients, each from its own 127.x source: connect, wait for the
greeting, hold the session SESSION_S, QUIT, and at once again, for RUN_S. The cluster's
global limit is LIMIT, so the hosts' demands together are far above it. Per host it reports
the sessions delivered (greeted within the run), the clients refused (with what), the wait
for the greeting at p50 and p99, and, sampled half-way through, the host's own
mxgate_connections_active and mxgate_connections_queued next to Redis's count.

    python3 benches/cluster_fairness.py [ROUNDS] [equal|unequal]

Two cases (or the one named), ROUNDS rounds each (3 by default):
- equal demand, 30 clients per host: the target is min/max delivered >= 0.8 in every round;
- unequal demand, 30, 5 and 5: the light hosts' p99 wait is to be at most one session.

Bounded: about 15 s a round; everything it starts is stopped at the end. The figures depend
on the machine being mostly idle (the client loop here is Python, on the same cores).
"""
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MXGATE = os.path.join(ROOT, "target", "release", "mxgate")
NAME = "fair"
LIMIT = 20
SESSION_S = 1.0
RUN_S = 10.0
QUEUE_TIMEOUT_S = 5
HOSTS = ("a", "b", "c")


def redis_call(port, *args):
    """One command over a fresh connection, in RESP; the reply parsed for ints and arrays."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    out = f"*{len(args)}\r\n".encode()
    for a in args:
        a = str(a).encode()
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    s.sendall(out)
    f = s.makefile("rb")

    def read():
        line = f.readline()
        kind, rest = line[:1], line[1:-2]
        if kind == b"*":
            return [read() for _ in range(int(rest))]
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else f.read(n + 2)[:-2].decode()
        if kind == b":":
            return int(rest)
        if kind == b"-":
            raise SystemExit(f"redis: {rest.decode()}")
        return rest.decode()

    v = read()
    s.close()
    return v


def redis_count(port, key):
    flat = redis_call(port, "HGETALL", f"mxgate:{NAME}:{key}") or []
    return {flat[i]: int(flat[i + 1]) for i in range(0, len(flat), 2)}


def gauge(mport, name):
    try:
        s = socket.create_connection(("127.0.0.1", mport), timeout=2)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        body = b""
        while chunk := s.recv(65536):
            body += chunk
        s.close()
    except OSError:
        return None
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


async def client(port, source, stop_at, stats):
    """One closed-loop client until `stop_at`."""
    loop = asyncio.get_running_loop()
    while loop.time() < stop_at:
        s = socket.socket()
        s.setblocking(False)
        s.bind((source, 0))
        t0 = loop.time()
        try:
            await loop.sock_connect(s, ("127.0.0.1", port))
            r, w = await asyncio.open_connection(sock=s)
            line = await asyncio.wait_for(r.readline(), QUEUE_TIMEOUT_S + 5)
        except (OSError, asyncio.TimeoutError) as e:
            stats["errors"][type(e).__name__] = stats["errors"].get(type(e).__name__, 0) + 1
            s.close()
            await asyncio.sleep(0.05)
            continue
        waited = loop.time() - t0
        if line.startswith(b"220"):
            if loop.time() <= stop_at:
                stats["delivered"] += 1
                stats["waits"].append(waited)
            await asyncio.sleep(SESSION_S)
            w.write(b"QUIT\r\n")
            try:
                await w.drain()
                await asyncio.wait_for(r.read(), 5)
            except (OSError, asyncio.TimeoutError):
                pass
        else:
            words = line.decode(errors="replace").strip()[:60] or "(closed)"
            stats["refused"][words] = stats["refused"].get(words, 0) + 1
            stats["refused_waits"].append(waited)
        w.close()


def pct(values, p):
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


async def one_round(hosts, demand, rnd, rport):
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + RUN_S
    stats = {h: {"delivered": 0, "waits": [], "refused": {}, "refused_waits": [],
                 "errors": {}} for h in HOSTS}
    tasks = []
    # Started interleaved (a1, b1, c1, a2, ...): the hosts' demands arrive together. Started
    # host by host, the first would take the whole limit before the others asked at all, and
    # keep that first second's head start in its count.
    for i in range(max(demand)):
        for hi, h in enumerate(HOSTS):
            if i < demand[hi]:
                source = f"127.{10 + hi}.{rnd}.{i + 1}"
                tasks.append(asyncio.create_task(
                    client(hosts[h][0], source, stop_at, stats[h])))
    await asyncio.sleep(RUN_S / 2)
    sample = {h: (gauge(hosts[h][1], "mxgate_connections_active"),
                  gauge(hosts[h][1], "mxgate_connections_queued")) for h in HOSTS}
    sample["redis"] = redis_count(rport, "g")
    await asyncio.gather(*tasks)
    return stats, sample


def report(case, rnd, demand, stats, sample):
    delivered = [stats[h]["delivered"] for h in HOSTS]
    ratio = min(delivered) / max(delivered) if max(delivered) else float("nan")
    print(f"\n{case}, round {rnd + 1}: demand {'/'.join(map(str, demand))}, "
          f"delivered {'/'.join(map(str, delivered))}, min/max {ratio:.2f}")
    print(f"  half-way: Redis g {sample['redis']}")
    for hi, h in enumerate(HOSTS):
        st = stats[h]
        refused = ", ".join(f"{n} x {k!r}" for k, n in st["refused"].items()) or "none"
        print(f"  host {h}: {st['delivered']:4d} delivered, wait p50 {pct(st['waits'], 50):.3f} s"
              f" p99 {pct(st['waits'], 99):.3f} s; refused {refused}; "
              f"half-way active {sample[h][0]:.0f} queued {sample[h][1]:.0f}"
              + (f"; errors {st['errors']}" if st["errors"] else ""))
    return ratio, [pct(stats[h]["waits"], 99) for h in HOSTS]


def wait_idle(rport):
    end = time.time() + 15
    while sum(redis_count(rport, "g").values()) != 0:
        if time.time() > end:
            raise SystemExit("the cluster's count never returned to 0 between rounds")
        time.sleep(0.05)


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    cases = [c for c in (("equal", (30, 30, 30)), ("unequal", (30, 5, 5)))
             if len(sys.argv) < 3 or c[0] == sys.argv[2]]
    if not cases:
        raise SystemExit(f"no case named {sys.argv[2]!r}: equal or unequal")
    for tool in ("redis-server", "smtp-sink"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed")
    if not os.path.exists(MXGATE):
        subprocess.run(["cargo", "build", "--release", "--bin", "mxgate"], cwd=ROOT, check=True)
    procs = []
    try:
        rport, sport = common.free_port(), common.free_port()
        procs.append(subprocess.Popen(
            ["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL))
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        procs.append(subprocess.Popen(["smtp-sink"] + user + [f"127.0.0.1:{sport}", "1000"],
                                      stdout=subprocess.DEVNULL))
        common.wait_port(rport)
        common.wait_port(sport)
        hosts = {}
        for h in HOSTS:
            port, mport = common.free_port(), common.free_port()
            procs.append(subprocess.Popen(
                [MXGATE, "run", "--backend", f"127.0.0.1:{sport}",
                 "--listen", f"127.0.0.1:{port}", "--metrics", f"127.0.0.1:{mport}",
                 "--hostname", "mx.test", "--pregreet", "off", "--max-connections", str(LIMIT),
                 "--max-per-source", "100", "--max-queued", "1000",
                 "--queue-timeout", f"{QUEUE_TIMEOUT_S}s",
                 "--cluster-redis", f"redis://127.0.0.1:{rport}/0", "--cluster-name", NAME,
                 "--cluster-instance", h, "--cluster-lease-ttl", "3s",
                 "--cluster-fallback-share", "0.5"],
                env=dict(os.environ, RUST_LOG="error")))
            hosts[h] = (port, mport)
        for h, (port, mport) in hosts.items():
            common.wait_port(port)
            end = time.time() + 20
            while not (gauge(mport, "mxgate_cluster_connected") == 1
                       and gauge(mport, "mxgate_cluster_warming") in (None, 0)):
                if time.time() > end:
                    raise SystemExit(f"host {h} never joined the cluster, or never warmed up")
                time.sleep(0.05)
        version = redis_call(rport, "INFO", "server").split("redis_version:")[1].split()[0]
        print(f"redis {version}; {os.cpu_count()} cores shared by redis-server, 3 mxgate, "
              f"smtp-sink and this client; global limit {LIMIT}, {SESSION_S:.0f} s sessions, "
              f"{RUN_S:.0f} s runs, queue_timeout {QUEUE_TIMEOUT_S} s")
        verdicts = []
        print(f"redis port {rport}", flush=True)
        for case, demand in cases:
            for rnd in range(rounds):
                wait_idle(rport)
                tag = rnd + (0 if case == "equal" else rounds)
                stats, sample = asyncio.run(one_round(hosts, demand, tag, rport))
                ratio, p99 = report(case, rnd, demand, stats, sample)
                if case == "equal":
                    verdicts.append((case, rnd, ratio >= 0.8, f"min/max {ratio:.2f} (>= 0.8)"))
                else:
                    light = max(p99[1:])
                    verdicts.append((case, rnd, light <= SESSION_S,
                                     f"light hosts' p99 wait {light:.3f} s (<= {SESSION_S:.0f} s)"))
        print("\nverdicts:")
        for case, rnd, ok, what in verdicts:
            print(f"  {case} round {rnd + 1}: {'met' if ok else 'MISSED'}: {what}")
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


if __name__ == "__main__":
    main()
