//! SIGPIPE must never kill the process. splice(2) into a socket has no MSG_NOSIGNAL, so a splice
//! toward a peer that has gone raises SIGPIPE; Rust binaries ignore it from the start, but an
//! embedding program may not, so mxgate sets it ignored itself. This test binary restores the
//! default action (terminate) before starting mxgate, then provokes real SIGPIPEs: one from a
//! splice into a socket that can no longer send, one raised directly.
#![cfg(target_os = "linux")]

mod common;

use common::*;

/// The action installed for SIGPIPE right now.
fn sigpipe_action() -> libc::sighandler_t {
    // SAFETY: sigaction with a null new action only reads the current one into `old`, which is
    // a valid, writable, zero-initialised sigaction.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        assert_eq!(
            libc::sigaction(libc::SIGPIPE, std::ptr::null(), &mut old),
            0
        );
        old.sa_sigaction
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigpipe_from_splice_does_not_kill_the_process() {
    // SAFETY: installing the default action has no preconditions; nothing else in this test
    // binary depends on SIGPIPE.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    assert_eq!(sigpipe_action(), libc::SIG_DFL);

    let backend = GreetingBackend::start().await;
    let mx = start(config(backend.addr)).await;
    assert_eq!(sigpipe_action(), libc::SIG_IGN, "mxgate ignores SIGPIPE");

    // A splice from a pipe into a socket whose sending side is shut down: EPIPE, and SIGPIPE
    // to this process, which would end it here under the default action.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let s = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let _peer = l.accept().unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let (read_end, write_end) = rustix::pipe::pipe().unwrap();
    assert_eq!(rustix::io::write(&write_end, b"data").unwrap(), 4);
    let err = rustix::pipe::splice(
        &read_end,
        None,
        &s,
        None,
        4,
        rustix::pipe::SpliceFlags::NONBLOCK,
    )
    .expect_err("a splice into a socket shut for writing fails");
    assert_eq!(err, rustix::io::Errno::PIPE, "{err}");

    // And a SIGPIPE sent outright.
    rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::PIPE)
        .unwrap();

    // Still alive, and still serving.
    let c = expect_admitted("127.0.0.2", mx.listen_addrs()[0]).await;
    drop(c);
    eventually("slot freed", || mx.admission().active() == 0).await;
}
