//! The load generator: from a client namespace, one paced stream of idempotent transfers per
//! VM of a cluster, each request timestamped (microseconds, wall clock, the clock QMP events
//! use), so availability gaps line up with T2 intervals.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde::Serialize;

use dczone_measure::{gaps, union, Interval};

/// A request not answered within this is retried, with the same id, on a new connection:
/// a client of a financial service does not wait out TCP's retransmission backoff, and
/// the ledger's idempotency makes the retry safe (a duplicate answers `DUP`).
pub const REQUEST_TIMEOUT: Duration = Duration::from_millis(100);
/// A lost SYN (the VM is stopped mid-switchover) is retried after this, not after TCP's 1 s.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(300);
/// The standard-TCP probers (no application retry) ask each VM this often: on the
/// long-lived connection every 50 ms, on a new connection every 100 ms. Not more: every
/// new connection is a guest thread under TCG, and at 10/20 ms the probers halved the
/// guests' throughput and multiplied their p99 by ten (BENCHMARKS.md): the measurement
/// must not become the guest's main load.
pub const PROBE_PERIOD: Duration = Duration::from_millis(50);
pub const FRESH_PERIOD: Duration = Duration::from_millis(100);
/// A standard client gives up on one request after this (the kernel's own SYN and data
/// retransmissions run meanwhile: 1 s, 3 s, 7 s ...).
pub const PROBE_GIVE_UP: Duration = Duration::from_secs(15);

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// One VM's stream.
#[derive(Debug)]
pub struct Stream {
    pub vm: String,
    /// (completion time us, latency us) of each successful request.
    pub ok: Vec<(u64, u64)>,
    pub errors: u64,
    pub sent: u64,
    /// The ids of the acknowledged transfers ([`transfer`] gives each one's request).
    pub acked: Vec<u64>,
}

/// The request of the stream's transfer `id`: one unit between two accounts derived from
/// the id, so that a client's log of acknowledged ids is enough to send them again.
pub fn transfer(id: u64) -> String {
    format!("T {id} {} {} 1", id % 1000, (id * 7 + 3) % 1000)
}

/// What one VM's standard-TCP probers saw: (start us, end us, answered) per request.
#[derive(Debug, Default)]
pub struct Probes {
    pub vm: String,
    /// One long-lived connection (a connection pool's): a request every
    /// [`PROBE_PERIOD`], the next sent once the previous is answered.
    pub pool: Vec<(u64, u64, bool)>,
    /// A new connection per request, opened every [`FRESH_PERIOD`] whatever the others do.
    pub fresh: Vec<(u64, u64, bool)>,
}

/// Why the load could not start, or a request went unanswered.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("cannot run in the client's namespace")]
    Namespace(#[source] dczone_lab::LabError),
    #[error("cannot reach the ledger at {0}:7000")]
    Unreachable(Ipv4Addr),
    #[error("the request to {ip}:7000 failed")]
    Request {
        ip: Ipv4Addr,
        #[source]
        source: std::io::Error,
    },
    #[error("the request thread panicked")]
    Panicked,
}

#[derive(Debug)]
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Stream>>,
    probes: Vec<JoinHandle<Probes>>,
    pub rate_per_vm: u32,
}

/// Starts `rate_per_vm` transfers per second to each target, from namespace `client_ns`.
pub fn start(
    client_ns: &str,
    targets: &[(String, Ipv4Addr)],
    rate_per_vm: u32,
) -> Result<Load, WorkloadError> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for (i, (vm, ip)) in targets.iter().enumerate() {
        let (vm, ip, stop) = (vm.clone(), *ip, stop.clone());
        let period = Duration::from_secs_f64(1.0 / f64::from(rate_per_vm.max(1)));
        let h = dczone_lab::sys::in_namespace(client_ns, move || {
            run_stream(vm, ip, period, stop, now_us() * 1024 + ((i as u64) << 32))
        })
        .map_err(WorkloadError::Namespace)?;
        threads.push(h);
    }
    let mut probes = Vec::new();
    // `DCZONE_TCP_PROBES=off` measures what the probers themselves cost the guests.
    let probing = std::env::var("DCZONE_TCP_PROBES").map_or(true, |v| v != "off");
    for (vm, ip) in targets.iter().filter(|_| probing) {
        let (vm, ip, stop) = (vm.clone(), *ip, stop.clone());
        let h = dczone_lab::sys::in_namespace(client_ns, move || probe(vm, ip, stop))
            .map_err(WorkloadError::Namespace)?;
        probes.push(h);
    }
    Ok(Load {
        stop,
        threads,
        probes,
        rate_per_vm,
    })
}

