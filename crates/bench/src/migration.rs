//! UC1 scenario #1 (a heterogeneous VM cluster under client load moved between DC1.1 and
//! DC1.2) and the single-VM migration sweep, both through the zone's host agents.

use std::time::Duration;

use serde::Serialize;

use dczone_control::vms::{self, destroy_if_present};
use dczone_control::{LabAgents, ZoneAgents};
use dczone_virt::migrate::{GroupMigration, Params, Strategy, VmMigration};
use dczone_virt::Platform;

use crate::{quantile, Header, Observer};

/// The PoC cluster of UC1 scenario #1: heterogeneous on purpose (SPEC.md section 3).
const POC_GROUP: &str = "poc";
const POC_VMS: [(&str, &str, u32, u32, u32); 3] = [
    // name, host, memory MiB, dirty MB/s, dirty area MiB
    ("poc-web", "dc1.1-h1", 256, 1, 16),
    ("poc-ap", "dc1.1-h2", 384, 4, 32),
    ("poc-db", "dc1.1-h1", 512, 8, 64),
];
const LOAD_RATE_PER_VM: u32 = 100;
const TOTAL_BALANCE: i64 = 1_000_000;

#[derive(Debug, Serialize)]
pub struct Continuity {
    pub vm: String,
    pub same_boot: bool,
    pub processed_before: u64,
    pub processed_after: u64,
    pub balance_sum_before: i64,
    pub balance_sum_after: i64,
    pub ok: bool,
}

/// How a variant shows in tables: the strategy, plus what is off.
fn variant(strategy: Strategy, frame_replay: bool, tls: bool) -> String {
    format!(
        "{}{}{}",
        strategy.name(),
        if frame_replay { "" } else { " (no replay)" },
        if tls { "" } else { " (no TLS)" }
    )
}

#[derive(Debug, Serialize)]
pub struct StrategyRun {
    pub strategy: String,
    /// Frames reaching a source during its switchover were replayed to the destination.
    pub frame_replay: bool,
    /// The streams between the sites were TLS.
    pub tls: bool,
    pub to_site: String,
    pub svc_t2_ms: f64,
    pub svc_t2_union_ms: f64,
    pub svc_t1_ms: f64,
    /// Memory and dirty pages sent by the whole group, MiB.
    pub sent_mib: f64,
    /// What the group sent over SVC-T1, Mbit/s (lab rate; the path's is 390.6).
    pub throughput_mbit_s: f64,
    pub client_gap_ms: f64,
    /// Where the longest service gap began, ms from the migration's start (negative:
    /// before it; past `svc_t1_ms`: after the switchover); none without a gap.
    pub client_gap_at_ms: Option<f64>,
    /// The migration's start and end, on the clock of `load.service_gaps`.
    pub migration_started_us: u64,
    pub migration_ended_us: u64,
    /// Standard TCP, no application retry: a long-lived connection, a new connection.
    pub tcp_gap_pool_ms: f64,
    pub tcp_gap_new_ms: f64,
    pub kr1_1_pass: bool,
    pub stretch_100ms_pass: bool,
    pub vms: Vec<VmMigration>,
    pub load: dczone_workload::LoadReport,
    pub continuity: Vec<Continuity>,
    pub continuity_ok: bool,
}

/// A query with a few retries: right after boot, the first ARP exchange across the APN
/// can outlast one connect timeout.
fn query_retry(ns: &str, ip: std::net::Ipv4Addr, req: &str) -> Option<String> {
    (0..5).find_map(|_| {
        dczone_workload::query(ns, ip, req)
            .inspect_err(|_| std::thread::sleep(std::time::Duration::from_millis(200)))
            .ok()
    })
}

pub(crate) fn guest_stats(ns: &str, ip: std::net::Ipv4Addr) -> (String, u64, i64) {
    let s = query_retry(ns, ip, "S").unwrap_or_default();
    let z = query_retry(ns, ip, "Z")
        .and_then(|z| z.parse().ok())
        .unwrap_or(i64::MIN);
    let field = |k: &str| {
        s.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
            .unwrap_or("")
            .to_string()
    };
    (field("boot"), field("processed").parse().unwrap_or(0), z)
}

/// A strategy's repeated runs, summarized.

