//! `dczone storage ...`: the zone's Ceph clusters, through the hosts' agents
//! (`dczone_storage::operator`).

use std::process::ExitCode;

use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};

use dczone_control::LabAgents;
use dczone_storage::operator;
use dczone_zone::Zone;

use crate::print_json;
use crate::table::render;

#[derive(Debug, Subcommand)]
pub enum StorageCommand {
    /// Create (or start again) every storage cluster of the zone: region 1 stretched over
    /// DC1.1 and DC1.2 with a tiebreaker monitor at the witness, DC2.1 a cluster of its own.
    Up {
        #[arg(long)]
        json: bool,
    },
    /// Each cluster's health, monitors, OSDs and placement groups.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Stop every storage daemon and remove the clusters' files (their data too: VM
    /// disks and the backup store). Refused while a VM has a disk, unless --force.
    Down {
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// Stop one daemon (e.g. `osd.2`) of a cluster: a fault for tests and benchmarks.
    Stop {
        daemon: String,
        #[arg(long)]
        cluster: String,
    },
}

fn gib(b: u64) -> String {
    format!("{:.1}", b as f64 / (1u64 << 30) as f64)
}

pub fn run(agents: &LabAgents, zone: &Zone, command: StorageCommand) -> anyhow::Result<ExitCode> {
    match command {
        StorageCommand::Up { json } => {
            let bar = ProgressBar::new_spinner();
            bar.set_style(ProgressStyle::with_template("{spinner} {elapsed} {msg}")?);
            bar.enable_steady_tick(std::time::Duration::from_millis(200));
            let say = |m: &str| {
                if bar.is_hidden() {
                    eprintln!("{m}");
                } else {
                    bar.println(m);
                }
            };
            let reports = operator::up(agents, zone, &say);
            bar.finish_and_clear();
            let reports = reports?;
            if json {
                print_json(&reports);
            } else {
                let rows: Vec<Vec<String>> = reports
                    .iter()
                    .map(|r| {
                        vec![
                            r.cluster.clone(),
                            if r.created { "created" } else { "started" }.into(),
                            r.status.health.clone(),
                            format!("{}/{}", r.status.quorum.len(), r.status.mons),
                            format!("{}/{}", r.status.osds_up, r.status.osds),
                            if r.status.stretch_mode { "yes" } else { "no" }.into(),
                            format!("{:.1}", r.ms / 1e3),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    render(
                        &["cluster", "", "health", "quorum", "osds up", "stretch", "s"],
                        &rows
                    )
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        StorageCommand::Status { json } => {
            let lines = operator::status(agents, zone);
            if json {
                print_json(&lines);
            } else {
                let rows: Vec<Vec<String>> = lines
                    .iter()
                    .map(|l| match &l.status {
                        Some(s) => vec![
                            l.cluster.clone(),
                            l.sites.join(","),
                            s.health.clone(),
                            format!("{}/{}", s.quorum.len(), s.mons),
                            format!("{}/{}", s.osds_up, s.osds),
                            s.pg_states
                                .iter()
                                .map(|(st, n)| format!("{n} {st}"))
                                .collect::<Vec<_>>()
                                .join(", "),
                            if s.stretch_mode { "yes" } else { "no" }.into(),
                            format!("{}/{}", gib(s.bytes_used), gib(s.bytes_total)),
                        ],
                        None => vec![
                            l.cluster.clone(),
                            l.sites.join(","),
                            format!("unreachable: {}", l.error.clone().unwrap_or_default()),
                        ],
                    })
                    .collect();
                print!(
                    "{}",
                    render(
                        &[
                            "cluster",
                            "sites",
                            "health",
                            "quorum",
                            "osds up",
                            "pgs",
                            "stretch",
                            "used/total GiB"
                        ],
                        &rows
                    )
                );
                for l in &lines {
                    for c in l.status.iter().flat_map(|s| &s.checks) {
                        println!("{}: {c}", l.cluster);
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        StorageCommand::Down { force, json } => {
            if !force {
                let with_disks: Vec<String> = dczone_control::ZoneAgents::list(agents)?
                    .into_iter()
                    .filter(|v| v.spec.disk.is_some())
                    .map(|v| v.spec.name)
                    .collect();
                if !with_disks.is_empty() {
                    anyhow::bail!(
                        "VMs {} have disks in the clusters: destroy them first, or --force \
                         (their disks and the backups go with the clusters)",
                        with_disks.join(", ")
                    );
                }
            }
            let lines = operator::down(agents, zone);
            let failed = lines.iter().any(|l| l.error.is_some());
            if json {
                print_json(&lines);
            } else {
                let rows: Vec<Vec<String>> = lines
                    .iter()
                    .map(|l| {
                        vec![
                            l.cluster.clone(),
                            l.host.clone(),
                            match &l.error {
                                None => l.stopped.join(" "),
                                Some(e) => format!("FAILED: {e}"),
                            },
                        ]
                    })
                    .collect();
                print!("{}", render(&["cluster", "host", "stopped"], &rows));
            }
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        StorageCommand::Stop { daemon, cluster } => {
            let host = operator::stop_daemon(agents, zone, &cluster, &daemon)?;
            println!("stopped {daemon} of {cluster} on {host}");
            Ok(ExitCode::SUCCESS)
        }
    }
}