/// One read-only request (`B 1`, a balance) on `s`; true if answered.
fn ask(s: &TcpStream, r: &mut BufReader<TcpStream>) -> bool {
    let mut line = String::new();
    (&*s).write_all(b"B 1\n").is_ok() && r.read_line(&mut line).is_ok_and(|n| n > 0)
}

/// A new connection, one request, closed: what a client that connects per request sees.
/// Blocking connect and read: only the kernel's TCP retransmits, up to [`PROBE_GIVE_UP`].
fn fresh_request(ip: Ipv4Addr) -> bool {
    let Ok(s) = TcpStream::connect_timeout(&SocketAddr::from((ip, 7000)), PROBE_GIVE_UP) else {
        return false;
    };
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(PROBE_GIVE_UP));
    let _ = s.set_write_timeout(Some(PROBE_GIVE_UP));
    let Ok(c) = s.try_clone() else { return false };
    ask(&s, &mut BufReader::new(c))
}

/// The standard-TCP probers of one VM: a long-lived connection in this thread, and a new
/// connection every [`FRESH_PERIOD`] on threads of their own (they inherit the namespace).
fn probe(vm: String, ip: Ipv4Addr, stop: Arc<AtomicBool>) -> Probes {
    let fresh = Arc::new(std::sync::Mutex::new(Vec::new()));
    let launcher = {
        let (stop, fresh) = (stop.clone(), fresh.clone());
        std::thread::spawn(move || {
            let mut inflight = Vec::new();
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let fresh = fresh.clone();
                inflight.push(std::thread::spawn(move || {
                    let t0 = now_us();
                    let ok = fresh_request(ip);
                    if let Ok(mut v) = fresh.lock() {
                        v.push((t0, now_us(), ok));
                    }
                }));
                inflight.retain(|h: &JoinHandle<()>| !h.is_finished());
                next += FRESH_PERIOD;
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            for h in inflight {
                let _ = h.join();
            }
        })
    };
    let mut pool = Vec::new();
    let mut conn: Option<(TcpStream, BufReader<TcpStream>)> = None;
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let t0 = now_us();
        if conn.is_none() {
            conn = TcpStream::connect_timeout(&SocketAddr::from((ip, 7000)), PROBE_GIVE_UP)
                .ok()
                .and_then(|s| {
                    s.set_nodelay(true).ok()?;
                    s.set_read_timeout(Some(PROBE_GIVE_UP)).ok()?;
                    let r = BufReader::new(s.try_clone().ok()?);
                    Some((s, r))
                });
        }
        let ok = conn.as_mut().is_some_and(|(s, r)| ask(s, r));
        pool.push((t0, now_us(), ok));
        if !ok {
            // A pool replaces a broken connection; the wait so far is the client's.
            conn = None;
        }
        next += PROBE_PERIOD;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
    let _ = launcher.join();
    let fresh = std::mem::take(&mut *fresh.lock().unwrap_or_else(|e| e.into_inner()));
    Probes { vm, pool, fresh }
}

/// The longest wait a client of the long-lived connection saw: the longest interval
/// between two answers, ms.
pub fn pool_gap_ms(requests: &[(u64, u64, bool)]) -> f64 {
    let mut ends: Vec<u64> = requests.iter().filter(|r| r.2).map(|r| r.1).collect();
    ends.sort_unstable();
    ends.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0) as f64 / 1e3
}

/// The longest wait of one client that connected for one request: the longest request,
/// answered or not, ms.
pub fn fresh_gap_ms(requests: &[(u64, u64, bool)]) -> f64 {
    requests
        .iter()
        .map(|r| r.1.saturating_sub(r.0))
        .max()
        .unwrap_or(0) as f64
        / 1e3
}

