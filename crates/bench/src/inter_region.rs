//! UC2 on the reference zone. Sync and async replication at each
//! distance (TATrxn, Ptrx, TATrsync, TATrasync, grey data), then a DC2.1 failure under sync
//! with availability-first (write stall, unprotected window, return to sync), then disasters
//! of the primary's site (RTO, audit), the first one deterministic and the rest at random
//! moments.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long `db up` may take in a benchmark (as the command's default).
pub const UP_TIMEOUT: Duration = Duration::from_secs(90);

use anyhow::{anyhow, Context};
use serde::Serialize;

use dczone_lab::{Lab, LinkChange};
use dczone_ledger::{unix_us, LoadOptions, LoadResult};
use dczone_zone::database::Replication;

use dczone_database::Database;

use crate::{Header, Observer};

/// How far behind a distance's standby (DC2.1) lies from the others, for `--distances`.
const REMOTE_SITE: &str = "dc2.1";

#[derive(Debug, Clone)]
pub struct InterRegionOptions {
    pub distances_km: Vec<f64>,
    pub clients: usize,
    pub seconds: f64,
    /// Rounds of sync and async at each distance, `seconds` each, alternating.
    pub rounds: usize,
    pub injections: usize,
    pub network: NetworkOptions,
    /// Sweep the clients at the default distance until Ptrx stops growing.
    pub saturation: bool,
}

/// One step of the saturation sweep.
#[derive(Debug, Clone, Serialize)]
pub struct SaturationPoint {
    pub mode: String,
    pub clients: usize,
    pub ptrx: f64,
    pub tatrxn_p50_ms: f64,
    pub tatrsync_excess_ms: Option<f64>,
}

/// Ptrx stops growing when doubling the clients adds less than this.
const SATURATION_GAIN: f64 = 1.05;
const SATURATION_MAX_CLIENTS: usize = 256;

/// One replication mode at one distance.
#[derive(Debug, Clone, Serialize)]
pub struct ModeResult {
    pub distance_km: f64,
    pub clients: usize,
    pub seconds: f64,
    pub acknowledged: usize,
    pub errors: u64,
    pub ptrx: f64,
    pub tatrxn_p50_ms: f64,
    pub tatrxn_p99_ms: f64,
    /// Sync: time for a commit to be confirmed by the synchronous standby (PostgreSQL's
    /// flush_lag of DC2.1, mean of the samples).
    pub tatrsync_ms: Option<f64>,
    /// Sync: TATrsync minus the round trip to DC2.1 at this distance (10 us per km): what
    /// the product adds (standby write and flush, process wake-ups, the emulator).
    pub tatrsync_excess_ms: Option<f64>,
    /// Sync: p99 of the flush_lag samples.
    pub tatrsync_p99_ms: Option<f64>,
    /// Where TATrsync goes (sync only), see [`SyncCost`].
    pub sync_cost: Option<SyncCost>,
    /// Async: replication lag of DC2.1 (flush_lag), mean and p99 of the samples.
    pub tatrasync_ms: Option<f64>,
    pub tatrasync_p99_ms: Option<f64>,
    /// Async: Ptrx x TATrasync, transactions acknowledged but not yet at DC2.1.
    pub grey_data_transactions: Option<f64>,
    /// (seconds into the run, DC2.1 flush lag in ms), every 100 ms.
    pub lag_over_time_ms: Vec<(f64, f64)>,
}