#[derive(Debug, Serialize)]
pub struct StrategyRuns {
    /// The strategy's name, with " (no replay)" when frames were dropped and " (no TLS)"
    /// when the streams were in the clear.
    pub strategy: String,
    pub frame_replay: bool,
    pub tls: bool,
    pub runs: Vec<StrategyRun>,
    pub svc_t2_median_ms: f64,
    pub svc_t2_p95_ms: f64,
    pub svc_t2_max_ms: f64,
    pub client_gap_max_ms: f64,
    pub tcp_gap_pool_max_ms: f64,
    pub tcp_gap_new_max_ms: f64,
    pub kr1_1_pass_runs: usize,
    pub runs_total: usize,
    pub svc_t1_median_ms: f64,
    pub svc_t1_max_ms: f64,
    /// Memory and dirty pages sent per run, MiB (median).
    pub sent_mib_median: f64,
    pub throughput_mbit_s_median: f64,
}

impl StrategyRuns {
    fn new(
        strategy: Strategy,
        frame_replay: bool,
        tls: bool,
        runs: Vec<StrategyRun>,
    ) -> StrategyRuns {
        let t2: Vec<f64> = runs.iter().map(|r| r.svc_t2_ms).collect();
        let max = |f: fn(&StrategyRun) -> f64| runs.iter().map(f).fold(0.0, f64::max);
        let median =
            |f: fn(&StrategyRun) -> f64| quantile(&runs.iter().map(f).collect::<Vec<_>>(), 0.5);
        StrategyRuns {
            strategy: variant(strategy, frame_replay, tls),
            frame_replay,
            tls,
            throughput_mbit_s_median: median(|r| r.throughput_mbit_s),
            svc_t2_median_ms: quantile(&t2, 0.5),
            svc_t2_p95_ms: quantile(&t2, 0.95),
            svc_t2_max_ms: max(|r| r.svc_t2_ms),
            client_gap_max_ms: max(|r| r.client_gap_ms),
            tcp_gap_pool_max_ms: max(|r| r.tcp_gap_pool_ms),
            tcp_gap_new_max_ms: max(|r| r.tcp_gap_new_ms),
            kr1_1_pass_runs: runs.iter().filter(|r| r.kr1_1_pass).count(),
            runs_total: runs.len(),
            svc_t1_median_ms: quantile(&runs.iter().map(|r| r.svc_t1_ms).collect::<Vec<_>>(), 0.5),
            svc_t1_max_ms: max(|r| r.svc_t1_ms),
            sent_mib_median: quantile(&runs.iter().map(|r| r.sent_mib).collect::<Vec<_>>(), 0.5),
            runs,
        }
    }
}

/// What to run: every strategy in every frame-replay and TLS mode, `runs` times each.
#[derive(Debug, Clone)]
pub struct IntraRegionOptions {
    pub strategies: Vec<Strategy>,
    pub frame_replay: Vec<bool>,
    pub tls: Vec<bool>,
    pub runs: usize,
}

/// Coordinated SVC-T2 over the other strategies' (medians), when they ran.
#[derive(Debug, Clone, Serialize)]
pub struct Ratios {
    pub coordinated_vs_sequential: Option<f64>,
    pub coordinated_vs_parallel: Option<f64>,
}

/// What TLS costs, for each strategy run both ways: medians with TLS over medians without.
#[derive(Debug, Clone, Serialize)]
pub struct TlsCost {
    pub strategy: String,
    pub svc_t2_ratio: f64,
    pub svc_t1_ratio: f64,
    pub throughput_ratio: f64,
}

/// `bench intra-region`'s report: one entry per variant (strategy, frame replay, TLS).
#[derive(Debug, Serialize)]
pub struct IntraRegionReport {
    #[serde(flatten)]
    pub header: Header,
    pub variants: Vec<StrategyRuns>,
    pub ratios: Ratios,
    /// Empty unless TLS ran both ways.
    pub tls_cost: Vec<TlsCost>,
}

impl IntraRegionReport {
    pub const VERSION: u32 = 2;

    /// Whether every run kept every guest's state, and every run of the strategies that
    /// stop a cluster together (coordinated, post-copy) met KR1.1. Sequential and parallel
    /// are there to be compared with: they miss KR1.1 by design (SVC-T2 spans the moves).
    pub fn pass(&self) -> bool {
        self.variants.iter().flat_map(|v| &v.runs).all(|r| {
            r.continuity_ok
                && (r.kr1_1_pass || !matches!(r.strategy.as_str(), "coordinated" | "postcopy"))
        })
    }
}

