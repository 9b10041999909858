//! `lab probe`: measures RTT and single-flow TCP throughput between sites from inside the
//! host namespaces, and compares them with what the zone configures.
//!
//! RTT uses ICMP echo with kernel timestamps (one probe outstanding at a time, histogram
//! in nanoseconds). Throughput is one TCP flow for a few seconds, measured
//! at the receiver after a warm-up, so slow start does not count against the link.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::{sys, Lab, LabError};

/// Goodput of a full-size TCP segment over its wire cost: 1448 payload bytes (MTU 1500,
/// TCP timestamps) over 1500 + 14 (Ethernet) + 24 (preamble, FCS, gap) = 1538 bytes.
pub const TCP_GOODPUT_RATIO: f64 = 1448.0 / 1538.0;

#[derive(Debug, Clone)]
pub struct ProbeOptions {
    pub pings: usize,
    pub interval: Duration,
    pub throughput: Duration,
    pub warmup: Duration,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        ProbeOptions {
            pings: 200,
            interval: Duration::ZERO,
            throughput: Duration::from_secs(2),
            warmup: Duration::from_millis(300),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RttStats {
    pub samples: u64,
    pub lost: u64,
    pub min_ms: f64,
    /// The 10th percentile: what the path costs when the host is not busy elsewhere.
    pub p10_ms: f64,
    pub median_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub mbit: f64,
    pub bytes: u64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PairReport {
    pub a: String,
    pub b: String,
    pub host_a: String,
    pub host_b: String,
    pub configured_one_way_delay_ms: f64,
    pub configured_rtt_ms: f64,
    pub configured_lab_mbit: f64,
    /// Highest TCP goodput the configured rate allows (`TCP_GOODPUT_RATIO` of it).
    pub goodput_ceiling_mbit: f64,
    /// Bandwidth-delay product of the path at its lab rate.
    pub bdp_bytes: u64,
    pub blackholed: bool,
    pub rtt: Option<RttStats>,
    pub throughput: Option<Throughput>,
    /// Achieved throughput / configured lab bandwidth.
    pub throughput_fraction: Option<f64>,
    pub rtt_median_ok: bool,
    pub rtt_p99_ok: bool,
    pub throughput_ok: bool,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProbeReport {
    pub lab: String,
    pub pairs: Vec<PairReport>,
    pub all_ok: bool,
}

/// Fidelity targets (issue 2): median RTT within 2% + 20 us of twice the one-way delay.
pub fn rtt_median_ok(expected_ms: f64, median_ms: f64) -> bool {
    (median_ms - expected_ms).abs() <= 0.02 * expected_ms + 0.020
}

/// p99 RTT within 50 us of twice the one-way delay.
pub fn rtt_p99_ok(expected_ms: f64, p99_ms: f64) -> bool {
    (p99_ms - expected_ms).abs() <= 0.050
}

/// 90-102 % of the rate up to 0.5 ms one way, at least 80 % on longer paths.
pub fn throughput_ok(one_way_ms: f64, fraction: f64) -> bool {
    if one_way_ms <= 0.5 + 1e-9 {
        (0.90..=1.02).contains(&fraction)
    } else {
        fraction >= 0.80
    }
}

/// Why a probe could not measure.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot run in the host's namespace")]
    Namespace(#[source] Box<LabError>),
    #[error("{what} failed")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("no echo answered ({lost} probes lost)")]
    NoEcho { lost: u64 },
    #[error("the flow ended before its warm-up did")]
    NoWindow,
    #[error("too short a flow to measure")]
    TooShort,
    #[error("the receiver did not start within 5 s")]
    NoReceiver,
    #[error("a probe thread panicked")]
    Panicked,
}

fn io(what: &'static str) -> impl Fn(std::io::Error) -> ProbeError {
    move |source| ProbeError::Io { what, source }
}

fn join<T>(h: std::thread::JoinHandle<T>) -> Result<T, ProbeError> {
    h.join().map_err(|_| ProbeError::Panicked)
}

fn spawn_in<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<std::thread::JoinHandle<T>, ProbeError> {
    sys::in_namespace(ns, f).map_err(|e| ProbeError::Namespace(Box::new(e)))
}

/// RTT from namespace `ns_a` to host `ip_b`, by ICMP echo with kernel timestamps
/// (see [`crate::icmp`]). Probes go back to back, one outstanding at a time, after a
/// warm-up that resolves ARP and teaches the APN switch both MACs.
pub fn measure_rtt(
    ns_a: &str,
    ip_b: Ipv4Addr,
    pings: usize,
    interval: Duration,
) -> Result<RttStats, ProbeError> {
    let client = spawn_in(ns_a, move || -> Result<RttStats, ProbeError> {
        let pinger = crate::icmp::Pinger::new(std::process::id() as u16)
            .map_err(io("open a raw ICMP socket"))?;
        let mut hist = Histogram::<u64>::new(3).expect("valid histogram");
        let mut lost = 0;
        let warmup = 5;
        for seq in 0..(pings + warmup) as u16 {
            match pinger
                .ping(ip_b, seq, Duration::from_millis(500))
                .map_err(io("an echo"))?
            {
                Some(d) if usize::from(seq) >= warmup => {
                    hist.record(d.as_nanos() as u64).expect("in range");
                }
                Some(_) => {}
                None => lost += 1,
            }
            if !interval.is_zero() {
                std::thread::sleep(interval);
            }
        }
        if hist.is_empty() {
            return Err(ProbeError::NoEcho { lost });
        }
        let ms = |ns: u64| ns as f64 / 1e6;
        Ok(RttStats {
            samples: hist.len(),
            lost,
            min_ms: ms(hist.min()),
            p10_ms: ms(hist.value_at_quantile(0.1)),
            median_ms: ms(hist.value_at_quantile(0.5)),
            p99_ms: ms(hist.value_at_quantile(0.99)),
            max_ms: ms(hist.max()),
        })
    })?;
    join(client)?
}

/// One TCP flow from `ns_a` to `ns_b` for `duration`; throughput measured at the receiver
/// after `warmup`.
pub fn measure_tcp(
    ns_a: &str,
    ns_b: &str,
    ip_b: Ipv4Addr,
    duration: Duration,
    warmup: Duration,
) -> Result<Throughput, ProbeError> {
    let (port_tx, port_rx) = std::sync::mpsc::channel();
    let server = spawn_in(ns_b, move || -> Result<Throughput, ProbeError> {
        let listener = TcpListener::bind("0.0.0.0:0").map_err(io("listen"))?;
        let _ = port_tx.send(listener.local_addr().map_err(io("listen"))?.port());
        listener.set_nonblocking(true).map_err(io("listen"))?;
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(io("accept the flow within 5 s")(e)),
            }
        };
        stream
            .set_nonblocking(false)
            .map_err(io("set up the flow"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .map_err(io("set up the flow"))?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut first: Option<Instant> = None;
        let mut counted = 0u64;
        let mut window_start: Option<Instant> = None;
        let mut last = Instant::now();
        loop {
            let n = stream.read(&mut buf).map_err(io("receive"))?;
            if n == 0 {
                break;
            }
            let now = Instant::now();
            let f = *first.get_or_insert(now);
            if now.duration_since(f) >= warmup {
                if window_start.is_none() {
                    window_start = Some(now);
                } else {
                    counted += n as u64;
                    last = now;
                }
            }
        }
        let start = window_start.ok_or(ProbeError::NoWindow)?;
        let seconds = last.duration_since(start).as_secs_f64();
        if seconds <= 0.0 {
            return Err(ProbeError::TooShort);
        }
        Ok(Throughput {
            mbit: counted as f64 * 8.0 / seconds / 1e6,
            bytes: counted,
            seconds,
        })
    })?;
    let port = port_rx
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| ProbeError::NoReceiver)?;
    let client = spawn_in(ns_a, move || -> Result<(), ProbeError> {
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::from((ip_b, port)), Duration::from_secs(3))
                .map_err(io("connect"))?;
        s.set_write_timeout(Some(Duration::from_secs(3)))
            .map_err(io("connect"))?;
        let chunk = vec![0x5au8; 128 * 1024];
        let end = Instant::now() + duration + warmup;
        while Instant::now() < end {
            s.write_all(&chunk).map_err(io("send"))?;
        }
        s.shutdown(std::net::Shutdown::Write)
            .map_err(io("close the flow"))?;
        Ok(())
    })?;
    let sent = join(client)?;
    let received = join(server)?;
    sent?;
    received
}

impl Lab {
    /// Probes every pair of sites, between the first host of each site.
    pub fn probe(
        &self,
        opts: &ProbeOptions,
        progress: &dyn Fn(usize, usize, &str),
    ) -> Result<ProbeReport, LabError> {
        let state = self.state()?;
        let zone = state.zone()?;
        let params: Vec<_> = state.links.iter().map(|l| l.params()).collect();
        let cut: Vec<_> = state.links.iter().map(|l| l.cut).collect();
        let first_host = |site: usize| {
            zone.hosts()
                .into_iter()
                .find(|h| h.site == site)
                .ok_or_else(|| LabError::BadValue {
                    field: format!("sites[{site}].hosts"),
                    reason: format!("site '{}' has no host to probe from", zone.sites[site].id),
                })
        };
        let n = zone.sites.len();
        let total = n * (n - 1) / 2;
        let mut pairs = Vec::new();
        for a in 0..n {
            for b in a + 1..n {
                let (sa, sb) = (&zone.sites[a].id, &zone.sites[b].id);
                progress(pairs.len(), total, &format!("{sa} <-> {sb}"));
                let (ha, hb) = (first_host(a)?, first_host(b)?);
                let spec = zone.path(a, b, &params, &cut);
                let isolated = state.isolated.contains(sa) || state.isolated.contains(sb);
                let one_way_ms = spec.one_way_delay_ns as f64 / 1e6;
                let lab_bps = zone.lab_rate_bps(spec.bandwidth_bps);
                let lab_mbit = lab_bps as f64 / 1e6;
                let ns_a = self.host_namespace(&ha.id);
                let ns_b = self.host_namespace(&hb.id);
                let mut error = None;
                let rtt = measure_rtt(&ns_a, hb.ip(), opts.pings, opts.interval)
                    .map_err(|e| error = Some(format!("rtt: {}", crate::error_chain(&e))))
                    .ok();
                let throughput = if rtt.is_some() {
                    measure_tcp(&ns_a, &ns_b, hb.ip(), opts.throughput, opts.warmup)
                        .map_err(|e| {
                            error = Some(format!("throughput: {}", crate::error_chain(&e)))
                        })
                        .ok()
                } else {
                    None
                };
                let fraction = throughput.as_ref().map(|t| t.mbit / lab_mbit);
                let rtt_ms = 2.0 * one_way_ms;
                pairs.push(PairReport {
                    a: sa.clone(),
                    b: sb.clone(),
                    host_a: ha.id.clone(),
                    host_b: hb.id.clone(),
                    configured_one_way_delay_ms: one_way_ms,
                    configured_rtt_ms: rtt_ms,
                    configured_lab_mbit: lab_mbit,
                    goodput_ceiling_mbit: lab_mbit * TCP_GOODPUT_RATIO,
                    bdp_bytes: (lab_bps as f64 * rtt_ms / 1e3 / 8.0) as u64,
                    blackholed: spec.blackholed || isolated,
                    rtt_median_ok: rtt
                        .as_ref()
                        .is_some_and(|r| rtt_median_ok(rtt_ms, r.median_ms)),
                    rtt_p99_ok: rtt.as_ref().is_some_and(|r| rtt_p99_ok(rtt_ms, r.p99_ms)),
                    throughput_ok: fraction.is_some_and(|f| throughput_ok(one_way_ms, f)),
                    rtt,
                    throughput,
                    throughput_fraction: fraction,
                    error,
                });
            }
        }
        progress(total, total, "done");
        let all_ok = pairs
            .iter()
            .all(|p| p.rtt_median_ok && p.rtt_p99_ok && p.throughput_ok);
        Ok(ProbeReport {
            lab: self.name().to_string(),
            pairs,
            all_ok,
        })
    }
}

/// Largest host-stack compensation `calibrate` will apply in one direction.
pub const MAX_COMPENSATION_NS: u64 = 250_000;

/// One pair's calibration.
#[derive(Debug, Clone, Serialize)]
pub struct CalibrationPair {
    pub a: String,
    pub b: String,
    pub configured_rtt_ms: f64,
    /// Median RTT with no compensation.
    pub raw_median_rtt_ms: f64,
    /// Subtracted from each direction's delay from now on.
    pub compensation_us: f64,
}

impl Lab {
    /// Measures the latency the host stack adds on each site pair (veth, bridge, TAP and
    /// the emulator's own read and write: tens of microseconds on a nested VM) and
    /// subtracts half of it from each direction's emulated delay, so that what endpoints
    /// observe is the configured propagation delay. Blackholed pairs keep their previous
    /// value. `lab up` and `lab link set --delay` run it; `lab probe` then verifies.
    pub fn calibrate(
        &self,
        progress: &dyn Fn(usize, usize, &str),
    ) -> Result<Vec<CalibrationPair>, LabError> {
        let _lock = self.lock()?;
        let mut state = self.state()?;
        let zone = state.zone()?;
        let params: Vec<_> = state.links.iter().map(|l| l.params()).collect();
        let cut: Vec<_> = state.links.iter().map(|l| l.cut).collect();
        let n = zone.sites.len();
        let hosts = zone.hosts();
        let mut out = Vec::new();
        let mut measured = Vec::new();
        for a in 0..n {
            for b in a + 1..n {
                let spec = zone.path(a, b, &params, &cut);
                let isolated = state.isolated.contains(&zone.sites[a].id)
                    || state.isolated.contains(&zone.sites[b].id);
                let (Some(ha), Some(hb)) = (
                    hosts.iter().find(|h| h.site == a),
                    hosts.iter().find(|h| h.site == b),
                ) else {
                    continue;
                };
                if spec.blackholed || isolated {
                    continue;
                }
                measured.push((a, b, spec.one_way_delay_ns, ha.clone(), hb.clone()));
            }
        }
        // Measure with no compensation on the pairs being measured.
        for (a, b, ..) in &measured {
            state
                .stack_compensation_ns
                .remove(&crate::state::pair_key(*a, *b));
        }
        self.push_paths(&zone, &state)?;
        let total = measured.len();
        for (i, (a, b, one_way_ns, ha, hb)) in measured.into_iter().enumerate() {
            let (sa, sb) = (&zone.sites[a].id, &zone.sites[b].id);
            progress(i, total, &format!("{sa} <-> {sb}"));
            let ns = self.host_namespace(&ha.id);
            let _warm_up = measure_rtt(&ns, hb.ip(), 30, Duration::ZERO);
            let rtt = measure_rtt(&ns, hb.ip(), 300, Duration::ZERO).map_err(|source| {
                LabError::Probe {
                    step: "calibration",
                    a: sa.clone(),
                    b: sb.clone(),
                    source,
                }
            })?;
            // The floor of the stack's latency, not its median: a median taken while the
            // shared host is busy would over-compensate, and the emulated path would then be
            // shorter than the fibre it stands for. Endpoints may see a path a few
            // microseconds long, never a short one.
            let raw_ns = (rtt.p10_ms * 1e6) as u64;
            let comp = (raw_ns.saturating_sub(2 * one_way_ns) / 2).min(MAX_COMPENSATION_NS);
            state
                .stack_compensation_ns
                .insert(crate::state::pair_key(a, b), comp);
            out.push(CalibrationPair {
                a: sa.clone(),
                b: sb.clone(),
                configured_rtt_ms: 2.0 * one_way_ns as f64 / 1e6,
                raw_median_rtt_ms: rtt.median_ms,
                compensation_us: comp as f64 / 1e3,
            });
        }
        progress(total, total, "done");
        self.push_paths(&zone, &state)?;
        Ok(out)
    }
}
