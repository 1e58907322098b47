#!/usr/bin/env python3
"""Side-by-side comparison of mxgate against HAProxy and nginx, in one run.

Every target forwards to the same backends (Postfix smtp-sink for SMTP, iperf3 for bulk) and is
driven by the same load generators. Results are reported as ratios to direct and to HAProxy,
and written to docs/benchmarks.md with an SVG chart. Run it through benches/compare.sh.
"""

import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MXGATE = os.environ.get("MXBIN") or os.path.join(ROOT, "target/release/mxgate")
NETLOAD = os.path.join(ROOT, "target/release/examples/netload")
QUICK = os.environ.get("QUICK") == "1"
IPERF_SECONDS = 2 if QUICK else 5
SMTP_MESSAGES = 2000 if QUICK else 20000
LATENCY_SAMPLES = 1000 if QUICK else 5000
REJECT_SECONDS = 2 if QUICK else 5
HOLD_SESSIONS = 1000 if QUICK else 5000
TMP = tempfile.mkdtemp(prefix="mxgate-compare-")
# Every proxy gets the same number of threads (workers for nginx): one per CPU by default.
THREADS = int(os.environ.get("THREADS") or os.cpu_count())


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listening on {port}")


def spawn(cmd, **kw):
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)


def tree_pids(pid):
    """pid and all its descendants (nginx and haproxy fork workers)."""
    pids = [pid]
    try:
        out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
        children = {}
        for line in out.split("\n"):
            if line.strip():
                p, pp = map(int, line.split())
                children.setdefault(pp, []).append(p)
        i = 0
        while i < len(pids):
            pids.extend(children.get(pids[i], []))
            i += 1
    except Exception:
        pass
    return pids


def rss_kib(pids):
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def fd_count(pids):
    total = 0
    for p in pids:
        try:
            total += len(os.listdir(f"/proc/{p}/fd"))
        except FileNotFoundError:
            pass
    return total


def cpu_seconds(pids):
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
        except FileNotFoundError:
            pass
    return total / tick


class Target:
    """One way to reach the backends: directly, or through a proxy."""

    def __init__(self, name):
        self.name = name
        self.procs = []
        self.smtp_port = None
        self.iperf_port = None
        self.hold_port = None

    def pids(self):
        pids = []
        for p in self.procs:
            pids.extend(tree_pids(p.pid))
        return pids

    def stop(self):
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                p.kill()
            p.wait()
        self.procs = []


def mxgate_target(name, mode, smtp, iperf, greet, reject=False):
    t = Target(name)
    limits = ["--max-connections", "0"] if reject else ["--max-connections", "100000"]
    for backend, attr in ((smtp, "smtp_port"), (iperf, "iperf_port"), (greet, "hold_port")):
        port = free_port()
        cmd = [MXGATE, "run", "--listen", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{backend}",
               "--metrics", "off", "--forwarding", mode, "--hostname", "mx.bench",
               "--max-per-source", "100000", "--threads", str(THREADS), *limits]
        t.procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        env={**os.environ, "RUST_LOG": "error"}, start_new_session=True))
        setattr(t, attr, port)
        wait_port(port)
    return t


def haproxy_target(smtp, iperf, greet, reject=False):
    t = Target("haproxy")
    t.smtp_port, t.iperf_port, t.hold_port = free_port(), free_port(), free_port()
    rule = "    tcp-request connection reject\n" if reject else ""
    cfg = f"""global
    maxconn 7000
    nbthread {THREADS}
defaults
    mode tcp
    option splice-auto
    timeout connect 5s
    timeout client 10m
    timeout server 10m
    maxconn 7000
frontend smtp
    bind 127.0.0.1:{t.smtp_port}
{rule}    default_backend smtp_b
frontend bulk
    bind 127.0.0.1:{t.iperf_port}
    default_backend bulk_b
frontend hold
    bind 127.0.0.1:{t.hold_port}
    default_backend hold_b
backend hold_b
    server s 127.0.0.1:{greet}
backend smtp_b
    server s 127.0.0.1:{smtp}
backend bulk_b
    server s 127.0.0.1:{iperf}
"""
    path = os.path.join(TMP, "haproxy.cfg")
    with open(path, "w") as f:
        f.write(cfg)
    t.procs.append(subprocess.Popen(["haproxy", "-f", path, "-db"], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True))
    wait_port(t.smtp_port)
    return t