/// UC1 scenario #1 on the lab's reference zone (brought up if it is not): the PoC cluster
/// is created through the hosts' agents and moved back and forth under client load, as
/// `o` says. The cluster stays up for the next run.
pub fn intra_region(
    lab: &dczone_lab::Lab,
    agents: &LabAgents,
    o: &IntraRegionOptions,
    observer: &dyn Observer,
) -> anyhow::Result<IntraRegionReport> {
    if o.runs == 0 {
        anyhow::bail!("at least one run per strategy is needed");
    }
    for (name, ..) in POC_VMS {
        destroy_if_present(agents, name)?;
    }
    let cluster: Vec<dczone_virt::CreateVm> = POC_VMS
        .iter()
        .map(|&(name, host, mem, dirty, area)| {
            observer.step(&format!(
                "booting {name} on {host} ({mem} MiB, dirtying {dirty} MB/s)"
            ));
            dczone_virt::CreateVm {
                name: name.into(),
                host: host.into(),
                memory_mib: mem,
                dirty_mbps: dirty,
                dirty_mib: area,
                resident_pct: dczone_virt::DEFAULT_RESIDENT_PCT,
                group: Some(POC_GROUP.into()),
                disk_mib: None,
                disk_image: None,
            }
        })
        .collect();
    vms::boot_all(agents, &cluster)?;
    let client = lab.host_namespace("dc1.1-client");
    let mut variants = Vec::new();
    let plan: Vec<(Strategy, bool, bool)> = o
        .strategies
        .iter()
        .flat_map(|&s| {
            o.frame_replay
                .iter()
                .flat_map(move |&r| o.tls.iter().map(move |&t| (s, r, t)))
        })
        .collect();
    for (strategy, frame_replay, tls) in plan {
        let mut runs = Vec::new();
        let label = variant(strategy, frame_replay, tls);
        let params = Params {
            keep_frames: frame_replay,
            tls,
            ..Params::default()
        };
        for run in 0..o.runs {
            if o.runs > 1 {
                observer.step(&format!("{label} run {}/{}", run + 1, o.runs));
            }
            let (g, run) = one_run(
                agents,
                &client,
                strategy,
                &params,
                (frame_replay, tls),
                observer,
            )?;
            observer.intra_region_run(&g, &run);
            runs.push(run);
        }
        variants.push(StrategyRuns::new(strategy, frame_replay, tls, runs));
    }
    let get = |n: &str| {
        variants
            .iter()
            .find(|r| r.strategy == n)
            .map(|r| r.svc_t2_median_ms)
    };
    let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
    let (seq, par, coo) = (get("sequential"), get("parallel"), get("coordinated"));
    Ok(IntraRegionReport {
        header: Header::new("intra-region", IntraRegionReport::VERSION),
        ratios: Ratios {
            coordinated_vs_sequential: ratio(coo, seq),
            coordinated_vs_parallel: ratio(coo, par),
        },
        tls_cost: tls_cost(&variants),
        variants,
    })
}

