#!/usr/bin/env python3
"""CPU per connection, side by side: where compare.py reports rates, this says what each one
costs. For each target, alternating, it runs the SMTP load (smtp-source against smtp-sink) or
the reject load (netload at a limit of 0) and prints, per connection: the proxy's CPU time,
smtp-sink's, the proxy's voluntary and involuntary context switches, and how busy the whole
machine was. Uses compare.py's targets, so every proxy runs as it does there.

    cargo build --release --bin mxgate --example netload
    python3 benches/cpu_per_connection.py smtp 3      # or: reject 3

With --syscalls it runs each target once under `strace -c` instead and prints the system calls
each proxy made per connection, side by side. strace slows the proxies down, so that mode
reports no rates, only counts.

    python3 benches/cpu_per_connection.py smtp --syscalls

MXBIN_BEFORE=/path/to/older/mxgate adds that build as a third target, "mxgate-before", in the
same run, for a change's before and after.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare as C  # noqa: E402
import common  # noqa: E402

MESSAGES = int(os.environ.get("MESSAGES", "10000"))
REJECT_SECONDS = 3
# With RATE, the reject load is paced at that many connections a second, the same for every
# proxy, instead of 32 clients each reconnecting as fast as it is answered.
RATE = os.environ.get("RATE")


def switches(pids):
    vol = invol = 0
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches"):
                        vol += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches"):
                        invol += int(line.split()[1])
    return vol, invol


def run_load(t, what):
    """Runs one load against `t`; returns how many connections it made, and per second."""
    if what == "reject":
        r = C.netload("reject", f"127.0.0.1:{t.smtp_port}", 32, REJECT_SECONDS, *([RATE] if RATE else []))
        return C.turned_away(r), r["per_second"]
    t0 = time.monotonic()
    subprocess.run(["smtp-source", "-s", "20", "-m", str(MESSAGES), "-l", "1000",
                    f"127.0.0.1:{t.smtp_port}"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return MESSAGES, MESSAGES / (time.monotonic() - t0)


def traced(t, what):
    """Runs one load against `t` with strace counting its system calls; returns
    ({syscall: calls}, connections)."""
    pids = t.pids()
    out = os.path.join(C.TMP, f"strace-{t.name}.txt")
    cmd = ["strace", "-c", "-f", "-o", out]
    for pid in pids:
        cmd += ["-p", str(pid)]
    want = sum(len(os.listdir(f"/proc/{pid}/task")) for pid in pids)
    st = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    # strace names every thread it attaches to; the load starts once all of them are traced.
    attached = 0
    while attached < want:
        line = st.stderr.readline()
        if not line:
            raise RuntimeError(f"strace stopped before attaching: {st.wait()}")
        m = re.search(r"attached(?: with (\d+) threads)?", line)
        if m:
            attached += int(m.group(1) or 1)
    conns, _ = run_load(t, what)
    st.send_signal(signal.SIGINT)
    st.communicate(timeout=60)
    calls = {}
    with open(out) as f:
        for line in f:
            fields = line.split()
            # "% time  seconds  usecs/call  calls  [errors]  syscall", numbers first.
            if len(fields) >= 5 and fields[3].isdigit() and fields[-1] != "total":
                calls[fields[-1]] = int(fields[3])
    return calls, conns


def syscalls_side_by_side(what, builders):
    per_conn = {}
    for name, build in builders.items():
        t = build()
        try:
            calls, conns = traced(t, what)
        finally:
            t.stop()
        per_conn[name] = {k: v / conns for k, v in calls.items()}
        print(f"{name}: {conns} connections traced", flush=True)
    names = list(per_conn)
    rows = sorted({k for c in per_conn.values() for k in c},
                  key=lambda k: -max(c.get(k, 0) for c in per_conn.values()))
    print(f"\n{what}: system calls per connection")
    print(f"{'syscall':16}" + "".join(f"{n:>16}" for n in names))
    for k in rows:
        if max(c.get(k, 0) for c in per_conn.values()) >= 0.01:
            print(f"{k:16}" + "".join(f"{per_conn[n].get(k, 0):16.2f}" for n in names))
    print(f"{'total':16}" + "".join(f"{sum(per_conn[n].values()):16.2f}" for n in names))


def machine():
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def main():
    args = [a for a in sys.argv[1:] if a != "--syscalls"]
    count_syscalls = len(args) < len(sys.argv) - 1
    what = args[0] if args else "smtp"
    rounds = int(args[1]) if len(args) > 1 else 2
    if what not in ("smtp", "reject"):
        sys.exit("usage: cpu_per_connection.py smtp|reject [ROUNDS] [--syscalls]")
    if count_syscalls and not shutil.which("strace"):
        sys.exit("--syscalls needs strace (apt-get install strace)")
    sink_port = common.free_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    sink = C.spawn(["smtp-sink", *user, f"127.0.0.1:{sink_port}", "1024"])
    common.wait_port(sink_port, timeout=30.0)
    reject = what == "reject"
    builders = {
        "mxgate-splice": lambda: C.mxgate_target("mxgate-splice", "splice", sink_port, 1, 1, reject),
        "haproxy": lambda: C.haproxy_target(sink_port, 1, 1, reject),
    }
    if C.MXGATE_BEFORE:
        builders["mxgate-before"] = lambda: C.mxgate_target(
            "mxgate-before", "splice", sink_port, 1, 1, reject, binary=C.MXGATE_BEFORE)
    try:
        if count_syscalls:
            syscalls_side_by_side(what, builders)
            return
        for _ in range(rounds):
            for name, build in builders.items():
                t = build()
                try:
                    pids = t.pids()
                    cpu0, sw0, st0 = C.cpu_seconds(pids), switches(pids), machine()
                    sink0 = C.cpu_seconds([sink.pid])
                    count, rate = run_load(t, what)
                    cpu, sw, st = C.cpu_seconds(pids) - cpu0, switches(pids), machine()
                    sink_cpu = C.cpu_seconds([sink.pid]) - sink0
                finally:
                    t.stop()
                d = [b - a for a, b in zip(st0, st)]
                busy = 1 - (d[3] + d[4]) / max(sum(d), 1)
                print(f"{what:6} {name:14} {rate:8.0f}/s  proxy CPU {1e6 * cpu / count:6.1f} us/conn  "
                      f"sink CPU {1e6 * sink_cpu / count:6.1f} us/conn  "
                      f"switches {(sw[0] - sw0[0]) / count:.2f} vol {(sw[1] - sw0[1]) / count:.2f} invol  "
                      f"machine busy {100 * busy:.0f}%", flush=True)
    finally:
        sink.kill()


if __name__ == "__main__":
    main()
