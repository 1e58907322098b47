#!/usr/bin/env python3
"""CPU per refusal: mxgate's 421 beside Postfix postscreen's 421, HAProxy's silent reset as the floor.

A narrower companion to compare.py for the refusal comparison. Three targets, each turning every
connection of the reject load away:
- mxgate (splice) at `--max-connections 0`: a 421 line, then close;
- Postfix postscreen with `postscreen_client_connection_count_limit = 1` and one idle client of
  the same address held open in its dummy SMTP engine, so every load connection is over the
  limit and gets `421 4.7.0 Error: too many connections`, then close;
- HAProxy with `tcp-request connection reject`: a reset, the cheapest refusal there is.

The reject load is compare.py's (benches/netload.rs `reject`): 32 clients, each reading to end of
file; a connection counts as answered only with a complete `421 ...\\r\\n`. It runs closed loop,
then paced at REJECT_RATE connections a second, the same for every target. Measures, per refusal:
- the proxy's own CPU (utime + stime from /proc/PID/stat; for postscreen, its one process);
- the whole machine's busy CPU (user, nice, system, irq, softirq from /proc/stat);
- the involved CPU: the proxy's own (for postscreen, its whole instance: master, postscreen and
  postlogd, which writes the three lines postscreen logs per refusal), the load generator's (its
  rusage) and the machine's irq and softirq time. On a machine shared with other work the whole-machine figure counts that work
  too; this one does not, but misses kernel work charged to other processes.
Rounds alternate the order of the targets. The one-minute load average is recorded each time.

postscreen needs root (a private Postfix instance in a temporary directory, its own
config_directory, queue_directory and data_directory, started and stopped with `postfix -c`):

    sudo apt-get install -y haproxy postfix
    cargo build --release --bin mxgate --example netload && ROUNDS=6 python3 benches/refusals.py
"""

import json
import os
import pwd
import resource
import shutil
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare as c  # noqa: E402
import common  # noqa: E402

ROUNDS = int(os.environ.get("ROUNDS") or 6)
REJECT_RATE = int(os.environ.get("REJECT_RATE") or c.REJECT_RATE)
c.REJECT_RATE = REJECT_RATE


def children_seconds():
    """CPU time of every child this script has waited for: the load generator's runs."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def interrupt_seconds():
    """irq and softirq time over all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return (int(fields[6]) + int(fields[7])) / os.sysconf("SC_CLK_TCK")