fn connect(ip: Ipv4Addr) -> Option<(TcpStream, BufReader<TcpStream>)> {
    let s = TcpStream::connect_timeout(&SocketAddr::from((ip, 7000)), CONNECT_TIMEOUT).ok()?;
    s.set_nodelay(true).ok()?;
    s.set_read_timeout(Some(REQUEST_TIMEOUT)).ok()?;
    let r = BufReader::new(s.try_clone().ok()?);
    Some((s, r))
}

fn run_stream(
    vm: String,
    ip: Ipv4Addr,
    period: Duration,
    stop: Arc<AtomicBool>,
    id_base: u64,
) -> Stream {
    let mut out = Stream {
        vm,
        ok: Vec::new(),
        errors: 0,
        sent: 0,
        acked: Vec::new(),
    };
    let mut conn = None;
    let mut next = Instant::now();
    let mut id = id_base;
    let mut retrying = false;
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        if conn.is_none() {
            conn = connect(ip);
            if conn.is_none() {
                out.errors += 1;
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
        }
        let (w, r) = conn.as_mut().expect("connected");
        if !retrying {
            id += 1;
        }
        let t0 = Instant::now();
        out.sent += 1;
        line.clear();
        let ok = writeln!(w, "{}", transfer(id)).is_ok()
            && r.read_line(&mut line).is_ok()
            && (line.starts_with("OK") || line.starts_with("DUP"));
        if ok {
            out.ok.push((now_us(), t0.elapsed().as_micros() as u64));
            out.acked.push(id);
            retrying = false;
        } else {
            // Retry the same id at once on a new connection.
            out.errors += 1;
            conn = None;
            retrying = true;
            continue;
        }
        next += period;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
    out
}

/// Summary of a load run around a disturbance window (e.g. a migration).
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub rate_per_vm: u32,
    pub sent: u64,
    pub ok: u64,
    pub errors: u64,
    /// Gaps per VM: intervals without a successful response, longer than the threshold.
    pub vm_gaps: Vec<(String, Vec<Interval>)>,
    /// The service is down while any of its VMs is: the union of the VMs' gaps.
    pub service_gaps: Vec<Interval>,
    /// Longest service gap, ms.
    pub client_gap_ms: f64,
    /// Standard TCP, no application retry, worst VM: the longest interval between two
    /// answers on a long-lived connection, ms.
    pub tcp_gap_pool_ms: f64,
    /// ... and the longest single request on a new connection (connect + answer), ms.
    pub tcp_gap_new_ms: f64,
    /// Requests of the standard-TCP probers that were never answered.
    pub tcp_probe_failures: u64,
    /// Per VM: (vm, pool gap ms, new-connection gap ms).
    pub tcp_gaps: Vec<(String, f64, f64)>,
    pub before: Phase,
    pub during: Phase,
    pub after: Phase,
    /// Per VM, its acknowledged transfers (a client's log): id, and when the answer came
    /// (us).
    #[serde(skip)]
    pub acked: Vec<(String, Vec<(u64, u64)>)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub tps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

fn phase(streams: &[Stream], from_us: u64, to_us: u64) -> Phase {
    let mut h = Histogram::<u64>::new(3).expect("valid histogram");
    let mut n = 0u64;
    for s in streams {
        for &(t, lat) in &s.ok {
            if t >= from_us && t < to_us {
                n += 1;
                let _ = h.record(lat.max(1));
            }
        }
    }
    let secs = (to_us.saturating_sub(from_us)) as f64 / 1e6;
    let q = |x: f64| {
        if h.is_empty() {
            0.0
        } else {
            h.value_at_quantile(x) as f64 / 1e3
        }
    };
    Phase {
        tps: if secs > 0.0 { n as f64 / secs } else { 0.0 },
        p50_ms: q(0.5),
        p99_ms: q(0.99),
    }
}

impl Load {
    /// Stops the streams and summarizes them around `[window_start_us, window_end_us)`.
    pub fn finish(self, started_us: u64, window: Interval) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        let streams: Vec<Stream> = self
            .threads
            .into_iter()
            .filter_map(|h| h.join().ok())
            .collect();
        let probes: Vec<Probes> = self
            .probes
            .into_iter()
            .filter_map(|h| h.join().ok())
            .collect();
        let tcp_gaps: Vec<(String, f64, f64)> = probes
            .iter()
            .map(|p| (p.vm.clone(), pool_gap_ms(&p.pool), fresh_gap_ms(&p.fresh)))
            .collect();
        let ended = now_us();
        let period_us = 1_000_000 / u64::from(self.rate_per_vm.max(1));
        // A gap is more than three request periods, and at least 20 ms, without success.
        let threshold = (3 * period_us).max(20_000);
        let vm_gaps: Vec<(String, Vec<Interval>)> = streams
            .iter()
            .map(|s| {
                let mut times: Vec<u64> = s.ok.iter().map(|(t, _)| *t).collect();
                times.push(started_us);
                times.push(ended);
                (s.vm.clone(), gaps(&times, threshold))
            })
            .collect();
        let all: Vec<Interval> = vm_gaps
            .iter()
            .flat_map(|(_, g)| g.iter().copied())
            .collect();
        let service_gaps = union(&all);
        let client_gap_ms =
            service_gaps.iter().map(Interval::len_us).max().unwrap_or(0) as f64 / 1e3;
        LoadReport {
            rate_per_vm: self.rate_per_vm,
            sent: streams.iter().map(|s| s.sent).sum(),
            ok: streams.iter().map(|s| s.ok.len() as u64).sum(),
            errors: streams.iter().map(|s| s.errors).sum(),
            before: phase(&streams, started_us, window.start_us),
            during: phase(&streams, window.start_us, window.end_us),
            after: phase(&streams, window.end_us, ended),
            vm_gaps,
            service_gaps,
            client_gap_ms,
            tcp_gap_pool_ms: tcp_gaps.iter().map(|g| g.1).fold(0.0, f64::max),
            tcp_gap_new_ms: tcp_gaps.iter().map(|g| g.2).fold(0.0, f64::max),
            tcp_probe_failures: probes
                .iter()
                .flat_map(|p| p.pool.iter().chain(&p.fresh))
                .filter(|r| !r.2)
                .count() as u64,
            tcp_gaps,
            acked: streams
                .into_iter()
                .map(|s| {
                    let at = s.ok.iter().map(|(t, _)| *t);
                    (s.vm, s.acked.iter().copied().zip(at).collect())
                })
                .collect(),
        }
    }
}

