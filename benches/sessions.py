#!/usr/bin/env python3
"""Whole-machine cost per SMTP session, bulk GiB and idle session, in many alternating rounds.

A narrower companion to compare.py for decisions that turn on a few tens of microseconds per
session: only the SMTP session load (smtp-source -s 20 -l 1000 to smtp-sink), the 1-stream bulk
load and the idle hold, for direct, HAProxy and every mxgate forwarding mode, in ROUNDS rounds
with the order turned each round. Two measures each time: the proxy's own CPU (from
/proc/PID/stat) and the whole machine's busy CPU (from /proc/stat: user, nice, system, irq,
softirq), so work a design moves into softirq or kernel workers is counted. A proxy's overhead is
its whole-machine total minus direct's in the same round. Run it through benches/compare.sh's
build step first:

    cargo build --release --bin mxgate --example netload && ROUNDS=9 python3 benches/sessions.py
"""

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare as c  # noqa: E402
import common  # noqa: E402

ROUNDS = int(os.environ.get("ROUNDS") or 9)
MESSAGES = int(os.environ.get("MESSAGES") or 10000)
MODES = (os.environ.get("MODES") or "splice,copy").split(",")


# The bulk pair: a discarding sink and a sender of BULK_GIB GiB in 1 MiB writes, the same for
# every target (iperf3 is not needed here).
BULK_GIB = int(os.environ.get("BULK_GIB") or 2)
SINK = """
import socket, sys, threading
l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen(16)
print(l.getsockname()[1], flush=True)
def drain(s):
    b = bytearray(1 << 20)
    while s.recv_into(b):
        pass
    s.close()
while True:
    threading.Thread(target=drain, args=(l.accept()[0],), daemon=True).start()
"""
SEND = """
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
b = bytes(1 << 20)
for _ in range(int(sys.argv[2]) << 10):
    s.sendall(b)
s.shutdown(socket.SHUT_WR)
s.recv(1)
"""


def slab_kib():
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["Slab"].split()[0])


def one(t):
    pids = t.pids()
    r = {}
    p0, m0 = c.cpu_seconds(pids), c.machine_seconds()
    t0 = time.monotonic()
    subprocess.run(["smtp-source", "-s", "20", "-m", str(MESSAGES), "-l", "1000",
                    f"127.0.0.1:{t.smtp_port}"], check=True, timeout=600,
                   stdout=subprocess.DEVNULL)
    r["sessions_per_s"] = MESSAGES / (time.monotonic() - t0)
    r["proc_us"] = 1e6 * (c.cpu_seconds(pids) - p0) / MESSAGES if pids else 0.0
    r["machine_us"] = 1e6 * (c.machine_seconds() - m0) / MESSAGES
    r["load1"] = os.getloadavg()[0]
    p0, m0 = c.cpu_seconds(pids), c.machine_seconds()
    subprocess.run([sys.executable, "-c", SEND, str(t.iperf_port), str(BULK_GIB)], check=True, timeout=300)
    gib = BULK_GIB
    r["bulk_proc_s_per_gib"] = (c.cpu_seconds(pids) - p0) / gib if pids else 0.0
    r["bulk_machine_s_per_gib"] = (c.machine_seconds() - m0) / gib
    if pids:
        n = 2000
        s0, rss0 = slab_kib(), c.rss_kib(pids)
        p = subprocess.Popen([c.NETLOAD, "hold", f"127.0.0.1:{t.hold_port}", str(n)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        r["idle_slab_kib"] = (slab_kib() - s0) / n
        r["idle_rss_kib"] = (c.rss_kib(pids) - rss0) / n
        p.stdin.close()
        p.wait(timeout=60)
    return r


def main():
    sink = common.free_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    helpers = [c.spawn(["smtp-sink", *user, f"127.0.0.1:{sink}", "1024"])]
    bulk = subprocess.Popen([sys.executable, "-c", SINK], stdout=subprocess.PIPE, text=True)
    helpers.append(bulk)
    iperf = int(bulk.stdout.readline())
    greeter = subprocess.Popen([c.NETLOAD, "greet", "127.0.0.1:0"], stdout=subprocess.PIPE, text=True)
    helpers.append(greeter)
    greet = int(greeter.stdout.readline())
    common.wait_port(sink, timeout=30.0)
    common.wait_port(iperf, timeout=30.0)
    ports = (sink, iperf, greet)
    builders = [("direct", lambda: c.direct_target(*ports)), ("haproxy", lambda: c.haproxy_target(*ports))]
    for m in MODES:
        builders.append((f"mxgate-{m}", lambda m=m: c.mxgate_target(f"mxgate-{m}", m, *ports)))
    rounds = []
    try:
        for r in range(ROUNDS):
            turn = builders[r % len(builders):] + builders[:r % len(builders)]
            rounds.append(c.run_each(f"round {r + 1}/{ROUNDS}: ", turn, one))
    finally:
        for t in list(c.LIVE):
            t.stop()
        for p in helpers:
            p.kill()
            p.wait()
    json.dump(rounds, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
