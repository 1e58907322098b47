//! STARTTLS through mxgate in every forwarding mode: swaks upgrades to TLS with a backend that
//! offers it (tests/starttls/backend.py, Python's ssl module with a certificate openssl makes
//! here), and the message the backend decrypts is byte for byte the one swaks sent. mxgate sees
//! only ciphertext after the 220 to STARTTLS, so this proves forwarding never alters, drops or
//! reorders a TLS record.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

fn tools() -> bool {
    ["python3", "openssl", "swaks"]
        .iter()
        .all(|t| require_tool(t))
}

/// A self-signed certificate for tls.test in `dir`: (cert, key).
fn certificate(dir: &Path) -> (String, String) {
    let cert = dir.join("cert.pem").display().to_string();
    let key = dir.join("key.pem").display().to_string();
    let ok = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args([
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=tls.test",
            "-keyout",
            &key,
            "-out",
            &cert,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success(), "openssl could not make a certificate");
    (cert, key)
}

/// The message swaks sends in `mode`: a line longer than one TLS record (16 KiB), so the
/// message spans several records.
fn body_for(mode: mxgate::config::Forwarding) -> String {
    format!(
        "Subject: mode {mode:?}\r\n\r\nline one\r\n{}\r\nlast",
        "x".repeat(20000)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_through_mxgate_in_every_mode() {
    if !tools() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("mxgate-starttls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = certificate(&dir);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/starttls/backend.py");
    let mut child = Command::new("python3")
        .arg(&script)
        .args([&cert, &key, &dir.display().to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut port = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut port)
        .unwrap();
    let _backend = KillOnDrop(child);
    let backend: std::net::SocketAddr = format!("127.0.0.1:{}", port.trim()).parse().unwrap();

    let modes = modes();
    assert!(!modes.is_empty());
    for (i, mode) in modes.into_iter().enumerate() {
        let mx = start(config_mode(backend, mode)).await;
        let server = mx.listen_addrs()[0].to_string();
        let body = body_for(mode);
        let cert = cert.clone();
        let out = tokio::task::spawn_blocking(move || {
            Command::new("swaks")
                .args([
                    "--server",
                    &server,
                    "--tls",
                    "--tls-verify",
                    "--tls-ca-path",
                ])
                .arg(&cert)
                .args([
                    "--tls-sni",
                    "tls.test",
                    "--from",
                    "a@example.org",
                    "--to",
                    "b@example.org",
                ])
                .args(["--data", "-", "--timeout", "20"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .and_then(|mut c| {
                    use std::io::Write;
                    c.stdin.take().unwrap().write_all(body.as_bytes())?;
                    c.wait_with_output()
                })
                .unwrap()
        })
        .await
        .unwrap();
        let log = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "swaks failed in {mode:?}:\n{log}");
        assert!(log.contains("TLS started"), "no TLS in {mode:?}:\n{log}");
        assert!(
            log.contains("250 2.0.0 queued"),
            "not queued in {mode:?}:\n{log}"
        );
        let n = i + 1;
        let got = std::fs::read(dir.join(format!("{n}.eml"))).unwrap();
        // swaks ends the data with CRLF . CRLF, so the message is the body and one CRLF.
        let sent = format!("{}\r\n", body_for(mode));
        assert_eq!(got.len(), sent.len(), "{mode:?}: length");
        assert!(
            got == sent.as_bytes(),
            "{mode:?}: the decrypted message differs"
        );
        let version = std::fs::read_to_string(dir.join(format!("{n}.tls"))).unwrap();
        assert!(version.starts_with("TLSv1."), "{mode:?}: {version}");
        mx.shutdown(std::time::Duration::from_secs(5)).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}
