//! The frame keeper: a lossless switchover for the VM's clients.
//!
//! While a VM is stopped for its switchover (T2), frames sent to it still reach the source
//! host: the switches learn the VM's new place only from the destination's announce. QEMU
//! does not read its TAP while the VM is stopped, so those frames wait in the TAP's queue
//! and die with the source QEMU. A client's TCP then resends after its retransmission
//! timeout: 1 s for a SYN, 200 ms doubling for data, so one lost segment costs a client
//! far more than T2.
//!
//! The keeper runs on the source host. It copies every frame sent to the VM's TAP (a packet
//! socket sees them as the TAP transmits them, before they queue) and watches the host's
//! uplink for the announce: the first frame from the VM's MAC that arrives from outside.
//! Once the caller says the destination took over (`replay_from(stop)`), the frames kept
//! from the source's stop on are sent out of the uplink as soon as the announce has passed,
//! so that the switches deliver them to the destination; later ones are forwarded at once
//! for a short tail. If the migration fails the source resumes and reads its own queue;
//! the keeper then replays nothing (`discard`).
//!
//! A frame that arrived an instant before the stop may have been read by the source guest
//! and is replayed too (`MARGIN_US`): a duplicate TCP segment or transfer request is
//! harmless (TCP drops it; the ledger's transfers are idempotent by id), a lost one is not.
//!
//! [`Buffer`] holds the decisions, pure and on injected timestamps; [`FrameKeeper`] is the
//! Linux part (AF_PACKET sockets with virtio-net headers, so that GSO super-frames keep
//! their offload information).

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// Frames this long before the source's STOP event are replayed too: the source may not
/// have read them before it stopped.
pub const MARGIN_US: u64 = 20_000;
/// Without an announce this long after `replay_from`, replay anyway.
pub const ANNOUNCE_TIMEOUT_US: u64 = 3_000_000;
/// After the replay, frames still arriving at the source (in flight while the switches
/// relearned) are forwarded this long.
pub const TAIL_US: u64 = 300_000;
/// Frames older than this are dropped while no stop is known (the migration's T1 is long).
pub const WINDOW_US: u64 = 10_000_000;
/// At most this many bytes are kept; the oldest go first.
pub const CAP_BYTES: usize = 64 << 20;

/// What the keeper did, for the migration's record.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KeeperReport {
    /// Frames to the VM that arrived at the source from its stop on and were replayed.
    pub frames_replayed: u64,
    pub bytes_replayed: u64,
    /// Of those, frames forwarded after the replay (in flight when the switches relearned).
    pub frames_forwarded: u64,
    /// From the source's stop to the announce seen at the source host, ms.
    pub announce_after_stop_ms: Option<f64>,
    /// The replay had to go without an announce.
    pub announce_timed_out: bool,
    /// Frames the keeper could not keep or send (memory cap, send errors).
    pub frames_lost: u64,
}

/// The kept frames and the replay decision.
#[derive(Debug, Default)]
pub struct Buffer {
    frames: VecDeque<(u64, Vec<u8>)>,
    bytes: usize,
    /// Arrival times of frames from the VM's MAC seen from outside (the last few).
    announces: VecDeque<u64>,
    from_us: Option<u64>,
    armed_at_us: Option<u64>,
    released_at_us: Option<u64>,
    discarded: bool,
    report: KeeperReport,
}

/// What the keeper loop does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Keep,
    /// Send these frames now, in order.
    Send(Vec<Vec<u8>>),
    Done,
}

impl Buffer {
    /// A frame to the VM arrived at the source's TAP at `ts_us`.
    pub fn frame(&mut self, ts_us: u64, frame: Vec<u8>) -> Next {
        if self.discarded {
            return Next::Done;
        }
        if let (Some(_), Some(from)) = (self.released_at_us, self.from_us) {
            if ts_us + MARGIN_US >= from {
                self.report.frames_replayed += 1;
                self.report.frames_forwarded += 1;
                self.report.bytes_replayed += frame.len() as u64;
                return Next::Send(vec![frame]);
            }
            return Next::Keep;
        }
        self.bytes += frame.len();
        self.frames.push_back((ts_us, frame));
        while self.bytes > CAP_BYTES {
            let Some((_, f)) = self.frames.pop_front() else {
                break;
            };
            self.bytes -= f.len();
            // Before a stop is known the oldest frames were delivered anyway.
            if self.from_us.is_some() {
                self.report.frames_lost += 1;
            }
        }
        if self.from_us.is_none() {
            while self
                .frames
                .front()
                .is_some_and(|(t, _)| t + WINDOW_US < ts_us)
            {
                let (_, f) = self.frames.pop_front().expect("front exists");
                self.bytes -= f.len();
            }
        }
        Next::Keep
    }

