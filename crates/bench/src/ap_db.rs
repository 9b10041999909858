//! Issue 13's AP-DB comparison (SPEC.md §3: TAT_dc-dc, TAT_pub-dc, P_dc-dc, P_pub-dc): an
//! application VM (AP) serves its clients by running ledger transactions against the
//! database platform's primary in DC1.2, first from DC1.2, then from the public cloud it
//! was migrated to, the two measured in turn in the same run.
//!
//! Each client request is one transaction of `round_trips` statements at the database
//! (`dczone-guest`'s AP mode): the AP times each from `BEGIN` to `COMMIT` (TAT, the
//! application-to-DB turnaround) and its clients time the whole request. Moving the AP
//! away from its database adds, per request, `round_trips` times the difference of the
//! two round-trip times, which the AP measures itself (`SELECT 1`).

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use dczone_control::cloud::{self, VmReport};
use dczone_control::vms::{self, destroy_if_present};
use dczone_control::ZoneAgents;
use dczone_database::Database;

use crate::cloud::{spread, Spread};
use crate::{quantile, Observer};

/// Where the database's primary is put, and the AP.
const DB_SITE: &str = "dc1.2";
const AP_HOST: &str = "dc1.2-h1";
const AP_VM: &str = "cb-ap";
const UP_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone)]
pub struct ApDbOptions {
    /// Closed-loop clients of the AP.
    pub clients: usize,
    /// Each measurement's length.
    pub seconds: f64,
    /// Measurements of each placement, taken in turn.
    pub rounds: u32,
    pub format: String,
}

/// One measurement of the AP at one placement.
#[derive(Debug, Clone, Serialize)]
pub struct ApLoad {
    /// `dc-dc` or `pub-dc`.
    pub placement: String,
    pub round: u32,
    pub ap_ip: Ipv4Addr,
    pub requests: u64,
    pub errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    pub seconds: f64,
    /// Requests per second (P).
    pub p: f64,
    /// The AP's transaction turnaround, BEGIN to COMMIT (TAT), ms.
    pub tat_ms: Spread,
    /// What its clients saw: the request through the AP, ms.
    pub client_ms: Spread,
    /// The AP's round trip to the database (median of `SELECT 1`), ms.
    pub rtt_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ApDbReport {
    pub ap_vm: String,
    pub db_site: String,
    pub db_ip: Ipv4Addr,
    /// Database round trips per client request.
    pub round_trips: u32,
    pub clients: usize,
    pub loads: Vec<ApLoad>,
    /// Medians over the rounds of each placement.
    pub tat_dc_dc_ms: f64,
    pub tat_pub_dc_ms: f64,
    pub p_dc_dc: f64,
    pub p_pub_dc: f64,
    pub rtt_dc_dc_ms: f64,
    pub rtt_pub_dc_ms: f64,
    pub tat_ratio: f64,
    pub p_ratio: f64,
    /// TAT_pub-dc − TAT_dc-dc, and what the round trips explain of it:
    /// `round_trips × (rtt_pub_dc − rtt_dc_dc)`.
    pub extra_ms: f64,
    pub expected_extra_ms: f64,
    /// |extra − expected| / expected.
    pub extra_error: f64,
    /// The AP's own migration to the cloud.
    pub migration: VmReport,
}

impl ApDbReport {
    /// The target: the extra turnaround within 20 % of what the round trips
    /// explain, and no request failed.
    pub fn pass(&self) -> bool {
        self.extra_error <= 0.2 && self.loads.iter().all(|l| l.errors == 0 && l.requests > 0)
    }
}

/// Runs the comparison: a fresh database platform with its primary in DC1.2 and the
/// application role, the AP booted in DC1.2, measured there, migrated to the cloud,
/// measured there, the two in turn `rounds` times. The AP's instance and object go after.
pub fn run(
    lab: &dczone_lab::Lab,
    exe: &Path,
    state_dir: &Path,
    agents: &(dyn ZoneAgents + Sync),
    account: &dczone_cloud::Account,
    o: &ApDbOptions,
    obs: &dyn Observer,
) -> anyhow::Result<ApDbReport> {
    if o.clients == 0 || o.rounds == 0 || !o.seconds.is_finite() || o.seconds <= 0.0 {
        anyhow::bail!(
            "the AP-DB comparison needs at least one client, one round and a positive length"
        );
    }
    let p = Database::open(lab)?;
    let client_host = p.client_host(None)?;
    obs.step("database platform: fresh start (the application role admitted)");
    dczone_control::db_down(&p, exe, state_dir)?;
    let primary = dczone_control::db_up(&p, exe, state_dir, &client_host, UP_TIMEOUT)?;
    if primary != DB_SITE {
        obs.step(&format!("database: switchover {primary} -> {DB_SITE}"));
        p.switchover(DB_SITE, UP_TIMEOUT)?;
    }
    let db_ip = p.member(DB_SITE)?.ip;
    let password = dczone_db::random_password()?;
    let pw = password.clone();
    p.in_host(&client_host, move || async move {
        dczone_ledger::ensure_app_role(db_ip, &pw).await
    })??;
    let ca = std::fs::read(dczone_database::ca_file(lab))?;
    let ca_hex: String = ca.iter().map(|b| format!("{b:02x}")).collect();
    let configure = format!(
        "D {db_ip} {} {} {} {password} {ca_hex}",
        dczone_db::PORT,
        dczone_db::DATABASE,
        dczone_db::APP_ROLE
    );

    destroy_if_present(agents, AP_VM)?;
    obs.step(&format!("booting the AP {AP_VM} on {AP_HOST}"));
    vms::boot_all(
        agents,
        &[dczone_virt::CreateVm {
            name: AP_VM.into(),
            host: AP_HOST.into(),
            memory_mib: 256,
            dirty_mbps: 0,
            dirty_mib: 0,
            resident_pct: dczone_virt::DEFAULT_RESIDENT_PCT,
            group: None,
            disk_mib: Some(1536),
            disk_image: None,
        }],
    )?;
    let vm = agents
        .list()?
        .into_iter()
        .find(|v| v.spec.name == AP_VM)
        .ok_or_else(|| anyhow::anyhow!("{AP_VM} was not created"))?;
    let dc_ip = dczone_virt::Platform::guest_ip(&vm);

    obs.step(&format!("{AP_VM} to the cloud"));
    let (lab2, exe2, dir2) = (lab.clone(), exe.to_path_buf(), state_dir.to_path_buf());
    let (acc, fmt) = (account.clone(), o.format.clone());
    let migrated = cloud::from_client(lab, move || -> anyhow::Result<cloud::MigrateReport> {
        let agents = dczone_control::lab_agents(&lab2, &exe2, &dir2)?;
        cloud::migrate(
            &agents,
            &acc,
            &[AP_VM.to_string()],
            &fmt,
            8,
            4,
            &[],
            &|ip| cloud::app_answers(ip, Duration::from_secs(1)),
            &|_| {},
        )
    })??;
    let migration = migrated
        .vms
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("the migration reported no VM"))?;
    let cloud_ip: Ipv4Addr = migration
        .ip
        .parse()
        .map_err(|_| anyhow::anyhow!("the instance's address {} is not IPv4", migration.ip))?;

