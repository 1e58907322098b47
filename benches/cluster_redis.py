#!/usr/bin/env python3
"""What one clustered admission costs Redis, and how many of them one Redis takes.

Starts a redis-server (persistence off), Postfix's smtp-sink as the backend and one mxgate
in a cluster, all on loopback, then measures two things:

(a) Per session, in a real run: Redis's INFO stats and commandstats are read before and after
    N sequential SMTP sessions (connect, greeting, QUIT) and once all their releases have
    reached Redis (its global hash is empty again). The deltas, per session: EVALSHA calls,
    the commands the scripts ran inside Redis, and the bytes Redis read and wrote. This
    bench's own INFO and polling traffic is subtracted exactly (it counts its own bytes and
    commands, and checks that model against an idle Redis first); the lease refreshes are
    measured in an idle window afterwards and subtracted at their rate.

(b) Throughput of one Redis: redis-benchmark runs the very ADMIT and RELEASE scripts mxgate
    loaded (their SHA1 computed from src/cluster/script.rs as redis::Script does, and checked
    with SCRIPT EXISTS), under the live lease and token mxgate registered, with random
    sources, at a few client counts and pipeline depths; PING as the ceiling.

    python3 benches/cluster_redis.py [SESSIONS]

SESSIONS defaults to 2000. Bounded: about two minutes on 2 cores (the unpipelined cells take
most of it); everything it starts is stopped at the end. redis-benchmark shares the cores
with redis-server, which the figures depend on.
"""
import csv
import hashlib
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MXGATE = os.path.join(ROOT, "target", "release", "mxgate")
SCRIPT_RS = os.path.join("src", "cluster", "script.rs")
PACE_RS = os.path.join("src", "cluster", "pace.rs")
NAME = "bench"
INSTANCE = "mx1"
PREFIX = f"mxgate:{NAME}:"
LEASE_TTL_S = 10
HUGE = 10 ** 12
# (clients, pipeline, requests) per redis-benchmark run.
LOADS = [(1, 1, 20000), (16, 1, 50000), (50, 1, 50000), (1, 16, 50000), (50, 16, 100000)]
KEYSPACE = 100000


def gauge(text, name):
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


class Redis:
    """A minimal RESP2 client that logs, per command, its name and the bytes it sent and
    received, so its own traffic can be taken out of Redis's counters exactly."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.buf = b""
        self.log = []  # (command name, bytes sent, bytes received)

    def _fill(self):
        b = self.sock.recv(65536)
        if not b:
            raise ConnectionError("redis closed the connection")
        self.buf += b
        self._got += len(b)

    def _line(self):
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            return RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                self._fill()
            data, self.buf = self.buf[:n], self.buf[n + 2:]
            return data.decode()
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._reply() for _ in range(n)]
        raise ValueError(f"bad reply {line!r}")

    def call(self, *args):
        parts = [f"*{len(args)}\r\n".encode()]
        for a in args:
            a = str(a).encode()
            parts.append(f"${len(a)}\r\n".encode() + a + b"\r\n")
        out = b"".join(parts)
        self.sock.sendall(out)
        self._got = 0
        r = self._reply()
        self.log.append((str(args[0]).lower(), len(out), self._got))
        if isinstance(r, RuntimeError):
            raise r
        return r

    def info(self, *sections):
        """One INFO call, parsed; also returns its place in the log."""
        text = self.call("INFO", *sections)
        out = {}
        for line in text.splitlines():
            if ":" in line and not line.startswith("#"):
                k, v = line.split(":", 1)
                if k.startswith("cmdstat_"):
                    out[k] = {f.split("=")[0]: float(f.split("=")[1]) for f in v.split(",")}
                else:
                    out[k] = v
        return out, len(self.log) - 1


def snapshot(r):
    return r.info("stats", "commandstats")


def delta(r, a, b):
    """Redis's counters from snapshot a to b, this client's own traffic taken out.

    Redis counts a command's input bytes when it reads it, its output bytes when it writes
    the reply, and the command itself once it has run: so between two INFO replies it has
    counted this client's commands after the first INFO up to and including the second (in),
    the replies from the first INFO's up to but not including the second's (out), and the
    commands from the first INFO up to but not including the second."""
    (sa, ia), (sb, ib) = a, b
    mine_in = sum(x[1] for x in r.log[ia + 1:ib + 1])
    mine_out = sum(x[2] for x in r.log[ia:ib])
    mine_cmds = {}
    for name, _, _ in r.log[ia:ib]:
        mine_cmds[name] = mine_cmds.get(name, 0) + 1
    d = {
        "in": int(sb["total_net_input_bytes"]) - int(sa["total_net_input_bytes"]) - mine_in,
        "out": int(sb["total_net_output_bytes"]) - int(sa["total_net_output_bytes"]) - mine_out,
        "commands": int(sb["total_commands_processed"]) - int(sa["total_commands_processed"])
        - sum(mine_cmds.values()),
        "cmd": {},
    }
    for k, v in sb.items():
        if not k.startswith("cmdstat_"):
            continue
        name = k[len("cmdstat_"):]
        before = sa.get(k, {"calls": 0})["calls"]
        n = int(v["calls"] - before) - mine_cmds.get(name.split("|")[0], 0)
        if n:
            d["cmd"][name] = n
    return d


def session(port, source):
    s = socket.socket()
    s.settimeout(5)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    got = b""
    while b"\r\n" not in got:
        b = s.recv(4096)
        if not b:
            break
        got += b
    if not got.startswith(b"220"):
        raise SystemExit(f"no greeting from mxgate: {got!r}")
    s.sendall(b"QUIT\r\n")
    while s.recv(4096):
        pass
    s.close()


def scripts_from(text, hold_ms):
    """The scripts as mxgate builds them: the prelude, then (where the source has them) the
    demand's publishing with its hold in ms for ADMIT, RELEASE and REFRESH, and the max-min
    shares for ADMIT, then the body."""
    found = dict(re.findall(r'const (\w+): &str = r#"(.*?)"#;', text, re.S))
    prelude = found.pop("PRELUDE")
    shares = found.pop("SHARES", "")
    demand = found.pop("DEMAND", "").replace("HOLD_MS", str(hold_ms))
    return {k: prelude + (demand if k in ("ADMIT", "RELEASE", "REFRESH") else "")
            + (shares if k == "ADMIT" else "") + v for k, v in found.items()}


def hold_ms(text):
    """The demand's hold, `cluster::pace::ASK_EVERY` in ms, where the source has one."""
    found = re.search(r"ASK_EVERY: Duration = Duration::from_millis\((\d+)\)", text)
    return int(found.group(1)) if found else 0