/// One request to a guest's ledger from `client_ns`; returns the answer line.
pub fn query(client_ns: &str, ip: Ipv4Addr, request: &str) -> Result<String, WorkloadError> {
    query_waiting(client_ns, ip, request, None)
}

/// [`query`] for a request that takes long (`F`, writing data at rest): its answer is
/// waited for up to `wait`.
pub fn query_waiting(
    client_ns: &str,
    ip: Ipv4Addr,
    request: &str,
    wait: Option<Duration>,
) -> Result<String, WorkloadError> {
    let request = request.to_string();
    dczone_lab::sys::in_namespace(client_ns, move || -> Result<String, WorkloadError> {
        let (mut w, mut r) = connect(ip).ok_or(WorkloadError::Unreachable(ip))?;
        let failed = |source| WorkloadError::Request { ip, source };
        if let Some(wait) = wait {
            r.get_ref().set_read_timeout(Some(wait)).map_err(failed)?;
        }
        writeln!(w, "{request}").map_err(failed)?;
        let mut line = String::new();
        r.read_line(&mut line).map_err(failed)?;
        Ok(line.trim().to_string())
    })
    .map_err(WorkloadError::Namespace)?
    .join()
    .map_err(|_| WorkloadError::Panicked)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_gap_is_the_longest_silence_between_answers() {
        let r = [
            (0, 1_000, true),
            (10_000, 11_000, true),
            (20_000, 1_250_000, true),
            (1_260_000, 1_261_000, true),
            (1_270_000, 1_300_000, false),
        ];
        assert_eq!(pool_gap_ms(&r), 1_239.0);
        assert_eq!(pool_gap_ms(&[]), 0.0);
    }

    #[test]
    fn fresh_gap_is_the_longest_single_request_answered_or_not() {
        let r = [
            (0, 900, true),
            (10_000, 1_030_000, true),
            (20_000, 21_000, false),
        ];
        assert_eq!(fresh_gap_ms(&r), 1_020.0);
    }
}