    let mut round_trips = 0;
    let result = (|| -> anyhow::Result<Vec<ApLoad>> {
        let mut rtts = Vec::new();
        for (placement, ip) in [("dc-dc", dc_ip), ("pub-dc", cloud_ip)] {
            let (c, conf) = (configure.clone(), ip);
            let answer =
                cloud::from_client(lab, move || request(conf, &c, Duration::from_secs(60)))??;
            let rtt_us: f64 = answer
                .strip_prefix("DB OK rtt_us=")
                .and_then(|r| r.split_whitespace().next()?.parse().ok())
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "the AP at {ip} ({placement}) could not use the database: {answer}"
                    )
                })?;
            rtts.push(rtt_us / 1e3);
            // The AP says how many round trips its transaction makes.
            round_trips = answer
                .split_whitespace()
                .find_map(|w| w.strip_prefix("round_trips=")?.parse().ok())
                .unwrap_or(0);
        }
        let mut loads = Vec::new();
        for round in 1..=o.rounds {
            for (i, (placement, ip)) in [("dc-dc", dc_ip), ("pub-dc", cloud_ip)]
                .into_iter()
                .enumerate()
            {
                obs.step(&format!(
                    "AP-DB round {round}/{}: {placement}, {} clients for {} s",
                    o.rounds, o.clients, o.seconds
                ));
                let (clients, secs) = (o.clients, o.seconds);
                let mut l = cloud::from_client(lab, move || {
                    load(ip, clients, Duration::from_secs_f64(secs))
                })??;
                l.placement = placement.into();
                l.round = round;
                l.rtt_ms = rtts[i];
                loads.push(l);
            }
        }
        Ok(loads)
    })();
    // The AP's instance and object go, whatever the measurement did; the DC's AP too.
    let (acc, instance, object) = (
        account.clone(),
        migration.instance.clone(),
        migration.object.clone(),
    );
    let _ = cloud::from_client(lab, move || {
        let _ = dczone_cloud::client::Compute::new(&acc).terminate(&[instance]);
        if let Ok(s) = dczone_cloud::s3::Store::new(&acc) {
            let _ = s.delete(&object);
        }
    });
    let _ = destroy_if_present(agents, AP_VM);
    let loads = result?;

    let med = |placement: &str, f: fn(&ApLoad) -> f64| {
        let v: Vec<f64> = loads
            .iter()
            .filter(|l| l.placement == placement)
            .map(f)
            .collect();
        quantile(&v, 0.5)
    };
    let (tat_dc, tat_pub) = (
        med("dc-dc", |l| l.tat_ms.median),
        med("pub-dc", |l| l.tat_ms.median),
    );
    let (p_dc, p_pub) = (med("dc-dc", |l| l.p), med("pub-dc", |l| l.p));
    let (rtt_dc, rtt_pub) = (med("dc-dc", |l| l.rtt_ms), med("pub-dc", |l| l.rtt_ms));
    let expected = f64::from(round_trips) * (rtt_pub - rtt_dc);
    let extra = tat_pub - tat_dc;
    Ok(ApDbReport {
        ap_vm: AP_VM.into(),
        db_site: DB_SITE.into(),
        db_ip,
        round_trips,
        clients: o.clients,
        tat_dc_dc_ms: tat_dc,
        tat_pub_dc_ms: tat_pub,
        p_dc_dc: p_dc,
        p_pub_dc: p_pub,
        rtt_dc_dc_ms: rtt_dc,
        rtt_pub_dc_ms: rtt_pub,
        tat_ratio: tat_pub / tat_dc,
        p_ratio: p_pub / p_dc,
        extra_ms: extra,
        expected_extra_ms: expected,
        extra_error: ((extra - expected) / expected).abs(),
        migration,
        loads,
    })
}