def nginx_target(smtp, iperf, greet, reject=False):
    t = Target("nginx")
    t.smtp_port, t.iperf_port, t.hold_port = free_port(), free_port(), free_port()
    deny = "            deny all;\n" if reject else ""
    prefix = os.path.join(TMP, "nginx")
    os.makedirs(os.path.join(prefix, "logs"), exist_ok=True)
    cfg = f"""load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes {THREADS};
worker_rlimit_nofile 20000;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log crit;
events {{ worker_connections 9000; }}
stream {{
    server {{
        listen 127.0.0.1:{t.smtp_port};
{deny}        proxy_pass 127.0.0.1:{smtp};
    }}
    server {{
        listen 127.0.0.1:{t.iperf_port};
        proxy_pass 127.0.0.1:{iperf};
    }}
    server {{
        listen 127.0.0.1:{t.hold_port};
        proxy_pass 127.0.0.1:{greet};
    }}
}}
"""
    path = os.path.join(prefix, "nginx.conf")
    with open(path, "w") as f:
        f.write(cfg)
    t.procs.append(subprocess.Popen(["nginx", "-p", prefix, "-c", path], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True))
    wait_port(t.smtp_port)
    return t


def direct_target(smtp, iperf, greet):
    t = Target("direct")
    t.smtp_port, t.iperf_port, t.hold_port = smtp, iperf, greet
    return t


def iperf(port, streams, pids):
    cpu0 = cpu_seconds(pids)
    out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(IPERF_SECONDS),
                          "-P", str(streams), "-J"], capture_output=True, text=True, timeout=120)
    cpu = cpu_seconds(pids) - cpu0
    end = json.loads(out.stdout)["end"]["sum_received"]
    gib = end["bytes"] / 2**30
    return end["bits_per_second"] / 1e9, (cpu / gib if pids and gib else None)


