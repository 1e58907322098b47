//! The fallback from splice to copy, with the kernel really refusing splice: a seccomp filter
//! on this test's threads makes every splice(2) fail with EINVAL, then with ENOSYS. The session
//! must switch to copying without losing a byte, and the switch must be counted.
#![cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]

mod common;

use common::*;
use mxgate::config::Forwarding;

const BULK: usize = 4 * 1024 * 1024;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7;

/// Makes splice(2) fail with `errno` for the calling thread and every thread it starts from
/// now on; nothing else is affected. The filter cannot be removed, so callers use a thread of
/// their own.
fn refuse_splice(errno: i32) {
    let stmt = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jeq = |k: u32, jf: u8| libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt: 0,
        jf,
        k,
    };
    let load = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    let ret = libc::BPF_RET | libc::BPF_K;
    // seccomp_data: the syscall number at offset 0, the architecture at offset 4.
    let mut program = [
        stmt(load, 4),
        jeq(AUDIT_ARCH, 3),
        stmt(load, 0),
        jeq(libc::SYS_splice as u32, 1),
        stmt(
            ret,
            libc::SECCOMP_RET_ERRNO | (errno as u32 & libc::SECCOMP_RET_DATA),
        ),
        stmt(ret, libc::SECCOMP_RET_ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: plain prctl calls on this thread; `prog` points to a valid filter that lives
    // across the call (the kernel copies it). No-new-privs is what lets an unprivileged
    // thread install a filter.
    unsafe {
        assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
        assert_eq!(
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const libc::sock_fprog
            ),
            0,
            "install the seccomp filter: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The filter is really in place: a splice from a pipe fails with `errno`.
fn splice_fails_with(errno: i32) -> bool {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two descriptors for pipe2, both closed below; splice
    // with null offsets on a pipe touches no user memory.
    unsafe {
        assert_eq!(libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK), 0);
        let n = libc::splice(
            fds[0],
            std::ptr::null_mut(),
            fds[1],
            std::ptr::null_mut(),
            1,
            libc::SPLICE_F_NONBLOCK,
        );
        let err = std::io::Error::last_os_error().raw_os_error();
        libc::close(fds[0]);
        libc::close(fds[1]);
        n == -1 && err == Some(errno)
    }
}

async fn one_session_through_refused_splice() {
    let m = bulk_session(Forwarding::Splice, BULK, false).await;
    // One session: the first refused fill switches the whole session, so it counts once.
    assert_eq!(metric(&m, "mxgate_splice_fallbacks_total"), 1.0);
    assert_eq!(metric(&m, "mxgate_spliced_bytes_total"), 0.0);
}

#[test]
fn a_refused_splice_switches_the_session_to_copy_and_is_counted() {
    for errno in [libc::EINVAL, libc::ENOSYS] {
        std::thread::spawn(move || {
            refuse_splice(errno);
            assert!(splice_fails_with(errno), "the filter refuses splice");
            // Built after the filter, so every runtime thread carries it, and so do the
            // worker threads mxgate starts.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(one_session_through_refused_splice());
        })
        .join()
        .unwrap_or_else(|_| panic!("errno {errno}: the session through refused splice failed"));
    }
}