/// One request to the AP on its own connection, its answer's line.
fn request(ip: Ipv4Addr, line: &str, timeout: Duration) -> anyhow::Result<String> {
    let mut s = TcpStream::connect_timeout(&(ip, cloud::APP_PORT).into(), Duration::from_secs(5))?;
    s.set_read_timeout(Some(timeout))?;
    writeln!(s, "{line}")?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer)?;
    Ok(answer.trim().to_string())
}

/// One client's turnarounds (the AP's, its own), errors and the first error's answer.
type ClientLog = (Vec<f64>, Vec<f64>, u64, Option<String>);

/// `clients` closed-loop clients of the AP at `ip` for `length`: each sends a transfer,
/// waits for its answer, sends the next. Plain TCP, no retries.
fn load(ip: Ipv4Addr, clients: usize, length: Duration) -> anyhow::Result<ApLoad> {
    let next_id = Arc::new(AtomicU64::new(dczone_ledger::unix_us() / 1000 * 1_000_000));
    let started = Instant::now();
    let stop = started + length;
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let next_id = next_id.clone();
            std::thread::spawn(move || -> anyhow::Result<ClientLog> {
                let s = TcpStream::connect_timeout(
                    &(ip, cloud::APP_PORT).into(),
                    Duration::from_secs(5),
                )?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                let mut w = s.try_clone()?;
                let mut r = BufReader::new(s);
                let (mut tat, mut client, mut errors, mut first_error) =
                    (Vec::new(), Vec::new(), 0, None);
                let mut seed =
                    0x9e37_79b9_7f4a_7c15_u64 ^ (c as u64 + 1) ^ next_id.load(Ordering::Relaxed);
                let mut rand = move || {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed
                };
                while Instant::now() < stop {
                    let id = next_id.fetch_add(1, Ordering::Relaxed);
                    let from = 1 + rand() % 1000;
                    let to = 1 + (from + rand() % 999) % 1000;
                    let sent = Instant::now();
                    writeln!(w, "A {id} {from} {to} {}", 1 + rand() % 100)?;
                    let mut line = String::new();
                    r.read_line(&mut line)?;
                    let took = sent.elapsed().as_secs_f64() * 1e3;
                    let f: Vec<&str> = line.split_whitespace().collect();
                    match f.as_slice() {
                        ["OK", _, _, db_us] => {
                            tat.push(db_us.parse::<f64>().unwrap_or(f64::NAN) / 1e3);
                            client.push(took);
                        }
                        _ => {
                            errors += 1;
                            first_error.get_or_insert_with(|| line.trim().to_string());
                        }
                    }
                }
                Ok((tat, client, errors, first_error))
            })
        })
        .collect();
    let (mut tat, mut client, mut errors, mut first_error) = (Vec::new(), Vec::new(), 0, None);
    for t in threads {
        let (a, b, e, f) = t
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
        tat.extend(a);
        client.extend(b);
        errors += e;
        first_error = first_error.or(f);
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(ApLoad {
        placement: String::new(),
        round: 0,
        ap_ip: ip,
        requests: tat.len() as u64,
        errors,
        first_error,
        seconds,
        p: tat.len() as f64 / seconds,
        tat_ms: spread(&tat, true),
        client_ms: spread(&client, true),
        rtt_ms: f64::NAN,
    })
}
