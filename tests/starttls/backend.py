"""A small SMTP backend that offers STARTTLS, for tests/starttls.rs.

Usage: backend.py CERT KEY OUT_DIR. Prints its port, then serves connections one thread each.
Every message it accepts after TLS is written to OUT_DIR/N.eml (N counts from 1), and the
negotiated TLS version to OUT_DIR/N.tls, so the test can compare bytes. Commands before
STARTTLS other than EHLO, HELO, NOOP and QUIT get 530, as a server requiring TLS answers.
"""

import os
import socket
import ssl
import sys
import threading

cert, key, out = sys.argv[1:4]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(64)
print(listener.getsockname()[1], flush=True)
count = 0
lock = threading.Lock()


def serve(conn):
    global count
    f = conn.makefile("rwb", buffering=0)
    f.write(b"220 tls.test ESMTP\r\n")
    tls = None
    while True:
        line = f.readline()
        if not line:
            return
        verb = line[:4].upper()
        if verb in (b"EHLO", b"HELO"):
            if tls is None:
                f.write(b"250-tls.test\r\n250 STARTTLS\r\n")
            else:
                f.write(b"250-tls.test\r\n250 8BITMIME\r\n")
        elif line.upper().startswith(b"STARTTLS"):
            f.write(b"220 2.0.0 ready to start TLS\r\n")
            tls = ctx.wrap_socket(conn, server_side=True)
            f = tls.makefile("rwb", buffering=0)
        elif verb == b"QUIT":
            f.write(b"221 2.0.0 bye\r\n")
            (tls or conn).close()
            return
        elif verb == b"NOOP":
            f.write(b"250 2.0.0 ok\r\n")
        elif tls is None:
            f.write(b"530 5.7.0 must issue a STARTTLS command first\r\n")
        elif verb in (b"MAIL", b"RCPT"):
            f.write(b"250 2.1.0 ok\r\n")
        elif verb == b"DATA":
            f.write(b"354 go ahead\r\n")
            body = b""
            while True:
                part = f.readline()
                if not part or part == b".\r\n":
                    break
                body += part
            with lock:
                count += 1
                n = count
            with open(os.path.join(out, f"{n}.eml"), "wb") as m:
                m.write(body)
            with open(os.path.join(out, f"{n}.tls"), "w") as m:
                m.write(tls.version())
            f.write(b"250 2.0.0 queued\r\n")
        else:
            f.write(b"502 5.5.2 not implemented\r\n")


while True:
    c, _ = listener.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
