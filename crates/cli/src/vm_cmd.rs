//! `dczone vm ...` and `dczone migrate ...`.

use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use dczone_lab::Lab;
use dczone_virt::migrate::{GroupMigration, Params, Progress, Strategy, VmMigration};
use dczone_virt::switchover::SwitchReason;

use dczone_agent::access::Access;
use dczone_control::{lab_agents, vms, HostAgents, LabAgents, ZoneAgents};

use crate::print_json;
use crate::table::render;

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Create and boot a VM on a lab host (builds the guest image first if needed).
    Create {
        name: String,
        #[arg(long)]
        host: String,
        #[arg(long, default_value_t = 256)]
        memory: u32,
        /// MB of guest memory the workload dirties per second.
        #[arg(long, default_value_t = 1)]
        dirty_mbps: u32,
        /// Size of the area it rewrites, MiB.
        #[arg(long, default_value_t = 32)]
        dirty_mib: u32,
        /// Percent of the memory the guest fills with incompressible data at boot (its
        /// working set, where the dirty area lies), as a real VM's memory is full.
        #[arg(long, default_value_t = dczone_virt::DEFAULT_RESIDENT_PCT)]
        resident_pct: u8,
        /// Cluster (service) the VM belongs to.
        #[arg(long)]
        group: Option<String>,
        /// Give it a disk of this size (e.g. 1536MiB, 2GiB; alone: 1.5 GiB, a 100 GB
        /// reference disk at the lab's scale) in the storage cluster of the host's site,
        /// attached with virtio-blk. Its ledger journals every acknowledged transfer there.
        #[arg(long, num_args = 0..=1, default_missing_value = "1536MiB", value_parser = parse_mib)]
        disk: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    Start {
        name: String,
    },
    Stop {
        name: String,
    },
    Destroy {
        name: String,
    },
    List {
        #[arg(long)]
        json: bool,
    },
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

/// `dczone migrate VM --to HOST` or `dczone migrate --group G --to SITE --strategy S`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The VM to move (or use --group).
    pub vm: Option<String>,
    /// Move every VM of this group.
    #[arg(long, conflicts_with = "vm")]
    pub group: Option<String>,
    /// Destination host (one VM) or site (a group).
    #[arg(long)]
    pub to: String,
    #[arg(long, value_enum, default_value = "coordinated")]
    pub strategy: StrategyArg,
    /// Target downtime-limit, ms.
    #[arg(long, default_value_t = 100)]
    pub downtime_ms: u64,
    /// Drop the frames that reach the source during the switchover, as QEMU alone does,
    /// instead of replaying them to the destination after its announce.
    #[arg(long)]
    pub no_frame_replay: bool,
    /// Send the stream between sites in the clear (by default it is TLS with the hosts'
    /// certificates).
    #[arg(long)]
    pub no_tls: bool,
    /// A group (coordinated, postcopy): switch every VM this many seconds after the start
    /// at the latest, even one still sending its RAM for the first time. Pre-copy then
    /// sends the rest with the VM stopped: a long downtime rather than no move.
    #[arg(long, default_value_t = 120)]
    pub max_hold_s: u64,
    /// A group (coordinated): once every VM has sent its RAM once, stop them all this many
    /// seconds later at the latest, even if a dirty set is still above the drain target.
    #[arg(long, default_value_t = 30)]
    pub max_drain_s: u64,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum StrategyArg {
    Sequential,
    Parallel,
    Coordinated,
    /// Coordinated pre-copy, then every VM switched to post-copy at the same instant.
    Postcopy,
}

impl From<StrategyArg> for Strategy {
    fn from(s: StrategyArg) -> Strategy {
        match s {
            StrategyArg::Sequential => Strategy::Sequential,
            StrategyArg::Parallel => Strategy::Parallel,
            StrategyArg::Coordinated => Strategy::Coordinated,
            StrategyArg::Postcopy => Strategy::Postcopy,
        }
    }
}

/// A size in MiB from `1536MiB`, `1536M`, `1.5GiB`, `2G` (binary units).
fn parse_mib(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("'{text}' is not a size such as 1536MiB or 1.5GiB"))?;
    let mib = match unit.trim().to_ascii_lowercase().as_str() {
        "m" | "mib" | "mb" => n,
        "g" | "gib" | "gb" => n * 1024.0,
        "t" | "tib" | "tb" => n * 1024.0 * 1024.0,
        u => {
            return Err(format!(
                "unknown unit '{u}' in '{text}': use MiB, GiB or TiB"
            ))
        }
    };
    if mib < 1.0 || mib.fract() != 0.0 {
        return Err(format!("'{text}' is not a whole number of MiB"));
    }
    Ok(mib as u64)
}