/// One move of the PoC group to the other DC1 site under client load from `client` (a
/// namespace), with the guests' state checked before and after.
fn one_run(
    agents: &LabAgents,
    client: &str,
    strategy: Strategy,
    params: &Params,
    (frame_replay, tls): (bool, bool),
    observer: &dyn Observer,
) -> anyhow::Result<(GroupMigration, StrategyRun)> {
    let vms = agents
        .list()?
        .into_iter()
        .filter(|v| v.group.as_deref() == Some(POC_GROUP))
        .collect::<Vec<_>>();
    let to_site = if vms.iter().all(|v| v.host.starts_with("dc1.1")) {
        "dc1.2"
    } else {
        "dc1.1"
    };
    let targets: Vec<_> = vms
        .iter()
        .map(|v| (v.spec.name.clone(), Platform::guest_ip(v)))
        .collect();
    let before: Vec<_> = targets
        .iter()
        .map(|(_, ip)| guest_stats(client, *ip))
        .collect();
    let started = dczone_workload::now_us();
    let load = dczone_workload::start(client, &targets, LOAD_RATE_PER_VM)?;
    std::thread::sleep(Duration::from_secs(2));
    let t0 = dczone_workload::now_us();
    let g = agents
        .agents
        .migrate_group(POC_GROUP, to_site, strategy, params, &|p| {
            observer.migration(p)
        });
    let t1 = dczone_workload::now_us();
    observer.migration_ended();
    std::thread::sleep(Duration::from_secs(2));
    let report = load.finish(started, dczone_measure::Interval::new(t0, t1));
    let g = g?;
    let continuity: Vec<Continuity> = targets
        .iter()
        .zip(&before)
        .map(|((vm, ip), (boot0, proc0, sum0))| {
            let (boot1, proc1, sum1) = guest_stats(client, *ip);
            Continuity {
                vm: vm.clone(),
                same_boot: !boot0.is_empty() && *boot0 == boot1,
                processed_before: *proc0,
                processed_after: proc1,
                balance_sum_before: *sum0,
                balance_sum_after: sum1,
                ok: !boot0.is_empty()
                    && *boot0 == boot1
                    && proc1 >= *proc0
                    && sum1 == TOTAL_BALANCE,
            }
        })
        .collect();
    let gap_at_ms = report
        .service_gaps
        .iter()
        .max_by_key(|i| i.end_us - i.start_us)
        .map(|i| (i.start_us as f64 - t0 as f64) / 1e3);
    let continuity_ok = continuity.iter().all(|c| c.ok);
    let sent_mib = g.vms.iter().map(|v| v.bytes_sent).sum::<u64>() as f64 / 1048576.0;
    let run = StrategyRun {
        strategy: strategy.name().into(),
        frame_replay,
        tls,
        throughput_mbit_s: sent_mib * 8.388608 / (g.svc_t1_ms / 1000.0),
        to_site: to_site.into(),
        svc_t2_ms: g.svc_t2_ms,
        svc_t2_union_ms: g.svc_t2_union_ms,
        svc_t1_ms: g.svc_t1_ms,
        sent_mib,
        client_gap_ms: report.client_gap_ms,
        client_gap_at_ms: gap_at_ms,
        migration_started_us: t0,
        migration_ended_us: t1,
        tcp_gap_pool_ms: report.tcp_gap_pool_ms,
        tcp_gap_new_ms: report.tcp_gap_new_ms,
        kr1_1_pass: g.svc_t2_ms < 1000.0,
        stretch_100ms_pass: g.svc_t2_ms < 100.0,
        vms: g.vms.clone(),
        load: report,
        continuity,
        continuity_ok,
    };
    Ok((g, run))
}

fn tls_cost(variants: &[StrategyRuns]) -> Vec<TlsCost> {
    variants
        .iter()
        .filter(|on| on.tls)
        .filter_map(|on| {
            let off = variants.iter().find(|s| {
                !s.tls
                    && s.frame_replay == on.frame_replay
                    && s.runs[0].strategy == on.runs[0].strategy
            })?;
            Some(TlsCost {
                strategy: on.strategy.clone(),
                svc_t2_ratio: on.svc_t2_median_ms / off.svc_t2_median_ms,
                svc_t1_ratio: on.svc_t1_median_ms / off.svc_t1_median_ms,
                throughput_ratio: on.throughput_mbit_s_median / off.throughput_mbit_s_median,
            })
        })
        .collect()
}

/// Brings the lab up on the reference zone (a no-op if it already is) and returns its
/// hosts' agents (started, should one be gone).
pub fn reference_agents(
    lab: &dczone_lab::Lab,
    exe: &std::path::Path,
    state_dir: &std::path::Path,
) -> anyhow::Result<LabAgents> {
    lab.up(
        &dczone_zone::Zone::reference(),
        "<built-in reference zone>",
        dczone_zone::DEFAULT_ZONE_TOML,
    )?;
    let agents = dczone_control::lab_agents(lab, exe, state_dir)?;
    agents.agents.ensure_all()?;
    Ok(agents)
}
/// The lab rate between two sites of `zone` with every link up, Mbit/s.
pub(crate) fn site_path_mbit_s(zone: &dczone_zone::Zone, a: &str, b: &str) -> f64 {
    let (Some(a), Some(b)) = (zone.site_index(a), zone.site_index(b)) else {
        return f64::NAN;
    };
    let params: Vec<_> = zone.links.iter().map(|l| l.params).collect();
    let cut = vec![false; params.len()];
    zone.lab_rate_bps(zone.path(a, b, &params, &cut).bandwidth_bps) as f64 / 1e6
}

