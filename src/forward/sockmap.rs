//! Kernel-side forwarding: after the greeting, a BPF stream verdict program redirects each
//! socket's bytes to its peer, so the bytes of a session never pass through user space.
//!
//! One [`Redirector`] per process holds two maps and the program:
//! - `socks`, a sockhash: socket cookie → socket;
//! - `peers`, a hash: socket cookie → the peer's cookie;
//! - the program, attached to `socks` as its stream verdict: it looks up its socket's cookie in
//!   `peers` and redirects the bytes to the egress of the socket under the peer's cookie
//!   (`bpf_sk_redirect_hash`). A socket without a peer entry passes its bytes to user space.
//!
//! The program is written here as instructions rather than built from C: it is fifteen
//! instructions, a fresh `cargo build` needs no clang, and there is no object file to keep in
//! step with a source. The maps and the program are made with raw `bpf()` calls (four commands)
//! rather than a loader crate, for the same reason: nothing here needs BTF, relocations or an ELF
//! object.
//!
//! User space keeps the end of the session: it wakes when a socket shows its peer's FIN or an
//! error, passes the FIN on only once every byte redirected before it is in the other socket's
//! send queue (bytes received on one side = bytes acknowledged + `SIOCOUTQ` on the other), and
//! takes the byte counts and the idle time from `tcp_info`.

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::task::Poll;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{End, Relayed, Report, Side, Timeouts, Traffic};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_SOCKHASH: u32 = 18;
const BPF_F_NO_PREALLOC: u32 = 1;
const BPF_PROG_TYPE_SK_SKB: u32 = 14;
const BPF_SK_SKB_STREAM_VERDICT: u32 = 5;
const BPF_FUNC_MAP_LOOKUP_ELEM: i32 = 1;
const BPF_FUNC_GET_SOCKET_COOKIE: i32 = 46;
const BPF_FUNC_SK_REDIRECT_HASH: i32 = 72;
const SK_PASS: i32 = 1;

/// One BPF instruction, as the kernel reads it.
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | dst,
        off,
        imm,
    }
}

/// The verdict program, for the two maps' descriptors.
fn program(peers: RawFd, socks: RawFd) -> Vec<Insn> {
    const MOV64_REG: u8 = 0xbf;
    const MOV64_IMM: u8 = 0xb7;
    const ADD64_IMM: u8 = 0x07;
    const STX_DW: u8 = 0x7b;
    const LDX_DW: u8 = 0x79;
    const LD_IMM64: u8 = 0x18;
    const JEQ_IMM: u8 = 0x15;
    const CALL: u8 = 0x85;
    const EXIT: u8 = 0x95;
    const PSEUDO_MAP_FD: u8 = 1;
    vec![
        insn(MOV64_REG, 6, 1, 0, 0),                     // r6 = skb
        insn(CALL, 0, 0, 0, BPF_FUNC_GET_SOCKET_COOKIE), // r0 = cookie(skb)
        insn(STX_DW, 10, 0, -8, 0),                      // fp[-8] = r0
        insn(LD_IMM64, 1, PSEUDO_MAP_FD, 0, peers),      // r1 = &peers
        insn(0, 0, 0, 0, 0),
        insn(MOV64_REG, 2, 10, 0, 0),                  // r2 = fp
        insn(ADD64_IMM, 2, 0, 0, -8),                  // r2 = fp - 8
        insn(CALL, 0, 0, 0, BPF_FUNC_MAP_LOOKUP_ELEM), // r0 = peers[cookie]
        insn(JEQ_IMM, 0, 0, 10, 0),                    // no peer: pass
        insn(LDX_DW, 1, 0, 0, 0),                      // r1 = *r0
        insn(STX_DW, 10, 1, -16, 0),                   // fp[-16] = peer cookie
        insn(MOV64_REG, 1, 6, 0, 0),                   // r1 = skb
        insn(LD_IMM64, 2, PSEUDO_MAP_FD, 0, socks),    // r2 = &socks
        insn(0, 0, 0, 0, 0),
        insn(MOV64_REG, 3, 10, 0, 0),                   // r3 = fp
        insn(ADD64_IMM, 3, 0, 0, -16),                  // r3 = fp - 16
        insn(MOV64_IMM, 4, 0, 0, 0),                    // r4 = 0: egress
        insn(CALL, 0, 0, 0, BPF_FUNC_SK_REDIRECT_HASH), // r0 = redirect
        insn(EXIT, 0, 0, 0, 0),
        insn(MOV64_IMM, 0, 0, 0, SK_PASS), // pass:
        insn(EXIT, 0, 0, 0, 0),
    ]
}

fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> io::Result<RawFd> {
    // SAFETY: attr is a zeroed 128-byte bpf_attr whose pointers, where set, point at live
    // buffers for the length of the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as RawFd)
    }
}

fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: fd was just returned by bpf() and is owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn map_create(kind: u32, key: u32, value: u32, entries: u32, flags: u32) -> io::Result<OwnedFd> {
    let mut attr = [0u64; 16];
    attr[0] = u64::from(kind) | (u64::from(key) << 32);
    attr[1] = u64::from(value) | (u64::from(entries) << 32);
    attr[2] = u64::from(flags);
    bpf(BPF_MAP_CREATE, &mut attr).map(owned)
}

fn map_update(map: &OwnedFd, key: &u64, value: *const u8) -> io::Result<()> {
    let mut attr = [0u64; 16];
    attr[0] = map.as_raw_fd() as u64;
    attr[1] = key as *const u64 as u64;
    attr[2] = value as u64;
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
}

fn map_delete(map: &OwnedFd, key: &u64) {
    let mut attr = [0u64; 16];
    attr[0] = map.as_raw_fd() as u64;
    attr[1] = key as *const u64 as u64;
    let _ = bpf(BPF_MAP_DELETE_ELEM, &mut attr);
}

/// The maps and the attached program, shared by every session of the process.
pub struct Redirector {
    socks: OwnedFd,
    peers: OwnedFd,
    _prog: OwnedFd,
}

impl Redirector {
    /// Creates the maps for up to `sessions` forwarded sessions and attaches the program.
    /// The error is the kernel's own: EPERM without CAP_BPF and CAP_NET_ADMIN or under a
    /// syscall filter, EINVAL on a kernel without sockhash.
    pub fn new(sessions: u32) -> io::Result<Redirector> {
        let entries = sessions.saturating_mul(2).max(2);
        let socks = map_create(BPF_MAP_TYPE_SOCKHASH, 8, 4, entries, 0)?;
        let peers = map_create(BPF_MAP_TYPE_HASH, 8, 8, entries, BPF_F_NO_PREALLOC)?;
        let insns = program(peers.as_raw_fd(), socks.as_raw_fd());
        let license = b"GPL\0";
        let mut log = vec![0u8; 4096];
        let mut attr = [0u64; 16];
        attr[0] = u64::from(BPF_PROG_TYPE_SK_SKB) | ((insns.len() as u64) << 32);
        attr[1] = insns.as_ptr() as u64;
        attr[2] = license.as_ptr() as u64;
        attr[3] = 1 | ((log.len() as u64) << 32);
        attr[4] = log.as_mut_ptr() as u64;
        // expected_attach_type sits at byte 68: after kern_version, prog_flags, prog_name[16]
        // and prog_ifindex.
        attr[8] = u64::from(BPF_SK_SKB_STREAM_VERDICT) << 32;
        let prog = bpf(BPF_PROG_LOAD, &mut attr).map(owned).map_err(|e| {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            io::Error::new(e.kind(), format!("{e}; verifier: {}", text.trim()))
        })?;
        let mut attr = [0u64; 16];
        attr[0] = socks.as_raw_fd() as u64 | ((prog.as_raw_fd() as u64) << 32);
        attr[1] = u64::from(BPF_SK_SKB_STREAM_VERDICT);
        bpf(BPF_PROG_ATTACH, &mut attr)?;
        Ok(Redirector {
            socks,
            peers,
            _prog: prog,
        })
    }

    /// Pairs `a` and `b`: from now on each one's bytes go to the other. Both sockets go in
    /// before either peer entry: until its peer entry is in, a socket's bytes pass to user
    /// space (which moves them); a peer entry naming a socket not yet in the map would drop
    /// them.
    fn pair(&self, a: &Link, b: &Link) -> io::Result<()> {
        for s in [a, b] {
            let fd: u32 = s.fd as u32;
            map_update(&self.socks, &s.cookie, &fd as *const u32 as *const u8)?;
        }
        map_update(&self.peers, &a.cookie, &b.cookie as *const u64 as *const u8)?;
        map_update(&self.peers, &b.cookie, &a.cookie as *const u64 as *const u8)?;
        Ok(())
    }