/// A VM command through the host agent of the VM's host: `create` names it, the zone's
/// agents say where a VM is.
pub fn run(agents: &dyn ZoneAgents, cmd: VmCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        VmCommand::Create {
            name,
            host,
            memory,
            dirty_mbps,
            dirty_mib,
            resident_pct,
            group,
            disk,
            json,
        } => {
            let vm = vms::create(
                agents,
                &dczone_virt::CreateVm {
                    name,
                    host,
                    memory_mib: memory,
                    dirty_mbps,
                    dirty_mib,
                    resident_pct,
                    group,
                    disk_mib: disk,
                    disk_image: None,
                },
            )?;
            if json {
                print_json(&vm);
            } else {
                println!(
                    "VM {} runs on {} ({}, {} MiB, {}) under {}",
                    vm.spec.name,
                    vm.host,
                    vm.spec.ip_cidr,
                    vm.spec.memory_mib,
                    vm.spec.mac,
                    vm.accel.as_str()
                );
            }
        }
        VmCommand::Start { name } => {
            let vm = vms::start(agents, &name)?;
            println!("VM {} runs on {}", vm.spec.name, vm.host);
        }
        VmCommand::Stop { name } => {
            vms::stop(agents, &name)?;
            println!("VM {name} stopped");
        }
        VmCommand::Destroy { name } => {
            vms::destroy(agents, &name)?;
            println!("VM {name} destroyed");
        }
        VmCommand::List { json } => {
            let vms = agents.list()?;
            if json {
                print_json(&vms);
            } else {
                let rows: Vec<_> = vms
                    .iter()
                    .map(|v| {
                        vec![
                            v.spec.name.clone(),
                            v.host.clone(),
                            v.group.clone().unwrap_or_default(),
                            v.spec.ip_cidr.clone(),
                            v.spec.memory_mib.to_string(),
                            v.spec.resident_mib().to_string(),
                            v.spec.dirty_mbps.to_string(),
                            v.accel.as_str().into(),
                            if v.running.is_some() {
                                "running"
                            } else {
                                "stopped"
                            }
                            .into(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    render(
                        &[
                            "VM",
                            "HOST",
                            "GROUP",
                            "IP",
                            "MEM_MIB",
                            "RESIDENT_MIB",
                            "DIRTY_MBPS",
                            "ACCEL",
                            "STATE"
                        ],
                        &rows
                    )
                );
            }
        }
        VmCommand::Show { name, json } => {
            let (host, vm) = vms::show(agents, &name)?;
            if json {
                print_json(&vm);
            } else {
                println!("{}", serde_json::to_string_pretty(&vm)?);
                if vm.running.is_some() {
                    println!("--- serial log (last lines) ---");
                    for l in vms::serial(agents, &host, &name, 10)? {
                        println!("{l}");
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A progress display: one bar per VM with bytes, rounds and expected downtime.
pub fn progress_display(hidden: bool) -> (MultiProgress, impl Fn(&[Progress])) {
    let multi = MultiProgress::new();
    if hidden {
        multi.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let bars: std::sync::Mutex<Vec<ProgressBar>> = std::sync::Mutex::new(Vec::new());
    let m = multi.clone();
    let update = move |ps: &[Progress]| {
        let mut bars = bars.lock().unwrap_or_else(|e| e.into_inner());
        while bars.len() < ps.len() {
            let b = m.add(ProgressBar::new_spinner());
            b.set_style(ProgressStyle::with_template("{spinner} {msg}").expect("valid template"));
            bars.push(b);
        }
        for (b, p) in bars.iter().zip(ps) {
            b.set_message(format!(
                "{:<8} {:<14} sent {:>7.1} MiB  left {:>6.1} MiB  rounds {:>3}  expected downtime {:>4} ms{}",
                p.vm,
                p.status,
                p.transferred as f64 / 1048576.0,
                p.remaining as f64 / 1048576.0,
                p.rounds,
                p.expected_downtime_ms,
                if p.held { "  (held)" } else { "" }
            ));
            b.tick();
        }
    };
    (multi, update)
}

pub fn print_group(g: &GroupMigration) {
    let rows: Vec<_> = g
        .vms
        .iter()
        .map(|m| {
            vec![
                m.vm.clone(),
                format!("{}->{}", m.from, m.to),
                format!("{:.1}", m.t1_ms),
                format!("{:.1}", m.t2_ms),
                match (m.t2_send_ms, m.t2_load_resume_ms) {
                    (Some(s), Some(l)) => format!("{s:.0}/{l:.0}"),
                    _ => "-".into(),
                },
                m.qemu_downtime_ms.to_string(),
                m.qemu_total_ms.to_string(),
                format!("{:.1}", m.bytes_sent as f64 / 1048576.0),
                m.iterations.to_string(),
                format!("{:.0}", m.held_ms),
                match &m.keeper {
                    Some(k) => format!(
                        "{}{}",
                        k.frames_replayed,
                        match k.announce_after_stop_ms {
                            Some(a) => format!(" @{a:.0}"),
                            None if k.announce_timed_out => " (no announce)".into(),
                            None => String::new(),
                        }
                    ),
                    None => "off".into(),
                },
                if m.tls { "tls" } else { "clear" }.into(),
            ]
        })
        .collect();
    print!(
        "{}",
        render(
            &[
                "VM",
                "MOVE",
                "T1_MS",
                "T2_MS",
                "T2 SEND/LOAD+RESUME_MS",
                "QEMU_DOWNTIME_MS",
                "QEMU_TOTAL_MS",
                "SENT_MIB",
                "ROUNDS",
                "HELD_MS",
                "REPLAYED @ANNOUNCE_MS",
                "STREAM"
            ],
            &rows
        )
    );
    let switched = match g.switch_reason {
        Some(SwitchReason::AllReady) => "; switched with every VM ready",
        Some(SwitchReason::HoldExpired) => "; switched when the hold expired",
        Some(SwitchReason::DrainExpired) => "; stopped when the drain expired",
        Some(SwitchReason::OneStopped) => "; switched when one VM stopped by itself",
        None => "",
    };
    println!(
        "strategy {}: SVC-T2 {:.1} ms (union of T2s {:.1} ms), SVC-T1 {:.1} ms{switched}",
        g.strategy.name(),
        g.svc_t2_ms,
        g.svc_t2_union_ms,
        g.svc_t1_ms
    );
    for m in &g.vms {
        if let Some(d) = &m.disk {
            println!(
                "{}: disk taken along from {} to {} as {}: {:.1} MiB mirrored, in sync after \
                 {:.0} ms (part of T1), completed in {:.0} ms (part of T2); {}",
                m.vm,
                d.from_cluster,
                d.to_cluster,
                d.image,
                d.mirrored_bytes as f64 / 1048576.0,
                d.copy_ms,
                d.completion_ms,
                match &d.source_remove_error {
                    None => "the source's image was removed".to_string(),
                    Some(e) => format!("the source's image is left: {e}"),
                }
            );
        }
    }
}

/// One VM: the source host's agent drives the migration with the destination's agent.
/// A group: this process coordinates (the coordinated strategy holds and releases VMs
/// against each other); each VM's source half runs in its source host's agent
/// ([`dczone_agent::leg`]). In the lab, through the lab's own access bundle from
/// `dc1.1-client`.
pub fn migrate(
    lab: &Lab,
    exe: &Path,
    state_dir: &Path,
    access: Option<&Access>,
    args: MigrateArgs,
) -> anyhow::Result<ExitCode> {
    let params = Params {
        downtime_limit_ms: args.downtime_ms,
        keep_frames: !args.no_frame_replay,
        tls: !args.no_tls,
        max_hold: Duration::from_secs(args.max_hold_s),
        max_drain: Duration::from_secs(args.max_drain_s),
        ..Params::default()
    };
    let g = match (&args.vm, &args.group) {
        (Some(vm), None) => {
            let in_lab: LabAgents;
            let agents: &dyn ZoneAgents = match access {
                Some(a) => a,
                None => {
                    in_lab = lab_agents(lab, exe, state_dir)?;
                    &in_lab
                }
            };
            agents.check_host(&args.to)?;
            // The source's agent first: starting, it settles an interrupted migration of
            // the VM, which may move it.
            let before = agents.host_of(vm)?;
            agents.call(&before, "GET", "/v1/health", None, Duration::from_secs(30))?;
            let from = agents.host_of(vm)?;
            // Start the destination's agent before the source's asks it to prepare.
            agents.call(&args.to, "GET", "/v1/vms", None, Duration::from_secs(30))?;
            let (multi, update) = progress_display(args.json);
            let stop = Arc::new(AtomicBool::new(false));
            let poller = agents.watch(
                &from,
                &format!("/v1/vms/{vm}/migration"),
                stop.clone(),
                Box::new(move |v| {
                    if let Ok(p) = serde_json::from_value::<Progress>(v) {
                        update(&[p]);
                    }
                }),
            )?;
            let body = serde_json::json!({
                "to": args.to,
                "agent": agents.agent_url(&args.to),
                "downtime_limit_ms": args.downtime_ms,
                "frame_replay": !args.no_frame_replay,
                "tls": !args.no_tls,
            });
            let m = agents.call(
                &from,
                "POST",
                &format!("/v1/vms/{vm}/migrate"),
                Some(body),
                Duration::from_secs(600),
            );
            stop.store(true, Ordering::SeqCst);
            let _ = poller.join();
            let _ = multi.clear();
            let m: VmMigration = serde_json::from_value(m?)?;
            GroupMigration {
                strategy: Strategy::Parallel,
                svc_t2_ms: m.t2_ms,
                svc_t2_union_ms: m.t2_ms,
                svc_t1_ms: m.t1_ms,
                switch_reason: None,
                vms: vec![m],
            }
        }
        (None, Some(group)) if access.is_some() => {
            let a = access.expect("checked");
            let (multi, update) = progress_display(args.json);
            let result = a.migrate_group(group, &args.to, args.strategy.into(), &params, &update);
            let _ = multi.clear();
            result?
        }
        (None, Some(group)) => {
            let agents = HostAgents::new(lab, exe, state_dir)?;
            let (multi, update) = progress_display(args.json);
            let result =
                agents.migrate_group(group, &args.to, args.strategy.into(), &params, &update);
            let _ = multi.clear();
            result?
        }
        _ => anyhow::bail!("give a VM name or --group NAME"),
    };
    if args.json {
        print_json(&g);
    } else {
        print_group(&g);
    }
    Ok(ExitCode::SUCCESS)
}
