//! The data path: one thread, one epoll set over every TAP, the control socket and a
//! timerfd.
//!
//! Each turn of the loop (1) writes every frame whose delivery time has come, (2) sleeps
//! until the earliest next delivery or until a TAP is readable, and (3) reads up to
//! `READ_BATCH` frames per readable TAP, switches them and admits them to their paths.
//!
//! Timing: the timerfd is armed `spin_ns` before the next delivery (timer slack is set to
//! 1 ns), after which the loop polls epoll without sleeping until the frame is due. This
//! gives microsecond delivery precision at the cost of a short busy-poll per delivery.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use crate::control::{EmulatorConfig, PathStats, PortStats, Request, Response, Stats};
use crate::frame::{self, VNET_HDR_LEN};
use crate::path::Path;
use crate::switch::{Forward, MacTable};
use crate::tap;

/// Frames read from one TAP before looking at the others and at the clock.
const READ_BATCH: usize = 32;
/// A GSO super-frame of 64 KiB plus the vnet header and an Ethernet header.
const LARGE_BUF: usize = 65_536 + VNET_HDR_LEN + 64;
/// Frames up to this size are copied into a small buffer, so that an ACK in flight does not
/// pin a 64 KiB buffer.
const SMALL_BUF: usize = 2048;
const POOL_LIMIT: usize = 1024;

/// Closer than this to a delivery, the poll loop stops yielding the CPU.
const YIELD_MARGIN_NS: u64 = 20_000;

const TOKEN_CONTROL: u64 = u64::MAX - 1;
const TOKEN_TIMER: u64 = u64::MAX - 2;

/// Why the emulator could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("config names no ports")]
    NoPorts,
    #[error("path {from} -> {to} names an unknown port")]
    UnknownPort { from: String, to: String },
    #[error("cannot open TAP '{tap}' for port '{port}'")]
    Tap {
        port: String,
        tap: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on control socket {}", path.display())]
    Control {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{call} failed")]
    Sys {
        call: &'static str,
        #[source]
        source: io::Error,
    },
}

fn sys(call: &'static str) -> impl FnOnce(io::Error) -> EngineError {
    move |source| EngineError::Sys { call, source }
}

fn check(call: &'static str, rc: libc::c_int) -> Result<libc::c_int, EngineError> {
    if rc < 0 {
        Err(EngineError::Sys {
            call,
            source: io::Error::last_os_error(),
        })
    } else {
        Ok(rc)
    }
}

/// CLOCK_MONOTONIC in nanoseconds, the clock the timerfd uses.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

struct Port {
    name: String,
    tap: File,
    stats: PortStats,
}

#[derive(Default)]
struct Pools {
    large: Vec<Vec<u8>>,
    small: Vec<Vec<u8>>,
}

impl Pools {
    fn large(&mut self) -> Vec<u8> {
        self.large.pop().unwrap_or_else(|| vec![0; LARGE_BUF])
    }

    fn copy_small(&mut self, data: &[u8]) -> Vec<u8> {
        let mut v = self
            .small
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(SMALL_BUF));
        v.clear();
        v.extend_from_slice(data);
        v
    }

    fn give_back(&mut self, mut buf: Vec<u8>) {
        if buf.capacity() >= LARGE_BUF {
            if self.large.len() < POOL_LIMIT {
                buf.resize(LARGE_BUF, 0);
                self.large.push(buf);
            }
        } else if self.small.len() < POOL_LIMIT {
            self.small.push(buf);
        }
    }
}

fn mem_of(buf: &Vec<u8>) -> u64 {
    buf.capacity() as u64
}

/// The running emulator.
pub struct Engine {
    ports: Vec<Port>,
    /// `paths[lane * n * n + from * n + to]`; lane 0 carries everything, lane 1 (the bulk
    /// lane) bulk transfers on paths that have one. `None` on the diagonal, for
    /// unconfigured pairs and for paths without a bulk lane.
    paths: Vec<Option<Path<Vec<u8>>>>,
    macs: MacTable,
    pools: Pools,
    listener: UnixListener,
    epoll: OwnedFd,
    timer: OwnedFd,
    armed_for: Option<u64>,
    spin_ns: u64,
    idle_poll_ns: u64,
    priority_ports: Vec<u16>,
    bulk_ports: Vec<u16>,
    last_activity: u64,
    started: u64,
    delivered: u64,
    late_sum: u64,
    late_max: u64,
    late_buckets: [u64; LATE_BUCKETS_US.len() + 1],
}

