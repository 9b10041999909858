//! `dczone backup ...`: snapshot backups of VM disks to another site's storage, and
//! recovery from them (`dczone_control::backup`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};

use dczone_control::{backup, ZoneAgents};
use dczone_zone::Zone;

use crate::print_json;
use crate::table::render;

#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Back up a VM's disk to a site's store: checkpoint, snapshot, then the diff since
    /// the previous backup (or everything) in checked chunks. With --group, every VM of
    /// the group at once.
    Create {
        #[arg(required_unless_present = "group", conflicts_with = "group")]
        vm: Option<String>,
        /// Back up every VM of this group (`vm create --group`) at once.
        #[arg(long)]
        group: Option<String>,
        /// The site whose storage keeps the backup (DC2.1: the other region).
        #[arg(long, default_value = "dc2.1")]
        to: String,
        /// Chunks in flight at once.
        #[arg(long, default_value_t = 4)]
        streams: usize,
        #[arg(long)]
        json: bool,
    },
    /// Back up a VM every interval (1h, 1d, 30m, 10s), on a clock sped up by --speedup.
    Schedule {
        vm: String,
        #[arg(long)]
        every: String,
        #[arg(long, default_value = "dc2.1")]
        to: String,
        /// Run the schedule this many times faster than real time (a compressed clock
        /// for tests and benchmarks: 3600 makes 1h a second).
        #[arg(long, default_value_t = 1.0)]
        speedup: f64,
        /// Stop after this many backups (default: run until interrupted).
        #[arg(long)]
        count: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// The backups in a site's store.
    List {
        #[arg(long, default_value = "dc2.1")]
        at: String,
        #[arg(long)]
        json: bool,
    },
    /// Check every chunk of a backup against its manifest.
    Verify {
        id: String,
        #[arg(long, default_value = "dc2.1")]
        at: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove a backup (and the chunks of a cut transfer of that id).
    Delete {
        id: String,
        #[arg(long, default_value = "dc2.1")]
        at: String,
    },
    /// Start a VM at a site from its latest backup (or --snapshot), measuring Trecovery
    /// until its service listens; then replay the clients' logged transfers (--replay).
    Restore {
        vm: String,
        #[arg(long, default_value = "dc2.1")]
        at: String,
        /// A backup id (default: the VM's latest).
        #[arg(long)]
        snapshot: Option<String>,
        /// The restored VM's name (default: the VM's).
        #[arg(long = "as")]
        name: Option<String>,
        /// The host to run it on (default: the site's first storage host).
        #[arg(long)]
        host: Option<String>,
        /// A file of the clients' acknowledged transfers (ledger `T` lines) to send again:
        /// transfers are idempotent, so those the backup holds answer DUP.
        #[arg(long)]
        replay: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

/// "1h", "1d", "30m", "10s" as a duration.
fn parse_every(text: &str) -> anyhow::Result<Duration> {
    let t = text.trim();
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = num
        .parse()
        .with_context(|| format!("'{text}' is not an interval such as 1h, 1d, 30m"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        u => anyhow::bail!("unknown unit '{u}' in '{text}': use s, m, h or d"),
    };
    anyhow::ensure!(secs > 0, "the interval must be positive");
    Ok(Duration::from_secs(secs))
}

fn report_row(r: &backup::BackupReport) -> Vec<String> {
    vec![
        r.id.clone(),
        if r.full { "full" } else { "incremental" }.into(),
        r.checkpoint.map_or("-".into(), |c| c.to_string()),
        format!("{:.0}", r.t1_ms),
        format!("{:.0}", r.t2_ms),
        format!("{:.1}", r.bytes as f64 / 1e6),
        format!("{:.0}", r.mbit_s),
        format!("{:.0}", r.most_delayed_arrival_ms),
        format!("{:.0}", r.mean_arrival_ms),
    ]
}

const REPORT_HEADER: [&str; 9] = [
    "backup",
    "kind",
    "checkpoint",
    "t1_ms",
    "t2_ms",
    "MB",
    "mbit_s",
    "most_delayed_ms",
    "mean_arrival_ms",
];

/// A spinner with the time so far, for a backup under way.
fn spinner(msg: String) -> anyhow::Result<ProgressBar> {
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("{spinner} {elapsed} {msg}")?);
    bar.set_message(msg);
    bar.enable_steady_tick(Duration::from_millis(200));
    Ok(bar)
}

pub fn run(
    agents: &(dyn ZoneAgents + Sync),
    zone: &Zone,
    command: BackupCommand,
) -> anyhow::Result<ExitCode> {
    match command {
        BackupCommand::Create {
            vm: None,
            group: Some(group),
            to,
            streams,
            json,
        } => {
            let bar = spinner(format!("backing up group {group} to {to}"))?;
            let r = backup::create_group(agents, zone, &group, &to, streams);
            bar.finish_and_clear();
            let r = r?;
            if json {
                print_json(&r);
            } else {
                let mut rows: Vec<Vec<String>> = r.vms.iter().map(report_row).collect();
                rows.push(vec![
                    format!("group {}", r.group),
                    if r.vms.iter().all(|v| v.full) {
                        "full"
                    } else if r.vms.iter().all(|v| !v.full) {
                        "incremental"
                    } else {
                        "mixed"
                    }
                    .into(),
                    "-".into(),
                    format!("{:.0}", r.t1_ms),
                    format!("{:.0}", r.t2_ms),
                    format!("{:.1}", r.bytes as f64 / 1e6),
                    format!("{:.0}", r.mbit_s),
                    format!("{:.0}", r.most_delayed_arrival_ms),
                    format!("{:.0}", r.mean_arrival_ms),
                ]);
                print!("{}", render(&REPORT_HEADER, &rows));
            }
        }
        BackupCommand::Create {
            vm,
            group: _,
            to,
            streams,
            json,
        } => {
            let vm = vm.ok_or_else(|| anyhow::anyhow!("name a VM, or a group with --group"))?;
            let bar = spinner(format!("backing up {vm} to {to}"))?;
            let r = backup::create(agents, zone, &vm, &to, streams);
            bar.finish_and_clear();
            let r = r?;
            if json {
                print_json(&r);
            } else {
                print!("{}", render(&REPORT_HEADER, &[report_row(&r)]));
            }
        }
        BackupCommand::Schedule {
            vm,
            every,
            to,
            speedup,
            count,
            json,
        } => {
            anyhow::ensure!(speedup > 0.0, "--speedup must be positive");
            let interval = parse_every(&every)?.div_f64(speedup);
            if !json {
                println!(
                    "backing up {vm} to {to} every {every} ({:.1} s on this clock)",
                    interval.as_secs_f64()
                );
                print!("{}", render(&REPORT_HEADER, &[]));
            }
            let mut n = 0;
            loop {
                let started = std::time::Instant::now();
                let r = backup::create(agents, zone, &vm, &to, 4)?;
                if json {
                    println!("{}", serde_json::to_string(&r)?);
                } else {
                    print!(
                        "{}",
                        render(&REPORT_HEADER, &[report_row(&r)])
                            .lines()
                            .nth(1)
                            .map(|l| format!("{l}\n"))
                            .unwrap_or_default()
                    );
                }
                n += 1;
                if count.is_some_and(|c| n >= c) {
                    break;
                }
                if let Some(rest) = interval.checked_sub(started.elapsed()) {
                    std::thread::sleep(rest);
                }
            }
        }
        BackupCommand::List { at, json } => {
            let list = backup::list(agents, zone, &at)?;
            if json {
                print_json(&list);
            } else {
                let rows: Vec<Vec<String>> = list
                    .iter()
                    .map(|m| {
                        vec![
                            m.id.clone(),
                            m.vm.clone(),
                            m.parent.clone().unwrap_or_else(|| "(full)".into()),
                            m.checkpoint.map_or("-".into(), |c| c.to_string()),
                            m.chunks.len().to_string(),
                            format!("{:.1}", m.bytes as f64 / 1e6),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    render(
                        &["backup", "vm", "parent", "checkpoint", "chunks", "MB"],
                        &rows
                    )
                );
            }
        }
        BackupCommand::Verify { id, at, json } => {
            let bytes = backup::verify(agents, zone, &at, &id)?;
            if json {
                print_json(&serde_json::json!({ "id": id, "ok": true, "bytes": bytes }));
            } else {
                println!("backup {id}: every chunk matches its manifest ({bytes} bytes)");
            }
        }
        BackupCommand::Delete { id, at } => {
            let n = backup::delete(agents, zone, &at, &id)?;
            println!("backup {id}: {n} objects removed");
        }
        BackupCommand::Restore {
            vm,
            at,
            snapshot,
            name,
            host,
            replay,
            json,
        } => {
            let lines = match &replay {
                Some(f) => std::fs::read_to_string(f)
                    .with_context(|| format!("read the replay log {}", f.display()))?
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_string)
                    .collect(),
                None => Vec::new(),
            };
            if let Some(bad) = lines.iter().find(|l| !l.starts_with("T ")) {
                anyhow::bail!(
                    "the replay log holds ledger transfers (`T id from to amount`), not {bad:?}"
                );
            }
            let name = name.unwrap_or_else(|| vm.clone());
            let r = backup::restore(
                agents,
                zone,
                &vm,
                &at,
                snapshot.as_deref(),
                &name,
                host.as_deref(),
                &lines,
            )?;
            if json {
                print_json(&r);
            } else {
                print!(
                    "{}",
                    render(
                        &[
                            "vm",
                            "at",
                            "chain",
                            "trecovery_ms",
                            "volume_ms",
                            "boot_ms",
                            "replayed",
                            "present"
                        ],
                        &[vec![
                            name.clone(),
                            r.host.clone(),
                            r.chain.join(" "),
                            format!("{:.0}", r.trecovery_ms),
                            format!("{:.0}", r.volume_ms),
                            format!("{:.0}", r.boot_ms),
                            r.replayed.to_string(),
                            r.present.to_string(),
                        ]]
                    )
                );
            }
            if r.refused > 0 {
                eprintln!(
                    "error: the restored VM refused {} logged transfers",
                    r.refused
                );
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
