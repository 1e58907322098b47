#!/usr/bin/env python3
"""CPU per connection, side by side: where compare.py reports rates, this says what each one
costs. For each target, alternating, it runs the SMTP load (smtp-source against smtp-sink) or
the reject load (netload at a limit of 0) and prints, per connection: the proxy's CPU time,
smtp-sink's, the proxy's voluntary and involuntary context switches, and how busy the whole
machine was. Uses compare.py's targets, so every proxy runs as it does there.

    cargo build --release --bin mxgate --example netload
    python3 benches/cpu_per_connection.py smtp 3      # or: reject 3
"""

import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare as C  # noqa: E402

MESSAGES = int(os.environ.get("MESSAGES", "10000"))
REJECT_SECONDS = 3


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


def machine():
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def main():
    what = sys.argv[1] if len(sys.argv) > 1 else "smtp"
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    if what not in ("smtp", "reject"):
        sys.exit("usage: cpu_per_connection.py smtp|reject [ROUNDS]")
    sink_port = C.free_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    sink = C.spawn(["smtp-sink", *user, f"127.0.0.1:{sink_port}", "1024"])
    C.wait_port(sink_port)
    reject = what == "reject"
    builders = {
        "mxgate-splice": lambda: C.mxgate_target("mxgate-splice", "splice", sink_port, 1, 1, reject),
        "haproxy": lambda: C.haproxy_target(sink_port, 1, 1, reject),
    }
    try:
        for _ in range(rounds):
            for name, build in builders.items():
                t = build()
                try:
                    pids = t.pids()
                    cpu0, sw0, st0 = C.cpu_seconds(pids), switches(pids), machine()
                    sink0 = C.cpu_seconds([sink.pid])
                    t0 = time.monotonic()
                    if reject:
                        r = C.netload("reject", f"127.0.0.1:{t.smtp_port}", 32, REJECT_SECONDS)
                        count, rate = r["per_second"] * REJECT_SECONDS, r["per_second"]
                    else:
                        subprocess.run(["smtp-source", "-s", "20", "-m", str(MESSAGES), "-l", "1000",
                                        f"127.0.0.1:{t.smtp_port}"], check=True,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                        count, rate = MESSAGES, MESSAGES / (time.monotonic() - t0)
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