    /// A frame from the VM's MAC arrived at the source host from outside.
    pub fn announce(&mut self, ts_us: u64) {
        self.announces.push_back(ts_us);
        if self.announces.len() > 16 {
            self.announces.pop_front();
        }
    }

    /// The destination took over; the source stopped at `stop_us` and never runs again.
    pub fn replay_from(&mut self, stop_us: u64, now_us: u64) {
        self.from_us = Some(stop_us);
        self.armed_at_us = Some(now_us);
    }

    /// The migration failed and the source resumes: nothing is replayed.
    pub fn discard(&mut self) {
        self.discarded = true;
        self.frames.clear();
        self.bytes = 0;
    }

    /// Called on every wake-up of the keeper loop.
    pub fn tick(&mut self, now_us: u64) -> Next {
        if self.discarded {
            return Next::Done;
        }
        let (Some(from), Some(armed)) = (self.from_us, self.armed_at_us) else {
            return Next::Keep;
        };
        if let Some(released) = self.released_at_us {
            return if now_us >= released + TAIL_US {
                Next::Done
            } else {
                Next::Keep
            };
        }
        let announce = self
            .announces
            .iter()
            .copied()
            .find(|&t| t + MARGIN_US >= from);
        let timed_out = now_us >= armed + ANNOUNCE_TIMEOUT_US;
        if announce.is_none() && !timed_out {
            return Next::Keep;
        }
        self.report.announce_after_stop_ms = announce.map(|a| a.saturating_sub(from) as f64 / 1e3);
        self.report.announce_timed_out = announce.is_none();
        self.released_at_us = Some(now_us);
        let frames: Vec<Vec<u8>> = std::mem::take(&mut self.frames)
            .into_iter()
            .filter(|(t, _)| t + MARGIN_US >= from)
            .map(|(_, f)| f)
            .collect();
        self.bytes = 0;
        self.report.frames_replayed += frames.len() as u64;
        self.report.bytes_replayed += frames.iter().map(|f| f.len() as u64).sum::<u64>();
        Next::Send(frames)
    }

    pub fn report(&self) -> KeeperReport {
        self.report.clone()
    }

    /// The replay has gone out (frames arriving now are forwarded at once).
    pub fn released(&self) -> bool {
        self.released_at_us.is_some()
    }

    /// `n` of the frames handed out for sending could not be sent.
    pub fn sends_failed(&mut self, n: u64) {
        self.report.frames_replayed = self.report.frames_replayed.saturating_sub(n);
        self.report.frames_lost += n;
    }
}

// Linux ABI values (include/uapi/linux/if_packet.h, asm-generic/socket.h).
const PACKET_OUTGOING: u8 = 4;
const PACKET_VNET_HDR: libc::c_int = 15;
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
const SO_TIMESTAMPNS: libc::c_int = 35;
const VNET_HDR_LEN: usize = 10;

/// The keeper's two packet sockets, opened in the source host's network namespace, and the
/// uplink's own MAC (the source address of replayed frames).
#[derive(Debug)]
pub struct Sockets {
    tap: OwnedFd,
    up: OwnedFd,
    up_mac: [u8; 6],
}