def loaded_scripts(r):
    """The scripts as mxgate builds them (PRELUDE + body, hashed as redis::Script does), from
    the working tree or, if the binary was built before the last edits, from HEAD."""
    sources = []
    pace = os.path.join(ROOT, PACE_RS)
    with open(os.path.join(ROOT, SCRIPT_RS)) as f:
        sources.append(("working tree", f.read(),
                        open(pace).read() if os.path.exists(pace) else ""))
    head = [subprocess.run(["git", "-C", ROOT, "show", f"HEAD:{path}"],
                           capture_output=True, text=True) for path in (SCRIPT_RS, PACE_RS)]
    if head[0].returncode == 0:
        sources.append(("HEAD", head[0].stdout, head[1].stdout))
    for where, text, pace in sources:
        texts = scripts_from(text, hold_ms(pace))
        shas = {k: hashlib.sha1(v.encode()).hexdigest() for k, v in texts.items()}
        if all(r.call("SCRIPT", "EXISTS", shas[k])[0] == 1 for k in ("ADMIT", "RELEASE")):
            return where, shas, "const SHARES" in text
    raise SystemExit("none of the script texts found matches what mxgate loaded into Redis")


def bench(port, args, clients, pipeline, n):
    out = subprocess.run(
        ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-c", str(clients),
         "-P", str(pipeline), "-n", str(n), "-r", str(KEYSPACE), "--csv"] + args,
        capture_output=True, text=True, check=True).stdout
    rows = list(csv.reader(io.StringIO(out)))
    return float(rows[-1][1])