/// TATrsync taken apart, from what PostgreSQL and the network show during the run:
/// `rtt_nominal_ms + network_excess_ms + standby_receive_ms + standby_flush_ms` is
/// TATrsync (up to sampling).
#[derive(Debug, Clone, Serialize)]
pub struct SyncCost {
    /// The fibre's round trip at this distance (10 us per km).
    pub rtt_nominal_ms: f64,
    /// ICMP echo primary -> DC2.1 member during the load, median (kernel timestamps).
    pub rtt_under_load_ms: Option<f64>,
    /// Echo minus the fibre: the emulator's wake-ups and both hosts' network stacks.
    pub network_excess_ms: Option<f64>,
    /// write_lag minus the echo: walsender send, walreceiver wake-up and write, its
    /// reply, the walsender reading it.
    pub standby_receive_ms: Option<f64>,
    /// flush_lag minus write_lag: the standby's fsync of the WAL.
    pub standby_flush_ms: f64,
    /// PostgreSQL's write_lag of DC2.1, mean of the samples.
    pub write_lag_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DistanceResult {
    pub distance_km: f64,
    pub sync: ModeResult,
    #[serde(rename = "async")]
    pub asynch: ModeResult,
    /// Sync Ptrx over async Ptrx, each over all of its rounds.
    pub sync_over_async_ptrx: f64,
    /// The rounds, in the order they ran: sync and async alternate (ABBA), so that a busy
    /// spell of the shared host weighs on both modes, not on one.
    pub rounds: Vec<PtrxRound>,
}

/// One round of the sync/async comparison: each mode's Ptrx over its own run.
#[derive(Debug, Clone, Serialize)]
pub struct PtrxRound {
    pub sync_ptrx: f64,
    pub async_ptrx: f64,
    pub sync_over_async_ptrx: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Fallback {
    /// Longest interval without an acknowledged commit after DC2.1 was cut off.
    pub stall_ms: f64,
    /// From the switch to async until the switch back (audit log).
    pub unprotected_window_ms: Option<f64>,
    /// From DC2.1's return until commits wait for it again.
    pub return_to_sync_ms: f64,
    pub acknowledged: usize,
    pub lost: usize,
}

/// A bulk load on the primary while Tier 1 commits wait for DC2.1, which stays alive (issue
/// 9, "slow is not dead"): it must not open an unprotected window.
#[derive(Debug, Clone, Serialize)]
pub struct BulkLoad {
    /// `pgbench -i -s SCALE` on the primary, from its site's client host.
    pub pgbench_scale: u32,
    pub pgbench_ms: f64,
    /// Unprotected windows opened while the ledger load ran: 0 is the target.
    pub unprotected_windows: usize,
    pub clients: usize,
    pub acknowledged: usize,
    pub lost: usize,
    pub tatrxn_p99_ms: f64,
    /// Longest interval without an acknowledged ledger commit.
    pub stall_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Disaster {
    pub old_primary: String,
    pub new_primary: String,
    pub injected_after_ms: f64,
    /// From the disaster until the first commit acknowledged by the new primary.
    pub rto_ms: Option<f64>,
    pub acknowledged: usize,
    pub lost: usize,
    pub indeterminate: usize,
    pub indeterminate_applied: usize,
    pub balances_conserved: bool,
    pub rpo_zero: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct InterRegionReport {
    #[serde(flatten)]
    pub header: Header,
    pub network: NetworkOptions,
    /// What the bulk cross traffic moved, when there was some.
    pub cross_traffic: Option<dczone_lab::cross::CrossReport>,
    pub clients: usize,
    /// At the default distance (500 km).
    pub sync: ModeResult,
    #[serde(rename = "async")]
    pub asynch: ModeResult,
    pub distances: Vec<DistanceResult>,
    pub fallback: Fallback,
    pub bulk_load: BulkLoad,
    pub fallback_stall_ms: f64,
    pub disasters: Vec<Disaster>,
    /// `--saturation`: clients doubled from 1 at the default distance, per mode, until
    /// Ptrx grew less than 5 %.
    pub saturation: Vec<SaturationPoint>,
    pub sync_ptrx_saturated: Option<f64>,
    pub async_ptrx_saturated: Option<f64>,
    /// The first (deterministic) disaster's RTO; `rto_max_ms` is the worst of all.
    pub failover_rto_ms: Option<f64>,
    pub rto_max_ms: Option<f64>,
    pub rpo_lost_transactions: usize,
    pub indeterminate_transactions: usize,
    pub kr2_1_pass: bool,
    pub kr2_2_tier1_pass: bool,
    pub sync_ptrx_ratio_pass: bool,
    pub stall_pass: bool,
    pub rto_pass: bool,
}

impl InterRegionReport {
    pub const VERSION: u32 = 2;
}

fn set_distance(lab: &Lab, p: &Database, km: f64) -> anyhow::Result<()> {
    for site in p.plan.members() {
        if site == REMOTE_SITE {
            continue;
        }
        if p.zone
            .site_index(&site)
            .and_then(|a| {
                p.zone
                    .site_index(REMOTE_SITE)
                    .and_then(|b| p.zone.link_index(a, b))
            })
            .is_some()
        {
            lab.link_set(
                &site,
                REMOTE_SITE,
                &LinkChange {
                    one_way_delay_ms: Some(km * dczone_zone::FIBER_NS_PER_KM / 1e6),
                    ..Default::default()
                },
            )?;
        }
    }
    Ok(())
}

/// One sample of DC2.1's lag on the primary: (unix us, write_lag ms, flush_lag ms).
type LagSample = (u64, Option<f64>, f64);

/// Samples DC2.1's write and flush lag on the primary every 100 ms until `stop`.
fn spawn_lag_sampler(
    p: &Database,
    host: &str,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<LagSample>> {
    let p = p.clone();
    let host = host.to_string();
    std::thread::spawn(move || {
        let hosts = p.hosts();
        let app = dczone_db::app_name(REMOTE_SITE);
        p.in_host(&host, move || async move {
            let mut out = Vec::new();
            let mut client = None;
            while !stop.load(Ordering::SeqCst) {
                if client.is_none() {
                    client = dczone_ledger::connect_primary_db(&hosts, "dczone-lag", "postgres")
                        .await
                        .ok()
                        .map(|(c, _)| c);
                }
                if let Some(c) = &client {
                    let r = tokio::time::timeout(
                        Duration::from_millis(500),
                        c.query_opt(
                            "SELECT extract(epoch from write_lag)::float8 * 1000, \
                                    extract(epoch from flush_lag)::float8 * 1000 \
                             FROM pg_stat_replication WHERE application_name = $1",
                            &[&app],
                        ),
                    )
                    .await;
                    match r {
                        Ok(Ok(Some(row))) => {
                            if let Some(ms) = row.get::<_, Option<f64>>(1) {
                                out.push((unix_us(), row.get::<_, Option<f64>>(0), ms));
                            }
                        }
                        Ok(Ok(None)) => {}
                        _ => client = None,
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            out
        })
        .unwrap_or_default()
    })
}

pub(crate) fn load_opts(p: &Database, client: &str, clients: usize, seconds: f64) -> LoadOptions {
    LoadOptions {
        hosts: p.hosts_for(client),
        clients,
        duration: Duration::from_secs_f64(seconds),
        request_timeout: Duration::from_secs(1),
        run_id: format!("b{}", unix_us()),
    }
}

/// Runs the load from `host` and calls `inject` after `after`; returns the load result and
/// the injection time (unix us).
fn load_with<F: FnOnce() -> anyhow::Result<()>>(
    p: &Database,
    host: &str,
    opts: LoadOptions,
    after: Option<Duration>,
    inject: F,
) -> anyhow::Result<(LoadResult, Option<u64>)> {
    let pc = p.clone();
    let h = host.to_string();
    let load = std::thread::spawn(move || pc.load(&h, opts));
    let mut at = None;
    if let Some(after) = after {
        std::thread::sleep(after);
        at = Some(unix_us());
        inject()?;
    }
    let r = load
        .join()
        .map_err(|_| anyhow!("the load thread panicked"))??;
    p.record(&r)?;
    Ok((r, at))
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn p99(v: &[f64]) -> Option<f64> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(((s.len() as f64 * 0.99) as usize).min(s.len().saturating_sub(1)))
        .copied()
}

/// ICMP echo from `host` to DC2.1's member every 50 ms for about `seconds` (a thread).
fn spawn_rtt_sampler(
    p: &Database,
    host: &str,
    seconds: f64,
) -> std::thread::JoinHandle<Option<dczone_lab::probe::RttStats>> {
    let ns = p.lab.host_namespace(host);
    let target = p.member(REMOTE_SITE).map(|m| m.ip).ok();
    let pings = (seconds * 20.0) as usize;
    std::thread::spawn(move || {
        dczone_lab::probe::measure_rtt(&ns, target?, pings.max(1), Duration::from_millis(50)).ok()
    })
}

/// One run of the workload in one mode, with what was sampled beside it.
struct ModeRun {
    load: LoadResult,
    lags: Vec<LagSample>,
    echo: Option<dczone_lab::probe::RttStats>,
}

fn measure_mode(
    p: &Database,
    tier: &str,
    mode: Replication,
    km: f64,
    clients: usize,
    seconds: f64,
) -> anyhow::Result<ModeResult> {
    let run = run_mode(p, tier, mode, clients, seconds)?;
    Ok(mode_result(mode, km, clients, vec![run]))
}

/// Sync and async at `km`, `rounds` times each in ABBA order (sync, async, async, sync,
/// ...): the shared host's busy spells, which last seconds, then fall on both modes.
fn measure_pair(
    p: &Database,
    km: f64,
    clients: usize,
    seconds: f64,
    rounds: usize,
    obs: &dyn Observer,
) -> anyhow::Result<DistanceResult> {
    let (mut syncs, mut asyncs, mut order) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds.max(1) {
        let modes = if round % 2 == 0 {
            [Replication::Sync, Replication::Async]
        } else {
            [Replication::Async, Replication::Sync]
        };
        for mode in modes {
            let (tier, name, runs) = match mode {
                Replication::Sync => ("tier1", "sync", &mut syncs),
                Replication::Async => ("tier2", "async", &mut asyncs),
            };
            obs.step(&format!("{km} km: {name}, round {}/{}", round + 1, rounds));
            runs.push(run_mode(p, tier, mode, clients, seconds)?);
        }
        order.push(PtrxRound {
            sync_ptrx: syncs.last().map_or(0.0, |r: &ModeRun| r.load.ptrx),
            async_ptrx: asyncs.last().map_or(0.0, |r: &ModeRun| r.load.ptrx),
            sync_over_async_ptrx: 0.0,
        });
    }
    for r in &mut order {
        r.sync_over_async_ptrx = r.sync_ptrx / r.async_ptrx.max(1e-9);
    }
    let sync = mode_result(Replication::Sync, km, clients, syncs);
    let asynch = mode_result(Replication::Async, km, clients, asyncs);
    Ok(DistanceResult {
        distance_km: km,
        sync_over_async_ptrx: sync.ptrx / asynch.ptrx.max(1e-9),
        sync,
        asynch,
        rounds: order,
    })
}

/// Sets the tier, waits for its mode, and runs the workload next to the primary while
/// sampling DC2.1's lag and the echo to it.
fn run_mode(
    p: &Database,
    tier: &str,
    mode: Replication,
    clients: usize,
    seconds: f64,
) -> anyhow::Result<ModeRun> {
    let probe = p.client_host(None)?;
    p.set_policy(&probe, tier)?;
    let snap = p.wait_mode(&probe, mode, Duration::from_secs(30))?;
    // The application runs next to its primary (wherever the last failover put it).
    let primary = snap
        .leader
        .map(|l| l.site)
        .unwrap_or_else(|| p.plan.primary.clone());
    let client = client_near(p, &primary);
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = spawn_lag_sampler(p, &client, stop.clone());
    let echo = p
        .member(&primary)
        .ok()
        .map(|m| spawn_rtt_sampler(p, &m.host.clone(), seconds));
    let (r, _) = load_with(
        p,
        &client,
        load_opts(p, &client, clients, seconds),
        None,
        || Ok(()),
    )?;
    stop.store(true, Ordering::SeqCst);
    let lags = sampler.join().unwrap_or_default();
    let echo = echo.and_then(|h| h.join().ok().flatten());
    Ok(ModeRun {
        load: r,
        lags,
        echo,
    })
}

/// The lag samples taken during the run's load (the sampler starts a little before it and
/// stops a little after).
fn during(x: &ModeRun) -> impl Iterator<Item = LagSample> + '_ {
    let (from, len) = (x.load.started_us, (x.load.seconds * 1e6) as u64);
    x.lags
        .iter()
        .copied()
        .filter(move |(t, _, _)| (from..=from + len).contains(t))
}

/// One mode's figures over its runs: Ptrx and TATrxn over every transaction, lag and echo
/// over every sample; the lag series runs on through the runs' summed time.
fn mode_result(mode: Replication, km: f64, clients: usize, runs: Vec<ModeRun>) -> ModeResult {
    let r = LoadResult::merge(&runs.iter().map(|x| x.load.clone()).collect::<Vec<_>>());
    let lags: Vec<LagSample> = runs.iter().flat_map(during).collect();
    let flush_ms: Vec<f64> = lags.iter().map(|(_, _, ms)| *ms).collect();
    let write_ms: Vec<f64> = lags.iter().filter_map(|(_, w, _)| *w).collect();
    let mut series = Vec::new();
    let mut offset = 0.0;
    for x in &runs {
        series.extend(during(x).map(|(t, _, ms)| {
            (
                offset + t.saturating_sub(x.load.started_us) as f64 / 1e6,
                ms,
            )
        }));
        offset += x.load.seconds;
    }
    let echoes: Vec<f64> = runs
        .iter()
        .filter_map(|x| x.echo.as_ref().map(|e| e.median_ms))
        .collect();
    let rtt_nominal_ms = 2.0 * km * dczone_zone::FIBER_NS_PER_KM / 1e6;
    let sync = mode == Replication::Sync;
    let tatrsync = if sync { mean(&flush_ms) } else { None };
    let tatrasync = if sync { None } else { mean(&flush_ms) };
    let sync_cost = match (tatrsync, mean(&write_ms)) {
        (Some(flush), Some(write)) => {
            // The median of each run's echoes, averaged over the runs.
            let echo_ms = mean(&echoes);
            Some(SyncCost {
                rtt_nominal_ms,
                rtt_under_load_ms: echo_ms,
                network_excess_ms: echo_ms.map(|e| e - rtt_nominal_ms),
                standby_receive_ms: echo_ms.map(|e| write - e),
                standby_flush_ms: flush - write,
                write_lag_ms: write,
            })
        }
        _ => None,
    };
    ModeResult {
        distance_km: km,
        clients,
        seconds: r.seconds,
        acknowledged: r.acknowledged.len(),
        errors: r.errors,
        ptrx: r.ptrx,
        tatrxn_p50_ms: r.tatrxn_p50_ms,
        tatrxn_p99_ms: r.tatrxn_p99_ms,
        tatrsync_ms: tatrsync,
        tatrsync_excess_ms: tatrsync.map(|t| t - rtt_nominal_ms),
        tatrsync_p99_ms: if sync { p99(&flush_ms) } else { None },
        sync_cost,
        tatrasync_ms: tatrasync,
        tatrasync_p99_ms: if sync { None } else { p99(&flush_ms) },
        grey_data_transactions: tatrasync.map(|ms| r.ptrx * ms / 1000.0),
        lag_over_time_ms: series,
    }
}

/// The longest gap between acknowledgements that ends after `t0` (the stall it caused).
fn stall_after(r: &LoadResult, t0: u64) -> f64 {
    let mut t = r.ack_times_us.clone();
    t.sort_unstable();
    let before = t.iter().rev().find(|&&x| x <= t0).copied().unwrap_or(t0);
    let mut worst = 0u64;
    let mut prev = before;
    for &x in t.iter().filter(|&&x| x > t0) {
        worst = worst.max(x - prev);
        prev = x;
    }
    worst as f64 / 1000.0
}

/// The first acknowledgement after `t0` plus `margin_us` (packets already in flight when
/// the site was cut off may still arrive within one one-way delay).
pub(crate) fn first_ack_after(r: &LoadResult, t0: u64, margin_us: u64) -> Option<f64> {
    r.ack_times_us
        .iter()
        .filter(|&&x| x > t0 + margin_us)
        .min()
        .map(|&x| (x - t0) as f64 / 1000.0)
}

/// Puts the zone's own tier (Tier 1 sync) back and waits for sync; returns the primary's
/// site and the application's client host next to it.
fn back_to_tier1(p: &Database) -> anyhow::Result<(String, String)> {
    let probe = p.client_host(None)?;
    p.set_policy(&probe, &p.plan.tier)?;
    let snap = p.wait_mode(&probe, Replication::Sync, Duration::from_secs(30))?;
    let primary = snap
        .leader
        .map(|l| l.site)
        .unwrap_or_else(|| p.plan.primary.clone());
    let client = client_near(p, &primary);
    Ok((primary, client))
}

fn fallback(p: &Database, o: &InterRegionOptions, obs: &dyn Observer) -> anyhow::Result<Fallback> {
    let (_, client) = back_to_tier1(p)?;
    obs.step(&format!(
        "{REMOTE_SITE} failure under sync, availability-first"
    ));
    let lab = p.lab.clone();
    let seconds = o.seconds.max(6.0);
    let (r, t0) = load_with(
        p,
        &client,
        load_opts(p, &client, o.clients, seconds),
        Some(Duration::from_secs_f64(seconds / 3.0)),
        || Ok(lab.site_isolate(REMOTE_SITE, true)?),
    )?;
    let t0 = t0.expect("injected");
    let stall_ms = stall_after(&r, t0);
    obs.step(&format!(
        "{REMOTE_SITE} back: waiting for the return to sync"
    ));
    let restored = Instant::now();
    p.lab.site_isolate(REMOTE_SITE, false)?;
    let snap = p.wait_mode(&client, Replication::Sync, Duration::from_secs(60))?;
    let return_to_sync_ms = restored.elapsed().as_secs_f64() * 1000.0;
    let window = snap
        .audit
        .iter()
        .filter(|e| e.kind == "unprotected" && e.start_ms * 1000 >= t0)
        .filter_map(|e| e.end_ms.map(|end| (end - e.start_ms) as f64))
        .next();
    let (acked, ind) = (r.acknowledged.clone(), r.indeterminate.clone());
    let audit = p.audit(&client, acked, ind)?;
    Ok(Fallback {
        stall_ms,
        unprotected_window_ms: window,
        return_to_sync_ms,
        acknowledged: r.acknowledged.len(),
        lost: audit.lost.len(),
    })
}

const BULK_SCALE: u32 = 5;
const BULK_CLIENTS: usize = 4;

/// Tier 1 ledger commits while `pgbench -i` fills the primary: DC2.1 falls behind but lives.
fn bulk_load(p: &Database, obs: &dyn Observer) -> anyhow::Result<BulkLoad> {
    let (primary, client) = back_to_tier1(p)?;
    let pg_ip = p.member(&primary)?.ip;
    obs.step(&format!(
        "bulk load on {primary} (pgbench -i -s {BULK_SCALE}) under Tier 1"
    ));
    let ns = p.lab.host_namespace(&client);
    let psql = |db: &str, sql: &str| {
        std::process::Command::new("ip")
            .args(["netns", "exec", &ns, "runuser", "-u", "postgres", "--"])
            .arg(format!("{}/psql", dczone_db::PG_BIN))
            .args(["-q", "-h", &pg_ip.to_string(), "-d", db, "-c", sql])
            .output()
    };
    psql("postgres", "DROP DATABASE IF EXISTS pgb")?;
    let out = psql("postgres", "CREATE DATABASE pgb")?;
    if !out.status.success() {
        anyhow::bail!(
            "create the pgbench database: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let started_ms = dczone_ha::agent::unix_ms();
    let mut took = Duration::ZERO;
    let (r, _) = load_with(
        p,
        &client,
        load_opts(p, &client, BULK_CLIENTS, 14.0),
        Some(Duration::from_secs(2)),
        || {
            let t = Instant::now();
            let out = std::process::Command::new("ip")
                .args(["netns", "exec", &ns, "runuser", "-u", "postgres", "--"])
                .arg(format!("{}/pgbench", dczone_db::PG_BIN))
                .args([
                    "-q",
                    "-i",
                    "-s",
                    &BULK_SCALE.to_string(),
                    "-h",
                    &pg_ip.to_string(),
                ])
                .arg("pgb")
                .output()?;
            took = t.elapsed();
            if !out.status.success() {
                anyhow::bail!(
                    "pgbench -i: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            Ok(())
        },
    )?;
    let _ = psql("postgres", "DROP DATABASE IF EXISTS pgb");
    let snap = p.snapshot(&client)?;
    let unprotected_windows = snap
        .audit
        .iter()
        .filter(|e| e.kind == "unprotected" && e.start_ms >= started_ms)
        .count();
    let (acked, ind) = (r.acknowledged.clone(), r.indeterminate.clone());
    let audit = p.audit(&client, acked, ind)?;
    Ok(BulkLoad {
        pgbench_scale: BULK_SCALE,
        pgbench_ms: took.as_secs_f64() * 1000.0,
        unprotected_windows,
        clients: BULK_CLIENTS,
        acknowledged: r.acknowledged.len(),
        lost: audit.lost.len(),
        tatrxn_p99_ms: r.tatrxn_p99_ms,
        stall_ms: stall_after(&r, r.started_us),
    })
}

/// A client host in `site` that is not its database host (the application's servers).
fn client_near(p: &Database, site: &str) -> String {
    let Some(idx) = p.zone.site_index(site) else {
        return "dc1.1-client".into();
    };
    let hosts = &p.zone.sites[idx].hosts;
    hosts
        .iter()
        .rev()
        .find(|h| Some(*h) != hosts.get(p.plan.host_index))
        .or(hosts.first())
        .cloned()
        .unwrap_or_else(|| "dc1.1-client".into())
}

/// A client host outside `site` (the clients of a lost site are lost with it).
fn client_outside(p: &Database, site: &str) -> anyhow::Result<String> {
    for h in ["dc1.2-h2", "dc1.1-client", "dc2.1-h2"] {
        if let Some(host) = p.zone.host(h) {
            if p.zone.sites[host.site].id != site {
                return Ok(h.to_string());
            }
        }
    }
    p.client_host(None)
}

fn disaster(
    p: &Database,
    exe: &Path,
    state_dir: &Path,
    o: &InterRegionOptions,
    after: Duration,
) -> anyhow::Result<Disaster> {
    let probe = p.client_host(None)?;
    let snap = p.wait_mode(&probe, p.plan.policy().replication, Duration::from_secs(60))?;
    let old = snap
        .leader
        .map(|l| l.site)
        .ok_or_else(|| anyhow!("no primary before the disaster"))?;
    let client = client_outside(p, &old)?;
    let seconds = (after.as_secs_f64() + 12.0).max(o.seconds);
    let lab = p.lab.clone();
    let pc = p.clone();
    let victim = old.clone();
    let (r, t0) = load_with(
        p,
        &client,
        load_opts(p, &client, o.clients, seconds),
        Some(after),
        move || {
            lab.site_isolate(&victim, true)?;
            pc.stop_ha_agent(&victim)?;
            Ok(())
        },
    )?;
    let t0 = t0.expect("injected");
    let audit = p.audit(&client, r.acknowledged.clone(), r.indeterminate.clone())?;
    let new = p
        .snapshot(&client)?
        .leader
        .map(|l| l.site)
        .unwrap_or_else(|| "none".into());
    // Bring the lost site back: its member rejoins as a standby (rewound).
    p.lab.site_isolate(&old, false)?;
    dczone_control::db_up(p, exe, state_dir, &probe, UP_TIMEOUT)
        .with_context(|| format!("{old} did not rejoin after the disaster"))?;
    Ok(Disaster {
        old_primary: old,
        new_primary: new,
        injected_after_ms: after.as_secs_f64() * 1000.0,
        rto_ms: first_ack_after(&r, t0, 50_000),
        acknowledged: r.acknowledged.len(),
        lost: audit.lost.len(),
        indeterminate: audit.indeterminate,
        indeterminate_applied: audit.indeterminate_applied,
        balances_conserved: audit.balances_conserved && audit.balances_match_transfers,
        rpo_zero: audit.rpo_zero,
    })
}

/// The network a benchmark runs on (SPEC.md section 9): the APN or a conventional WAN,
/// with or without bulk cross traffic from the primary's site to DC2.1.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct NetworkOptions {
    #[serde(serialize_with = "as_text")]
    pub wan: dczone_zone::Wan,
    pub cross_traffic: bool,
}

fn as_text<S: serde::Serializer>(w: &dczone_zone::Wan, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(w)
}

/// Bulk TCP flows of the cross traffic.
const CROSS_FLOWS: usize = 4;

/// A host of `site` that is neither a database member nor a client host, for bulk traffic.
fn bulk_host(p: &Database, site: &str) -> anyhow::Result<String> {
    let idx = p
        .zone
        .site_index(site)
        .ok_or_else(|| anyhow!("no site {site} in the zone"))?;
    let hosts = &p.zone.sites[idx].hosts;
    hosts
        .iter()
        .find(|h| !h.ends_with("-client") && !p.members.iter().any(|m| &m.host == *h))
        .or_else(|| hosts.first())
        .cloned()
        .ok_or_else(|| anyhow!("site {site} has no host"))
}

/// Network conditions in force for a benchmark; [`Conditions::end`] puts the APN back.
pub(crate) struct Conditions {
    cross: Option<dczone_lab::cross::CrossTraffic>,
    wan: dczone_zone::Wan,
}

impl Conditions {
    pub(crate) fn start(lab: &Lab, p: &Database, n: NetworkOptions) -> anyhow::Result<Conditions> {
        lab.set_wan(n.wan)?;
        let cross = if n.cross_traffic {
            let from = bulk_host(p, &p.plan.primary)?;
            let to = bulk_host(p, REMOTE_SITE)?;
            Some(lab.cross_traffic(&from, &to, CROSS_FLOWS)?)
        } else {
            None
        };
        Ok(Conditions { cross, wan: n.wan })
    }

    /// Stops the cross traffic and restores the APN; returns what the traffic moved.
    pub(crate) fn end(
        self,
        lab: &Lab,
        obs: &dyn Observer,
    ) -> Option<dczone_lab::cross::CrossReport> {
        let report = self.cross.map(|c| c.stop());
        if self.wan != dczone_zone::Wan::Apn {
            if let Err(e) = lab.set_wan(dczone_zone::Wan::Apn) {
                obs.warn(&format!("could not put the links back on the APN: {e}"));
            }
        }
        report
    }
}

/// Doubles the clients from 1 until Ptrx grows less than [`SATURATION_GAIN`]; returns the
/// steps and the highest Ptrx seen.
fn saturate(
    p: &Database,
    tier: &str,
    mode: Replication,
    km: f64,
    seconds: f64,
    obs: &dyn Observer,
) -> anyhow::Result<(Vec<SaturationPoint>, f64)> {
    let mut out: Vec<SaturationPoint> = Vec::new();
    let mut clients = 1;
    while clients <= SATURATION_MAX_CLIENTS {
        obs.step(&format!("saturation: {tier} with {clients} clients"));
        let m = measure_mode(p, tier, mode, km, clients, seconds)?;
        let grew = out
            .last()
            .is_none_or(|prev| m.ptrx >= prev.ptrx * SATURATION_GAIN);
        out.push(SaturationPoint {
            mode: if mode == Replication::Sync {
                "sync"
            } else {
                "async"
            }
            .into(),
            clients,
            ptrx: m.ptrx,
            tatrxn_p50_ms: m.tatrxn_p50_ms,
            tatrsync_excess_ms: m.tatrsync_excess_ms,
        });
        if !grew {
            break;
        }
        clients *= 2;
    }
    let best = out.iter().map(|s| s.ptrx).fold(0.0, f64::max);
    Ok((out, best))
}

/// The reference zone's lab up (brought up if it is not) and a fresh database platform
/// (the primary in its declared site, an empty ledger).
pub(crate) fn fresh_platform(
    lab: &Lab,
    exe: &Path,
    state_dir: &Path,
    obs: &dyn Observer,
) -> anyhow::Result<Database> {
    lab.up(
        &dczone_zone::Zone::reference(),
        "<built-in reference zone>",
        dczone_zone::DEFAULT_ZONE_TOML,
    )?;
    let p = Database::open(lab)?;
    obs.step("database platform: fresh start");
    dczone_control::db_down(&p, exe, state_dir)?;
    dczone_control::db_up(&p, exe, state_dir, &p.client_host(None)?, UP_TIMEOUT)?;
    Ok(p)
}

/// UC2 on the lab's reference zone (brought up if it is not), on a fresh database
/// platform: see the module's documentation. The zone is left as declared (distances,
/// tier, the APN).
pub fn inter_region(
    lab: &Lab,
    exe: &Path,
    state_dir: &Path,
    o: &InterRegionOptions,
    obs: &dyn Observer,
) -> anyhow::Result<InterRegionReport> {
    let positive = |x: f64| x.is_finite() && x > 0.0;
    if o.clients == 0
        || o.rounds == 0
        || !positive(o.seconds)
        || !o
            .distances_km
            .iter()
            .all(|d| dczone_zone::is_non_negative(*d))
    {
        anyhow::bail!(
            "--clients and --rounds must be >= 1, --seconds positive and --distances >= 0 km"
        );
    }
    let p = fresh_platform(lab, exe, state_dir, obs)?;
    let conditions = Conditions::start(lab, &p, o.network)?;
    let default_km = 500.0;
    let mut distances = Vec::new();
    let mut result = (|| -> anyhow::Result<InterRegionReport> {
        for &km in &o.distances_km {
            set_distance(lab, &p, km)?;
            distances.push(measure_pair(&p, km, o.clients, o.seconds, o.rounds, obs)?);
        }
        set_distance(lab, &p, default_km)?;
        let at_default = match distances.iter().find(|d| d.distance_km == default_km) {
            Some(d) => d.clone(),
            None => measure_pair(&p, default_km, o.clients, o.seconds, o.rounds, obs)?,
        };
        let (mut saturation, mut sync_sat, mut async_sat) = (Vec::new(), None, None);
        if o.saturation {
            let (steps, best) =
                saturate(&p, "tier1", Replication::Sync, default_km, o.seconds, obs)?;
            saturation.extend(steps);
            sync_sat = Some(best);
            let (steps, best) =
                saturate(&p, "tier2", Replication::Async, default_km, o.seconds, obs)?;
            saturation.extend(steps);
            async_sat = Some(best);
        }
        let bulk = bulk_load(&p, obs)?;
        let fb = fallback(&p, o, obs)?;
        let mut disasters = Vec::new();
        let mut seed = unix_us() | 1;
        for i in 0..o.injections.max(1) {
            let after = if i == 0 {
                Duration::from_secs(3)
            } else {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                Duration::from_millis(1000 + seed % 4000)
            };
            obs.step(&format!(
                "disaster {}/{} at {:.1} s into the load",
                i + 1,
                o.injections.max(1),
                after.as_secs_f64()
            ));
            disasters.push(disaster(&p, exe, state_dir, o, after)?);
        }
        let lost: usize = disasters.iter().map(|d| d.lost).sum::<usize>() + fb.lost + bulk.lost;
        let indeterminate = disasters.iter().map(|d| d.indeterminate).sum();
        let rtos: Vec<f64> = disasters.iter().filter_map(|d| d.rto_ms).collect();
        let rto_max = rtos
            .iter()
            .copied()
            .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
        let all_recovered = rtos.len() == disasters.len();
        Ok(InterRegionReport {
            header: Header::new("inter-region", InterRegionReport::VERSION),
            network: o.network,
            cross_traffic: None,
            saturation,
            sync_ptrx_saturated: sync_sat,
            async_ptrx_saturated: async_sat,
            clients: o.clients,
            sync: at_default.sync.clone(),
            asynch: at_default.asynch.clone(),
            sync_ptrx_ratio_pass: at_default.sync_over_async_ptrx >= 0.7,
            distances: distances.clone(),
            fallback_stall_ms: fb.stall_ms,
            bulk_load: bulk,
            stall_pass: fb.stall_ms <= 1000.0,
            fallback: fb,
            failover_rto_ms: disasters.first().and_then(|d| d.rto_ms),
            rto_max_ms: rto_max,
            rto_pass: all_recovered && rto_max.is_some_and(|r| r <= 15_000.0),
            kr2_2_tier1_pass: all_recovered && rto_max.is_some_and(|r| r < 30.0 * 60_000.0),
            rpo_lost_transactions: lost,
            indeterminate_transactions: indeterminate,
            kr2_1_pass: lost == 0 && disasters.iter().all(|d| d.balances_conserved),
            disasters,
        })
    })();
    let cross = conditions.end(lab, obs);
    if let Ok(r) = result.as_mut() {
        r.cross_traffic = cross;
    }
    // Leave the zone as it was declared.
    let _ = set_distance(lab, &p, default_km);
    if let Ok(client) = p.client_host(None) {
        let _ = p.set_policy(&client, &p.plan.tier);
    }
    result.map_err(|e| anyhow!("{e:#}"))
}

/// One planned switchover under load.
#[derive(Debug, Clone, Serialize)]
pub struct SwitchoverRound {
    pub from: String,
    pub to: String,
    /// Request -> target holds the leader key.
    pub leader_ms: f64,
    /// Request -> the new primary acknowledged the probe's commit.
    pub first_commit_ms: f64,
    /// Request -> the old primary streams again.
    pub rejoined_ms: f64,
    /// Longest interval without an acknowledged transfer, seen by the clients.
    pub client_stall_ms: f64,
    pub acknowledged: usize,
    pub lost: usize,
    pub indeterminate: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct SwitchoverReport {
    #[serde(flatten)]
    pub header: Header,
    pub clients: usize,
    pub rounds: Vec<SwitchoverRound>,
    pub client_stall_ms_median: f64,
    pub client_stall_ms_max: f64,
    pub rpo_lost_transactions: usize,
}

impl SwitchoverReport {
    pub const VERSION: u32 = 2;
}

/// Planned switchovers under load around the database sites (DC1.1 -> DC1.2 -> DC2.1 ->
/// DC1.1 ...), each audited.
pub fn switchover(
    lab: &Lab,
    exe: &Path,
    state_dir: &Path,
    rounds: usize,
    clients: usize,
    obs: &dyn Observer,
) -> anyhow::Result<SwitchoverReport> {
    if rounds == 0 || clients == 0 {
        anyhow::bail!("at least one round and one client are needed");
    }
    let p = fresh_platform(lab, exe, state_dir, obs)?;
    let probe = p.client_host(None)?;
    let sites: Vec<String> = p.members.iter().map(|m| m.site.clone()).collect();
    let client = client_near(&p, &p.plan.primary);
    let result = (|| -> anyhow::Result<Vec<SwitchoverRound>> {
        let mut out = Vec::new();
        for i in 0..rounds {
            let snap = p.wait_mode(&probe, p.plan.policy().replication, Duration::from_secs(60))?;
            let from = snap
                .leader
                .map(|l| l.site)
                .ok_or_else(|| anyhow!("no primary before switchover {}", i + 1))?;
            let pos = sites.iter().position(|s| *s == from).unwrap_or(0);
            let to = sites[(pos + 1) % sites.len()].clone();
            obs.step(&format!("switchover {}/{rounds}: {from} -> {to}", i + 1));
            let pc = p.clone();
            let target = to.clone();
            let report = std::sync::Arc::new(std::sync::Mutex::new(None));
            let slot = report.clone();
            let (r, t0) = load_with(
                &p,
                &client,
                load_opts(&p, &client, clients, 8.0),
                Some(Duration::from_secs(2)),
                move || {
                    let r = pc.switchover(&target, Duration::from_secs(30))?;
                    *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                    Ok(())
                },
            )?;
            let t0 = t0.expect("injected");
            let sw = report
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
                .ok_or_else(|| anyhow!("switchover {} left no report", i + 1))?;
            let audit = p.audit(&client, r.acknowledged.clone(), r.indeterminate.clone())?;
            out.push(SwitchoverRound {
                from,
                to,
                leader_ms: sw.leader_ms,
                first_commit_ms: sw.first_commit_ms,
                rejoined_ms: sw.rejoined_ms,
                client_stall_ms: stall_after(&r, t0),
                acknowledged: r.acknowledged.len(),
                lost: audit.lost.len(),
                indeterminate: audit.indeterminate,
            });
        }
        Ok(out)
    })();
    let rounds = result.map_err(|e| anyhow!("{e:#}"))?;
    let mut stalls: Vec<f64> = rounds.iter().map(|r| r.client_stall_ms).collect();
    stalls.sort_by(f64::total_cmp);
    Ok(SwitchoverReport {
        header: Header::new("switchover", SwitchoverReport::VERSION),
        clients,
        client_stall_ms_median: stalls[(stalls.len() - 1) / 2],
        client_stall_ms_max: stalls[stalls.len() - 1],
        rpo_lost_transactions: rounds.iter().map(|r| r.lost).sum(),
        rounds,
    })
}