def smtp_sessions(port):
    t0 = time.monotonic()
    subprocess.run(["smtp-source", "-s", "20", "-m", str(SMTP_MESSAGES), "-l", "1000",
                    f"127.0.0.1:{port}"], check=True, timeout=600,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return SMTP_MESSAGES / (time.monotonic() - t0)


def netload(*args):
    out = subprocess.run([NETLOAD, *map(str, args)], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout.strip().split("\n")[-1])


def hold(port, pids):
    before_rss, before_fd = rss_kib(pids), fd_count(pids)
    p = subprocess.Popen([NETLOAD, "hold", f"127.0.0.1:{port}", str(HOLD_SESSIONS)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line.strip() == "ready", line
    time.sleep(0.5)  # let the proxy's allocator settle before reading RSS
    rss, fds = rss_kib(pids), fd_count(pids)
    p.stdin.close()
    p.wait(timeout=60)
    return (rss - before_rss) / HOLD_SESSIONS, (fds - before_fd) / HOLD_SESSIONS


def measure(t):
    pids = t.pids()
    r = {}
    r["iperf1_gbps"], r["cpu_s_per_gib"] = iperf(t.iperf_port, 1, pids)
    r["iperf4_gbps"], _ = iperf(t.iperf_port, 4, pids)
    r["smtp_sessions_per_s"] = smtp_sessions(t.smtp_port)
    lat = netload("latency", f"127.0.0.1:{t.smtp_port}", LATENCY_SAMPLES)
    r["latency_p50_us"], r["latency_p99_us"] = lat["p50_us"], lat["p99_us"]
    if pids:
        r["idle_rss_kib"], r["idle_fds"] = hold(t.hold_port, pids)
    return r


def measure_reject(t):
    return netload("reject", f"127.0.0.1:{t.smtp_port}", 32, REJECT_SECONDS)


def run_each(label, builders, how):
    """Starts each target in turn, measures it with `how`, stops it; results by name."""
    out = {}
    for name, build in builders:
        print(f"== {label}{name}", file=sys.stderr)
        t = build()
        try:
            out[name] = how(t)
        finally:
            t.stop()
        print(json.dumps(out[name]), file=sys.stderr)
    return out


def main():
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("compare: stopped"))
    for tool in ("haproxy", "nginx", "iperf3", "smtp-sink", "smtp-source"):
        if not shutil.which(tool):
            sys.exit(f"compare: {tool} is not installed (see benches/compare.sh)")
    sink_port, iperf_port = free_port(), free_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    sink = spawn(["smtp-sink", *user, f"127.0.0.1:{sink_port}", "1024"])
    iperf_srv = spawn(["iperf3", "-s", "-p", str(iperf_port)])
    greeter = subprocess.Popen([NETLOAD, "greet", "127.0.0.1:0"], stdout=subprocess.PIPE, text=True)
    greet_port = int(greeter.stdout.readline())
    wait_port(sink_port)
    wait_port(iperf_port)
    results, rejects = {}, {}
    try:
        builders = [
            ("direct", lambda: direct_target(sink_port, iperf_port, greet_port)),
            ("mxgate-splice", lambda: mxgate_target("mxgate-splice", "splice", sink_port, iperf_port, greet_port)),
            ("mxgate-copy", lambda: mxgate_target("mxgate-copy", "copy", sink_port, iperf_port, greet_port)),
            ("haproxy", lambda: haproxy_target(sink_port, iperf_port, greet_port)),
            ("nginx", lambda: nginx_target(sink_port, iperf_port, greet_port)),
        ]
        results = run_each("", builders, measure)
        reject_builders = [
            ("mxgate-splice", lambda: mxgate_target("mxgate-splice", "splice", sink_port, iperf_port, greet_port, True)),
            ("haproxy", lambda: haproxy_target(sink_port, iperf_port, greet_port, True)),
            ("nginx", lambda: nginx_target(sink_port, iperf_port, greet_port, True)),
        ]
        rejects = run_each("reject ", reject_builders, measure_reject)
    finally:
        sink.kill()
        iperf_srv.kill()
        greeter.kill()
        shutil.rmtree(TMP, ignore_errors=True)
    write_report(results, rejects)


def ratio(a, b):
    return f"{a / b:.2f}" if a is not None and b else "–"


def write_report(results, rejects):
    rows = [
        ("bulk throughput, 1 stream (Gbit/s)", "iperf1_gbps", True),
        ("bulk throughput, 4 streams (Gbit/s)", "iperf4_gbps", True),
        ("SMTP sessions/s (smtp-source -s 20 -l 1000)", "smtp_sessions_per_s", True),
        ("connect→greeting p50 (µs)", "latency_p50_us", False),
        ("connect→greeting p99 (µs)", "latency_p99_us", False),
        ("RSS per idle session (KiB)", "idle_rss_kib", False),
        ("fds per idle session", "idle_fds", False),
        ("CPU seconds per GiB forwarded", "cpu_s_per_gib", False),
    ]
    names = list(results)
    fmt = lambda v: "–" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))
    out = []
    out.append("# Benchmarks: mxgate beside HAProxy and nginx\n")
    out.append(f"Run on {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, kernel "
               f"{platform.release()}, {os.cpu_count()} cores, by `benches/compare.sh`"
               f"{' (QUICK=1)' if QUICK else ''}. All targets were measured in this one run, against "
               "the same smtp-sink and iperf3 backends, with the same load generators, over loopback.\n")
    out.append("HAProxy " + subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.split()[2]
               + f" runs in TCP mode with `option splice-auto` and {THREADS} threads; nginx "
               + subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip().split("/")[-1]
               + f" runs `stream` with {THREADS} workers; mxgate runs {THREADS} worker threads.\n")
    out.append("| measure | " + " | ".join(names) + " |")
    out.append("|---|" + "---|" * len(names))
    for label, key, _ in rows:
        out.append(f"| {label} | " + " | ".join(fmt(results[n].get(key)) for n in names) + " |")
    out.append("\n## Ratios (mxgate-splice)\n")
    out.append("| measure | vs direct | vs HAProxy | target |")
    out.append("|---|---|---|---|")
    m, h, d = results["mxgate-splice"], results["haproxy"], results["direct"]
    targets = {
        "iperf1_gbps": "≥ 1.3 × HAProxy", "iperf4_gbps": "≥ 1.3 × HAProxy",
        "smtp_sessions_per_s": "≥ 1.2 × HAProxy", "latency_p50_us": "added latency ≤ HAProxy's",
        "latency_p99_us": "added latency ≤ HAProxy's", "idle_rss_kib": "≤ 2 KiB",
        "idle_fds": "exactly 2", "cpu_s_per_gib": "",
    }
    for label, key, _ in rows:
        out.append(f"| {label} | {ratio(m.get(key), d.get(key))} | {ratio(m.get(key), h.get(key))} | {targets[key]} |")
    added = lambda r, k: r[k] - d[k]
    out.append(f"\nAdded connect→greeting latency over direct, p50/p99 µs: mxgate-splice "
               f"{added(m, 'latency_p50_us')}/{added(m, 'latency_p99_us')}, HAProxy "
               f"{added(h, 'latency_p50_us')}/{added(h, 'latency_p99_us')}, nginx "
               f"{added(results['nginx'], 'latency_p50_us')}/{added(results['nginx'], 'latency_p99_us')}.\n")
    out.append("\n## Reject throughput at a limit of 0\n")
    out.append("32 concurrent clients connect and read to end of file for "
               f"{REJECT_SECONDS} s. mxgate must deliver a complete `421` line to every client; HAProxy "
               "(`tcp-request connection reject`) resets and nginx (`deny all`) closes silently. A connection "
               "reset or refused during the handshake also counts as turned away.\n")
    out.append("| target | turned away/s | complete 421 lines | silent closes | resets | refused at connect | other errors | vs HAProxy |")
    out.append("|---|---|---|---|---|---|---|---|")
    for n, r in rejects.items():
        out.append(f"| {n} | {r['per_second']} | {r['complete_421']} | {r['silent_close']} | {r['reset']} | "
                   f"{r['refused_at_connect']} | {r['errors']} | {ratio(r['per_second'], rejects['haproxy']['per_second'])} |")
        if r.get("first_error"):
            out.append(f"\n{n}'s first other error: `{r['first_error']}`\n")
    out.append("\n![ratios to HAProxy](benchmarks.svg)\n")
    os.makedirs(os.path.join(ROOT, "docs"), exist_ok=True)
    with open(os.path.join(ROOT, "docs/benchmarks.md"), "w") as f:
        f.write("\n".join(out) + "\n")
    write_svg(results, rejects)
    print("\n".join(out))