def main():
    sessions = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    for tool in ("redis-server", "redis-benchmark", "smtp-sink"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed")
    if not os.path.exists(MXGATE):
        subprocess.run(["cargo", "build", "--release", "--bin", "mxgate"], cwd=ROOT, check=True)
    procs = []
    started = time.monotonic()
    try:
        rport = common.free_port()
        procs.append(subprocess.Popen(
            ["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL))
        sport = common.free_port()
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        procs.append(subprocess.Popen(["smtp-sink"] + user + [f"127.0.0.1:{sport}", "1000"],
                                      stdout=subprocess.DEVNULL))
        common.wait_port(rport)
        common.wait_port(sport)
        r = Redis(rport)
        version = r.info("server")[0]["redis_version"]

        # The accounting of this client's own traffic, checked on an idle Redis.
        a = snapshot(r)
        for _ in range(5):
            r.call("PING")
        r.call("HGETALL", PREFIX + "g")
        check = delta(r, a, snapshot(r))
        if check["in"] or check["out"] or check["commands"] or check["cmd"]:
            raise SystemExit(f"own-traffic accounting is off on an idle Redis: {check}")

        port, mport = common.free_port(), common.free_port()
        procs.append(subprocess.Popen(
            [MXGATE, "run", "--backend", f"127.0.0.1:{sport}", "--listen", f"127.0.0.1:{port}",
             "--metrics", f"127.0.0.1:{mport}", "--hostname", "mx.test", "--pregreet", "off",
             "--max-per-source", "1000",
             "--cluster-redis", f"redis://127.0.0.1:{rport}/0", "--cluster-name", NAME,
             "--cluster-instance", INSTANCE, "--cluster-lease-ttl", f"{LEASE_TTL_S}s"],
            env=dict(os.environ, RUST_LOG="error")))
        common.wait_port(port)
        common.wait_port(mport)
        # Connected, and past the warm-up of a fresh Redis (one lease; its end brings one
        # extra refresh, which must not fall in a measured window).
        end = time.time() + LEASE_TTL_S + 10
        while True:
            text = common.metrics_text(mport)
            if gauge(text, "mxgate_cluster_connected") == 1 \
                    and gauge(text, "mxgate_cluster_warming") in (None, 0) \
                    and r.call("EXISTS", PREFIX + "warm") == 0:
                break
            if time.time() > end:
                raise SystemExit("the cluster instance never connected, or never warmed up")
            time.sleep(0.05)
        # demand: the scripts take the instance's demand (ADMIT's last argument, RELEASE's
        # first after the token).
        where, shas, demand = loaded_scripts(r)

        # (a) N sequential sessions, then until Redis's global count is back to 0.
        a = snapshot(r)
        t0 = time.monotonic()
        for i in range(sessions):
            session(port, f"127.0.{1 + (i // 250) % 250}.{i % 250 + 1}")
        t_sessions = time.monotonic() - t0
        polls = 0
        end = time.time() + 10
        while sum(int(v) for v in r.call("HGETALL", PREFIX + "g")[1::2]) != 0:
            polls += 1
            if time.time() > end:
                raise SystemExit("the releases never reached Redis")
            time.sleep(0.002)
        b = snapshot(r)
        t_window = time.monotonic() - t0
        busy = delta(r, a, b)
        fallback = gauge(common.metrics_text(mport), "mxgate_cluster_fallback_admissions_total") or 0

        # The lease refreshes alone: an idle window of at least one lease (3 refreshes).
        t_idle = max(t_window, LEASE_TTL_S)
        c = snapshot(r)
        t1 = time.monotonic()
        while time.monotonic() - t1 < t_idle:
            time.sleep(0.05)
        idle = delta(r, c, snapshot(r))
        t_idle = time.monotonic() - t1
        scale = t_window / t_idle

        def per_session(v, idle_v):
            return (v - idle_v * scale) / sessions

        names = sorted(set(busy["cmd"]) | set(idle["cmd"]))
        per = {k: per_session(busy["cmd"].get(k, 0), idle["cmd"].get(k, 0)) for k in names}
        evalsha = per.pop("evalsha", 0)
        inner = {k: v for k, v in per.items() if abs(v) >= 0.005}

        # (b) One Redis's throughput for the scripts, under mxgate's live lease and token.
        token = r.call("HGET", PREFIX + "token", INSTANCE)
        epoch = r.call("HGET", PREFIX + "epoch", INSTANCE)
        admit = ["EVALSHA", shas["ADMIT"], "0", PREFIX, INSTANCE, "10.__rand_int__/32",
                 str(HUGE), "", "0", str(HUGE), "1", token, epoch] + (["1"] if demand else [])
        answer = r.call(*admit[:5], "10.0.0.1/32", *admit[6:])
        if answer[0] != 0:
            raise SystemExit(f"ADMIT does not admit under mxgate's lease: {answer}")
        # A busy cluster's global count: releases below never take it to zero.
        r.call("HINCRBY", PREFIX + "g", INSTANCE, HUGE)
        token_demand = [token] + (["0"] if demand else [])
        release1 = ["EVALSHA", shas["RELEASE"], "0", PREFIX, INSTANCE, *token_demand,
                    PREFIX + "s:10.__rand_int__/32", PREFIX + "g"]
        release16 = ["EVALSHA", shas["RELEASE"], "0", PREFIX, INSTANCE, *token_demand] \
            + [PREFIX + "s:10.__rand_int__/32", PREFIX + "g"] * 16
        r.call("CONFIG", "SET", "slowlog-log-slower-than", "1000")
        r.call("SLOWLOG", "RESET")
        rows = []
        for label, args, loads in (
                ("PING", ["PING"], LOADS),
                ("ADMIT", admit, LOADS),
                ("RELEASE, 1 session", release1, LOADS),
                ("RELEASE, batch of 16", release16, LOADS),
                ("ADMIT, 64 instances", admit, [LOADS[-1]])):
            if label == "ADMIT, 64 instances":
                # 63 more instances holding a field in the global count: count() sums them.
                for i in range(63):
                    r.call("HSET", PREFIX + "g", f"other{i}", 1)
            cells = []
            for clients, pipeline, n in loads:
                r.call("CONFIG", "RESETSTAT")
                rps = bench(rport, args, clients, pipeline, n)
                st = r.info("commandstats")[0]
                ev = st.get("cmdstat_evalsha", {"usec_per_call": 0, "failed_calls": 0})
                if ev.get("failed_calls", 0):
                    raise SystemExit(f"{label}: {int(ev['failed_calls'])} script calls failed")
                usec = st.get("cmdstat_ping", {}).get("usec_per_call", 0) \
                    if label == "PING" else ev["usec_per_call"]
                cells.append((clients, pipeline, n, rps, usec))
            rows.append((label, cells))
        slow = r.call("SLOWLOG", "GET", "10")
        for i in range(63):
            r.call("HDEL", PREFIX + "g", f"other{i}")

        # The report.
        print(f"redis {version}, {os.cpu_count()} cores shared by redis-server, "
              f"redis-benchmark, mxgate and smtp-sink; scripts from {where}")
        print(f"\n(a) {sessions} sequential sessions (connect, greeting, QUIT) in "
              f"{t_sessions:.2f} s; window to the last release {t_window:.2f} s; "
              f"fallback admissions {fallback:.0f}")
        print(f"    idle window {t_idle:.1f} s: {idle['cmd'].get('evalsha', 0)} refreshes, "
              f"{idle['in']} B in, {idle['out']} B out, {idle['commands']} commands "
              f"(subtracted at that rate, x {scale:.2f})")
        print(f"    per refresh: {idle['in'] / max(1, idle['cmd'].get('evalsha', 1)):.0f} B in, "
              f"{idle['out'] / max(1, idle['cmd'].get('evalsha', 1)):.0f} B out, "
              f"{idle['commands'] / max(1, idle['cmd'].get('evalsha', 1)):.1f} commands")
        print(f"    this bench's own INFO and {polls + 1} polls taken out exactly")
        print("\n    per session                  value")
        print(f"    EVALSHA calls            {evalsha:8.2f}   (1 ADMIT + "
              f"{evalsha - 1:.2f} RELEASE batches)")
        print(f"    commands run in scripts  "
              f"{per_session(busy['commands'], idle['commands']) - evalsha:8.2f}")
        for k, v in sorted(inner.items(), key=lambda kv: -kv[1]):
            print(f"      {k:22} {v:8.2f}")
        print(f"    bytes into Redis         {per_session(busy['in'], idle['in']):8.1f}")
        print(f"    bytes out of Redis       {per_session(busy['out'], idle['out']):8.1f}")

        print(f"\n(b) redis-benchmark, requests/s (server µs per call in brackets); "
              f"-r {KEYSPACE} random sources")
        head = "".join(f"  -c{c:<3}-P{p:<3}" + " " * 6 for c, p, _ in LOADS)
        print(f"    {'':22}{head}")
        for label, cells in rows:
            line = "".join(f"  {rps:8.0f} ({usec:5.1f})" for _, _, _, rps, usec in cells)
            print(f"    {label:22}{line}")
        print(f"    requests per cell: " + ", ".join(
            f"-c{c} -P{p}: {n}" for c, p, n in LOADS))
        print(f"\n    SLOWLOG (over 1 ms): {len(slow)} entries")
        for e in slow:
            print(f"      {e[2]} us  {' '.join(e[3][:2])} ... ({len(e[3])} args)")
        print(f"\n    total run {time.monotonic() - started:.0f} s")
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