    /// Takes both sockets out of the maps (closing them would too; this frees the peer
    /// entries).
    fn release(&self, client: &TcpStream, backend: &TcpStream) {
        for s in [client, backend] {
            if let Ok(l) = Link::of(s) {
                map_delete(&self.socks, &l.cookie);
                map_delete(&self.peers, &l.cookie);
            }
        }
    }
}

/// A socket's identity in the maps.
struct Link {
    fd: RawFd,
    cookie: u64,
}

impl Link {
    fn of(s: &TcpStream) -> io::Result<Link> {
        let fd = s.as_raw_fd();
        let mut cookie = 0u64;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: cookie and len are live and sized for SO_COOKIE's u64.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                &mut cookie as *mut u64 as *mut libc::c_void,
                &mut len,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Link { fd, cookie })
    }
}

/// The parts of `tcp_info` this module reads.
#[derive(Clone, Copy, Debug, Default)]
pub struct TcpInfo {
    pub state: u8,
    pub last_data_sent_ms: u32,
    pub last_data_recv_ms: u32,
    pub bytes_acked: u64,
    pub bytes_received: u64,
}

/// TCP states past ESTABLISHED in which the peer's FIN has arrived.
const TCP_CLOSE_WAIT: u8 = 8;
const TCP_LAST_ACK: u8 = 9;
const TCP_CLOSE: u8 = 7;
const TCP_CLOSING: u8 = 11;
const TCP_TIME_WAIT: u8 = 6;

impl TcpInfo {
    pub fn of(fd: RawFd) -> io::Result<TcpInfo> {
        let mut buf = [0u8; 232];
        let mut len = buf.len() as libc::socklen_t;
        // SAFETY: buf and len are live; the kernel writes at most len bytes.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                buf.as_mut_ptr() as *mut libc::c_void,
                &mut len,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let u32_at = |o: usize| u32::from_ne_bytes(buf[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_ne_bytes(buf[o..o + 8].try_into().unwrap());
        Ok(TcpInfo {
            state: buf[0],
            last_data_sent_ms: u32_at(44),
            last_data_recv_ms: u32_at(52),
            bytes_acked: u64_at(120),
            bytes_received: u64_at(128),
        })
    }

    fn fin_received(&self) -> bool {
        matches!(
            self.state,
            TCP_CLOSE_WAIT | TCP_LAST_ACK | TCP_CLOSE | TCP_CLOSING | TCP_TIME_WAIT
        )
    }
}

/// Bytes written into `fd` so far: acknowledged, plus still in its send queue (`SIOCOUTQ`).
fn bytes_queued(fd: RawFd, info: &TcpInfo) -> io::Result<u64> {
    let mut outq: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int.
    let r = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut outq) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info.bytes_acked + outq as u64)
}

fn socket_error(s: &TcpStream) -> Option<io::Error> {
    socket2::SockRef::from(s).take_error().ok().flatten()
}

/// What ended one direction's wait.
enum Event {
    Fin,
    Error(io::Error),
}

/// Waits until `s` has received a FIN or failed. Bytes are redirected before user space sees
/// them, so every other wake-up (the kernel still signals arrivals) is cleared and waited past.
async fn until_end(s: &TcpStream) -> Event {
    loop {
        if let Err(e) = s.ready(Interest::READABLE).await {
            return Event::Error(e);
        }
        // Cleared before looking, so a FIN that lands after the look wakes the next wait.
        let _ = s.try_io(Interest::READABLE, || -> io::Result<()> {
            Err(io::ErrorKind::WouldBlock.into())
        });
        if let Some(e) = socket_error(s) {
            return Event::Error(e);
        }
        match TcpInfo::of(s.as_raw_fd()) {
            Ok(info) if info.fin_received() => return Event::Fin,
            Ok(_) => {}
            Err(e) => return Event::Error(e),
        }
    }
}

/// Waits until every byte `src` received is in `dst`'s send queue, then shuts `dst` for
/// writing, so the FIN follows the redirected bytes. The redirect runs in a kernel worker, so
/// the last bytes may still be on their way: polled at a fine step while they are.
async fn pass_fin(src: &TcpStream, dst: &TcpStream, offset: i64) -> io::Result<()> {
    let mut step = Duration::from_micros(50);
    loop {
        let got = TcpInfo::of(src.as_raw_fd())?.bytes_received;
        let dinfo = TcpInfo::of(dst.as_raw_fd())?;
        let queued = bytes_queued(dst.as_raw_fd(), &dinfo)?;
        if queued as i64 >= got as i64 + offset {
            break;
        }
        if let Some(e) = socket_error(dst) {
            return Err(e);
        }
        tokio::time::sleep(step).await;
        step = (step * 2).min(Duration::from_millis(10));
    }
    match socket2::SockRef::from(dst).shutdown(std::net::Shutdown::Write) {
        Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e),
        _ => Ok(()),
    }
}