class Postscreen(c.Target):
    """A private Postfix instance whose only service is postscreen on a loopback port."""

    def __init__(self):
        super().__init__("postscreen")
        self.dir = os.path.join(c.TMP, "postfix")
        # The Postfix daemons, running as postfix, must reach their data directory inside.
        os.chmod(c.TMP, 0o755)
        conf, queue, data = (os.path.join(self.dir, d) for d in ("conf", "queue", "data"))
        for d in (conf, queue, data):
            os.makedirs(d, exist_ok=True)
        owner = pwd.getpwnam("postfix")
        os.chown(data, owner.pw_uid, owner.pw_gid)
        self.smtp_port = common.free_port()
        self.log = os.path.join(self.dir, "maillog")
        # Loopback is in the default mynetworks, and the default postscreen_access_list
        # (permit_mynetworks) and smtpd_client_event_limit_exceptions ($mynetworks) would exempt
        # it from tests and limits: both are emptied and mynetworks moved off loopback.
        # The dummy SMTP engine (a deep protocol test) keeps the idle holder inside postscreen for
        # an hour, so it counts against the per-client limit for the whole run.
        main = f"""compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
myhostname = ps.bench
inet_interfaces = loopback-only
mynetworks = 192.0.2.1/32
smtpd_client_event_limit_exceptions =
postscreen_access_list =
postscreen_client_connection_count_limit = 1
postscreen_pipelining_enable = yes
postscreen_greet_wait = 30s
postscreen_command_time_limit = 3600s
maillog_file_prefixes = {self.dir}
maillog_file = {self.log}
"""
        master = f"""127.0.0.1:{self.smtp_port} inet n - n - 1 postscreen
smtpd pass - - n - - smtpd
postlog unix-dgram n - n - 1 postlogd
"""
        with open(os.path.join(conf, "main.cf"), "w") as f:
            f.write(main)
        with open(os.path.join(conf, "master.cf"), "w") as f:
            f.write(master)
        self.conf = conf
        self.postfix("start")
        self.started = True
        self.holder = self.hold()
        self.postscreen = self.find_postscreen()

    def hold(self):
        """The holder: the one connection within the limit. postscreen's first line to it is the
        start of its multi-line greeting (the pregreet test). Until postscreen has seen an
        earlier probe go, the holder itself is over the limit: then it tries again."""
        for attempt in range(50):
            try:
                s = socket.create_connection(("127.0.0.1", self.smtp_port), timeout=10)
            except ConnectionRefusedError:
                time.sleep(0.05)
                continue
            first = s.recv(1024)
            if first.startswith(b"220-"):
                return s
            s.close()
            time.sleep(0.05)
        raise RuntimeError(f"postscreen never admitted the holder: {first!r}")

    def postfix(self, verb):
        out = subprocess.run(["postfix", "-c", self.conf, verb], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            log = open(self.log).read()[-2000:] if os.path.exists(self.log) else ""
            raise RuntimeError(f"postfix {verb} failed: {out.stderr}{log}")

    def find_postscreen(self):
        with open(os.path.join(self.dir, "queue/pid/master.pid")) as f:
            master = int(f.read())
        for pid in c.tree_pids(master):
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().strip() == "postscreen":
                        return pid
            except FileNotFoundError:
                pass
        raise RuntimeError("postscreen is not running")

    def pids(self):
        return [self.postscreen]

    def instance_pids(self):
        """Every process of the instance: master, postscreen and postlogd, which writes the
        three lines postscreen logs per refusal."""
        with open(os.path.join(self.dir, "queue/pid/master.pid")) as f:
            return c.tree_pids(int(f.read()))

    def stop(self):
        if getattr(self, "started", False):
            self.holder.close()
            self.postfix("stop")
            self.started = False
        if self in c.LIVE:
            c.LIVE.remove(self)


def check_421(port):
    """One real client over the limit: the whole line, then end of file."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        got = b""
        while chunk := s.recv(1024):
            got += chunk
    return got


def measure(t):
    """The reject load closed loop (for the rate), then paced (for the CPU per refusal)."""
    pids = t.pids()
    every = t.instance_pids() if hasattr(t, "instance_pids") else pids
    load = os.getloadavg()[0]
    target = f"127.0.0.1:{t.smtp_port}"
    r = c.netload("reject", target, 32, c.REJECT_SECONDS)
    p0, e0, m0 = c.cpu_seconds(pids), c.cpu_seconds(every), c.machine_seconds()
    k0, i0 = children_seconds(), interrupt_seconds()
    w0 = time.monotonic()
    paced = c.netload("reject", target, 32, c.REJECT_SECONDS, REJECT_RATE)
    n = max(c.turned_away(paced), 1)
    own = c.cpu_seconds(pids) - p0
    r["paced_cpu_us"] = 1e6 * own / n
    r["paced_machine_us"] = 1e6 * (c.machine_seconds() - m0) / n
    r["instance_cpu_us"] = 1e6 * (c.cpu_seconds(every) - e0) / n
    r["involved_us"] = r["instance_cpu_us"] + 1e6 * ((children_seconds() - k0) + (interrupt_seconds() - i0)) / n
    r["paced_per_second"] = paced["per_second"]
    # How busy the whole machine was meanwhile: near 1.0, other work filled every idle moment,
    # and the whole-machine figure per refusal says little more than the rate.
    r["machine_busy"] = (c.machine_seconds() - m0) / ((time.monotonic() - w0) * os.cpu_count())
    r["paced"] = paced
    r["load1"] = (load + os.getloadavg()[0]) / 2
    return r


def main():
    if os.geteuid() != 0:
        sys.exit("refusals: postscreen's private Postfix instance needs root")
    for tool in ("haproxy", "postfix", "smtp-sink"):
        if not shutil.which(tool):
            sys.exit(f"refusals: {tool} is not installed")
    sink = common.free_port()
    helpers = [c.spawn(["smtp-sink", "-u", "nobody", f"127.0.0.1:{sink}", "1024"])]
    ports = (sink, sink, sink)
    builders = [
        ("mxgate-splice", lambda: c.mxgate_target("mxgate-splice", "splice", *ports, True)),
        ("postscreen", Postscreen),
        ("haproxy", lambda: c.haproxy_target(*ports, True)),
    ]
    rounds = []
    try:
        common.wait_port(sink, timeout=30.0)
        for name, build in builders[:2]:
            t = build()
            try:
                got = check_421(t.smtp_port)
            finally:
                t.stop()
            print(f"{name} answers {got!r}", file=sys.stderr)
            assert got.startswith(b"421 ") and got.endswith(b"\r\n"), got
        for r in range(ROUNDS):
            turn = builders[r % len(builders):] + builders[:r % len(builders)]
            rounds.append(c.run_each(f"round {r + 1}/{ROUNDS}: ", turn, measure))
    finally:
        for t in list(c.LIVE):
            t.stop()
        for p in helpers:
            p.kill()
            p.wait()
        shutil.rmtree(c.TMP, ignore_errors=True)
    json.dump({"reject_rate": REJECT_RATE, "rounds": rounds}, sys.stdout, indent=1)
    print()
    report(rounds)


def report(rounds):
    """Each round's figures per refusal (µs) and mxgate ÷ postscreen, as a Markdown table, on
    stderr. The machine's busy fraction shows whether the whole-machine figure says anything."""
    f = c.fmt
    out = ["| round | load | mxgate: own, involved | postscreen: own, instance, involved | HAProxy: own, involved "
           "| mxgate ÷ postscreen: own | whole machine | involved |",
           "|---|---|---|---|---|---|---|---|"]
    busy, whole = [], True
    for i, r in enumerate(rounds):
        m, p, h = r["mxgate-splice"], r["postscreen"], r["haproxy"]
        load = sum(x["load1"] for x in (m, p, h)) / 3
        busy.extend(x["machine_busy"] for x in (m, p, h))
        whole = whole and all(x["complete_421"] == c.turned_away(x)
                              and x["paced"]["complete_421"] == c.turned_away(x["paced"]) for x in (m, p))
        out.append(f"| {i + 1} | {load:.1f} | {f(m['paced_cpu_us'])}, {f(m['involved_us'])} "
                   f"| {f(p['paced_cpu_us'])}, {f(p['instance_cpu_us'])}, {f(p['involved_us'])} "
                   f"| {f(h['paced_cpu_us'])}, {f(h['involved_us'])} "
                   f"| {m['paced_cpu_us'] / p['paced_cpu_us']:.2f} "
                   f"| {m['paced_machine_us'] / p['paced_machine_us']:.2f} "
                   f"| {m['involved_us'] / p['involved_us']:.2f} |")
    out.append(f"\nThe machine was busy {min(busy):.2f}–{max(busy):.2f} of the time during the paced runs; "
               f"every mxgate and postscreen answer a whole 421: {c.verdict(whole)}.")
    print("\n".join(out), file=sys.stderr)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--report"]:
        shutil.rmtree(c.TMP, ignore_errors=True)
        with open(sys.argv[2]) as f:
            report(json.load(f)["rounds"])
    else:
        main()
