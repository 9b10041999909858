//! The `dczone` command line: one module per command family, each translating arguments
//! into library calls and results into a table (people) or JSON (`--json`, machines).

mod backup_cmd;
mod bench;
mod bench_report;
mod cloud_cmd;
mod db_cmd;
mod image_cmd;
mod lab_cmd;
mod pki_cmd;
mod plot;
mod storage_cmd;
mod table;
mod vm_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "dczone",
    version,
    about = "One logical computing zone over a deterministic optical WAN"
)]
pub struct Cli {
    /// Name of the lab (namespaces are called `<lab>-<host>`).
    #[arg(long, global = true, env = "DCZONE_LAB", default_value = "dcz")]
    pub lab: String,
    /// Where labs keep their state files.
    #[arg(
        long,
        global = true,
        env = "DCZONE_STATE_DIR",
        default_value = "/run/dczone"
    )]
    pub state_dir: PathBuf,
    /// Drive a zone through its agents with only this access bundle (`zone.toml`, the zone
    /// CA, the operator's certificate, the database's password; `lab up` writes one to
    /// <state-dir>/<lab>/access): no namespace entry, no shared file. For `vm`, `migrate`
    /// (one VM or a group) and `db` (every command).
    #[arg(long, global = true, env = "DCZONE_ACCESS")]
    pub access: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The demo: lab up, a 3-VM cluster under load migrates DC1.1 -> DC1.2 (coordinated)
    /// with its report, then the database platform (sync vs async at 500 km, DC2.1 lost
    /// and back, a DC1.1 disaster with its RPO audit, two planned switchovers), lab down.
    Demo {
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Build, inspect and control the embedded lab.
    Lab {
        #[command(subcommand)]
        command: lab_cmd::LabCommand,
    },
    /// Validate a zone file, or show the built-in reference zone.
    Zone {
        #[command(subcommand)]
        command: lab_cmd::ZoneCommand,
    },
    /// VMs of the lab: create, start, stop, destroy, list, show.
    Vm {
        #[command(subcommand)]
        command: vm_cmd::VmCommand,
    },
    /// Live-migrate a VM to a host, or a group of VMs to a site.
    Migrate(vm_cmd::MigrateArgs),
    /// The zone's PKI: its CA, host and operator certificates.
    Pki {
        #[command(subcommand)]
        command: pki_cmd::PkiCommand,
    },
    /// The guest image (kernel + initramfs with the ledger service).
    Image {
        #[command(subcommand)]
        command: image_cmd::ImageCommand,
    },
    /// The database platform: PostgreSQL per DC site, HA agents, the ledger and its audit.
    Db {
        #[command(subcommand)]
        command: db_cmd::DbCommand,
    },
    /// The zone's storage: Ceph clusters (region 1 stretched, DC2.1 its own).
    Storage {
        #[command(subcommand)]
        command: storage_cmd::StorageCommand,
    },
    /// Snapshot backups of VM disks to another site, and recovery from them.
    Backup {
        #[command(subcommand)]
        command: backup_cmd::BackupCommand,
    },
    /// The public cloud: its account, migrations of VMs to it, its instances and objects.
    Cloud {
        #[command(subcommand)]
        command: cloud_cmd::CloudCommand,
    },
    /// Runs one HA agent in the current namespace (started by `db up`).
    #[command(hide = true)]
    HaAgent {
        #[arg(long)]
        site: String,
    },
    /// Benchmarks; each prints a table and can write JSON.
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
    /// Runs the APN emulator in the current namespace (started by `lab up`).
    #[command(hide = true)]
    ApnRun {
        #[arg(long)]
        config: PathBuf,
    },
}