/// Bytes `src` has received that user space has read (`tcp_info`'s bytes received less what
/// waits in the receive queue, `SIOCINQ`), read again until no byte arrived in between.
fn consumed(src: &TcpStream) -> io::Result<u64> {
    let inq = |fd: RawFd| -> io::Result<u64> {
        let mut n: libc::c_int = 0;
        // SAFETY: SIOCINQ writes one int.
        if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as u64)
    };
    let fd = src.as_raw_fd();
    loop {
        let before = inq(fd)?;
        let got = TcpInfo::of(fd)?.bytes_received;
        if inq(fd)? == before {
            return Ok(got - before);
        }
    }
}

/// Where a direction stands at the handover: what `dst` had been given and what user space had
/// read from `src`. Every byte `src` receives from then on ends up in `dst`'s send queue.
#[derive(Clone, Copy)]
struct Mark {
    queued: u64,
    consumed: u64,
}

impl Mark {
    fn take(src: &TcpStream, dst: &TcpStream) -> io::Result<Mark> {
        let info = TcpInfo::of(dst.as_raw_fd())?;
        Ok(Mark {
            queued: bytes_queued(dst.as_raw_fd(), &info)?,
            consumed: consumed(src)?,
        })
    }

    /// dst's queued bytes minus src's received bytes once everything has gone across.
    fn offset(self) -> i64 {
        self.queued as i64 - self.consumed as i64
    }
}

