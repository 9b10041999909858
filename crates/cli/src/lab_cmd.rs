//! `dczone lab ...` and `dczone zone ...`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use dczone_lab::probe::ProbeOptions;
use dczone_lab::{Lab, LinkChange};
use dczone_zone::{format_bandwidth, Zone, DEFAULT_ZONE_TOML};

use crate::print_json;
use crate::table::{render, yes_no};

#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// Create the namespaces, site bridges and APN emulator of a zone (idempotent).
    Up {
        /// Zone file; the built-in reference zone without it.
        #[arg(long)]
        zone: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Remove every namespace, link, TAP and process of the lab (idempotent).
    Down {
        #[arg(long)]
        json: bool,
    },
    /// Hosts, links and emulator health.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Run a command inside a host's namespace; exits with its exit code.
    Exec {
        host: String,
        #[arg(trailing_var_arg = true, required = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Change a link at runtime.
    Link {
        #[command(subcommand)]
        command: LinkCommand,
    },
    /// Put every link on the APN (the default) or on a conventional WAN over the same
    /// fibre: jitter, loss and one pipe shared with bulk transfers (see ARCHITECTURE.md).
    Wan { wan: dczone_zone::Wan },
    /// Cut a site off from all others (a disaster), or bring it back.
    Site {
        #[command(subcommand)]
        command: SiteCommand,
    },
    /// Measure the host stack's latency per site pair and compensate it in the emulator.
    Calibrate {
        #[arg(long)]
        json: bool,
    },
    /// Measure RTT and single-flow TCP throughput between every pair of sites.
    Probe {
        #[arg(long)]
        json: bool,
        /// Echo probes per pair.
        #[arg(long, default_value_t = 200)]
        pings: usize,
        /// Seconds of TCP flow per pair (after a 0.3 s warm-up).
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
    },
}

#[derive(Debug, Subcommand)]
pub enum LinkCommand {
    /// Blackhole the link: packets vanish, the link stays up.
    Cut { a: String, b: String },
    /// Undo a cut.
    Restore { a: String, b: String },
    /// Change delay, bandwidth, loss or jitter without restarting the emulator.
    Set {
        a: String,
        b: String,
        /// One-way delay in ms.
        #[arg(long)]
        delay: Option<f64>,
        /// Real-world bandwidth, e.g. 10Gbit (the lab enforces bandwidth / lab_scale).
        #[arg(long)]
        bandwidth: Option<String>,
        /// Loss in percent.
        #[arg(long)]
        loss: Option<f64>,
        /// Jitter in ms.
        #[arg(long)]
        jitter: Option<f64>,
        /// apn (fixed delay, bulk transfers on paths of their own) or conventional (a
        /// carrier WAN: give --jitter and --loss too, or use `lab wan conventional`).
        #[arg(long)]
        wan: Option<dczone_zone::Wan>,
    },
}

#[derive(Debug, Subcommand)]
pub enum SiteCommand {
    Isolate { site: String },
    Restore { site: String },
}

#[derive(Debug, Subcommand)]
pub enum ZoneCommand {
    /// Validate a zone file.
    Check { file: PathBuf },
    /// Print the built-in reference zone file.
    Show,
}

pub fn zone(cmd: ZoneCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ZoneCommand::Check { file } => {
            let z = Zone::load(&file)?;
            println!(
                "{}: zone '{}' is valid: {} sites, {} hosts, {} links",
                file.display(),
                z.name,
                z.sites.len(),
                z.hosts().len(),
                z.links.len()
            );
        }
        ZoneCommand::Show => print!("{DEFAULT_ZONE_TOML}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// Reads the zone for `lab up`: a file, or the built-in reference.
pub fn load_zone(file: Option<&Path>) -> anyhow::Result<(Zone, String, String)> {
    Ok(match file {
        Some(path) => {
            let zone = Zone::load(path)?;
            let text = std::fs::read_to_string(path)?;
            (zone, path.display().to_string(), text)
        }
        None => (
            Zone::reference(),
            "<built-in reference zone>".to_string(),
            DEFAULT_ZONE_TOML.to_string(),
        ),
    })
}

pub fn run(lab: &Lab, exe: &Path, state_dir: &Path, cmd: LabCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        LabCommand::Up { zone, json } => {
            let (z, source, text) = load_zone(zone.as_deref())?;
            let spinner = spinner(json, "building the lab");
            let built = lab.up(&z, &source, &text)?;
            // The lab only makes hosts; from here on, everything goes through their agents.
            spinner.set_message("starting the host agents");
            let access = dczone_control::HostAgents::new(lab, exe, state_dir)?.start_all()?;
            // The database platform's consensus store, if the zone has one and etcd is
            // installed (`db up` insists on it), started by its hosts' agents.
            if z.database.is_some() && dczone_lab::etcd::installed() {
                spinner.set_message("starting etcd");
                dczone_database::Database::open(lab)?.etcd_up()?;
            }
            spinner.finish_and_clear();
            let status = lab.status()?;
            if json {
                print_json(&json!({"built": built, "status": status, "access": access}));
            } else {
                println!(
                    "lab '{}' {} (zone '{}', {} hosts, {} sites); operator access: {}",
                    lab.name(),
                    if built { "is up" } else { "was already up" },
                    status.zone,
                    status.hosts.len(),
                    status.sites.len(),
                    access.display()
                );
            }
        }
        LabCommand::Down { json } => {
            let removed = lab.down()?;
            if json {
                print_json(&json!({"lab": lab.name(), "namespaces_removed": removed}));
            } else {
                println!(
                    "lab '{}' is down ({removed} namespaces removed)",
                    lab.name()
                );
            }
        }
        LabCommand::Status { json } => {
            let s = lab.status()?;
            if json {
                print_json(&s);
            } else {
                println!(
                    "lab '{}': {}; zone '{}' from {}; lab_scale {}",
                    s.lab,
                    if s.up { "up" } else { "NOT healthy" },
                    s.zone,
                    s.zone_source,
                    s.lab_scale
                );
                println!(
                    "APN emulator: pid {} {} in namespace {}{}\n",
                    s.emulator.pid.map_or("-".into(), |p| p.to_string()),
                    if s.emulator.alive { "alive" } else { "DEAD" },
                    s.emulator.namespace,
                    s.emulator.rss_bytes.map_or(String::new(), |r| format!(
                        ", RSS {:.1} MiB",
                        r as f64 / 1048576.0
                    ))
                );
                let rows: Vec<_> = s
                    .hosts
                    .iter()
                    .map(|h| {
                        vec![
                            h.id.clone(),
                            h.site.clone(),
                            h.namespace.clone(),
                            h.ip.clone(),
                            h.mac.clone(),
                            if h.present { "yes" } else { "MISSING" }.into(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    render(
                        &["HOST", "SITE", "NAMESPACE", "IP", "MAC", "PRESENT"],
                        &rows
                    )
                );
                println!();
                let rows: Vec<_> = s
                    .links
                    .iter()
                    .map(|l| {
                        vec![
                            format!("{}-{}", l.a, l.b),
                            l.distance_km.map_or("-".into(), |d| format!("{d}")),
                            format!("{:.3}", l.one_way_delay_ms),
                            l.bandwidth.clone(),
                            format_bandwidth(l.lab_bandwidth_bps),
                            format!("{}", l.jitter_ms),
                            format!("{}", l.loss_percent),
                            if l.deterministic { "APN" } else { "WAN" }.into(),
                            if l.cut { "CUT" } else { "up" }.into(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    render(
                        &[
                            "LINK",
                            "KM",
                            "DELAY_MS",
                            "BANDWIDTH",
                            "LAB_BW",
                            "JITTER_MS",
                            "LOSS_%",
                            "KIND",
                            "STATE"
                        ],
                        &rows
                    )
                );
                let isolated: Vec<_> = s
                    .sites
                    .iter()
                    .filter(|x| x.isolated)
                    .map(|x| x.id.as_str())
                    .collect();
                if !isolated.is_empty() {
                    println!("isolated sites: {}", isolated.join(", "));
                }
            }
            if !s.up {
                return Ok(ExitCode::FAILURE);
            }
        }
        LabCommand::Exec { host, command } => {
            let code = lab.exec(&host, &command)?;
            return Ok(ExitCode::from(code.clamp(0, 255) as u8));
        }
        LabCommand::Link { command } => match command {
            LinkCommand::Cut { a, b } => {
                lab.link_cut(&a, &b, true)?;
                println!("link {a}-{b} cut");
            }
            LinkCommand::Restore { a, b } => {
                lab.link_cut(&a, &b, false)?;
                println!("link {a}-{b} restored");
            }
            LinkCommand::Set {
                a,
                b,
                delay,
                bandwidth,
                loss,
                jitter,
                wan,
            } => {
                if delay.is_none()
                    && bandwidth.is_none()
                    && loss.is_none()
                    && jitter.is_none()
                    && wan.is_none()
                {
                    anyhow::bail!(
                        "nothing to set: give --delay, --bandwidth, --loss, --jitter or --wan"
                    );
                }
                lab.link_set(
                    &a,
                    &b,
                    &LinkChange {
                        one_way_delay_ms: delay,
                        bandwidth,
                        loss_percent: loss,
                        jitter_ms: jitter,
                        deterministic: wan.map(|w| w == dczone_zone::Wan::Apn),
                    },
                )?;
                println!("link {a}-{b} updated");
            }
        },
        LabCommand::Wan { wan } => {
            lab.set_wan(wan)?;
            let w = wan.link();
            println!(
                "every link on the {wan} profile: jitter +/-{} ms, loss {} %, bulk transfers {}",
                w.jitter_ms,
                w.loss_percent,
                if w.deterministic {
                    "on paths of their own"
                } else {
                    "sharing the pipe"
                }
            );
        }
        LabCommand::Site { command } => match command {
            SiteCommand::Isolate { site } => {
                lab.site_isolate(&site, true)?;
                println!("site {site} isolated from every other site");
            }
            SiteCommand::Restore { site } => {
                lab.site_isolate(&site, false)?;
                println!("site {site} restored");
            }
        },
        LabCommand::Calibrate { json } => {
            let pairs = lab.calibrate(&|_, _, _| {})?;
            if json {
                print_json(&pairs);
            } else {
                let rows: Vec<_> = pairs
                    .iter()
                    .map(|p| {
                        vec![
                            format!("{}<->{}", p.a, p.b),
                            format!("{:.3}", p.configured_rtt_ms),
                            format!("{:.3}", p.raw_median_rtt_ms),
                            format!("{:.1}", p.compensation_us),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    render(
                        &["PAIR", "RTT_CFG_MS", "RAW_RTT_P50_MS", "COMP_US_EACH_WAY"],
                        &rows
                    )
                );
            }
        }
        LabCommand::Probe {
            json,
            pings,
            seconds,
        } => {
            if !(seconds.is_finite() && seconds > 0.0 && seconds < 600.0) || pings == 0 {
                anyhow::bail!("--seconds must be in (0, 600) and --pings at least 1");
            }
            let opts = ProbeOptions {
                pings,
                throughput: Duration::from_secs_f64(seconds),
                ..ProbeOptions::default()
            };
            let bar = if json {
                ProgressBar::hidden()
            } else {
                ProgressBar::new(0)
            };
            bar.set_style(
                ProgressStyle::with_template("probing {pos}/{len} pairs {msg}")
                    .expect("valid template"),
            );
            let report = lab.probe(&opts, &|done, total, msg| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
                bar.set_message(msg.to_string());
            })?;
            bar.finish_and_clear();
            if json {
                print_json(&report);
            } else {
                print_probe(&report);
            }
            if !report.all_ok {
                return Ok(ExitCode::from(3));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn spinner(hidden: bool, msg: &str) -> ProgressBar {
    if hidden {
        return ProgressBar::hidden();
    }
    let s = ProgressBar::new_spinner();
    s.set_message(msg.to_string());
    s.enable_steady_tick(Duration::from_millis(100));
    s
}

pub fn print_probe(report: &dczone_lab::probe::ProbeReport) {
    let f = |v: Option<f64>, prec: usize| v.map_or("-".to_string(), |x| format!("{x:.prec$}"));
    let rows: Vec<_> = report
        .pairs
        .iter()
        .map(|p| {
            vec![
                format!("{}<->{}", p.a, p.b),
                format!("{:.3}", p.configured_rtt_ms),
                f(p.rtt.as_ref().map(|r| r.median_ms), 3),
                f(p.rtt.as_ref().map(|r| r.p99_ms), 3),
                yes_no(p.rtt_median_ok && p.rtt_p99_ok),
                format!("{:.1}", p.configured_lab_mbit),
                f(p.throughput.as_ref().map(|t| t.mbit), 1),
                f(p.throughput_fraction.map(|x| x * 100.0), 1),
                yes_no(p.throughput_ok),
                p.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print!(
        "{}",
        render(
            &[
                "PAIR",
                "RTT_CFG_MS",
                "RTT_P50_MS",
                "RTT_P99_MS",
                "RTT",
                "LAB_MBIT",
                "TCP_MBIT",
                "TCP_%",
                "TCP",
                "NOTE"
            ],
            &rows
        )
    );
    println!(
        "verdict: {}",
        if report.all_ok {
            "every pair within the fidelity targets"
        } else {
            "some pairs MISS the fidelity targets"
        }
    );
}
