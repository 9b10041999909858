//! `dczone db ...`: the database platform (PostgreSQL per DC site, one HA agent per site,
//! etcd), the ledger workload, and the RPO audit.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use clap::Subcommand;
use serde::Serialize;

use dczone_agent::access::Access;
use dczone_database::operator::{self, Reach};
use dczone_database::recovery;
use dczone_database::remote::Remote;
use dczone_database::{Database, DegradedStatus};
use dczone_ha::decide::Switchover;
use dczone_ha::keys::Snapshot;
use dczone_lab::Lab;
use dczone_ledger::{Audit, LoadOptions};

use crate::print_json;
use crate::table::{render, yes_no};

#[derive(Debug, Subcommand)]
pub enum DbCommand {
    /// Initialise PostgreSQL in every database site, start the HA agents, create the ledger
    /// (idempotent).
    Up {
        /// Seconds to wait for the primary and for each standby to stream.
        #[arg(long, default_value_t = 90)]
        timeout: u64,
        #[arg(long)]
        json: bool,
    },
    /// Stop the HA agents and PostgreSQL, and remove the database files.
    Down {
        #[arg(long)]
        json: bool,
    },
    /// Leader, members, replication mode, standbys and the audit log.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Switch the replication policy at run time (a tier of the zone file, e.g. tier2).
    Policy {
        tier: String,
        #[arg(long)]
        json: bool,
    },
    /// Planned switchover: the primary shuts down cleanly and hands over to a standby that
    /// holds all of its WAL; the old primary rejoins as a standby.
    Switchover {
        /// The standby's site that becomes the primary.
        #[arg(long)]
        to: String,
        /// Seconds to wait for the handover and for the old primary to rejoin.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        #[arg(long)]
        json: bool,
    },
    /// Manual failover for when consensus is lost (Patroni's `failover`, Data Guard's
    /// `FAILOVER TO`): proves from WAL that SITE holds every acknowledged commit, or refuses
    /// naming the gap; fences every member it reaches, rebuilds consensus on the survivors
    /// and makes SITE the primary.
    Failover {
        /// The standby's site that becomes the primary.
        #[arg(long)]
        to: String,
        /// Fail over even if it cannot be proven that SITE holds every acknowledged commit;
        /// the report says what may be lost (LSN range, number of transactions).
        #[arg(long)]
        accept_data_loss: bool,
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        #[arg(long)]
        json: bool,
    },
    /// Run the ledger workload; acknowledged and indeterminate ids go to the audit logs.
    Load {
        #[arg(long, default_value_t = 8)]
        clients: usize,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// The host the clients run on (default: dc1.1-client, or a host of a site that is
        /// not cut off).
        #[arg(long)]
        client: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Print the libpq connection string that follows the primary (multi-host,
    /// target_session_attrs=read-write), nearest member first for the client's host.
    Conninfo {
        /// The client's host (default: as for `load`).
        #[arg(long)]
        client: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Check the current primary: every acknowledged transfer present exactly once, balances
    /// conserved, indeterminate transfers listed. Exits 1 unless RPO = 0.
    Audit {
        #[arg(long)]
        client: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

/// `db status` when consensus cannot be read: exit code 1.
fn show_degraded(d: &DegradedStatus, json: bool) -> ExitCode {
    if json {
        print_json(d);
    } else {
        print_degraded(d);
    }
    ExitCode::FAILURE
}

fn print_degraded(d: &DegradedStatus) {
    println!("consensus: NO QUORUM ({})", d.error);
    if !d.unreachable_consensus_members.is_empty() {
        println!(
            "unreachable etcd members: {}",
            d.unreachable_consensus_members.join(", ")
        );
    }
    let rows: Vec<Vec<String>> = d
        .consensus
        .iter()
        .map(|c| {
            vec![
                c.name.clone(),
                c.site.clone(),
                c.url.clone(),
                if !c.reachable {
                    "unreachable".into()
                } else if c.has_leader {
                    "in quorum".into()
                } else {
                    "answers, no leader".into()
                },
            ]
        })
        .collect();
    print!(
        "{}",
        render(&["etcd member", "site", "url", "state"], &rows)
    );
    println!("PostgreSQL members, read directly:");
    let lsn = |l: Option<u64>| {
        l.map_or("-".into(), |l| {
            format!("{:X}/{:X}", l >> 32, l & 0xffff_ffff)
        })
    };
    let rows: Vec<Vec<String>> = d
        .members
        .iter()
        .map(|m| {
            vec![
                m.site.clone(),
                m.role.clone(),
                m.timeline.map_or("-".into(), |t| t.to_string()),
                lsn(m.lsn),
                m.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print!(
        "{}",
        render(&["site", "role", "timeline", "lsn", "error"], &rows)
    );
    println!(
        "the HA agents cannot act without consensus; see `dczone db failover --help` for \
         the guarded manual failover"
    );
}

#[derive(Debug, Serialize)]
struct StatusView {
    leader: Option<String>,
    policy: String,
    replication: Option<String>,
    sync_set: Vec<String>,
    members: Vec<dczone_ha::decide::MemberReport>,
    audit: Vec<dczone_ha::keys::AuditEntry>,
    /// A planned switchover not yet cleared by the new primary.
    switchover: Option<Switchover>,
}

fn status_view(default_tier: &str, snap: &Snapshot) -> StatusView {
    StatusView {
        leader: snap.leader.as_ref().map(|l| l.site.clone()),
        policy: snap
            .tier
            .clone()
            .unwrap_or_else(|| default_tier.to_string()),
        replication: snap
            .sync
            .as_ref()
            .map(|s| format!("{:?}", s.mode).to_lowercase()),
        sync_set: snap
            .sync
            .as_ref()
            .map(|s| s.set.clone())
            .unwrap_or_default(),
        members: snap.members.clone(),
        audit: snap.audit.clone(),
        switchover: snap.switchover.clone(),
    }
}

fn print_status(v: &StatusView) {
    println!(
        "leader: {}   policy: {}   replication: {} {}",
        v.leader.as_deref().unwrap_or("none"),
        v.policy,
        v.replication.as_deref().unwrap_or("-"),
        if v.sync_set.is_empty() {
            String::new()
        } else {
            format!("(sync set: {})", v.sync_set.join(", "))
        }
    );
    let rows: Vec<Vec<String>> = v
        .members
        .iter()
        .map(|m| {
            vec![
                m.site.clone(),
                if !m.pg_up {
                    "down".into()
                } else if m.in_recovery {
                    "standby".into()
                } else {
                    "primary".into()
                },
                format!("{:X}/{:X}", m.lsn >> 32, m.lsn & 0xffff_ffff),
                if m.fenced { "yes".into() } else { "no".into() },
            ]
        })
        .collect();
    print!("{}", render(&["site", "role", "lsn", "fenced"], &rows));
    if let Some(r) = &v.switchover {
        println!(
            "switchover {} -> {}: {}",
            r.from,
            r.to,
            match (&r.refused, r.handed_over_ms) {
                (Some(why), _) => format!("refused ({why})"),
                (None, Some(_)) => "handed over, waiting for the target".into(),
                (None, None) => "requested".into(),
            }
        );
    }
    if !v.audit.is_empty() {
        println!("audit log:");
        let rows: Vec<Vec<String>> = v
            .audit
            .iter()
            .map(|e| {
                vec![
                    e.kind.clone(),
                    e.primary.clone(),
                    e.start_ms.to_string(),
                    e.end_ms
                        .map_or("open".into(), |end| format!("{} ms", end - e.start_ms)),
                    e.reason.clone(),
                ]
            })
            .collect();
        print!(
            "{}",
            render(
                &["kind", "primary", "start (unix ms)", "duration", "reason"],
                &rows
            )
        );
    }
}

pub fn run(lab: &Lab, exe: &Path, state_dir: &Path, cmd: DbCommand) -> anyhow::Result<ExitCode> {
    let p = Database::open(lab)?;
    match cmd {
        DbCommand::Up { timeout, json } => {
            let client = p.client_host(None)?;
            let primary =
                dczone_control::db_up(&p, exe, state_dir, &client, Duration::from_secs(timeout))?;
            let v = status_view(&p.plan.tier, &p.snapshot(&client)?);
            if json {
                print_json(&v);
            } else {
                println!("database platform up: primary {primary}");
                print_status(&v);
            }
        }
        DbCommand::Down { json } => show_down(&dczone_control::db_down(&p, exe, state_dir)?, json),
        DbCommand::Status { json } => {
            let host = p.client_host(None)?;
            match p.snapshot(&host) {
                Ok(snap) => show_status(&status_view(&p.plan.tier, &snap), json),
                Err(e) => {
                    let d = recovery::degraded_status(&p.at(&host), format!("{e:#}"))?;
                    return Ok(show_degraded(&d, json));
                }
            }
        }
        DbCommand::Policy { tier, json } => {
            // The HA agent checks the tier against the zone's.
            p.set_policy(&p.client_host(None)?, &tier)?;
            show_policy(&tier, json);
        }
        DbCommand::Switchover { to, timeout, json } => {
            show_switchover(&p.switchover(&to, Duration::from_secs(timeout))?, json);
        }
        DbCommand::Failover {
            to,
            accept_data_loss,
            timeout,
            json,
        } => {
            let r = dczone_control::db_failover(
                &p,
                exe,
                state_dir,
                &to,
                accept_data_loss,
                Duration::from_secs(timeout),
            )?;
            show_failover(&r, json);
        }
        DbCommand::Load {
            clients,
            seconds,
            client,
            json,
        } => {
            let host = p.client_host(client)?;
            let r = p.load(&host, load_options(p.hosts_for(&host), clients, seconds)?)?;
            p.record(&r)?;
            show_load(&r, json);
        }
        DbCommand::Conninfo { client, json } => {
            let host = p.client_host(client)?;
            let conninfo = p.conninfo(&host);
            if json {
                print_json(&serde_json::json!({"client": host, "conninfo": conninfo}));
            } else {
                println!("{conninfo}");
            }
        }
        DbCommand::Audit { client, json } => {
            let (acked, ind) = p.recorded();
            return Ok(show_audit(
                &p.audit(&p.client_host(client)?, acked, ind)?,
                json,
            ));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn show_status(v: &StatusView, json: bool) {
    if json {
        print_json(v);
    } else {
        print_status(v);
    }
}

fn show_policy(tier: &str, json: bool) {
    if json {
        print_json(&serde_json::json!({"policy": tier}));
    } else {
        println!("policy {tier} requested; the primary applies it within one HA loop");
    }
}

fn show_switchover(r: &dczone_database::SwitchoverReport, json: bool) {
    if json {
        print_json(r);
    } else {
        println!(
            "switchover {} -> {}: leader key moved after {:.0} ms, first commit on {} after {:.0} ms, {} streaming again after {:.0} ms",
            r.from, r.to, r.leader_ms, r.to, r.first_commit_ms, r.from, r.rejoined_ms
        );
    }
}

fn load_options(
    hosts: Vec<std::net::Ipv4Addr>,
    clients: usize,
    seconds: f64,
) -> anyhow::Result<LoadOptions> {
    if clients == 0 || !(seconds.is_finite() && seconds > 0.0) {
        bail!("--clients must be at least 1 and --seconds positive");
    }
    Ok(LoadOptions {
        hosts,
        clients,
        duration: Duration::from_secs_f64(seconds),
        request_timeout: Duration::from_secs(1),
        run_id: format!("r{}", dczone_ledger::unix_us()),
    })
}

fn show_load(r: &dczone_ledger::LoadResult, json: bool) {
    if json {
        print_json(r);
    } else {
        println!(
            "{} acknowledged, {} indeterminate, {} errors; Ptrx {:.0}/s, TATrxn p50 {:.2} ms p99 {:.2} ms",
            r.acknowledged.len(),
            r.indeterminate.len(),
            r.errors,
            r.ptrx,
            r.tatrxn_p50_ms,
            r.tatrxn_p99_ms
        );
    }
}

/// Prints an audit; the exit code is a failure unless RPO = 0 and the balances hold.
fn show_audit(a: &Audit, json: bool) -> ExitCode {
    if json {
        print_json(a);
    } else {
        print_audit(a);
    }
    if !a.rpo_zero || !a.balances_conserved || !a.balances_match_transfers {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// `dczone --access DIR db ...`: the commands an operator runs from anywhere, through
/// the agents ([`Remote`]). Bringing the platform up or down and the manual failover
/// still run next to the lab.
pub fn run_remote(access: &Access, cmd: DbCommand) -> anyhow::Result<ExitCode> {
    let r = Remote::open(access)?;
    let here = |client: Option<String>| {
        if let Some(c) = client {
            bail!(
                "with --access the clients run in this process, not on '{c}': drop --client \
                 (or run the command on that host)"
            );
        }
        Ok(())
    };
    match cmd {
        DbCommand::Status { json } => match r.snapshot() {
            Ok(snap) => show_status(&status_view(&r.plan.tier, &snap), json),
            Err(e) => {
                let d = recovery::degraded_status(&r, format!("{e:#}"))?;
                return Ok(show_degraded(&d, json));
            }
        },
        DbCommand::Switchover { to, timeout, json } => {
            r.require_password()?;
            show_switchover(
                &operator::switchover(&r, &to, Duration::from_secs(timeout))?,
                json,
            )
        }
        DbCommand::Load {
            clients,
            seconds,
            client,
            json,
        } => {
            here(client)?;
            r.require_password()?;
            let result = r.load(load_options(r.hosts(), clients, seconds)?)?;
            r.audit_log().record(&result)?;
            show_load(&result, json);
        }
        DbCommand::Conninfo { client, json } => {
            here(client)?;
            let conninfo = r.conninfo();
            if json {
                print_json(&serde_json::json!({"client": "this process", "conninfo": conninfo}));
            } else {
                println!("{conninfo}");
            }
        }
        DbCommand::Audit { client, json } => {
            here(client)?;
            r.require_password()?;
            let (acked, ind) = r.audit_log().recorded();
            return Ok(show_audit(&operator::audit(&r, acked, ind)?, json));
        }
        DbCommand::Policy { tier, json } => {
            r.set_policy(&tier)?;
            show_policy(&tier, json);
        }
        DbCommand::Up { timeout, json } => {
            let primary = r.up(Duration::from_secs(timeout))?;
            let v = status_view(&r.plan.tier, &r.snapshot()?);
            if json {
                print_json(&v);
            } else {
                println!("database platform up: primary {primary}");
                print_status(&v);
            }
        }
        DbCommand::Down { json } => show_down(&recovery::down(&r)?, json),
        DbCommand::Failover {
            to,
            accept_data_loss,
            timeout,
            json,
        } => {
            r.require_password()?;
            let report =
                recovery::failover(&r, &to, accept_data_loss, Duration::from_secs(timeout))?;
            show_failover(&report, json);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `db failover`'s report.
fn show_failover(r: &dczone_database::FailoverReport, json: bool) {
    if json {
        print_json(r);
    } else {
        println!(
            "failover to {}: {}; leader key after {:.0} ms, first commit after {:.0} ms",
            r.to,
            if r.proven {
                format!("proven, {} holds every acknowledged commit", r.to)
            } else {
                format!(
                    "DATA MAY BE LOST after {}{}{}{}",
                    r.lost_from_lsn.as_deref().unwrap_or("-"),
                    r.lost_to_lsn
                        .as_deref()
                        .map(|l| format!(" up to {l}"))
                        .unwrap_or_default(),
                    r.transactions_at_most
                        .map(|n| format!(", at most {n} transactions"))
                        .unwrap_or_default(),
                    if r.unknown.is_empty() {
                        String::new()
                    } else {
                        format!(" (unreadable: {})", r.unknown.join(", "))
                    }
                )
            },
            r.leader_ms,
            r.first_commit_ms
        );
        println!(
            "fenced: {}; consensus rebuilt on {} (rejoined: {}); run `dczone db up` \
             once the lost sites are back",
            if r.fenced.is_empty() {
                "none reachable".into()
            } else {
                r.fenced.join(", ")
            },
            r.consensus_rebuilt_on,
            if r.consensus_rejoined.is_empty() {
                "none".into()
            } else {
                r.consensus_rejoined.join(", ")
            }
        );
    }
}

/// `db down`'s report.
fn show_down(d: &dczone_database::recovery::Down, json: bool) {
    if json {
        print_json(d);
    } else {
        println!("database platform down ({} HA agents stopped)", d.stopped);
        if !d.keys_cleared {
            println!(
                "warning: no etcd member took the deletion of the platform's keys; the next \
                 `db up` finds them"
            );
        }
    }
}

pub fn print_audit(a: &Audit) {
    let rows = vec![
        vec![
            "acknowledged transfers".into(),
            a.acknowledged.to_string(),
            String::new(),
        ],
        vec![
            "present on the primary".into(),
            a.present.to_string(),
            yes_no(a.rpo_zero),
        ],
        vec![
            "lost".into(),
            a.lost.len().to_string(),
            yes_no(a.lost.is_empty()),
        ],
        vec![
            "indeterminate (applied)".into(),
            format!("{} ({})", a.indeterminate, a.indeterminate_applied),
            String::new(),
        ],
        vec![
            "balance sum".into(),
            a.balance_sum.to_string(),
            yes_no(a.balances_conserved),
        ],
        vec![
            "balances match transfers".into(),
            String::new(),
            yes_no(a.balances_match_transfers),
        ],
    ];
    print!(
        "{}",
        render(
            &[
                "audit of primary ".to_string() + &a.primary,
                String::new(),
                String::new()
            ]
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
            &rows
        )
    );
    if a.rpo_zero {
        println!("verdict: RPO = 0");
    } else {
        println!(
            "verdict: {} acknowledged transfers LOST: {}",
            a.lost.len(),
            a.lost
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}

/// `dczone ha-agent --site S`: runs one HA agent (started by `db up` in the site's namespace).
pub fn agent(lab: &Lab, site: &str) -> anyhow::Result<ExitCode> {
    let p = Database::open(lab)?;
    p.prepare_member(site)?;
    let cfg = p.agent_config(site)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(dczone_ha::agent::run(cfg))?;
    Ok(ExitCode::SUCCESS)
}