/// Upper bounds (us) of the lateness histogram in [`Stats::late_buckets`].
pub const LATE_BUCKETS_US: [u64; 5] = [5, 20, 50, 100, 1000];

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("ports", &self.ports.len())
            .finish()
    }
}

impl Engine {
    /// Opens the TAPs and the control socket in the calling thread's namespace.
    pub fn new(config: &EmulatorConfig) -> Result<Engine, EngineError> {
        if config.ports.is_empty() {
            return Err(EngineError::NoPorts);
        }
        let mut ports = Vec::new();
        for p in &config.ports {
            let tap = tap::open(&p.tap).map_err(|source| EngineError::Tap {
                port: p.name.clone(),
                tap: p.tap.clone(),
                source,
            })?;
            ports.push(Port {
                name: p.name.clone(),
                tap,
                stats: PortStats {
                    name: p.name.clone(),
                    ..PortStats::default()
                },
            });
        }
        let n = ports.len();
        let mut paths: Vec<Option<Path<Vec<u8>>>> = (0..2 * n * n).map(|_| None).collect();
        for (i, pc) in config.paths.iter().enumerate() {
            let find = |name: &str| ports.iter().position(|p| p.name == name);
            let (Some(a), Some(b)) = (find(&pc.from), find(&pc.to)) else {
                return Err(EngineError::UnknownPort {
                    from: pc.from.clone(),
                    to: pc.to.clone(),
                });
            };
            paths[a * n + b] = Some(Path::new(pc.params, config.seed ^ (i as u64 + 1)));
            if pc.params.bulk_lane {
                paths[n * n + a * n + b] =
                    Some(Path::new(pc.params, config.seed ^ !(i as u64 + 1)));
            }
        }
        let _ = std::fs::remove_file(&config.control_socket);
        let listener =
            UnixListener::bind(&config.control_socket).map_err(|source| EngineError::Control {
                path: config.control_socket.clone(),
                source,
            })?;
        listener.set_nonblocking(true).map_err(sys("fcntl"))?;
        // SAFETY: epoll_create1 returns a new fd or -1; we own it from here on.
        let epoll = unsafe {
            OwnedFd::from_raw_fd(check(
                "epoll_create1",
                libc::epoll_create1(libc::EPOLL_CLOEXEC),
            )?)
        };
        // SAFETY: as above, for timerfd_create.
        let timer = unsafe {
            OwnedFd::from_raw_fd(check(
                "timerfd_create",
                libc::timerfd_create(
                    libc::CLOCK_MONOTONIC,
                    libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
                ),
            )?)
        };
        // SAFETY: PR_SET_TIMERSLACK takes an integer; 1 ns asks for the tightest wakeups.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
        let engine = Engine {
            ports,
            paths,
            macs: MacTable::default(),
            pools: Pools::default(),
            listener,
            epoll,
            timer,
            armed_for: None,
            spin_ns: config.spin_ns,
            idle_poll_ns: config.idle_poll_ns,
            priority_ports: config.priority_ports.clone(),
            bulk_ports: config.bulk_ports.clone(),
            last_activity: 0,
            started: monotonic_ns(),
            delivered: 0,
            late_sum: 0,
            late_max: 0,
            late_buckets: [0; LATE_BUCKETS_US.len() + 1],
        };
        for (i, p) in engine.ports.iter().enumerate() {
            engine.watch(p.tap.as_raw_fd(), i as u64)?;
        }
        engine.watch(engine.listener.as_raw_fd(), TOKEN_CONTROL)?;
        engine.watch(engine.timer.as_raw_fd(), TOKEN_TIMER)?;
        Ok(engine)
    }