/// Entry point of the binary: runs the command and prints the whole error chain on failure.
pub fn main() -> ExitCode {
    // SIGPIPE stays ignored (Rust's default), never SIG_DFL: the HA agent, the emulator and
    // the benchmarks hold TLS connections to etcd and the agents, and rustls writes with
    // writev(2), which has no MSG_NOSIGNAL. With SIG_DFL a peer that died (an etcd member
    // killed by a rebuild) killed the HA agent silently on its next write (seen in
    // `db::manual_failover_...`: the target's agent died 0.3 s before consensus was
    // rebuilt on its site). A reader of stdout that went away (`dczone ... | head`) ends
    // the command quietly instead, with the status a shell gives a SIGPIPE (141).
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        default_hook(info);
    }));
    let cli = Cli::parse();
    let _failpoints = dczone_virt::failpoints_from_env();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe()?;
    let lab = dczone_lab::Lab::new(&cli.lab, &cli.state_dir, &exe)?;
    let access = match &cli.access {
        None => None,
        Some(dir) => {
            if !matches!(
                cli.command,
                Command::Vm { .. } | Command::Migrate(_) | Command::Db { .. }
            ) {
                anyhow::bail!(
                    "--access drives `vm`, `migrate` and `db` through the agents; the other \
                     commands run next to the lab for now (issue 11)"
                );
            }
            Some(dczone_agent::access::Access::open(dir)?)
        }
    };
    // libpq's conventions, for our clients and the psql or pgbench an operator runs
    // through `lab exec`: the database password and CA (the lab's, or the access
    // bundle's), and TLS verified against it. Set before any thread starts; an operator's
    // own settings win.
    let (passfile, ca) = match &access {
        Some(a) => (a.dir.join("pgpass"), a.dir.join("ca.crt")),
        None => (
            dczone_database::passfile(&lab),
            dczone_database::ca_file(&lab),
        ),
    };
    for (var, value) in [
        ("PGPASSFILE", passfile.into_os_string()),
        ("PGSSLROOTCERT", ca.into_os_string()),
        ("PGSSLMODE", "verify-full".into()),
    ] {
        if std::env::var_os(var).is_none() {
            std::env::set_var(var, value);
        }
    }
    match cli.command {
        Command::Lab { command } => lab_cmd::run(&lab, &exe, &cli.state_dir, command),
        Command::Demo { json } => {
            let beside = |suffix: &str| {
                json.as_ref().map(|p| {
                    let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or("demo");
                    p.with_file_name(format!("{stem}-{suffix}.json"))
                })
            };
            let (db_json, switchover_json) = (beside("inter-region"), beside("switchover"));
            // Each part runs even if one before it missed a key requirement; the demo
            // fails if any did.
            let result = (|| {
                let migration = bench::intra_region(
                    &lab,
                    &exe,
                    &cli.state_dir,
                    &dczone_bench::migration::IntraRegionOptions {
                        strategies: vec![dczone_virt::migrate::Strategy::Coordinated],
                        frame_replay: vec![true],
                        tls: vec![true],
                        runs: 1,
                    },
                    json.as_deref(),
                )?;
                println!();
                // The second headline, short: sync vs async at 500 km, DC2.1 lost and back,
                // one disaster of DC1.1 with its RPO audit.
                let database = bench::inter_region(
                    &lab,
                    &exe,
                    &cli.state_dir,
                    &dczone_bench::inter_region::InterRegionOptions {
                        distances_km: vec![500.0],
                        clients: 32,
                        seconds: 5.0,
                        rounds: 2,
                        injections: 1,
                        network: dczone_bench::inter_region::NetworkOptions::default(),
                        saturation: false,
                    },
                    db_json.as_deref(),
                )?;
                println!();
                // Planned switchovers under load: DC1.1 -> DC1.2, then across regions to
                // DC2.1, each audited.
                let switchovers = bench::switchover(
                    &lab,
                    &exe,
                    &cli.state_dir,
                    2,
                    16,
                    switchover_json.as_deref(),
                )?;
                Ok::<_, anyhow::Error>(
                    if [migration, database, switchovers].contains(&ExitCode::FAILURE) {
                        ExitCode::FAILURE
                    } else {
                        ExitCode::SUCCESS
                    },
                )
            })();
            lab.down()?;
            println!("lab '{}' is down", lab.name());
            result
        }
        Command::Zone { command } => lab_cmd::zone(command),
        Command::Pki { command } => pki_cmd::run(command),
        Command::Image { command } => image_cmd::run(&exe, command),
        Command::Vm { command } => match &access {
            Some(a) => vm_cmd::run(a, command),
            None => vm_cmd::run(
                &dczone_control::lab_agents(&lab, &exe, &cli.state_dir)?,
                command,
            ),
        },
        Command::Migrate(args) => {
            vm_cmd::migrate(&lab, &exe, &cli.state_dir, access.as_ref(), args)
        }
        Command::Db { command } => match &access {
            Some(a) => db_cmd::run_remote(a, command),
            None => db_cmd::run(&lab, &exe, &cli.state_dir, command),
        },
        Command::Storage { command } => {
            let zone = lab.state()?.zone()?;
            let agents = dczone_control::lab_agents(&lab, &exe, &cli.state_dir)?;
            agents.agents.ensure_all()?;
            storage_cmd::run(&agents, &zone, command)
        }
        Command::Backup { command } => {
            let zone = lab.state()?.zone()?;
            let agents = dczone_control::lab_agents(&lab, &exe, &cli.state_dir)?;
            backup_cmd::run(&agents, &zone, command)
        }
        Command::Cloud { command } => cloud_cmd::run(&lab, &exe, &cli.state_dir, command),
        Command::HaAgent { site } => db_cmd::agent(&lab, &site),
        Command::Bench { command } => bench::run(&lab, &cli.state_dir, &exe, command),
        Command::ApnRun { config } => {
            let text = std::fs::read(&config)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", config.display()))?;
            let config: dczone_apn::EmulatorConfig = serde_json::from_slice(&text)?;
            dczone_apn::Engine::new(&config)?.run()?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_json(value: &impl serde::Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("reports serialize")
    );
}
