//! The PROXY protocol over real sockets: headers written to the backend (exact bytes, IPv4 and
//! IPv6), and headers read from a trusted upstream, valid and every kind of malformed.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use mxgate::config::{Config, Settings};
use mxgate::proxy_protocol::{parse, V2_SIGNATURE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// A backend that reads a PROXY header (parsing it), sends the greeting, then echoes.
/// Each connection's raw header bytes are sent on the channel.
async fn header_backend() -> (SocketAddr, mpsc::UnboundedReceiver<Vec<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut b = [0u8; 1];
                let len = loop {
                    if let Ok(Some(h)) = parse(&buf) {
                        break h.len;
                    }
                    if s.read(&mut b).await.unwrap_or(0) == 0 {
                        return;
                    }
                    buf.push(b[0]);
                };
                let _ = tx.send(buf[..len].to_vec());
                let _ = s.write_all(GREETING).await;
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (addr, rx)
}

fn config_toml(backend: SocketAddr, listen: &str, toml: &str) -> Config {
    let text = format!(
        "backend = \"{backend}\"\nhostname = \"{HOST}\"\nlisten = [\"{listen}\"]\nmetrics = \"127.0.0.1:0\"\npregreet = \"off\"\n{toml}"
    );
    Settings::from_toml(&text).unwrap().validate(None).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_header_to_the_backend_ipv4_and_ipv6() {
    let (backend, mut headers) = header_backend().await;
    for listen in ["127.0.0.1:0", "[::1]:0"] {
        let mx = start(config_toml(backend, listen, "proxy_protocol = \"v1\"")).await;
        let at = mx.listen_addrs()[0];
        let source = if at.is_ipv4() { "127.0.0.2" } else { "::1" };
        let client = connect_from(source, at).await.unwrap();
        let me = client.local_addr().unwrap();
        let mut client = client;
        assert_eq!(read_line(&mut client).await, GREETING);
        let got = headers.recv().await.unwrap();
        let want = if at.is_ipv4() {
            format!(
                "PROXY TCP4 127.0.0.2 127.0.0.1 {} {}\r\n",
                me.port(),
                at.port()
            )
        } else {
            format!("PROXY TCP6 ::1 ::1 {} {}\r\n", me.port(), at.port())
        };
        assert_eq!(String::from_utf8(got).unwrap(), want);
        // The header is not client data: the echo carries only what the client sent.
        client.write_all(b"NOOP\r\n").await.unwrap();
        assert_eq!(read_line(&mut client).await, b"NOOP\r\n");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_header_to_the_backend_exact_bytes() {
    let (backend, mut headers) = header_backend().await;
    let mx = start(config_toml(
        backend,
        "127.0.0.1:0",
        "proxy_protocol = \"v2\"",
    ))
    .await;
    let at = mx.listen_addrs()[0];
    let mut client = connect_from("127.0.0.2", at).await.unwrap();
    let me = client.local_addr().unwrap();
    assert_eq!(read_line(&mut client).await, GREETING);
    let mut want = V2_SIGNATURE.to_vec();
    want.extend_from_slice(&[0x21, 0x11, 0x00, 0x0c, 127, 0, 0, 2, 127, 0, 0, 1]);
    want.extend_from_slice(&me.port().to_be_bytes());
    want.extend_from_slice(&at.port().to_be_bytes());
    assert_eq!(headers.recv().await.unwrap(), want);

    let mx6 = start(config_toml(backend, "[::1]:0", "proxy_protocol = \"v2\"")).await;
    let at6 = mx6.listen_addrs()[0];
    let mut client6 = connect_from("::1", at6).await.unwrap();
    let me6 = client6.local_addr().unwrap();
    assert_eq!(read_line(&mut client6).await, GREETING);
    let mut want6 = V2_SIGNATURE.to_vec();
    want6.extend_from_slice(&[0x21, 0x21, 0x00, 0x24]);
    want6.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
    want6.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
    want6.extend_from_slice(&me6.port().to_be_bytes());
    want6.extend_from_slice(&at6.port().to_be_bytes());
    assert_eq!(headers.recv().await.unwrap(), want6);
}

fn v2_header(src: [u8; 4], sport: u16) -> Vec<u8> {
    let mut h = V2_SIGNATURE.to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&[198, 51, 100, 1]);
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&25u16.to_be_bytes());
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_headers_set_the_source_for_limits_and_for_the_backend() {
    let (backend, mut headers) = header_backend().await;
    let mx = start(config_toml(
        backend,
        "127.0.0.1:0",
        "accept_proxy_protocol = [\"127.0.0.5\"]\nmax_per_source = 1\nproxy_protocol = \"v1\"",
    ))
    .await;
    let at = mx.listen_addrs()[0];

    // v1 from the load balancer: the carried client is the source.
    let mut a = connect_from("127.0.0.5", at).await.unwrap();
    a.write_all(b"PROXY TCP4 192.0.2.10 198.51.100.1 40000 25\r\n")
        .await
        .unwrap();
    assert_eq!(read_line(&mut a).await, GREETING);
    assert_eq!(
        headers.recv().await.unwrap(),
        b"PROXY TCP4 192.0.2.10 198.51.100.1 40000 25\r\n",
        "the backend learns the real client"
    );
    // The same carried client again, now as v2 written one byte at a time: over its limit.
    let mut b = connect_from("127.0.0.5", at).await.unwrap();
    for byte in v2_header([192, 0, 2, 10], 40001) {
        b.write_all(&[byte]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(read_to_end(&mut b).await, SOURCE_LINE);
    // Another carried client, with bytes right behind its header: admitted, bytes kept in order.
    let mut c = connect_from("127.0.0.5", at).await.unwrap();
    let mut both = v2_header([192, 0, 2, 11], 40002);
    both.extend_from_slice(b"EHLO early\r\n");
    c.write_all(&both).await.unwrap();
    assert_eq!(read_line(&mut c).await, GREETING);
    assert_eq!(read_line(&mut c).await, b"EHLO early\r\n");
    assert_eq!(
        String::from_utf8(headers.recv().await.unwrap()).unwrap(),
        "PROXY TCP4 192.0.2.11 198.51.100.1 40002 25\r\n"
    );
    assert_eq!(
        mx.source_key("192.0.2.10".parse().unwrap()).to_string(),
        "192.0.2.10/32"
    );
    drop((a, c));
    eventually("slots freed", || mx.admission().active() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_late_oversized_and_untrusted_headers_are_closed_on() {
    let (backend, _headers) = header_backend().await;
    let mx = start(config_toml(
        backend,
        "127.0.0.1:0",
        "accept_proxy_protocol = [\"127.0.0.5\"]\nproxy_header_timeout = \"300ms\"",
    ))
    .await;
    let at = mx.listen_addrs()[0];
    let mut v2_bad_len = V2_SIGNATURE.to_vec();
    v2_bad_len.extend_from_slice(&[0x21, 0x11, 0x02, 0x58]);
    let mut v2_bad_family = V2_SIGNATURE.to_vec();
    v2_bad_family.extend_from_slice(&[0x21, 0x31, 0, 12]);
    v2_bad_family.extend_from_slice(&[0; 12]);
    let cases: Vec<(&str, &str, Vec<u8>, bool)> = vec![
        (
            "wrong signature",
            "127.0.0.5",
            b"EHLO client.example\r\n".to_vec(),
            false,
        ),
        (
            "truncated",
            "127.0.0.5",
            b"PROXY TCP4 192.0.2.10 198.5".to_vec(),
            true,
        ),
        ("bad v2 length", "127.0.0.5", v2_bad_len, false),
        ("unknown family", "127.0.0.5", v2_bad_family, false),
        (
            "oversized v1",
            "127.0.0.5",
            [b"PROXY TCP4 ".to_vec(), vec![b'9'; 200]].concat(),
            false,
        ),
        (
            "untrusted peer",
            "127.0.0.6",
            b"PROXY TCP4 192.0.2.10 198.51.100.1 1 25\r\n".to_vec(),
            false,
        ),
    ];
    assert!(!cases.is_empty());
    for (what, from, bytes, then_close) in &cases {
        let mut s = connect_from(from, at).await.unwrap();
        let _ = s.write_all(bytes).await;
        if *then_close {
            s.shutdown().await.unwrap();
        }
        let mut got = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
        assert!(r.is_ok(), "{what}: closed promptly");
        assert!(
            got.is_empty(),
            "{what}: no bytes, got {:?}",
            String::from_utf8_lossy(&got)
        );
    }
    // Late: a trusted peer that says nothing is closed on at the header timeout.
    let started = Instant::now();
    let mut s = connect_from("127.0.0.5", at).await.unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got).await;
    assert!(got.is_empty());
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );

    let m = scrape(mx.metrics_addr().unwrap()).await;
    assert_eq!(
        metric(
            &m,
            "mxgate_connections_rejected_total{reason=\"bad_proxy_header\"}"
        ),
        (cases.len() + 1) as f64
    );
    assert_eq!(metric(&m, "mxgate_connections_active"), 0.0);
}