/// The memory sizes and dirty rates of the sweep's grid.
pub const SWEEP_MEMORY_MIB: [u32; 3] = [256, 512, 1024];
pub const SWEEP_DIRTY_MBPS: [u32; 3] = [0, 4, 16];

#[derive(Debug, Clone, Serialize)]
pub struct SweepPoint {
    pub memory_mib: u32,
    /// The guest's incompressible working set.
    pub resident_mib: u32,
    /// The VM this one stands for at the lab's scale (memory x scale).
    pub reference_memory_gib: f64,
    pub dirty_mbps: u32,
    pub total_ms: f64,
    pub t2_ms: f64,
    pub qemu_downtime_ms: u64,
    pub bytes_sent: u64,
    /// bytes_sent over the total time, against the path's lab rate.
    pub throughput_mbit_s: f64,
    pub path_mbit_s: f64,
    pub iterations: u64,
}

/// `bench migration-sweep`'s report.
#[derive(Debug, Serialize)]
pub struct SweepReport {
    #[serde(flatten)]
    pub header: Header,
    pub points: Vec<SweepPoint>,
}

impl SweepReport {
    pub const VERSION: u32 = 1;
}

/// Single-VM migrations DC1.1 -> DC1.2 over a grid of memory sizes and dirty rates, each
/// driven by the source host's agent as `dczone migrate VM` does.
pub fn sweep(agents: &LabAgents, observer: &dyn Observer) -> anyhow::Result<SweepReport> {
    let zone = dczone_zone::Zone::reference();
    let path_mbit_s = site_path_mbit_s(&zone, "dc1.1", "dc1.2");
    let mut points = Vec::new();
    for mem in SWEEP_MEMORY_MIB {
        let names: Vec<String> = SWEEP_DIRTY_MBPS
            .iter()
            .map(|d| format!("sw-{mem}-{d}"))
            .collect();
        for name in &names {
            destroy_if_present(agents, name)?;
        }
        let vms: Vec<dczone_virt::CreateVm> = names
            .iter()
            .zip(SWEEP_DIRTY_MBPS)
            .map(|(name, dirty)| dczone_virt::CreateVm {
                name: name.clone(),
                host: "dc1.1-h1".into(),
                memory_mib: mem,
                dirty_mbps: dirty,
                dirty_mib: (mem / 4).min(128),
                resident_pct: dczone_virt::DEFAULT_RESIDENT_PCT,
                group: None,
                disk_mib: None,
                disk_image: None,
            })
            .collect();
        observer.step(&format!("booting {} VMs of {mem} MiB", vms.len()));
        vms::boot_all(agents, &vms)?;
        for (name, dirty) in names.iter().zip(SWEEP_DIRTY_MBPS) {
            observer.step(&format!("{name}: migrating to dc1.2-h1"));
            let record: dczone_virt::VmRecord = serde_json::from_value(agents.call(
                "dc1.1-h1",
                "GET",
                &format!("/v1/vms/{name}"),
                None,
                Duration::from_secs(30),
            )?)?;
            let resident_mib = record.spec.resident_mib();
            let body = serde_json::json!({ "to": "dc1.2-h1" });
            let m: VmMigration = serde_json::from_value(agents.call(
                "dc1.1-h1",
                "POST",
                &format!("/v1/vms/{name}/migrate"),
                Some(body),
                Duration::from_secs(600),
            )?)?;
            let total_ms = m.t1_ms + m.t2_ms;
            let point = SweepPoint {
                memory_mib: mem,
                resident_mib,
                reference_memory_gib: f64::from(mem) * zone.lab_scale / 1024.0,
                throughput_mbit_s: m.bytes_sent as f64 * 8.0 / 1e3 / total_ms,
                path_mbit_s,
                dirty_mbps: dirty,
                total_ms,
                t2_ms: m.t2_ms,
                qemu_downtime_ms: m.qemu_downtime_ms,
                bytes_sent: m.bytes_sent,
                iterations: m.iterations,
            };
            observer.sweep_point(&point);
            points.push(point);
            destroy_if_present(agents, name)?;
        }
    }
    Ok(SweepReport {
        header: Header::new("migration-sweep", SweepReport::VERSION),
        points,
    })
}
