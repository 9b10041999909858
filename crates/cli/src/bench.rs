//! `dczone bench ...`: parses a benchmark's options, runs its scenario from
//! [`dczone_bench`] and prints the report as tables; `--json FILE` also writes the report.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;

use clap::Subcommand;
use indicatif::{MultiProgress, ProgressBar};

use dczone_bench::inter_region::{InterRegionOptions, NetworkOptions};
use dczone_bench::migration::{
    IntraRegionOptions, IntraRegionReport, StrategyRun, StrategyRuns, SweepPoint, SweepReport,
    SWEEP_DIRTY_MBPS,
};
use dczone_bench::region::RegionDisasterOptions;
use dczone_bench::Observer;
use dczone_virt::migrate::{GroupMigration, Progress, Strategy};

use crate::bench_report::{print_inter_region, print_region_disaster, print_switchover};
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

impl From<NetworkArgs> for NetworkOptions {
    fn from(a: NetworkArgs) -> Self {
        NetworkOptions {
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
    /// Issue 12's storage scenario: stretched against local write latency, then a VM with
    /// a disk live-migrated between the regions under a saturating client, back and forth
    /// (its disk mirrored into the other cluster): T1, T2, Ptrx before and during.
    Storage {
        /// Inter-region migrations (alternating DC1.1 -> DC2.1 and back).
        #[arg(long, default_value_t = 4)]
        runs: u32,
        /// apn (fixed delay, no loss) or conventional (jitter and loss on every link), for
        /// the whole run; the APN is put back at the end.
        #[arg(long, default_value = "apn")]
        wan: dczone_zone::Wan,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// VMs of DC1.2 migrated to the public cloud one after another, each phase timed
    /// (export, convert, transfer, import, settings, start), `--runs` times: T1 against
    /// its floor, the upload against the APN path.
    Cloud {
        #[arg(long, default_value_t = 3)]
        runs: u32,
        #[arg(long, default_value_t = 2)]
        vms: usize,
        /// Data at rest in each VM's disk, MiB.
        #[arg(long, default_value_t = 64)]
        data_mib: u32,
        /// The format the cloud imports: vmdk, vhd, raw or qcow2.
        #[arg(long, default_value = "vmdk")]
        format: String,
        /// Closed-loop clients of the AP in the AP-DB comparison (0 skips it). One
        /// measures a transaction's own turnaround; more add queueing at the database,
        /// which a slower AP sees less of (BENCHMARKS.md).
        #[arg(long, default_value_t = 1)]
        ap_clients: usize,
        /// Length of each AP-DB measurement, seconds (each placement measured `--runs`
        /// times, in turn).
        #[arg(long, default_value_t = 8.0)]
        ap_seconds: f64,
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

/// A group migration's bars, and what updates them.
type Bars = (MultiProgress, Box<dyn Fn(&[Progress]) + Send>);

/// A scenario on a terminal: its steps as lines (`lines`) or as a spinner's message, a
/// group migration's progress as one bar per VM, and each run's figures as it ends.
pub struct Terminal {
    spinner: Option<ProgressBar>,
    bars: Mutex<Option<Bars>>,
}

impl Terminal {
    /// Steps printed as lines (a scenario with output of its own between them).
    pub fn lines() -> Terminal {
        Terminal {
            spinner: None,
            bars: Mutex::new(None),
        }
    }

    /// Steps shown by one spinner, cleared when the terminal is dropped.
    pub fn spinner() -> Terminal {
        let bar = ProgressBar::new_spinner();
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        Terminal {
            spinner: Some(bar),
            bars: Mutex::new(None),
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        if let Some(bar) = &self.spinner {
            bar.finish_and_clear();
        }
    }
}

impl Observer for Terminal {
    fn step(&self, text: &str) {
        match &self.spinner {
            Some(bar) => bar.set_message(text.to_string()),
            None => println!("{text}"),
        }
    }

    fn warn(&self, text: &str) {
        match &self.spinner {
            Some(bar) => bar.suspend(|| eprintln!("warning: {text}")),
            None => eprintln!("warning: {text}"),
        }
    }

    fn migration(&self, progress: &[Progress]) {
        let mut bars = self.bars.lock().unwrap_or_else(|e| e.into_inner());
        let (_, update) = bars.get_or_insert_with(|| {
            let (multi, update) = crate::vm_cmd::progress_display(false);
            (multi, Box::new(update))
        });
        update(progress);
    }

    fn migration_ended(&self) {
        if let Some((multi, _)) = self.bars.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = multi.clear();
        }
    }

    fn intra_region_run(&self, g: &GroupMigration, run: &StrategyRun) {
        crate::vm_cmd::print_group(g);
        let report = &run.load;
        println!(
            "client: {} ok / {} sent, {} errors; longest service gap {:.1} ms{}; TPS before/during/after {:.0}/{:.0}/{:.0}; p99 {:.1}/{:.1}/{:.1} ms",
            report.ok, report.sent, report.errors, report.client_gap_ms,
            run.client_gap_at_ms.map_or(String::new(), |ms| format!(" (from {:+.1} s of the migration)", ms / 1e3)),
            report.before.tps, report.during.tps, report.after.tps,
            report.before.p99_ms, report.during.p99_ms, report.after.p99_ms
        );
        println!(
            "standard TCP, no application retry: long-lived connection gap {:.0} ms, new connection gap {:.0} ms ({} requests unanswered)",
            report.tcp_gap_pool_ms, report.tcp_gap_new_ms, report.tcp_probe_failures
        );
        for c in &run.continuity {
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
        println!(
            "KR1.1 (SVC-T2 < 1 s): {}; stretch (< 100 ms): {}\n",
            if run.kr1_1_pass { "pass" } else { "FAIL" },
            if run.stretch_100ms_pass {
                "pass"
            } else {
                "miss"
            }
        );
    }

    fn sweep_point(&self, p: &SweepPoint) {
        println!(
            "{:>5} MiB ({} resident, a {:.0} GiB VM at scale), dirty {:>2} MB/s: total {:>7.1} ms, T2 {:>6.1} ms (QEMU downtime {} ms), {:.1} MiB sent at {:.0} of {:.1} Mbit/s, {} rounds",
            p.memory_mib,
            p.resident_mib,
            p.reference_memory_gib,
            p.dirty_mbps,
            p.total_ms,
            p.t2_ms,
            p.qemu_downtime_ms,
            p.bytes_sent as f64 / 1048576.0,
            p.throughput_mbit_s,
            p.path_mbit_s,
            p.iterations
        );
    }
}

/// Writes `report` as JSON to `path`, if one was given.
fn write_json(path: Option<&Path>, report: &impl serde::Serialize) -> anyhow::Result<()> {
    if let Some(path) = path {
        std::fs::write(path, serde_json::to_vec_pretty(report)?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn verdict(pass: bool) -> ExitCode {
    if pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

pub fn run(
    lab: &dczone_lab::Lab,
    state_dir: &Path,
    exe: &Path,
    cmd: BenchCommand,
) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCommand::MigrationSweep { json, svg } => {
            let agents = dczone_bench::migration::reference_agents(lab, exe, state_dir)?;
            let report = dczone_bench::migration::sweep(&agents, &Terminal::lines())?;
            write_sweep_plot(&report, &svg)?;
            write_json(json.as_deref(), &report)?;
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::InterRegion {
            distances,
            clients,
            seconds,
            rounds,
            injections,
            saturation,
            network,
            json,
        } => inter_region(
            lab,
            exe,
            state_dir,
            &InterRegionOptions {
                distances_km: distances,
                clients,
                seconds,
                rounds,
                injections,
                network: network.into(),
                saturation,
            },
            json.as_deref(),
        ),
        BenchCommand::RegionDisaster {
            injections,
            clients,
            network,
            json,
        } => {
            let report = dczone_bench::region::region_disaster(
                lab,
                exe,
                state_dir,
                &RegionDisasterOptions {
                    injections,
                    clients,
                    network: network.into(),
                },
                &Terminal::spinner(),
            )?;
            print_region_disaster(&report);
            write_json(json.as_deref(), &report)?;
            Ok(verdict(report.pass()))
        }
        BenchCommand::Switchover {
            rounds,
            clients,
            json,
        } => switchover(lab, exe, state_dir, rounds, clients, json.as_deref()),
        BenchCommand::Cloud {
            runs,
            vms,
            data_mib,
            format,
            ap_clients,
            ap_seconds,
            json,
        } => {
            dczone_cloud::ec2::DiskFormat::parse(&format).ok_or_else(|| {
                anyhow::anyhow!("unknown disk format '{format}': use vmdk, vhd, raw or qcow2")
            })?;
            let report = dczone_bench::cloud::cloud(
                lab,
                exe,
                state_dir,
                &dczone_bench::cloud::CloudOptions {
                    runs,
                    vms,
                    data_mib,
                    ap_db: (ap_clients > 0).then(|| dczone_bench::ap_db::ApDbOptions {
                        clients: ap_clients,
                        seconds: ap_seconds,
                        rounds: runs,
                        format: format.clone(),
                    }),
                    format,
                },
                &Terminal::spinner(),
            )?;
            print_cloud(&report);
            write_json(json.as_deref(), &report)?;
            Ok(verdict(report.pass()))
        }
        BenchCommand::Storage { runs, wan, json } => {
            if runs == 0 {
                anyhow::bail!("--runs must be at least 1");
            }
            let agents = dczone_bench::migration::reference_agents(lab, exe, state_dir)?;
            let report = dczone_bench::storage::storage(
                lab,
                &agents,
                &dczone_bench::storage::StorageOptions { runs, wan },
                &Terminal::spinner(),
            )?;
            print_storage(&report);
            write_json(json.as_deref(), &report)?;
            Ok(verdict(report.pass()))
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
                &IntraRegionOptions {
                    strategies,
                    frame_replay: frame_replay.modes(),
                    tls: tls.modes(),
                    runs,
                },
                json.as_deref(),
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

/// `bench intra-region` (and the demo's first part): the scenario, its tables, its JSON.
pub fn intra_region(
    lab: &dczone_lab::Lab,
    exe: &Path,
    state_dir: &Path,
    o: &IntraRegionOptions,
    json: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let agents = dczone_bench::migration::reference_agents(lab, exe, state_dir)?;
    let report = dczone_bench::migration::intra_region(lab, &agents, o, &Terminal::lines())?;
    print_intra_region(&report);
    write_json(json, &report)?;
    Ok(verdict(report.pass()))
}

/// `bench inter-region` (and the demo's second part).
pub fn inter_region(
    lab: &dczone_lab::Lab,
    exe: &Path,
    state_dir: &Path,
    o: &InterRegionOptions,
    json: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let report =
        dczone_bench::inter_region::inter_region(lab, exe, state_dir, o, &Terminal::spinner())?;
    print_inter_region(&report);
    write_json(json, &report)?;
    if std::env::var_os("DCZONE_PRINT_JSON").is_some() {
        crate::print_json(&report);
    }
    Ok(ExitCode::SUCCESS)
}

/// `bench switchover` (and the demo's last part).
pub fn switchover(
    lab: &dczone_lab::Lab,
    exe: &Path,
    state_dir: &Path,
    rounds: usize,
    clients: usize,
    json: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let report = dczone_bench::inter_region::switchover(
        lab,
        exe,
        state_dir,
        rounds,
        clients,
        &Terminal::spinner(),
    )?;
    print_switchover(&report);
    write_json(json, &report)?;
    Ok(verdict(report.rpo_lost_transactions == 0))
}

fn print_cloud(r: &dczone_bench::cloud::CloudReport) {
    let rows: Vec<Vec<String>> = r
        .vms
        .iter()
        .map(|v| {
            let m = &v.report;
            let p = &m.phases;
            let mut row = vec![
                format!("{} {}", v.run, m.vm),
                dczone_storage::size(m.object_bytes),
            ];
            row.extend(crate::cloud_cmd::phase_cells(p));
            row.extend([
                format!("{:.0}", m.boot_ms.unwrap_or(f64::NAN)),
                format!("{:.0}", m.t1_ms),
                format!("{:.2}", v.t1_over_floor),
                format!("{:.0}", m.transfer_mbit_s),
                format!("{:.0}", m.most_delayed_part_ms),
            ]);
            row
        })
        .collect();
    print!(
        "{}",
        render(
            &[
                "RUN VM",
                "IMAGE",
                "EXPORT_MS",
                "CONVERT_MS",
                "TRANSFER_MS",
                "IMPORT_MS",
                "SETTINGS_MS",
                "START_MS",
                "BOOT_MS",
                "T1_MS",
                "T1/FLOOR",
                "MBIT_S",
                "SLOWEST_PART_MS",
            ],
            &rows
        )
    );
    let s = |x: &dczone_bench::cloud::Spread| {
        format!("{:.2} / {:.2} / {:.2}", x.median, x.p95, x.worst)
    };
    println!(
        "format {}; path {:.0} Mbit/s; transfer median {:.0} Mbit/s; share of the path (median / p5 / worst) \
         while a part was in flight {}, over the whole phase {}",
        r.format,
        r.path_mbit_s,
        r.transfer_mbit_s,
        s(&r.transfer_share),
        s(&r.transfer_share_wall)
    );
    println!(
        "T1 ms (median / p95 / worst) {:.0} / {:.0} / {:.0}; T1 over its floor {}; batch T1 per run {:?} ms",
        r.t1_ms.median,
        r.t1_ms.p95,
        r.t1_ms.worst,
        s(&r.t1_over_floor),
        r.t1_total_ms.iter().map(|t| t.round()).collect::<Vec<_>>()
    );
    if let Some(a) = &r.ap_db {
        let rows: Vec<Vec<String>> = a
            .loads
            .iter()
            .map(|l| {
                vec![
                    format!("{} {}", l.round, l.placement),
                    l.ap_ip.to_string(),
                    l.requests.to_string(),
                    l.errors.to_string(),
                    format!("{:.1}", l.p),
                    format!(
                        "{:.2} / {:.2} / {:.2}",
                        l.tat_ms.median, l.tat_ms.p95, l.tat_ms.worst
                    ),
                    format!("{:.2} / {:.2}", l.client_ms.median, l.client_ms.p95),
                    format!("{:.2}", l.rtt_ms),
                ]
            })
            .collect();
        print!(
            "{}",
            render(
                &[
                    "ROUND PLACEMENT",
                    "AP",
                    "REQUESTS",
                    "ERRORS",
                    "P_PER_S",
                    "TAT_MS (MED/P95/WORST)",
                    "CLIENT_MS (MED/P95)",
                    "DB_RTT_MS",
                ],
                &rows
            )
        );
        println!(
            "AP-DB (DB primary in {} at {}, {} round trips per request, {} clients): TAT dc-dc {:.2} ms, pub-dc {:.2} ms (x{:.2}); P dc-dc {:.1}/s, pub-dc {:.1}/s (x{:.2}); per round, extra against {} x the RTT difference: {}; worst {:.0} % off",
            a.db_site,
            a.db_ip,
            a.round_trips,
            a.clients,
            a.tat_dc_dc_ms,
            a.tat_pub_dc_ms,
            a.tat_ratio,
            a.p_dc_dc,
            a.p_pub_dc,
            a.p_ratio,
            a.round_trips,
            a.rounds
                .iter()
                .map(|c| format!("{:.2} / {:.2} ms", c.extra_ms, c.expected_extra_ms))
                .collect::<Vec<_>>()
                .join(", "),
            a.extra_error * 100.0
        );
    }
    if let Some(e) = &r.ap_db_error {
        println!("AP-DB comparison failed: {e}");
    }
    println!(
        "clocks agree: {}; sources kept running: {}; verdict (transfer >= 80 % of the path, T1 <= 1.3x floor, AP-DB extra within 20 %): {}",
        r.clocks_agree,
        r.sources_running,
        if r.pass() { "PASS" } else { "FAIL" }
    );
}

fn print_storage(r: &dczone_bench::storage::StorageReport) {
    let lat = |w: &dczone_bench::storage::WriteLatency| {
        vec![
            w.cluster.clone(),
            w.host.clone(),
            format!("{:.2}", w.write_p50_ms),
            format!("{:.2}", w.write_p95_ms),
            format!("{:.2}", w.write_worst_ms),
        ]
    };
    print!(
        "{}",
        render(
            &["CLUSTER", "FROM", "4K_WRITE_P50_MS", "P95_MS", "WORST_MS"],
            &[lat(&r.stretch), lat(&r.local)]
        )
    );
    let rows: Vec<Vec<String>> = r
        .migration_runs
        .iter()
        .map(|m| {
            vec![
                format!("{}->{}", m.from, m.to),
                format!("{:.0}", m.t1_ms),
                format!("{:.1}", m.t2_ms),
                format!("{:.0}/{:.0}", m.copy_ms, m.completion_ms),
                format!("{:.0}/{:.0}", m.mirrored_mib, m.memory_mib),
                format!("{:.0}/{:.0}", m.ptrx_before, m.ptrx_during),
                format!("{:.2}", m.ptrx_ratio),
                format!("{:.0}", m.client_gap_ms),
                format!("{:.0}", m.tcp_gap_pool_ms),
                if m.continuity_ok { "ok" } else { "BROKEN" }.into(),
            ]
        })
        .collect();
    print!(
        "{}",
        render(
            &[
                "MOVE",
                "T1_MS",
                "T2_MS",
                "COPY/COMPLETION_MS",
                "DISK/MEM_MIB",
                "PTRX BEFORE/DURING",
                "RATIO",
                "GAP_MS",
                "TCP_GAP_MS",
                "STATE",
            ],
            &rows
        )
    );
    let m = &r.migration;
    println!(
        "{} runs: T2 median {:.1} ms, p95 {:.1}, worst {:.1}; Ptrx during/before median {:.2}, worst {:.2}",
        m.runs, m.t2_ms, m.t2_p95_ms, m.t2_worst_ms, m.ptrx_ratio, m.ptrx_ratio_worst
    );
    let b = &r.backup;
    let group_row = |kind: &str, g: &dczone_control::backup::GroupBackupReport| {
        vec![
            kind.to_string(),
            format!("{:.0}", g.t1_ms),
            format!("{:.0}", g.t2_ms),
            format!("{:.1}", g.bytes as f64 / 1e6),
            g.chunks.to_string(),
            format!(
                "{:.0} ({:.0} %)",
                g.mbit_s,
                100.0 * g.mbit_s / b.path_mbit_s
            ),
            format!("{:.0}", g.most_delayed_arrival_ms),
            format!("{:.0}", g.mean_arrival_ms),
            format!(
                "{:.0}",
                g.bytes as f64 * 8.0 / (b.path_mbit_s * 1e3) + b.one_way_ms
            ),
        ]
    };
    println!(
        "backup of a {}-VM group to DC2.1 ({} WAN, path {:.1} Mbit/s, {:.2} ms one way); clients' Ptrx {:.0} before, {:.0} during the full backup",
        b.full.vms.len(),
        b.wan,
        b.path_mbit_s,
        b.one_way_ms,
        b.ptrx_before,
        b.ptrx_during
    );
    print!(
        "{}",
        render(
            &[
                "BACKUP",
                "T1_MS",
                "T2_MS",
                "MB",
                "CHUNKS",
                "MBIT_S (OF PATH)",
                "MOST_DELAYED_MS",
                "MEAN_ARRIVAL_MS",
                "FLOOR_MS",
            ],
            &[
                group_row("full", &b.full),
                group_row("incremental", &b.incremental)
            ]
        )
    );
    let rows: Vec<Vec<String>> = r
        .restore
        .vms
        .iter()
        .map(|v| {
            let x = &v.report;
            vec![
                format!("{} -> {}", x.vm, x.host),
                format!("{:.0}", x.trecovery_ms),
                format!("{:.0}", x.volume_ms),
                format!("{:.0}", x.boot_ms),
                v.acknowledged.to_string(),
                v.before_backup.to_string(),
                v.replayed.to_string(),
                v.present.to_string(),
                (v.lost + v.refused).to_string(),
                if v.checksum_match {
                    "equal"
                } else {
                    "DIFFERENT"
                }
                .into(),
            ]
        })
        .collect();
    print!(
        "{}",
        render(
            &[
                "RESTORE",
                "TRECOVERY_MS",
                "VOLUME_MS",
                "BOOT_MS",
                "ACKED",
                "BEFORE_BACKUP",
                "REPLAYED",
                "PRESENT",
                "LOST",
                "CHECKSUM",
            ],
            &rows
        )
    );
    let s = &r.site_loss;
    println!(
        "{} lost for {:.0} s under writes in DC1.2: longest write gap {:.0} ms (plain TCP {:.0} ms), Ptrx {:.0} before, {:.0} while it was gone ({} acknowledged); {} of {} acknowledged transfers lost, {} refused; region 1 whole again {:.1} s after",
        s.site,
        s.held_s,
        s.write_gap_ms,
        s.tcp_gap_pool_ms,
        s.ptrx_before,
        s.ptrx_during,
        s.acknowledged_during,
        s.lost,
        s.acknowledged,
        s.refused,
        s.recovered_ms / 1e3
    );
    let v = &r.verdicts;
    let pf = |b: bool| if b { "PASS" } else { "FAIL" };
    println!(
        "stretched write <= local + RTT(100 km) + 1 ms: {}; T2 < 1 s every run: {}; Ptrx during >= 0.8 x before every run: {}; state kept, source image removed: {}",
        pf(v.stretch_latency),
        pf(v.migration_t2),
        pf(v.migration_ptrx),
        pf(v.continuity)
    );
    println!(
        "backup >= 80 % of the path: {}; most delayed <= 1.1 x floor: {}; restore lost nothing: {}; Trecovery <= boot + 2 s: {}; DC1.1 lost, DC1.2 served and lost nothing: {}",
        pf(v.backup_rate),
        pf(v.backup_most_delayed),
        pf(v.restore_rpo),
        pf(v.trecovery),
        pf(v.site_loss)
    );
}

fn print_intra_region(report: &IntraRegionReport) {
    print_runs(&report.variants);
    for c in &report.tls_cost {
        println!(
            "TLS / clear, {} (medians): SVC-T2 {:.2}, SVC-T1 {:.2}, throughput {:.2}",
            c.strategy, c.svc_t2_ratio, c.svc_t1_ratio, c.throughput_ratio
        );
    }
    let r = &report.ratios;
    if r.coordinated_vs_sequential.is_some() || r.coordinated_vs_parallel.is_some() {
        println!(
            "ratios: coordinated/sequential SVC-T2 {:.2}, coordinated/parallel {:.2}",
            r.coordinated_vs_sequential.unwrap_or(f64::NAN),
            r.coordinated_vs_parallel.unwrap_or(f64::NAN)
        );
    }
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

/// The sweep's two panels (total time, downtime) as an SVG file.
fn write_sweep_plot(report: &SweepReport, svg: &Path) -> anyhow::Result<()> {
    let points = &report.points;
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
    std::fs::write(svg, chart)?;
    println!("wrote {}", svg.display());
    Ok(())
}