/// The keeper of one VM's frames on its source host.
#[derive(Debug)]
pub struct FrameKeeper {
    buffer: Arc<Mutex<Buffer>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FrameKeeper {
    /// Starts keeping the frames sent to `tap` for `mac`, watching `uplink` for the
    /// announce. `open` runs the socket set-up where the host's interfaces are (the lab
    /// enters the host's namespace; sockets keep their namespace afterwards).
    pub fn start(
        tap: &str,
        uplink: &str,
        mac: &str,
        open: impl FnOnce(
            Box<dyn FnOnce() -> std::io::Result<Sockets> + Send>,
        ) -> std::io::Result<Sockets>,
    ) -> std::io::Result<FrameKeeper> {
        let mac = parse_mac(mac)?;
        let (tap, uplink) = (tap.to_string(), uplink.to_string());
        let sockets = open(Box::new(move || {
            // The uplink carries the migration stream out: only what comes in matters.
            let (up, up_mac) = packet_socket(&uplink, true)?;
            let (tap, _) = packet_socket(&tap, false)?;
            Ok(Sockets { tap, up, up_mac })
        }))?;
        let buffer = Arc::new(Mutex::new(Buffer::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (buffer, stop) = (buffer.clone(), stop.clone());
            std::thread::Builder::new()
                .name("frame-keeper".into())
                .spawn(move || run(sockets, mac, &buffer, &stop))?
        };
        Ok(FrameKeeper {
            buffer,
            stop,
            thread: Some(thread),
        })
    }

    /// The destination took over: replay what arrived from `stop_us` on, after the announce.
    pub fn replay_from(&self, stop_us: u64) {
        let mut b = self.buffer.lock().expect("keeper buffer");
        b.replay_from(stop_us, unix_us());
    }

    /// The source resumes: it reads its own queue, nothing is replayed.
    pub fn discard(mut self) {
        self.buffer.lock().expect("keeper buffer").discard();
        self.join();
    }

    /// Waits until the replay and its tail are done (bounded by the announce timeout and
    /// the tail), and says what was replayed.
    pub fn wait(mut self) -> KeeperReport {
        self.join();
        self.buffer.lock().expect("keeper buffer").report()
    }

    fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            let armed = self
                .buffer
                .lock()
                .expect("keeper buffer")
                .armed_at_us
                .is_some();
            if !armed {
                self.stop.store(true, Ordering::SeqCst);
            }
            let _ = t.join();
        }
    }
}

impl Drop for FrameKeeper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn parse_mac(mac: &str) -> std::io::Result<[u8; 6]> {
    let bytes: Vec<u8> = mac
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .map_err(|_| std::io::Error::other(format!("bad MAC '{mac}'")))?;
    bytes
        .try_into()
        .map_err(|_| std::io::Error::other(format!("bad MAC '{mac}'")))
}

fn check(rc: libc::c_int, what: &str) -> std::io::Result<libc::c_int> {
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(rc)
}

/// A packet socket bound to `ifname`, with virtio-net headers and kernel timestamps;
/// `incoming_only` leaves out what the host sends on it.
fn packet_socket(ifname: &str, incoming_only: bool) -> std::io::Result<(OwnedFd, [u8; 6])> {
    let name = std::ffi::CString::new(ifname).map_err(std::io::Error::other)?;
    // SAFETY: plain libc calls on a socket this function owns; pointers are to live locals.
    unsafe {
        let index = libc::if_nametoindex(name.as_ptr());
        if index == 0 {
            return Err(std::io::Error::other(format!(
                "no interface '{ifname}' on this host"
            )));
        }
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // Protocol 0 until bound: a socket created with ETH_P_ALL hears every interface
        // until `bind` narrows it.
        let fd = check(
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            ),
            "packet socket",
        )?;
        let fd = OwnedFd::from_raw_fd(fd);
        let one: libc::c_int = 1;
        let opt = |level, name, value: &libc::c_int| {
            libc::setsockopt(
                fd.as_raw_fd(),
                level,
                name,
                (value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        check(
            opt(libc::SOL_PACKET, PACKET_VNET_HDR, &one),
            "PACKET_VNET_HDR",
        )?;
        check(
            opt(libc::SOL_SOCKET, SO_TIMESTAMPNS, &one),
            "SO_TIMESTAMPNS",
        )?;
        if incoming_only {
            check(
                opt(libc::SOL_PACKET, PACKET_IGNORE_OUTGOING, &one),
                "PACKET_IGNORE_OUTGOING",
            )?;
        }
        let rcvbuf: libc::c_int = 8 << 20;
        check(
            opt(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &rcvbuf),
            "SO_RCVBUFFORCE",
        )?;
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = index as i32;
        check(
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            ),
            "bind packet socket",
        )?;
        let mut req: libc::ifreq = std::mem::zeroed();
        for (d, c) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
            *d = *c as libc::c_char;
        }
        check(
            libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req),
            "SIOCGIFHWADDR",
        )?;
        let hw = req.ifr_ifru.ifru_hwaddr.sa_data;
        let mac = [hw[0], hw[1], hw[2], hw[3], hw[4], hw[5]].map(|b| b as u8);
        Ok((fd, mac))
    }
}