    fn watch(&self, fd: RawFd, token: u64) -> Result<(), EngineError> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: both fds are open and owned by the engine; `ev` outlives the call.
        check("epoll_ctl", unsafe {
            libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev)
        })?;
        Ok(())
    }

    /// Runs forever (until the process is killed).
    pub fn run(mut self) -> Result<(), EngineError> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 16];
        loop {
            let now = monotonic_ns();
            self.deliver_due(now);
            let recently_active = now < self.last_activity + self.idle_poll_ns;
            let timeout = match self.next_delivery() {
                _ if recently_active => 0,
                None => -1,
                Some(t) if t <= now + self.spin_ns => {
                    if t > now + YIELD_MARGIN_NS {
                        // Busy-polling must not starve per-CPU kernel work (ksoftirqd) that
                        // the frames we deliver depend on.
                        // SAFETY: sched_yield has no arguments and no memory effects.
                        unsafe { libc::sched_yield() };
                    }
                    0
                }
                Some(t) => {
                    self.arm(t - self.spin_ns)?;
                    -1
                }
            };
            // SAFETY: `events` is a valid array of the length we pass.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as i32,
                    timeout,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(EngineError::Sys {
                    call: "epoll_wait",
                    source: err,
                });
            }
            for ev in &events[..n as usize] {
                match ev.u64 {
                    TOKEN_CONTROL => self.accept_control(),
                    TOKEN_TIMER => {
                        let mut buf = [0u8; 8];
                        // SAFETY: reading 8 bytes into an 8-byte buffer clears the timerfd.
                        unsafe { libc::read(self.timer.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
                        self.armed_for = None;
                    }
                    port => self.read_port(port as usize),
                }
            }
        }
    }

    fn arm(&mut self, at: u64) -> Result<(), EngineError> {
        if self.armed_for == Some(at) {
            return Ok(());
        }
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (at / 1_000_000_000) as libc::time_t,
                tv_nsec: (at % 1_000_000_000) as libc::c_long,
            },
        };
        // SAFETY: the timerfd is ours; `spec` is a valid itimerspec; old value not wanted.
        check("timerfd_settime", unsafe {
            libc::timerfd_settime(
                self.timer.as_raw_fd(),
                libc::TFD_TIMER_ABSTIME,
                &spec,
                std::ptr::null_mut(),
            )
        })?;
        self.armed_for = Some(at);
        Ok(())
    }

    fn next_delivery(&self) -> Option<u64> {
        self.paths
            .iter()
            .flatten()
            .filter_map(|p| p.next_delivery())
            .min()
    }

    fn deliver_due(&mut self, now: u64) {
        let n = self.ports.len();
        for (idx, slot) in self.paths.iter_mut().enumerate() {
            let Some(path) = slot else { continue };
            while let Some(due) = path.next_delivery().filter(|&t| t <= now) {
                let Some(buf) = path.pop_due(now, mem_of) else {
                    break;
                };
                let late = monotonic_ns().saturating_sub(due);
                let port = &mut self.ports[idx % n];
                match port.tap.write(&buf) {
                    Ok(_) => {
                        port.stats.tx_frames += 1;
                        port.stats.tx_bytes += (buf.len() - VNET_HDR_LEN) as u64;
                    }
                    Err(_) => port.stats.tx_errors += 1,
                }
                self.delivered += 1;
                self.last_activity = now;
                self.late_sum += late;
                self.late_max = self.late_max.max(late);
                let bucket = LATE_BUCKETS_US
                    .iter()
                    .position(|&us| late < us * 1000)
                    .unwrap_or(LATE_BUCKETS_US.len());
                self.late_buckets[bucket] += 1;
                self.pools.give_back(buf);
            }
        }
    }

    fn read_port(&mut self, ingress: usize) {
        let n = self.ports.len();
        for _ in 0..READ_BATCH {
            let mut buf = self.pools.large();
            let len = match self.ports[ingress].tap.read(&mut buf) {
                Ok(len) if len > VNET_HDR_LEN => len,
                Ok(_) => {
                    self.pools.give_back(buf);
                    continue;
                }
                Err(_) => {
                    // WouldBlock: drained. Anything else: the TAP is gone; the lab restarts us.
                    self.pools.give_back(buf);
                    return;
                }
            };
            let now = monotonic_ns();
            self.last_activity = now;
            buf.truncate(len);
            let stats = &mut self.ports[ingress].stats;
            stats.rx_frames += 1;
            stats.rx_bytes += (len - VNET_HDR_LEN) as u64;
            let Some((dst, src)) = frame::macs(&buf) else {
                self.pools.give_back(buf);
                continue;
            };
            let cost = frame::wire_cost(&buf);
            let priority = frame::is_priority(&buf, &self.priority_ports);
            let bulk = !priority && frame::uses_port(&buf, &self.bulk_ports);
            let targets: Vec<usize> = match self.macs.forward(ingress, dst, src) {
                Forward::Port(p) => vec![p],
                Forward::Flood => (0..n).filter(|&p| p != ingress).collect(),
                Forward::Drop => Vec::new(),
            };
            let mut original = Some(buf);
            for (k, &to) in targets.iter().enumerate() {
                let main = ingress * n + to;
                let lane = if bulk && self.paths[n * n + main].is_some() {
                    n * n + main
                } else {
                    main
                };
                let Some(path) = self.paths[lane].as_mut() else {
                    continue;
                };
                let data = original.as_deref().unwrap_or(&[]);
                let copy = if len <= SMALL_BUF {
                    self.pools.copy_small(data)
                } else if k + 1 == targets.len() {
                    original.take().unwrap_or_default()
                } else {
                    data.to_vec()
                };
                let mem = mem_of(&copy);
                // A dropped frame is counted by the path and its buffer freed.
                let _ = if priority {
                    path.admit_priority(now, cost.bytes, cost.segments, copy, mem)
                } else {
                    path.admit(now, cost.bytes, cost.segments, copy, mem)
                };
            }
            if let Some(b) = original {
                self.pools.give_back(b);
            }
        }
    }

    fn accept_control(&mut self) {
        while let Ok((stream, _)) = self.listener.accept() {
            let _ = self.serve(stream);
        }
    }

    fn serve(&mut self, stream: UnixStream) -> io::Result<()> {
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(Duration::from_millis(200)))?;
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line)?;
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(req) => self.handle(req),
            Err(e) => Response::Error {
                message: format!("bad request: {e}"),
            },
        };
        let mut out = serde_json::to_vec(&response).map_err(io::Error::other)?;
        out.push(b'\n');
        (&stream).write_all(&out)
    }

    fn handle(&mut self, req: Request) -> Response {
        match req {
            Request::Ping => Response::Ok,
            Request::Stats => Response::Stats(self.stats()),
            Request::SetPaths { paths } => {
                let n = self.ports.len();
                let find = |name: &str| self.ports.iter().position(|p| p.name == name);
                let mut updates = Vec::new();
                for pc in &paths {
                    match (find(&pc.from), find(&pc.to)) {
                        (Some(a), Some(b)) if a != b => updates.push((a * n + b, pc.params)),
                        _ => {
                            return Response::Error {
                                message: format!(
                                    "path {} -> {} does not join two distinct known ports",
                                    pc.from, pc.to
                                ),
                            }
                        }
                    }
                }
                for (idx, params) in updates {
                    self.set_path(idx, params);
                    if params.bulk_lane {
                        self.set_path(n * n + idx, params);
                    } else if let Some(mut lane) = self.paths[n * n + idx].take() {
                        // The lane is released: what it still carries is lost with it.
                        while let Some(buf) = lane.pop_due(u64::MAX, mem_of) {
                            self.pools.give_back(buf);
                        }
                    }
                }
                Response::Ok
            }
        }
    }

    /// Creates or changes the path in slot `idx`; a path that becomes blackholed loses
    /// the frames in it.
    fn set_path(&mut self, idx: usize, params: crate::path::PathParams) {
        let slot = &mut self.paths[idx];
        let was_cut = slot.as_ref().is_none_or(|p| p.params().blackhole);
        match slot {
            Some(p) => p.set_params(params),
            None => *slot = Some(Path::new(params, idx as u64 + 1)),
        }
        if params.blackhole && !was_cut {
            if let Some(p) = slot.as_mut() {
                while let Some(buf) = p.pop_due(u64::MAX, mem_of) {
                    self.pools.give_back(buf);
                }
            }
        }
    }

    fn stats(&self) -> Stats {
        let n = self.ports.len();
        let paths = self
            .paths
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                p.as_ref().map(|p| PathStats {
                    from: self.ports[(i % (n * n)) / n].name.clone(),
                    to: self.ports[i % n].name.clone(),
                    bulk_lane: i >= n * n,
                    params: p.params(),
                    counters: p.counters,
                })
            })
            .collect();
        Stats {
            uptime_ns: monotonic_ns() - self.started,
            cpu_ns: cpu_ns(),
            rss_bytes: rss_bytes(),
            in_flight_bytes: self
                .paths
                .iter()
                .flatten()
                .map(|p| p.in_flight_bytes())
                .sum(),
            mac_entries: self.macs.len(),
            delivered_frames: self.delivered,
            late_ns_sum: self.late_sum,
            late_ns_max: self.late_max,
            late_buckets: self.late_buckets.to_vec(),
            ports: self.ports.iter().map(|p| p.stats.clone()).collect(),
            paths,
        }
    }
}

/// User + system CPU time of this process.
fn cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Resident set size from /proc/self/statm.
fn rss_bytes() -> u64 {
    let mut text = String::new();
    let ok = File::open("/proc/self/statm")
        .and_then(|mut f| f.read_to_string(&mut text))
        .is_ok();
    let pages: u64 = if ok {
        text.split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    } else {
        0
    };
    pages * 4096
}