/// Hands the pair to the kernel. Bytes that arrived before the handover are still in the
/// sockets' receive queues: they are moved in user space, right after the pairing (an SMTP
/// client sends nothing more before the reply to them).
async fn handover(r: &Redirector, client: &TcpStream, backend: &TcpStream) -> io::Result<()> {
    let (a, b) = (Link::of(client)?, Link::of(backend)?);
    r.pair(&a, &b)?;
    for (src, dst) in [(client, backend), (backend, client)] {
        let mut buf = [0u8; 4096];
        loop {
            // A plain recv, not tokio's try_read: the bytes may be there before tokio has
            // seen the socket readable.
            // SAFETY: buf is live and writable for its length.
            let n = unsafe {
                libc::recv(
                    src.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n > 0 {
                super::write_all(dst, &buf[..n as usize]).await?;
                continue;
            }
            let e = io::Error::last_os_error();
            match n {
                0 => break,
                _ if e.kind() == io::ErrorKind::WouldBlock => break,
                _ if e.kind() == io::ErrorKind::Interrupted => continue,
                _ => return Err(e),
            }
        }
    }
    Ok(())
}

/// One direction: waits for `src`'s FIN or error, then passes the FIN on to `dst`.
async fn direction(
    src: &TcpStream,
    dst: &TcpStream,
    mark: Mark,
    to: Side,
) -> Result<(), (Side, io::Error)> {
    let from = match to {
        Side::Client => Side::Backend,
        Side::Backend => Side::Client,
    };
    match until_end(src).await {
        Event::Error(e) => Err((from, e)),
        Event::Fin => pass_fin(src, dst, mark.offset()).await.map_err(|e| (to, e)),
    }
}

/// The sockmap counterpart of [`super::forward`]: the same ends, the same report.
pub async fn forward(
    client: &TcpStream,
    backend: &TcpStream,
    r: &Redirector,
    timeouts: Timeouts,
    traffic: &Traffic,
    relayed: Relayed,
    cancel: std::pin::Pin<&mut (dyn Future<Output = ()> + Send)>,
) -> Report {
    let start = Instant::now();
    let marks = Mark::take(client, backend).and_then(|up| Ok((up, Mark::take(backend, client)?)));
    let (up_mark, down_mark) = match marks {
        Ok(m) => m,
        Err(e) => {
            return report(
                client,
                backend,
                relayed,
                None,
                start,
                End::Fault(Side::Client, e),
                traffic,
            )
        }
    };
    if let Err(e) = handover(r, client, backend).await {
        r.release(client, backend);
        let end = End::Fault(Side::Client, e);
        return report(
            client,
            backend,
            relayed,
            Some((up_mark, down_mark)),
            start,
            end,
            traffic,
        );
    }
    let end = watch(client, backend, up_mark, down_mark, timeouts, cancel).await;
    r.release(client, backend);
    report(
        client,
        backend,
        relayed,
        Some((up_mark, down_mark)),
        start,
        end,
        traffic,
    )
}

/// Waits for both directions to end, a fault, inactivity past a limit, or `cancel`.
async fn watch(
    client: &TcpStream,
    backend: &TcpStream,
    up_mark: Mark,
    down_mark: Mark,
    timeouts: Timeouts,
    cancel: std::pin::Pin<&mut (dyn Future<Output = ()> + Send)>,
) -> End {
    let mut cancel = cancel;
    let mut up = std::pin::pin!(direction(client, backend, up_mark, Side::Backend));
    let mut down = std::pin::pin!(direction(backend, client, down_mark, Side::Client));
    let (mut up_done, mut down_done) = (false, false);
    let mut backend_done_at: Option<Instant> = None;
    // The slow timer: inactivity is read from tcp_info, a quarter of the limit (at most a
    // second) after the last look.
    let period =
        |limit: Duration| (limit / 4).clamp(Duration::from_millis(1), Duration::from_secs(1));
    let mut timer = std::pin::pin!(tokio::time::sleep(period(timeouts.idle())));
    std::future::poll_fn(|cx| {
        if cancel.as_mut().poll(cx).is_ready() {
            return Poll::Ready(End::Cancelled);
        }
        if !up_done {
            match up.as_mut().poll(cx) {
                Poll::Ready(Ok(())) => up_done = true,
                Poll::Ready(Err((side, e))) => return Poll::Ready(End::Fault(side, e)),
                Poll::Pending => {}
            }
        }
        if !down_done {
            match down.as_mut().poll(cx) {
                Poll::Ready(Ok(())) => {
                    down_done = true;
                    backend_done_at = Some(Instant::now());
                }
                Poll::Ready(Err((side, e))) => return Poll::Ready(End::Fault(side, e)),
                Poll::Pending => {}
            }
        }
        if up_done && down_done {
            return Poll::Ready(End::Closed);
        }
        loop {
            std::task::ready!(timer.as_mut().poll(cx));
            let (c, b) = match (
                TcpInfo::of(client.as_raw_fd()),
                TcpInfo::of(backend.as_raw_fd()),
            ) {
                (Ok(c), Ok(b)) => (c, b),
                (Err(e), _) => return Poll::Ready(End::Fault(Side::Client, e)),
                (_, Err(e)) => return Poll::Ready(End::Fault(Side::Backend, e)),
            };
            let (limit, quiet, end) = match backend_done_at {
                Some(at) => {
                    let since = u32::try_from(at.elapsed().as_millis()).unwrap_or(u32::MAX);
                    (
                        timeouts.half_close(),
                        c.last_data_recv_ms.min(since),
                        End::HalfClosed,
                    )
                }
                None => (
                    timeouts.idle(),
                    c.last_data_recv_ms.min(b.last_data_recv_ms),
                    End::Idle,
                ),
            };
            let quiet = Duration::from_millis(quiet.into());
            if quiet >= limit {
                return Poll::Ready(end);
            }
            let next = (limit - quiet).min(period(limit));
            timer.as_mut().reset(Instant::now() + next);
        }
    })
    .await
}

/// The session's report, its byte counts from tcp_info; feeds `traffic` what the kernel moved.
fn report(
    client: &TcpStream,
    backend: &TcpStream,
    relayed: Relayed,
    marks: Option<(Mark, Mark)>,
    start: Instant,
    end: End,
    traffic: &Traffic,
) -> Report {
    let moved = |src: &TcpStream, mark: Option<Mark>| -> u64 {
        match (mark, TcpInfo::of(src.as_raw_fd())) {
            (Some(m), Ok(info)) => info.bytes_received.saturating_sub(m.consumed),
            _ => 0,
        }
    };
    let up = moved(client, marks.map(|m| m.0));
    let down = moved(backend, marks.map(|m| m.1));
    traffic.client_to_backend.increment(up);
    traffic.backend_to_client.increment(down);
    Report {
        client_to_backend: u64::from(relayed.client_to_backend) + up,
        backend_to_client: u64::from(relayed.backend_to_client) + down,
        spliced: 0,
        duration: start.elapsed(),
        end,
    }
}