/// What one read of a packet socket gave.
enum Received {
    /// (packet type, kernel timestamp in unix us, bytes with the vnet header).
    Frame(u8, u64, usize),
    Empty,
    /// The interface is gone (the source QEMU quit and took its TAP).
    Gone,
}

fn receive(fd: &OwnedFd, buf: &mut [u8]) -> Received {
    // SAFETY: recvmsg into buffers owned by this frame; the control buffer is large enough
    // for one timespec message and is read with the CMSG helpers.
    unsafe {
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut control = [0u64; 16];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = (&mut addr as *mut libc::sockaddr_ll).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        let n = libc::recvmsg(fd.as_raw_fd(), &mut msg, 0);
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => Received::Empty,
                _ => Received::Gone,
            };
        }
        if n == 0 {
            return Received::Empty;
        }
        let mut ts = unix_us();
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == SO_TIMESTAMPNS {
                let t: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                ts = t.tv_sec as u64 * 1_000_000 + t.tv_nsec as u64 / 1_000;
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
        Received::Frame(addr.sll_pkttype, ts, n as usize)
    }
}

/// Sends one kept frame out of the uplink with the uplink's own source MAC: with the
/// client's, the switches would learn the client's address on the source host's port and
/// send the VM's answers there. A full device queue is waited out briefly.
fn send(fd: &OwnedFd, frame: &mut [u8], source: [u8; 6]) -> bool {
    if frame.len() >= VNET_HDR_LEN + 14 {
        frame[VNET_HDR_LEN + 6..VNET_HDR_LEN + 12].copy_from_slice(&source);
    }
    for _ in 0..50 {
        // SAFETY: send of a buffer owned by the caller on a bound packet socket.
        let n = unsafe { libc::send(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n == frame.len() as isize {
            return true;
        }
        let e = std::io::Error::last_os_error();
        let busy =
            e.kind() == std::io::ErrorKind::WouldBlock || e.raw_os_error() == Some(libc::ENOBUFS);
        if !busy {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    false
}

/// Frames read from one socket per wake-up, at most: the loop must reach `tick`.
const READ_BATCH: usize = 256;

fn run(sockets: Sockets, mac: [u8; 6], buffer: &Mutex<Buffer>, stop: &AtomicBool) {
    let Sockets { tap, up, up_mac } = sockets;
    let mut buf = vec![0u8; 70 * 1024];
    let mut tap_open = true;
    let is_frame = |n: usize| n >= VNET_HDR_LEN + 14;
    loop {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let mut fds = [
            libc::pollfd {
                // A negative descriptor is ignored: a TAP that is gone stops waking us.
                fd: if tap_open { tap.as_raw_fd() } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: up.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll on two descriptors this thread owns.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, 5) };
        let mut out = Vec::new();
        for _ in 0..READ_BATCH {
            if !tap_open {
                break;
            }
            match receive(&tap, &mut buf) {
                Received::Frame(kind, ts, n) => {
                    let frame = &buf[..n];
                    if kind == PACKET_OUTGOING && is_frame(n) && frame[VNET_HDR_LEN..][..6] == mac {
                        let next = buffer
                            .lock()
                            .expect("keeper buffer")
                            .frame(ts, frame.to_vec());
                        if let Next::Send(f) = next {
                            out.extend(f);
                        }
                    }
                }
                Received::Empty => break,
                Received::Gone => tap_open = false,
            }
        }
        for _ in 0..READ_BATCH {
            let Received::Frame(kind, ts, n) = receive(&up, &mut buf) else {
                break;
            };
            let frame = &buf[..n];
            if kind == PACKET_OUTGOING || !is_frame(n) {
                continue;
            }
            let mut b = buffer.lock().expect("keeper buffer");
            if frame[VNET_HDR_LEN + 6..][..6] == mac {
                b.announce(ts);
            } else if frame[VNET_HDR_LEN..][..6] == mac && !tap_open && b.released() {
                // Still in flight to the source after its TAP went: forward it too.
                if let Next::Send(f) = b.frame(ts, frame.to_vec()) {
                    out.extend(f);
                }
            }
        }
        let next = buffer.lock().expect("keeper buffer").tick(unix_us());
        let done = match next {
            Next::Send(f) => {
                out.extend(f);
                false
            }
            Next::Done => true,
            Next::Keep => false,
        };
        let mut lost = 0u64;
        for f in &mut out {
            if !send(&up, f, up_mac) {
                lost += 1;
            }
        }
        if lost > 0 {
            buffer.lock().expect("keeper buffer").sends_failed(lost);
        }
        if done {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(n: u8) -> Vec<u8> {
        vec![n; 60]
    }

    #[test]
    fn frames_from_the_stop_on_wait_for_the_announce_then_go_in_order() {
        let mut b = Buffer::default();
        b.frame(1_000_000, f(1)); // long before the stop: the source read it
        b.frame(1_990_000, f(2)); // within the margin: replayed, maybe a duplicate
        b.frame(2_050_000, f(3)); // during T2
        b.replay_from(2_000_000, 2_100_000);
        assert_eq!(b.tick(2_110_000), Next::Keep, "no announce yet");
        b.announce(1_500_000); // the VM's own frame before the stop: not the announce
        assert_eq!(b.tick(2_120_000), Next::Keep);
        b.announce(2_130_000);
        assert_eq!(b.tick(2_131_000), Next::Send(vec![f(2), f(3)]));
        let r = b.report();
        assert_eq!(r.frames_replayed, 2);
        assert_eq!(r.announce_after_stop_ms, Some(130.0));
        // In flight when the switches relearned: forwarded at once, during the tail.
        assert_eq!(b.frame(2_140_000, f(4)), Next::Send(vec![f(4)]));
        assert_eq!(b.tick(2_131_000 + TAIL_US - 1), Next::Keep);
        assert_eq!(b.tick(2_131_000 + TAIL_US), Next::Done);
        assert_eq!(b.report().frames_forwarded, 1);
    }

    #[test]
    fn an_announce_seen_before_the_caller_knew_releases_at_once() {
        let mut b = Buffer::default();
        b.frame(5_010_000, f(1));
        b.announce(5_040_000);
        b.replay_from(5_000_000, 5_200_000);
        assert_eq!(b.tick(5_200_001), Next::Send(vec![f(1)]));
    }

    #[test]
    fn without_an_announce_the_replay_goes_after_the_timeout() {
        let mut b = Buffer::default();
        b.frame(10_000, f(1));
        b.replay_from(0, 100_000);
        assert_eq!(b.tick(100_000 + ANNOUNCE_TIMEOUT_US - 1), Next::Keep);
        assert_eq!(
            b.tick(100_000 + ANNOUNCE_TIMEOUT_US),
            Next::Send(vec![f(1)])
        );
        assert!(b.report().announce_timed_out);
    }

    #[test]
    fn a_failed_migration_replays_nothing() {
        let mut b = Buffer::default();
        b.frame(10_000, f(1));
        b.announce(20_000);
        b.discard();
        assert_eq!(b.tick(30_000), Next::Done);
        assert_eq!(b.report().frames_replayed, 0);
    }

    #[test]
    fn before_a_stop_is_known_only_a_window_and_a_cap_are_kept() {
        let mut b = Buffer::default();
        b.frame(0, f(1));
        b.frame(WINDOW_US + 1, f(2));
        b.replay_from(0, WINDOW_US + 2);
        b.announce(WINDOW_US + 3);
        assert_eq!(
            b.tick(WINDOW_US + 4),
            Next::Send(vec![f(2)]),
            "the first aged out"
        );
        // Over the cap after the stop, the oldest kept frame is lost (and said so).
        let mut b = Buffer::default();
        b.replay_from(0, 0);
        let big = vec![0u8; CAP_BYTES / 2 + 1];
        b.frame(1, big.clone());
        b.frame(2, big);
        assert_eq!(b.report().frames_lost, 1);
    }

    #[test]
    fn mac_text_parses_or_says_what_is_wrong() {
        assert_eq!(
            parse_mac("02:dc:01:02:65:01").unwrap(),
            [2, 0xdc, 1, 2, 0x65, 1]
        );
        assert!(parse_mac("02:dc")
            .unwrap_err()
            .to_string()
            .contains("02:dc"));
    }
}
