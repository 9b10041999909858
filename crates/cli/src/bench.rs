//! `dczone bench ...`: each benchmark prints a table and can write its JSON to a file.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use indicatif::ProgressBar;

use dczone_virt::migrate::{Params, Strategy};
use dczone_virt::Platform;

use crate::agents::ZoneAgents;
use crate::table::render;

/// The network a database benchmark runs on (SPEC.md section 9).
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct NetworkArgs {
    /// apn: fixed delay, no loss, bulk transfers on paths of their own. conventional: the
    /// same fibre as a carrier WAN (jitter, loss, one pipe shared with bulk transfers).
    #[arg(long, default_value = "apn")]
    pub wan: dczone_zone::Wan,
    /// Bulk TCP flows (backup, bulk replication) from the primary's site to DC2.1 for the
    /// whole run, filling the path; HA traffic keeps its priority.
    #[arg(long)]
    pub cross_traffic: bool,
}

impl From<NetworkArgs> for crate::db_bench::NetworkOptions {
    fn from(a: NetworkArgs) -> Self {
        crate::db_bench::NetworkOptions {
            wan: a.wan,
            cross_traffic: a.cross_traffic,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// One VM's migration time and downtime against guest memory size and dirty rate.
    MigrationSweep {
        #[arg(long)]
        json: Option<PathBuf>,
        /// Where to write the SVG plot.
        #[arg(long, default_value = "report/migration-sweep.svg")]
        svg: PathBuf,
    },
    /// UC1 scenario #1: a 3-VM cluster under client load migrates DC1.1 -> DC1.2.
    IntraRegion {
        #[arg(
            long,
            value_enum,
            default_value = "coordinated",
            conflicts_with = "compare"
        )]
        strategy: crate::vm_cmd::StrategyArg,
        /// Run sequential, parallel and coordinated in one run and print the ratios.
        #[arg(long)]
        compare: bool,
        /// Migrations per strategy, back and forth on a cluster that stays up (default 1,
        /// 3 with --compare).
        #[arg(long)]
        runs: Option<usize>,
        /// Replay the frames that reach a source during its switchover (on), drop them as
        /// QEMU alone does (off), or run each strategy both ways in the same run (compare).
        #[arg(long, value_enum, default_value = "on")]
        frame_replay: FrameReplayArg,
        /// Encrypt the streams between the sites (on, the default), send them in the clear
        /// (off), or run each strategy both ways in the same run and print what TLS costs
        /// (compare).
        #[arg(long, value_enum, default_value = "on")]
        tls: FrameReplayArg,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// UC2: sync and async replication per distance, DC2.1 failure (fallback to async and
    /// back), disasters of the primary's site (RTO, RPO audit).
    InterRegion {
        /// Distances of DC2.1 in km (its links to the other database sites).
        #[arg(long, value_delimiter = ',', default_value = "100,500,1000,2500")]
        distances: Vec<f64>,
        #[arg(long, default_value_t = 32)]
        clients: usize,
        /// Seconds of load per measurement.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Rounds of sync and async at each distance, alternating (sync, async, async,
        /// sync, ...); Ptrx and the sync/async ratio are taken over all of them.
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// Disasters of the primary's site; the first at 3 s into the load, the rest at
        /// random moments.
        #[arg(long, default_value_t = 10)]
        injections: usize,
        /// Also sweep the clients (1, 2, 4, ...) at 500 km, sync and async, until Ptrx
        /// stops growing.
        #[arg(long)]
        saturation: bool,
        #[command(flatten)]
        network: NetworkArgs,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Regional disasters: both DC1 sites cut off at random moments under Tier 1 load from a
    /// client in DC2.1; each audited, region 1 restored and rejoined, the primary switched
    /// back home.
    RegionDisaster {
        #[arg(long, default_value_t = 10)]
        injections: usize,
        #[arg(long, default_value_t = 8)]
        clients: usize,
        #[command(flatten)]
        network: NetworkArgs,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Planned switchovers under load around the database sites, each audited.
    Switchover {
        #[arg(long, default_value_t = 6)]
        rounds: usize,
        #[arg(long, default_value_t = 16)]
        clients: usize,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// APN emulator fidelity (delay, rate), capacity and memory.
    Wan {
        /// Write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Measured runs per figure (after one warm-up).
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
}

pub fn run(
    lab: &dczone_lab::Lab,
    state_dir: &Path,
    exe: &Path,
    cmd: BenchCommand,
) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCommand::MigrationSweep { json, svg } => sweep(lab, exe, state_dir, json, svg),
        BenchCommand::InterRegion {
            distances,
            clients,
            seconds,
            rounds,
            injections,
            saturation,
            network,
            json,
        } => crate::db_bench::inter_region(
            lab,
            exe,
            state_dir,
            crate::db_bench::InterRegionOptions {
                distances_km: distances,
                clients,
                seconds,
                rounds,
                injections,
                json,
                network: network.into(),
                saturation,
            },
        ),
        BenchCommand::RegionDisaster {
            injections,
            clients,
            network,
            json,
        } => crate::region_bench::region_disaster(
            lab,
            exe,
            state_dir,
            crate::region_bench::RegionDisasterOptions {
                injections,
                clients,
                json,
                network: network.into(),
            },
        ),
        BenchCommand::Switchover {
            rounds,
            clients,
            json,
        } => {
            crate::db_bench::switchover_bench(lab, exe, state_dir, rounds, clients, json.as_deref())
        }
        BenchCommand::IntraRegion {
            strategy,
            compare,
            runs,
            frame_replay,
            tls,
            json,
        } => {
            let strategies = if compare {
                Strategy::ALL.to_vec()
            } else {
                vec![strategy.into()]
            };
            let runs = runs.unwrap_or(if compare { 3 } else { 1 });
            if runs == 0 {
                anyhow::bail!("--runs must be at least 1");
            }
            intra_region(
                lab,
                exe,
                state_dir,
                strategies,
                &frame_replay.modes(),
                &tls.modes(),
                runs,
                json,
            )
        }
        BenchCommand::Wan { json, runs } => {
            if runs == 0 {
                anyhow::bail!("--runs must be at least 1");
            }
            let lab = dczone_lab::Lab::new("dczbench", state_dir, exe)?.precise();
            let bar = ProgressBar::new_spinner();
            bar.enable_steady_tick(std::time::Duration::from_millis(100));
            let report = lab.wan_bench(runs, &|msg| bar.set_message(msg.to_string()))?;
            bar.finish_and_clear();
            let rows: Vec<_> = report
                .measurements
                .iter()
                .map(|m| {
                    vec![
                        m.name.clone(),
                        format!("{:.3}", m.min),
                        format!("{:.3}", m.median),
                        format!("{:.3}", m.max),
                        m.target.clone(),
                        m.pass
                            .map_or("-".into(), |p| if p { "pass" } else { "MISS" }.into()),
                    ]
                })
                .collect();
            println!("bench wan @ {} ({} runs each)", report.git_rev, report.runs);
            print!(
                "{}",
                render(
                    &["MEASUREMENT", "MIN", "MEDIAN", "MAX", "TARGET", "VERDICT"],
                    &rows
                )
            );
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
                println!("wrote {}", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

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

#[derive(Debug, serde::Serialize)]
struct Continuity {
    vm: String,
    same_boot: bool,
    processed_before: u64,
    processed_after: u64,
    balance_sum_before: i64,
    balance_sum_after: i64,
    ok: bool,
}

/// A feature on, off, or both ways in the same run.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum FrameReplayArg {
    On,
    Off,
    Compare,
}

impl FrameReplayArg {
    fn modes(self) -> Vec<bool> {
        match self {
            FrameReplayArg::On => vec![true],
            FrameReplayArg::Off => vec![false],
            FrameReplayArg::Compare => vec![true, false],
        }
    }
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

#[derive(Debug, serde::Serialize)]
struct StrategyRun {
    strategy: String,
    /// Frames reaching a source during its switchover were replayed to the destination.
    frame_replay: bool,
    /// The streams between the sites were TLS.
    tls: bool,
    to_site: String,
    svc_t2_ms: f64,
    svc_t2_union_ms: f64,
    svc_t1_ms: f64,
    /// Memory and dirty pages sent by the whole group, MiB.
    sent_mib: f64,
    /// What the group sent over SVC-T1, Mbit/s (lab rate; the path's is 390.6).
    throughput_mbit_s: f64,
    client_gap_ms: f64,
    /// Where the longest service gap began, ms from the migration's start (negative:
    /// before it; past `svc_t1_ms`: after the switchover); none without a gap.
    client_gap_at_ms: Option<f64>,
    /// The migration's start and end, on the clock of `load.service_gaps`.
    migration_started_us: u64,
    migration_ended_us: u64,
    /// Standard TCP, no application retry: a long-lived connection, a new connection.
    tcp_gap_pool_ms: f64,
    tcp_gap_new_ms: f64,
    kr1_1_pass: bool,
    stretch_100ms_pass: bool,
    vms: Vec<dczone_virt::migrate::VmMigration>,
    load: dczone_workload::LoadReport,
    continuity: Vec<Continuity>,
    continuity_ok: bool,
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

fn guest_stats(ns: &str, ip: std::net::Ipv4Addr) -> (String, u64, i64) {
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
#[derive(Debug, serde::Serialize)]
struct StrategyRuns {
    /// The strategy's name, with " (no replay)" when frames were dropped and " (no TLS)"
    /// when the streams were in the clear.
    strategy: String,
    frame_replay: bool,
    tls: bool,
    runs: Vec<StrategyRun>,
    svc_t2_median_ms: f64,
    svc_t2_p95_ms: f64,
    svc_t2_max_ms: f64,
    client_gap_max_ms: f64,
    tcp_gap_pool_max_ms: f64,
    tcp_gap_new_max_ms: f64,
    kr1_1_pass_runs: usize,
    runs_total: usize,
    svc_t1_median_ms: f64,
    svc_t1_max_ms: f64,
    /// Memory and dirty pages sent per run, MiB (median).
    sent_mib_median: f64,
    throughput_mbit_s_median: f64,
}

/// Nearest-rank quantile of `v` (any order).
fn quantile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
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

// The scenario's options become one typed struct when it moves into a library (issue 11).
#[allow(clippy::too_many_arguments)]
pub fn intra_region(
    lab: &dczone_lab::Lab,
    exe: &Path,
    state_dir: &Path,
    strategies: Vec<Strategy>,
    replay_modes: &[bool],
    tls_modes: &[bool],
    runs_per_strategy: usize,
    json: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    // Everything through the hosts' agents, as on real hosts: the VMs' lifecycle and the
    // group's moves.
    let zone_agents = reference_agents(lab, exe, state_dir)?;
    let agents = &zone_agents.agents;
    for (name, ..) in POC_VMS {
        destroy_if_present(&zone_agents, name)?;
    }
    let cluster: Vec<dczone_virt::CreateVm> = POC_VMS
        .iter()
        .map(|&(name, host, mem, dirty, area)| {
            println!("booting {name} on {host} ({mem} MiB, dirtying {dirty} MB/s)");
            dczone_virt::CreateVm {
                name: name.into(),
                host: host.into(),
                memory_mib: mem,
                dirty_mbps: dirty,
                dirty_mib: area,
                resident_pct: dczone_virt::DEFAULT_RESIDENT_PCT,
                group: Some(POC_GROUP.into()),
            }
        })
        .collect();
    create_all(&zone_agents, &cluster)?;
    let client = lab.host_namespace("dc1.1-client");
    let mut summaries = Vec::new();
    let plan: Vec<(Strategy, bool, bool)> = strategies
        .iter()
        .flat_map(|&s| {
            replay_modes
                .iter()
                .flat_map(move |&r| tls_modes.iter().map(move |&t| (s, r, t)))
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
        for run in 0..runs_per_strategy {
            if runs_per_strategy > 1 {
                println!("{label} run {}/{}", run + 1, runs_per_strategy);
            }
            let vms = zone_agents
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
                .map(|(_, ip)| guest_stats(&client, *ip))
                .collect();
            let started = dczone_workload::now_us();
            let load = dczone_workload::start(&client, &targets, LOAD_RATE_PER_VM)?;
            std::thread::sleep(std::time::Duration::from_secs(2));
            let (multi, update) = crate::vm_cmd::progress_display(false);
            let t0 = dczone_workload::now_us();
            let g = agents.migrate_group(POC_GROUP, to_site, strategy, &params, &update);
            let t1 = dczone_workload::now_us();
            let _ = multi.clear();
            std::thread::sleep(std::time::Duration::from_secs(2));
            let report = load.finish(started, dczone_measure::Interval::new(t0, t1));
            let g = g?;
            let continuity: Vec<Continuity> = targets
                .iter()
                .zip(&before)
                .map(|((vm, ip), (boot0, proc0, sum0))| {
                    let (boot1, proc1, sum1) = guest_stats(&client, *ip);
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
            crate::vm_cmd::print_group(&g);
            let gap_at_ms = report
                .service_gaps
                .iter()
                .max_by_key(|i| i.end_us - i.start_us)
                .map(|i| (i.start_us as f64 - t0 as f64) / 1e3);
            println!(
            "client: {} ok / {} sent, {} errors; longest service gap {:.1} ms{}; TPS before/during/after {:.0}/{:.0}/{:.0}; p99 {:.1}/{:.1}/{:.1} ms",
            report.ok, report.sent, report.errors, report.client_gap_ms, gap_at_ms.map_or(String::new(), |ms| format!(" (from {:+.1} s of the migration)", ms / 1e3)),
            report.before.tps, report.during.tps, report.after.tps,
            report.before.p99_ms, report.during.p99_ms, report.after.p99_ms
        );
            println!(
            "standard TCP, no application retry: long-lived connection gap {:.0} ms, new connection gap {:.0} ms ({} requests unanswered)",
            report.tcp_gap_pool_ms, report.tcp_gap_new_ms, report.tcp_probe_failures
        );
            for c in &continuity {
                println!(
                    "continuity {}: same boot {}, processed {} -> {}, balance sum {} -> {} {}",
                    c.vm,
                    c.same_boot,
                    c.processed_before,
                    c.processed_after,
                    c.balance_sum_before,
                    c.balance_sum_after,
                    if c.ok { "ok" } else { "FAILED" }
                );
            }
            let continuity_ok = continuity.iter().all(|c| c.ok);
            println!(
                "KR1.1 (SVC-T2 < 1 s): {}; stretch (< 100 ms): {}\n",
                if g.svc_t2_ms < 1000.0 { "pass" } else { "FAIL" },
                if g.svc_t2_ms < 100.0 { "pass" } else { "miss" }
            );
            let sent_mib = g.vms.iter().map(|v| v.bytes_sent).sum::<u64>() as f64 / 1048576.0;
            runs.push(StrategyRun {
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
                vms: g.vms,
                load: report,
                continuity,
                continuity_ok,
            });
        }
        summaries.push(StrategyRuns::new(strategy, frame_replay, tls, runs));
    }
    print_runs(&summaries);
    let tls_cost = tls_cost(&summaries);
    let value = if !tls_cost.is_empty() {
        serde_json::json!({
            "git_rev": dczone_lab::wan_bench::git_rev(),
            "variants": summaries,
            "tls_cost": tls_cost,
        })
    } else if summaries.len() == 1 && runs_per_strategy == 1 {
        serde_json::to_value(&summaries[0].runs[0])?
    } else if summaries.len() == 1 {
        let mut v = serde_json::to_value(&summaries[0])?;
        v["git_rev"] = dczone_lab::wan_bench::git_rev().into();
        v
    } else {
        let get = |n: &str| {
            summaries
                .iter()
                .find(|r| r.strategy == n)
                .map(|r| r.svc_t2_median_ms)
        };
        let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
        let (seq, par, coo) = (get("sequential"), get("parallel"), get("coordinated"));
        println!(
            "ratios: coordinated/sequential SVC-T2 {:.2}, coordinated/parallel {:.2}",
            ratio(coo, seq).unwrap_or(f64::NAN),
            ratio(coo, par).unwrap_or(f64::NAN)
        );
        serde_json::json!({
            "git_rev": dczone_lab::wan_bench::git_rev(),
            "strategies": summaries.iter().map(|r| (r.strategy.clone(), serde_json::to_value(r).unwrap_or_default())).collect::<serde_json::Map<_, _>>(),
            "ratios": {"coordinated_vs_sequential": ratio(coo, seq), "coordinated_vs_parallel": ratio(coo, par)},
        })
    };
    if let Some(path) = json {
        std::fs::write(&path, serde_json::to_vec_pretty(&value)?)?;
        println!("wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// What TLS costs, for each strategy run both ways: medians with TLS over medians without.
#[derive(Debug, serde::Serialize)]
struct TlsCost {
    strategy: String,
    svc_t2_ratio: f64,
    svc_t1_ratio: f64,
    throughput_ratio: f64,
}

fn tls_cost(summaries: &[StrategyRuns]) -> Vec<TlsCost> {
    let costs: Vec<TlsCost> = summaries
        .iter()
        .filter(|on| on.tls)
        .filter_map(|on| {
            let off = summaries.iter().find(|s| {
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
        .collect();
    for c in &costs {
        println!(
            "TLS / clear, {} (medians): SVC-T2 {:.2}, SVC-T1 {:.2}, throughput {:.2}",
            c.strategy, c.svc_t2_ratio, c.svc_t1_ratio, c.throughput_ratio
        );
    }
    costs
}

/// The distribution of each strategy's runs.
fn print_runs(summaries: &[StrategyRuns]) {
    let rows: Vec<Vec<String>> = summaries
        .iter()
        .map(|s| {
            vec![
                s.strategy.clone(),
                s.runs_total.to_string(),
                format!("{:.0}", s.svc_t2_median_ms),
                format!("{:.0}", s.svc_t2_p95_ms),
                format!("{:.0}", s.svc_t2_max_ms),
                format!("{:.0}", s.client_gap_max_ms),
                format!("{:.0}", s.tcp_gap_pool_max_ms),
                format!("{:.0}", s.tcp_gap_new_max_ms),
                format!("{}/{}", s.kr1_1_pass_runs, s.runs_total),
                format!("{:.1}", s.svc_t1_median_ms / 1000.0),
                format!("{:.0}", s.sent_mib_median),
                format!("{:.0}", s.throughput_mbit_s_median),
            ]
        })
        .collect();
    print!(
        "{}",
        crate::table::render(
            &[
                "STRATEGY",
                "RUNS",
                "SVC-T2 MEDIAN MS",
                "P95",
                "WORST",
                "CLIENT GAP WORST MS",
                "TCP POOL GAP WORST",
                "TCP NEW GAP WORST",
                "KR1.1 RUNS",
                "SVC-T1 MEDIAN S",
                "SENT MIB",
                "MBIT/S"
            ],
            &rows
        )
    );
}

/// Brings the lab up on the reference zone (a no-op if it already is) and returns its
/// hosts' agents (started, should one be gone).
fn reference_agents(
    lab: &dczone_lab::Lab,
    exe: &Path,
    state_dir: &Path,
) -> anyhow::Result<crate::agents::LabAgents> {
    let (zone, source, text) = crate::lab_cmd::load_zone(None)?;
    lab.up(&zone, &source, &text)?;
    let agents = crate::vm_cmd::lab_agents(lab, exe, state_dir)?;
    agents.agents.ensure_all()?;
    Ok(agents)
}

/// Creates and boots `vms` at once (under TCG each guest takes seconds to boot), each
/// through its host's agent, as `dczone vm create` does.
fn create_all(
    agents: &(dyn ZoneAgents + Sync),
    vms: &[dczone_virt::CreateVm],
) -> anyhow::Result<()> {
    std::thread::scope(|s| {
        let boots: Vec<_> = vms
            .iter()
            .map(|vm| {
                s.spawn(move || {
                    let body = serde_json::json!({
                        "name": vm.name,
                        "memory_mib": vm.memory_mib,
                        "dirty_mbps": vm.dirty_mbps,
                        "dirty_mib": vm.dirty_mib,
                        "resident_pct": vm.resident_pct,
                        "group": vm.group,
                    });
                    agents
                        .call(&vm.host, "POST", "/v1/vms", Some(body), BOOT_TIMEOUT)
                        .with_context(|| format!("create {} on {}", vm.name, vm.host))
                })
            })
            .collect();
        for b in boots {
            b.join()
                .map_err(|_| anyhow::anyhow!("VM creation thread panicked"))??;
        }
        Ok(())
    })
}

/// Destroys `name` through its host's agent, if the zone has it.
fn destroy_if_present(agents: &dyn ZoneAgents, name: &str) -> anyhow::Result<()> {
    let Some(vm) = agents.list()?.into_iter().find(|v| v.spec.name == name) else {
        return Ok(());
    };
    agents
        .call(
            &vm.host,
            "DELETE",
            &format!("/v1/vms/{name}"),
            None,
            Duration::from_secs(30),
        )
        .with_context(|| format!("destroy {name} on {}", vm.host))?;
    Ok(())
}

/// How long a VM may take to boot under TCG on a busy host.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// The lab rate between two sites of `zone` with every link up, Mbit/s.
fn site_path_mbit_s(zone: &dczone_zone::Zone, a: &str, b: &str) -> f64 {
    let (Some(a), Some(b)) = (zone.site_index(a), zone.site_index(b)) else {
        return f64::NAN;
    };
    let params: Vec<_> = zone.links.iter().map(|l| l.params).collect();
    let cut = vec![false; params.len()];
    zone.lab_rate_bps(zone.path(a, b, &params, &cut).bandwidth_bps) as f64 / 1e6
}

const SWEEP_MEMORY_MIB: [u32; 3] = [256, 512, 1024];
const SWEEP_DIRTY_MBPS: [u32; 3] = [0, 4, 16];

#[derive(Debug, serde::Serialize)]
struct SweepPoint {
    memory_mib: u32,
    /// The guest's incompressible working set.
    resident_mib: u32,
    /// The VM this one stands for at the lab's scale (memory x scale).
    reference_memory_gib: f64,
    dirty_mbps: u32,
    total_ms: f64,
    t2_ms: f64,
    qemu_downtime_ms: u64,
    bytes_sent: u64,
    /// bytes_sent over the total time, against the path's lab rate.
    throughput_mbit_s: f64,
    path_mbit_s: f64,
    iterations: u64,
}

/// Single-VM migrations DC1.1 -> DC1.2 over a grid of memory sizes and dirty rates.
pub fn sweep(
    lab: &dczone_lab::Lab,
    exe: &Path,
    state_dir: &Path,
    json: Option<PathBuf>,
    svg: PathBuf,
) -> anyhow::Result<ExitCode> {
    let agents = reference_agents(lab, exe, state_dir)?;
    let (zone, ..) = crate::lab_cmd::load_zone(None)?;
    let path_mbit_s = site_path_mbit_s(&zone, "dc1.1", "dc1.2");
    let mut points = Vec::new();
    for mem in SWEEP_MEMORY_MIB {
        let names: Vec<String> = SWEEP_DIRTY_MBPS
            .iter()
            .map(|d| format!("sw-{mem}-{d}"))
            .collect();
        for name in &names {
            destroy_if_present(&agents, name)?;
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
            })
            .collect();
        create_all(&agents, &vms)?;
        for (name, dirty) in names.iter().zip(SWEEP_DIRTY_MBPS) {
            let record: dczone_virt::VmRecord = serde_json::from_value(agents.call(
                "dc1.1-h1",
                "GET",
                &format!("/v1/vms/{name}"),
                None,
                Duration::from_secs(30),
            )?)?;
            let resident_mib = record.spec.resident_mib();
            // One VM's migration is driven by its source host's agent with the
            // destination's, as `dczone migrate VM` does.
            let body = serde_json::json!({ "to": "dc1.2-h1" });
            let m: dczone_virt::migrate::VmMigration = serde_json::from_value(agents.call(
                "dc1.1-h1",
                "POST",
                &format!("/v1/vms/{name}/migrate"),
                Some(body),
                Duration::from_secs(600),
            )?)?;
            let total_ms = m.t1_ms + m.t2_ms;
            let throughput_mbit_s = m.bytes_sent as f64 * 8.0 / 1e3 / total_ms;
            println!(
                "{mem:>5} MiB ({resident_mib} resident, a {:.0} GiB VM at scale), dirty {dirty:>2} MB/s: total {:>7.1} ms, T2 {:>6.1} ms (QEMU downtime {} ms), {:.1} MiB sent at {throughput_mbit_s:.0} of {path_mbit_s:.1} Mbit/s, {} rounds",
                f64::from(mem) * zone.lab_scale / 1024.0,
                total_ms,
                m.t2_ms,
                m.qemu_downtime_ms,
                m.bytes_sent as f64 / 1048576.0,
                m.iterations
            );
            points.push(SweepPoint {
                memory_mib: mem,
                resident_mib,
                reference_memory_gib: f64::from(mem) * zone.lab_scale / 1024.0,
                throughput_mbit_s,
                path_mbit_s,
                dirty_mbps: dirty,
                total_ms: m.t1_ms + m.t2_ms,
                t2_ms: m.t2_ms,
                qemu_downtime_ms: m.qemu_downtime_ms,
                bytes_sent: m.bytes_sent,
                iterations: m.iterations,
            });
            destroy_if_present(&agents, name)?;
        }
    }
    let series = |f: fn(&SweepPoint) -> f64| -> Vec<crate::plot::Series> {
        SWEEP_DIRTY_MBPS
            .iter()
            .map(|&d| {
                (
                    format!("dirty {d} MB/s"),
                    points
                        .iter()
                        .filter(|p| p.dirty_mbps == d)
                        .map(|p| (f64::from(p.memory_mib), f(p)))
                        .collect(),
                )
            })
            .collect()
    };
    let total = series(|p| p.total_ms);
    let down = series(|p| p.t2_ms);
    let chart = crate::plot::two_panels(
        &crate::plot::Panel {
            title: "Migration time (T1 + T2)",
            x_label: "guest memory, MiB",
            y_label: "ms",
            series: &total,
        },
        &crate::plot::Panel {
            title: "Downtime T2 (STOP -> RESUME)",
            x_label: "guest memory, MiB",
            y_label: "ms",
            series: &down,
        },
    );
    if let Some(dir) = svg.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&svg, chart)?;
    println!("wrote {}", svg.display());
    if let Some(path) = json {
        std::fs::write(
            &path,
            serde_json::to_vec_pretty(
                &serde_json::json!({"git_rev": dczone_lab::wan_bench::git_rev(), "points": points}),
            )?,
        )?;
        println!("wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}
