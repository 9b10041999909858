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
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(100);

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
}

#[derive(Debug)]
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Stream>>,
    pub rate_per_vm: u32,
}

/// Starts `rate_per_vm` transfers per second to each target, from namespace `client_ns`.
pub fn start(
    client_ns: &str,
    targets: &[(String, Ipv4Addr)],
    rate_per_vm: u32,
) -> Result<Load, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for (i, (vm, ip)) in targets.iter().enumerate() {
        let (vm, ip, stop) = (vm.clone(), *ip, stop.clone());
        let period = Duration::from_secs_f64(1.0 / f64::from(rate_per_vm.max(1)));
        let h = dczone_lab::sys::in_namespace(client_ns, move || {
            run_stream(vm, ip, period, stop, now_us() * 1024 + ((i as u64) << 32))
        })
        .map_err(|e| e.to_string())?;
        threads.push(h);
    }
    Ok(Load {
        stop,
        threads,
        rate_per_vm,
    })
}

fn connect(ip: Ipv4Addr) -> Option<(TcpStream, BufReader<TcpStream>)> {
    let s = TcpStream::connect_timeout(&SocketAddr::from((ip, 7000)), Duration::from_millis(300))
        .ok()?;
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
        let (from, to) = (id % 1000, (id * 7 + 3) % 1000);
        let t0 = Instant::now();
        out.sent += 1;
        line.clear();
        let ok = writeln!(w, "T {id} {from} {to} 1").is_ok()
            && r.read_line(&mut line).is_ok()
            && (line.starts_with("OK") || line.starts_with("DUP"));
        if ok {
            out.ok.push((now_us(), t0.elapsed().as_micros() as u64));
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
    pub before: Phase,
    pub during: Phase,
    pub after: Phase,
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
        }
    }
}

/// One request to a guest's ledger from `client_ns`; returns the answer line.
pub fn query(client_ns: &str, ip: Ipv4Addr, request: &str) -> Result<String, String> {
    let request = request.to_string();
    dczone_lab::sys::in_namespace(client_ns, move || -> Result<String, String> {
        let (mut w, mut r) = connect(ip).ok_or_else(|| format!("cannot reach {ip}:7000"))?;
        writeln!(w, "{request}").map_err(|e| e.to_string())?;
        let mut line = String::new();
        r.read_line(&mut line).map_err(|e| e.to_string())?;
        Ok(line.trim().to_string())
    })
    .map_err(|e| e.to_string())?
    .join()
    .map_err(|_| "query thread panicked".to_string())?
}