def write_svg(results, rejects):
    """A bar chart of mxgate-splice / HAProxy ratios; above 1 is better for every bar."""
    m, h = results["mxgate-splice"], results["haproxy"]
    bars = [
        ("1-stream throughput", m["iperf1_gbps"] / h["iperf1_gbps"]),
        ("4-stream throughput", m["iperf4_gbps"] / h["iperf4_gbps"]),
        ("SMTP sessions/s", m["smtp_sessions_per_s"] / h["smtp_sessions_per_s"]),
        ("p50 latency (inverse)", h["latency_p50_us"] / max(m["latency_p50_us"], 1)),
        ("p99 latency (inverse)", h["latency_p99_us"] / max(m["latency_p99_us"], 1)),
        ("reject rate", rejects["mxgate-splice"]["per_second"] / max(rejects["haproxy"]["per_second"], 1)),
        ("idle RSS (inverse)", h["idle_rss_kib"] / max(m["idle_rss_kib"], 0.01)),
        ("CPU per GiB (inverse)", (h["cpu_s_per_gib"] or 0) / max(m["cpu_s_per_gib"] or 1, 1e-9)),
    ]
    width, bar_h, left, scale = 720, 28, 200, 160
    height = 60 + bar_h * len(bars)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="13">',
             '<text x="10" y="20" font-size="15">mxgate (splice) relative to HAProxy; 1.0 = equal, right is better</text>']
    x1 = left + scale
    parts.append(f'<line x1="{x1}" y1="30" x2="{x1}" y2="{height - 10}" stroke="#444" stroke-dasharray="4"/>')
    for i, (label, v) in enumerate(bars):
        y = 40 + i * bar_h
        w = min(v, 3.0) * scale
        color = "#2a7" if v >= 1 else "#c54"
        parts.append(f'<text x="10" y="{y + 17}">{label}</text>')
        parts.append(f'<rect x="{left}" y="{y + 4}" width="{w:.1f}" height="{bar_h - 8}" fill="{color}"/>')
        parts.append(f'<text x="{left + w + 6:.1f}" y="{y + 17}">{v:.2f}×</text>')
    parts.append("</svg>")
    with open(os.path.join(ROOT, "docs/benchmarks.svg"), "w") as f:
        f.write("\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
