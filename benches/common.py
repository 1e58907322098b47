"""What the Python benches share: a free loopback port, waiting for a listener, reading
mxgate's metrics, and stopping a process group.

A bench imports it with `import common`. Python puts a script's own folder first on its path,
so this works whether the bench runs as `python3 benches/NAME.py` from the repository root or
as `python3 NAME.py` from benches/.
"""

import os
import signal
import socket
import subprocess
import sys
import time


def free_port():
    """A loopback TCP port free right now, for programs that cannot take port 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=20.0):
    """Returns once something accepts on 127.0.0.1:`port`; ends the bench after `timeout`
    seconds, naming the bench and the port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.02)
    bench = os.path.splitext(os.path.basename(sys.argv[0]))[0]
    sys.exit(f"{bench}: nothing listens on {port}")


def metrics_text(port):
    """The whole text of mxgate's /metrics on 127.0.0.1:`port`."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out.decode()


def stop(p, sig=signal.SIGKILL):
    """Sends `sig` to the process group `p` leads (it was started with
    start_new_session=True) and returns its exit status."""
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass
    return p.wait()


def start_haproxy(tmp, port, backend_port, maxconn):
    """HAProxy in TCP mode on `port` in front of `backend_port`, at most `maxconn` sessions to
    it and the others waiting in its queue for up to 30 s: the queue mxgate's is compared with.
    Its config is written to `tmp`. Returns at once, without waiting for it to listen."""
    cfg = os.path.join(tmp, "haproxy.cfg")
    with open(cfg, "w") as f:
        f.write(f"""global
    maxconn 4000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout queue 30s
frontend smtp
    bind 127.0.0.1:{port}
    default_backend mail
backend mail
    server mx 127.0.0.1:{backend_port} maxconn {maxconn}
""")
    return subprocess.Popen(["haproxy", "-f", cfg], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
