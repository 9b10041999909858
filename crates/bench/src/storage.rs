//! Issue 12's storage scenarios on the reference zone, through the hosts' agents:
//! - the write latency of region 1's stretched cluster (two copies in DC1.1, two in DC1.2,
//!   100 km apart) against DC2.1's local one: 4 KiB random writes, one at a time, with
//!   `rbd bench` from a hypervisor host of each, in batches;
//! - a VM with a disk live-migrated between the regions under a saturating client (the
//!   disk mirrored into the other cluster, then memory), N runs back and forth: T1, T2,
//!   the disk copy, and the Tier 1 service's Ptrx before and during the migration, as the
//!   client sees them.
//!
//! - a 3-VM group backed up to DC2.1 twice under client load (full, then incremental):
//!   T1, T2, the bytes, the rate against the APN path's, and the most delayed chunk's
//!   arrival against its physical floor (bytes / path rate + one-way delay);
//! - the group lost and restored at DC2.1 from the incremental backup: Trecovery and its
//!   breakdown, then the clients' log replayed, transfer by transfer (the audit: every
//!   acknowledged transfer answers `DUP`, held by the backup, or `OK`, applied by the
//!   replay; any other answer, or none, is a lost transfer).
//!
//! - DC1.1 cut off for [`SITE_LOSS_HOLD`] while a VM in DC1.2, its disk in the stretched
//!   cluster, serves a client in DC1.2: the longest time without an acknowledged write,
//!   the writes acknowledged while DC1.1 was gone, and the audit (every acknowledged
//!   transfer sent again must answer `DUP`: an `OK` is a transfer the cluster lost).
//!
//! `--wan conventional` runs all of it on the conventional WAN's links (jitter, loss); the
//! APN is put back at the end.

use std::process::Command;
use std::time::Duration;

use serde::Serialize;

use dczone_control::vms::{self, destroy_if_present};
use dczone_control::{LabAgents, ZoneAgents};
use dczone_virt::migrate::{Params, Strategy, VmMigration};
use dczone_virt::Platform;

use crate::migration::guest_stats;
use crate::{quantile, Header, Observer};

const VM: &str = "sto-ledger";
const GROUP: &str = "sto";
/// The guest's data at rest before the runs, MiB: the disk copy carries it each time.
const DATA_MIB: u32 = 64;
/// Requests per second asked of the client stream: more than a disk-backed guest serves
/// under TCG, so the stream is closed-loop and its rate is the service's Ptrx.
const SATURATING_RATE: u32 = 1000;
const TOTAL_BALANCE: i64 = 1_000_000;
/// Write-latency batches per cluster, and 4 KiB writes per batch.
const LATENCY_BATCHES: usize = 10;
const WRITES_PER_BATCH: u64 = 128;
/// The one-way delay between DC1.1 and DC1.2 in the reference zone (100 km), ms.
const STRETCH_RTT_MS: f64 = 1.0;

/// The backup scenario's group: 3 VMs in DC1.1, each with `BACKUP_DATA_MIB` at rest
/// before the full backup and `INCREMENT_MIB` rewritten before the incremental one.
const BACKUP_GROUP: &str = "stob";
const BACKUP_VMS: [(&str, &str); 3] = [
    ("sto-b1", "dc1.1-h1"),
    ("sto-b2", "dc1.1-h2"),
    ("sto-b3", "dc1.1-h1"),
];
const BACKUP_DATA_MIB: u32 = 48;
const INCREMENT_MIB: u32 = 16;
/// Transfers per second per VM while the group is backed up: a steady service, not a
/// saturating one (the backup's rate is what is measured).
const BACKUP_LOAD_RATE: u32 = 20;
/// The store's site, and the site whose path to it the backups take.
const STORE_SITE: &str = "dc2.1";
const SOURCE_SITE: &str = "dc1.1";

/// The site-loss scenario: its VM in DC1.2, its client on another host of DC1.2, the site
/// lost and for how long, and the client's steady rate.
const SITE_LOSS_VM: &str = "sto-s1";
const SITE_LOSS_HOST: &str = "dc1.2-h1";
const SITE_LOSS_CLIENT: &str = "dc1.2-h2";
const LOST_SITE: &str = "dc1.1";
const SITE_LOSS_HOLD: Duration = Duration::from_secs(30);
const SITE_LOSS_RATE: u32 = 50;

#[derive(Debug, Clone, Copy)]
pub struct StorageOptions {
    pub runs: u32,
    pub wan: dczone_zone::Wan,
}

/// 4 KiB random writes, one at a time, from `host` to `cluster`: each batch's mean write
/// time (one over `rbd bench`'s ops/sec, the writes being one at a time).
#[derive(Debug, Serialize)]
pub struct WriteLatency {
    pub cluster: String,
    pub host: String,
    pub batches_ms: Vec<f64>,
    /// Median, p95 and worst of the batches' means, ms.
    pub write_p50_ms: f64,
    pub write_p95_ms: f64,
    pub write_worst_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct MigrationRun {
    pub from: String,
    pub to: String,
    pub t1_ms: f64,
    pub t2_ms: f64,
    /// The disk copy until in sync (part of T1), its completion (part of T2), ms.
    pub copy_ms: f64,
    pub completion_ms: f64,
    pub mirrored_mib: f64,
    pub memory_mib: f64,
    /// Transfers per second the client got before (2 s) and during the migration.
    pub ptrx_before: f64,
    pub ptrx_during: f64,
    pub ptrx_ratio: f64,
    pub tat_before_p50_ms: f64,
    pub tat_during_p50_ms: f64,
    /// The longest time without an answer, with the client's 100 ms retry, and on a plain
    /// long-lived TCP connection without any.
    pub client_gap_ms: f64,
    pub tcp_gap_pool_ms: f64,
    /// Same boot, no transfer lost, balances conserved.
    pub continuity_ok: bool,
    pub source_removed: bool,
    pub vm: VmMigration,
}

#[derive(Debug, Serialize)]
pub struct MigrationSummary {
    pub runs: usize,
    pub t1_ms: f64,
    pub t2_ms: f64,
    pub t2_p95_ms: f64,
    pub t2_worst_ms: f64,
    pub ptrx_before: f64,
    pub ptrx_during: f64,
    /// Ptrx during over before: median and the worst run.
    pub ptrx_ratio: f64,
    pub ptrx_ratio_worst: f64,
}

/// The group's two backups, against the path they took.
#[derive(Debug, Serialize)]
pub struct BackupSummary {
    pub wan: String,
    /// The DC1.1 -> DC2.1 path: its lab rate and one-way delay.
    pub path_mbit_s: f64,
    pub one_way_ms: f64,
    /// The full backup's figures (the incremental one's are in `incremental`).
    pub t1_ms: f64,
    pub t2_ms: f64,
    pub bytes: u64,
    pub mbit_s: f64,
    /// `mbit_s` over the path's rate.
    pub rate_ratio: f64,
    pub most_delayed_arrival_ms: f64,
    pub mean_arrival_ms: f64,
    /// The physical floor of the most delayed arrival: bytes / path rate + one-way delay.
    pub floor_ms: f64,
    /// Transfers per second the group's clients got before and during the full backup.
    pub ptrx_before: f64,
    pub ptrx_during: f64,
    pub full: dczone_control::backup::GroupBackupReport,
    pub incremental: dczone_control::backup::GroupBackupReport,
}

/// One VM of the group restored at DC2.1, and its audit: every transfer its client had
/// acknowledged is sent again to the restored VM.
#[derive(Debug, Serialize)]
pub struct RestoreRun {
    /// Transfers the client had acknowledged when the VM was lost.
    pub acknowledged: u64,
    /// Those acknowledged before the incremental backup started: its checkpoint came after
    /// them, so the backup must hold each one (it must answer `DUP`).
    pub before_backup: u64,
    /// Of those, the ones the restored ledger did not hold (they answered `OK`, or
    /// nothing sensible): lost by the backup.
    pub lost: u64,
    /// Acknowledged after the backup started: applied by the replay (`OK`), or held
    /// already (`DUP`, the checkpoint came after them).
    pub replayed: u64,
    pub present: u64,
    /// Answers that were neither `OK` nor `DUP`, or missing, among those after.
    pub refused: u64,
    /// The restored ledger's checksum after the replay equals the lost VM's last one.
    pub checksum_match: bool,
    pub report: dczone_control::backup::RestoreReport,
}

#[derive(Debug, Serialize)]
pub struct RestoreSummary {
    /// The slowest VM's Trecovery and its breakdown.
    pub trecovery_ms: f64,
    pub volume_ms: f64,
    pub boot_ms: f64,
    /// Trecovery minus the boot, worst VM: the aim is 2 s.
    pub over_boot_ms: f64,
    pub replayed: u64,
    pub present: u64,
    pub refused: u64,
    pub lost: u64,
    pub vms: Vec<RestoreRun>,
}

/// DC1.1 lost under writes to region 1's stretched cluster.
#[derive(Debug, Serialize)]
pub struct SiteLoss {
    pub site: String,
    pub held_s: f64,
    /// The longest time without an acknowledged transfer (the client retries every
    /// 100 ms), and on a plain long-lived TCP connection without retries, ms.
    pub write_gap_ms: f64,
    pub tcp_gap_pool_ms: f64,
    /// Transfers per second before the loss and while the site was gone.
    pub ptrx_before: f64,
    pub ptrx_during: f64,
    /// Transfers acknowledged in all, and while the site was gone.
    pub acknowledged: u64,
    pub acknowledged_during: u64,
    /// Acknowledged transfers the ledger no longer held after a restart from its disk (they
    /// answered `OK` when sent again), and answers that were neither `OK` nor `DUP`.
    pub lost: u64,
    pub refused: u64,
    /// From the site's return until every PG of region 1 was active again, ms.
    pub recovered_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct Verdicts {
    /// Stretched p50 <= local p50 + RTT(100 km) + 1 ms.
    pub stretch_latency: bool,
    /// Every run's T2 < 1 s (KR1.1 across regions).
    pub migration_t2: bool,
    /// Every run's Ptrx during >= 0.8 x before.
    pub migration_ptrx: bool,
    /// Every run kept the guest's state and removed the source's image.
    pub continuity: bool,
    /// Both backups moved at >= 80 % of the path's rate.
    pub backup_rate: bool,
    /// Both backups' most delayed arrival <= 1.1 x bytes / path rate + one-way delay.
    pub backup_most_delayed: bool,
    /// The restore lost no acknowledged transfer (RPO = 0 after the replay).
    pub restore_rpo: bool,
    /// Every restored VM listened within its boot + 2 s.
    pub trecovery: bool,
    /// DC1.2 acknowledged writes while DC1.1 was gone, and none was lost.
    pub site_loss: bool,
}

#[derive(Debug, Serialize)]
pub struct StorageReport {
    #[serde(flatten)]
    pub header: Header,
    pub stretch: WriteLatency,
    pub local: WriteLatency,
    pub migration: MigrationSummary,
    pub migration_runs: Vec<MigrationRun>,
    pub backup: BackupSummary,
    pub restore: RestoreSummary,
    pub site_loss: SiteLoss,
    pub verdicts: Verdicts,
}

impl StorageReport {
    pub const VERSION: u32 = 2;

    pub fn pass(&self) -> bool {
        let v = &self.verdicts;
        v.stretch_latency
            && v.migration_t2
            && v.migration_ptrx
            && v.continuity
            && v.backup_rate
            && v.backup_most_delayed
            && v.restore_rpo
            && v.trecovery
            && v.site_loss
    }
}

/// Runs the scenario on the lab's reference zone (brought up, with its storage, if it is
/// not), and leaves the lab and its storage up.
pub fn storage(
    lab: &dczone_lab::Lab,
    agents: &LabAgents,
    o: &StorageOptions,
    observer: &dyn Observer,
) -> anyhow::Result<StorageReport> {
    if o.runs == 0 {
        anyhow::bail!("at least one migration run is needed");
    }
    let zone = lab.state()?.zone()?;
    observer.step("storage up");
    dczone_storage::operator::up(agents, &zone, &|m: &str| observer.step(m))?;
    lab.set_wan(o.wan)?;
    let report = scenarios(lab, agents, &zone, o, observer);
    if o.wan != dczone_zone::Wan::Apn {
        if let Err(e) = lab.set_wan(dczone_zone::Wan::Apn) {
            observer.warn(&format!("could not put the links back on the APN: {e}"));
        }
    }
    report
}

fn scenarios(
    lab: &dczone_lab::Lab,
    agents: &LabAgents,
    zone: &dczone_zone::Zone,
    o: &StorageOptions,
    observer: &dyn Observer,
) -> anyhow::Result<StorageReport> {
    observer.step("write latency: region 1 (stretched) from dc1.1-h1");
    let stretch = write_latency(lab, "dc1.1-h1", "region-1")?;
    observer.step("write latency: region 2 (local) from dc2.1-h1");
    let local = write_latency(lab, "dc2.1-h1", "region-2")?;

    destroy_if_present(agents, VM)?;
    observer.step(&format!("booting {VM} on dc1.1-h1 with a disk"));
    vms::boot_all(
        agents,
        &[dczone_virt::CreateVm {
            name: VM.into(),
            host: "dc1.1-h1".into(),
            memory_mib: 256,
            dirty_mbps: 1,
            dirty_mib: 16,
            resident_pct: dczone_virt::DEFAULT_RESIDENT_PCT,
            group: Some(GROUP.into()),
            disk_mib: Some(1536),
            disk_image: None,
        }],
    )?;
    let client = lab.host_namespace("dc1.1-client");
    let vm = agents
        .list()?
        .into_iter()
        .find(|v| v.spec.name == VM)
        .ok_or_else(|| anyhow::anyhow!("{VM} was not created"))?;
    let ip = Platform::guest_ip(&vm);
    let filled = dczone_workload::query_waiting(
        &client,
        ip,
        &format!("F {DATA_MIB}"),
        Some(Duration::from_secs(120)),
    )?;
    if !filled.starts_with("FILLED") {
        anyhow::bail!("{VM} did not write its data: {filled}");
    }
    let mut runs = Vec::new();
    for run in 0..o.runs {
        let at = agents.host_of(VM)?;
        let to_site = if at.starts_with("dc1.") {
            "dc2.1"
        } else {
            "dc1.1"
        };
        observer.step(&format!(
            "run {}/{}: {VM} {at} -> {to_site} with its disk",
            run + 1,
            o.runs
        ));
        runs.push(one_migration(agents, &client, ip, &at, to_site, observer)?);
    }
    // The VM goes with its disk; the clusters stay for the next scenario.
    destroy_if_present(agents, VM)?;

    let f = |sel: fn(&MigrationRun) -> f64| runs.iter().map(sel).collect::<Vec<f64>>();
    let (t2, ratio) = (f(|r| r.t2_ms), f(|r| r.ptrx_ratio));
    let migration = MigrationSummary {
        runs: runs.len(),
        t1_ms: quantile(&f(|r| r.t1_ms), 0.5),
        t2_ms: quantile(&t2, 0.5),
        t2_p95_ms: quantile(&t2, 0.95),
        t2_worst_ms: t2.iter().copied().fold(0.0, f64::max),
        ptrx_before: quantile(&f(|r| r.ptrx_before), 0.5),
        ptrx_during: quantile(&f(|r| r.ptrx_during), 0.5),
        ptrx_ratio: quantile(&ratio, 0.5),
        ptrx_ratio_worst: ratio.iter().copied().fold(f64::INFINITY, f64::min),
    };
    let (backup, restore) = backup_and_restore(lab, agents, zone, o.wan, observer)?;
    let site_loss = site_loss(lab, agents, zone, observer)?;
    let within_floor = |g: &dczone_control::backup::GroupBackupReport| {
        g.most_delayed_arrival_ms
            <= 1.1 * floor_ms(g.bytes, backup.path_mbit_s, 0.0) + backup.one_way_ms
    };
    let verdicts = Verdicts {
        stretch_latency: stretch.write_p50_ms <= local.write_p50_ms + STRETCH_RTT_MS * 2.0 + 1.0,
        migration_t2: runs.iter().all(|r| r.t2_ms < 1000.0),
        migration_ptrx: runs.iter().all(|r| r.ptrx_ratio >= 0.8),
        continuity: runs.iter().all(|r| r.continuity_ok && r.source_removed),
        backup_rate: [&backup.full, &backup.incremental]
            .iter()
            .all(|g| g.mbit_s >= 0.8 * backup.path_mbit_s),
        backup_most_delayed: within_floor(&backup.full) && within_floor(&backup.incremental),
        restore_rpo: restore.lost == 0
            && restore.refused == 0
            && restore.vms.iter().all(|r| r.checksum_match),
        trecovery: restore
            .vms
            .iter()
            .all(|r| r.report.trecovery_ms <= r.report.boot_ms + 2000.0),
        site_loss: site_loss.acknowledged_during > 0
            && site_loss.lost == 0
            && site_loss.refused == 0,
    };
    Ok(StorageReport {
        header: Header::new("storage", StorageReport::VERSION),
        stretch,
        local,
        migration,
        migration_runs: runs,
        backup,
        restore,
        site_loss,
        verdicts,
    })
}

/// DC1.1 cut off from every site for [`SITE_LOSS_HOLD`] while a VM of DC1.2 writes to the
/// stretched cluster under its client's steady load; then the site comes back, region 1
/// becomes whole again, and every acknowledged transfer is sent again to find any lost.
fn site_loss(
    lab: &dczone_lab::Lab,
    agents: &LabAgents,
    zone: &dczone_zone::Zone,
    observer: &dyn Observer,
) -> anyhow::Result<SiteLoss> {
    destroy_if_present(agents, SITE_LOSS_VM)?;
    observer.step(&format!(
        "booting {SITE_LOSS_VM} on {SITE_LOSS_HOST} with a disk in region 1"
    ));
    let vm = vms::boot(
        agents,
        &dczone_virt::CreateVm {
            name: SITE_LOSS_VM.into(),
            host: SITE_LOSS_HOST.into(),
            memory_mib: 256,
            dirty_mbps: 1,
            dirty_mib: 16,
            resident_pct: dczone_virt::DEFAULT_RESIDENT_PCT,
            group: None,
            disk_mib: Some(1536),
            disk_image: None,
        },
    )?;
    let ip = Platform::guest_ip(&vm);
    let client = lab.host_namespace(SITE_LOSS_CLIENT);
    let started = dczone_workload::now_us();
    let load = dczone_workload::start(&client, &[(SITE_LOSS_VM.into(), ip)], SITE_LOSS_RATE)?;
    std::thread::sleep(Duration::from_secs(3));
    observer.step(&format!(
        "{LOST_SITE} cut off for {} s under writes from {SITE_LOSS_CLIENT}",
        SITE_LOSS_HOLD.as_secs()
    ));
    let t0 = dczone_workload::now_us();
    let cut = lab.site_isolate(LOST_SITE, true);
    if cut.is_ok() {
        std::thread::sleep(SITE_LOSS_HOLD);
    }
    let t1 = dczone_workload::now_us();
    let back = lab.site_isolate(LOST_SITE, false);
    std::thread::sleep(Duration::from_secs(3));
    let report = load.finish(started, dczone_measure::Interval::new(t0, t1));
    cut?;
    back?;
    observer.step(&format!("{LOST_SITE} back: region 1 becoming whole again"));
    let t = std::time::Instant::now();
    dczone_storage::operator::up(agents, zone, &|m: &str| observer.step(m))?;
    let recovered_ms = t.elapsed().as_secs_f64() * 1e3;

    let ids: Vec<String> = report
        .acked
        .iter()
        .flat_map(|(_, a)| a.iter().map(|(id, _)| dczone_workload::transfer(*id)))
        .collect();
    // The ledger in memory remembers every transfer it applied, whatever the disk kept: a
    // restart rebuilds it from the journal on the disk, which is what the audit checks.
    observer.step(&format!(
        "restarting {SITE_LOSS_VM} from its disk, then sending the {} acknowledged transfers again",
        ids.len()
    ));
    vms::stop(agents, SITE_LOSS_VM)?;
    vms::start(agents, SITE_LOSS_VM)?;
    let t = std::time::Instant::now();
    while checksum_of(&client, ip).is_none() {
        if t.elapsed() > Duration::from_secs(120) {
            anyhow::bail!("{SITE_LOSS_VM} did not serve again within 120 s of its restart");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let (lost, _, refused) = send_again(agents, SITE_LOSS_HOST, SITE_LOSS_VM, &ids)?;
    destroy_if_present(agents, SITE_LOSS_VM)?;
    let held_s = t1.saturating_sub(t0) as f64 / 1e6;
    Ok(SiteLoss {
        site: LOST_SITE.into(),
        held_s,
        write_gap_ms: report.client_gap_ms,
        tcp_gap_pool_ms: report.tcp_gap_pool_ms,
        ptrx_before: report.before.tps,
        ptrx_during: report.during.tps,
        acknowledged: ids.len() as u64,
        // The phase's rate is its count over its length.
        acknowledged_during: (report.during.tps * held_s).round() as u64,
        lost,
        refused,
        recovered_ms,
    })
}

/// The time `bytes` take at `mbit_s`, plus `one_way_ms`.
fn floor_ms(bytes: u64, mbit_s: f64, one_way_ms: f64) -> f64 {
    bytes as f64 * 8.0 / (mbit_s * 1e6) * 1e3 + one_way_ms
}

/// The group booted in DC1.1 with data at rest, backed up twice to DC2.1 under its clients'
/// load, then lost and restored at DC2.1 from the incremental backup with the clients' log
/// replayed. The group and its backups are removed at the end.
fn backup_and_restore(
    lab: &dczone_lab::Lab,
    agents: &LabAgents,
    zone: &dczone_zone::Zone,
    wan: dczone_zone::Wan,
    observer: &dyn Observer,
) -> anyhow::Result<(BackupSummary, RestoreSummary)> {
    let link = lab
        .status()?
        .links
        .into_iter()
        .find(|l| {
            (l.a == SOURCE_SITE && l.b == STORE_SITE) || (l.a == STORE_SITE && l.b == SOURCE_SITE)
        })
        .ok_or_else(|| anyhow::anyhow!("the zone has no link {SOURCE_SITE} - {STORE_SITE}"))?;
    let path_mbit_s = link.lab_bandwidth_bps as f64 / 1e6;
    let one_way_ms = link.one_way_delay_ms;
    let restored = |vm: &str| format!("{vm}r");
    let clean = || -> anyhow::Result<()> {
        for (vm, _) in BACKUP_VMS {
            destroy_if_present(agents, vm)?;
            destroy_if_present(agents, &restored(vm))?;
        }
        let mut backups = dczone_control::backup::list(agents, zone, STORE_SITE)?;
        // An incremental backup before the one it is based on.
        backups.sort_by_key(|m| std::cmp::Reverse(m.created_unix_ms));
        for m in backups {
            if BACKUP_VMS.iter().any(|(vm, _)| m.vm == *vm) {
                dczone_control::backup::delete(agents, zone, STORE_SITE, &m.id)?;
            }
        }
        Ok(())
    };
    clean()?;
    observer.step(&format!(
        "booting group {BACKUP_GROUP} ({} VMs with disks) in {SOURCE_SITE}",
        BACKUP_VMS.len()
    ));
    let specs: Vec<dczone_virt::CreateVm> = BACKUP_VMS
        .iter()
        .map(|(vm, host)| dczone_virt::CreateVm {
            name: (*vm).into(),
            host: (*host).into(),
            memory_mib: 256,
            dirty_mbps: 1,
            dirty_mib: 16,
            resident_pct: dczone_virt::DEFAULT_RESIDENT_PCT,
            group: Some(BACKUP_GROUP.into()),
            disk_mib: Some(1536),
            disk_image: None,
        })
        .collect();
    vms::boot_all(agents, &specs)?;
    let client = lab.host_namespace("dc1.1-client");
    let all = agents.list()?;
    let targets: Vec<(String, std::net::Ipv4Addr)> = BACKUP_VMS
        .iter()
        .map(|(vm, _)| {
            all.iter()
                .find(|v| v.spec.name == *vm)
                .map(|v| ((*vm).to_string(), Platform::guest_ip(v)))
                .ok_or_else(|| anyhow::anyhow!("{vm} was not created"))
        })
        .collect::<anyhow::Result<_>>()?;
    let fill = |mib: u32| -> anyhow::Result<()> {
        for (vm, ip) in &targets {
            let filled = dczone_workload::query_waiting(
                &client,
                *ip,
                &format!("F {mib}"),
                Some(Duration::from_secs(120)),
            )?;
            if !filled.starts_with("FILLED") {
                anyhow::bail!("{vm} did not write its data: {filled}");
            }
        }
        Ok(())
    };
    observer.step(&format!("writing {BACKUP_DATA_MIB} MiB on each VM's disk"));
    fill(BACKUP_DATA_MIB)?;

    let started = dczone_workload::now_us();
    let load = dczone_workload::start(&client, &targets, BACKUP_LOAD_RATE)?;
    std::thread::sleep(Duration::from_secs(2));
    observer.step(&format!(
        "full backup of group {BACKUP_GROUP} to {STORE_SITE} under load"
    ));
    let t0 = dczone_workload::now_us();
    let full = dczone_control::backup::create_group(agents, zone, BACKUP_GROUP, STORE_SITE, 4);
    let t1 = dczone_workload::now_us();
    let incremental = full.and_then(|full| {
        observer.step(&format!("rewriting {INCREMENT_MIB} MiB on each VM's disk"));
        fill(INCREMENT_MIB)?;
        observer.step(&format!("incremental backup of group {BACKUP_GROUP}"));
        let started = dczone_workload::now_us();
        let incr = dczone_control::backup::create_group(agents, zone, BACKUP_GROUP, STORE_SITE, 4)?;
        // Transfers after the last checkpoint: only the replay brings them back.
        std::thread::sleep(Duration::from_secs(2));
        Ok((full, incr, started))
    });
    let load = load.finish(started, dczone_measure::Interval::new(t0, t1));
    let (full, incremental, incremental_started) = incremental?;
    // The group's last state as its clients left it, then the group is lost.
    let mut last = Vec::new();
    for (vm, ip) in &targets {
        last.push(
            checksum_of(&client, *ip).ok_or_else(|| anyhow::anyhow!("{vm} did not answer S"))?,
        );
        vms::stop(agents, vm)?;
    }

    let mut restores = Vec::new();
    for ((vm, _), before) in targets.iter().zip(last) {
        let acked: &[(u64, u64)] = load
            .acked
            .iter()
            .find(|(v, _)| v == vm)
            .map_or(&[], |(_, a)| a.as_slice());
        // (id, acknowledged at us), before the incremental backup started and after.
        type Acked<'a> = Vec<&'a (u64, u64)>;
        let (held, after): (Acked, Acked) =
            acked.iter().partition(|(_, at)| *at < incremental_started);
        let lines = |a: &[&(u64, u64)]| -> Vec<String> {
            a.iter()
                .map(|(id, _)| dczone_workload::transfer(*id))
                .collect()
        };
        observer.step(&format!(
            "restoring {vm} at {STORE_SITE}, then sending its {} acknowledged transfers again",
            acked.len()
        ));
        // The restore's own replay gets those the backup must hold: each must answer DUP.
        let report = dczone_control::backup::restore(
            agents,
            zone,
            vm,
            STORE_SITE,
            None,
            &restored(vm),
            None,
            &lines(&held),
        )?;
        let (ok, dup, other) = send_again(agents, &report.host, &restored(vm), &lines(&after))?;
        let ns = lab.host_namespace(&report.host);
        let ip = Platform::guest_ip(&vms::show(agents, &restored(vm))?.1);
        let checksum = checksum_of(&ns, ip);
        restores.push(RestoreRun {
            acknowledged: acked.len() as u64,
            before_backup: held.len() as u64,
            lost: (held.len() as u64).saturating_sub(report.present),
            replayed: ok,
            present: report.present + dup,
            refused: other,
            checksum_match: checksum.as_deref() == Some(before.as_str()),
            report,
        });
    }
    if let Err(e) = clean() {
        observer.warn(&format!("the backup scenario's VMs or backups stay: {e:#}"));
    }

    let worst = restores
        .iter()
        .max_by(|a, b| a.report.trecovery_ms.total_cmp(&b.report.trecovery_ms))
        .ok_or_else(|| anyhow::anyhow!("no VM was restored"))?;
    let sum = |f: fn(&RestoreRun) -> u64| restores.iter().map(f).sum::<u64>();
    let restore = RestoreSummary {
        trecovery_ms: worst.report.trecovery_ms,
        volume_ms: worst.report.volume_ms,
        boot_ms: worst.report.boot_ms,
        over_boot_ms: restores
            .iter()
            .map(|r| r.report.trecovery_ms - r.report.boot_ms)
            .fold(0.0, f64::max),
        replayed: sum(|r| r.replayed),
        present: sum(|r| r.present),
        refused: sum(|r| r.refused),
        lost: sum(|r| r.lost),
        vms: restores,
    };
    let backup = BackupSummary {
        wan: wan.to_string(),
        path_mbit_s,
        one_way_ms,
        t1_ms: full.t1_ms,
        t2_ms: full.t2_ms,
        bytes: full.bytes,
        mbit_s: full.mbit_s,
        rate_ratio: full.mbit_s / path_mbit_s,
        most_delayed_arrival_ms: full.most_delayed_arrival_ms,
        mean_arrival_ms: full.mean_arrival_ms,
        floor_ms: floor_ms(full.bytes, path_mbit_s, one_way_ms),
        ptrx_before: load.before.tps,
        ptrx_during: load.during.tps,
        full,
        incremental,
    };
    Ok((backup, restore))
}

/// Sends transfers again to VM `name`'s ledger through its host's agent; how many answered
/// `OK` (applied now), `DUP` (held already), and anything else or nothing.
fn send_again(
    agents: &LabAgents,
    host: &str,
    name: &str,
    requests: &[String],
) -> anyhow::Result<(u64, u64, u64)> {
    let (mut ok, mut dup, mut other) = (0, 0, 0);
    for batch in requests.chunks(500) {
        let v = agents.call(
            host,
            "POST",
            &format!("/v1/vms/{name}/ledger"),
            Some(serde_json::json!({ "requests": batch })),
            Duration::from_secs(60),
        )?;
        let answers: Vec<&str> = v
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| a.as_str().unwrap_or_default())
            .collect();
        for a in &answers {
            if a.starts_with("OK ") {
                ok += 1;
            } else if a.starts_with("DUP ") {
                dup += 1;
            } else {
                other += 1;
            }
        }
        other += batch.len().saturating_sub(answers.len()) as u64;
    }
    Ok((ok, dup, other))
}

/// The ledger's checksum (`S`), if the guest answers.
fn checksum_of(ns: &str, ip: std::net::Ipv4Addr) -> Option<String> {
    let s = dczone_workload::query(ns, ip, "S").ok()?;
    s.split_whitespace()
        .find_map(|kv| kv.strip_prefix("checksum="))
        .map(str::to_string)
}

/// `rbd bench` batches on a scratch image of `cluster`, from `host`'s namespace with the
/// hypervisors' client (what a VM's QEMU uses).
fn write_latency(lab: &dczone_lab::Lab, host: &str, cluster: &str) -> anyhow::Result<WriteLatency> {
    let ns = lab.host_namespace(host);
    let conf = dczone_storage::host::lab_root(lab.dir(), host)
        .join(cluster)
        .join("ceph.conf");
    let image = "rbd/bench-latency";
    let rbd = |args: &[&str]| -> anyhow::Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &ns, "timeout", "120", "rbd", "-c"])
            .arg(&conf)
            .args(["--id", dczone_storage::host::VM_USER])
            .args(args)
            .output()?;
        if !out.status.success() {
            anyhow::bail!(
                "rbd {} on {host} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let _ = rbd(&["rm", "--no-progress", image]);
    rbd(&["create", "--size", "256M", image])?;
    let total = format!("{}K", WRITES_PER_BATCH * 4);
    let mut batches_ms = Vec::new();
    let result = (|| -> anyhow::Result<()> {
        for _ in 0..LATENCY_BATCHES {
            rbd(&[
                "bench",
                image,
                "--io-type",
                "write",
                "--io-size",
                "4K",
                "--io-threads",
                "1",
                "--io-total",
                &total,
                "--io-pattern",
                "rand",
            ])
            .and_then(|out| {
                // "elapsed: 0   ops: 128   ops/sec: 1032.26   bytes/sec: 4.0 MiB/s"
                let rate = out
                    .lines()
                    .rev()
                    .find_map(|l| l.split_whitespace().skip_while(|w| *w != "ops/sec:").nth(1))
                    .and_then(|s| s.parse::<f64>().ok())
                    .filter(|r| *r > 0.0)
                    .ok_or_else(|| {
                        anyhow::anyhow!("no ops/sec in rbd bench's output on {host}: {out}")
                    })?;
                batches_ms.push(1e3 / rate);
                Ok(())
            })?;
        }
        Ok(())
    })();
    let _ = rbd(&["rm", "--no-progress", image]);
    result?;
    Ok(WriteLatency {
        cluster: cluster.into(),
        host: host.into(),
        write_p50_ms: quantile(&batches_ms, 0.5),
        write_p95_ms: quantile(&batches_ms, 0.95),
        write_worst_ms: batches_ms.iter().copied().fold(0.0, f64::max),
        batches_ms,
    })
}

fn one_migration(
    agents: &LabAgents,
    client: &str,
    ip: std::net::Ipv4Addr,
    from: &str,
    to_site: &str,
    observer: &dyn Observer,
) -> anyhow::Result<MigrationRun> {
    let (boot0, proc0, _) = guest_stats(client, ip);
    let started = dczone_workload::now_us();
    let load = dczone_workload::start(client, &[(VM.to_string(), ip)], SATURATING_RATE)?;
    std::thread::sleep(Duration::from_secs(2));
    let t0 = dczone_workload::now_us();
    let g = agents.agents.migrate_group(
        GROUP,
        to_site,
        Strategy::Coordinated,
        &Params::default(),
        &|p| observer.migration(p),
    );
    let t1 = dczone_workload::now_us();
    observer.migration_ended();
    std::thread::sleep(Duration::from_secs(1));
    let report = load.finish(started, dczone_measure::Interval::new(t0, t1));
    let g = g?;
    let m = g
        .vms
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("the migration reported no VM"))?;
    let disk = m
        .disk
        .clone()
        .ok_or_else(|| anyhow::anyhow!("{VM}'s disk did not go along to {to_site}"))?;
    let (boot1, proc1, sum1) = guest_stats(client, ip);
    let continuity_ok =
        !boot0.is_empty() && boot0 == boot1 && proc1 >= proc0 && sum1 == TOTAL_BALANCE;
    Ok(MigrationRun {
        from: from.into(),
        to: m.to.clone(),
        t1_ms: m.t1_ms,
        t2_ms: m.t2_ms,
        copy_ms: disk.copy_ms,
        completion_ms: disk.completion_ms,
        mirrored_mib: disk.mirrored_bytes as f64 / 1048576.0,
        memory_mib: m.bytes_sent as f64 / 1048576.0,
        ptrx_before: report.before.tps,
        ptrx_during: report.during.tps,
        ptrx_ratio: if report.before.tps > 0.0 {
            report.during.tps / report.before.tps
        } else {
            0.0
        },
        tat_before_p50_ms: report.before.p50_ms,
        tat_during_p50_ms: report.during.p50_ms,
        client_gap_ms: report.client_gap_ms,
        tcp_gap_pool_ms: report.tcp_gap_pool_ms,
        continuity_ok,
        source_removed: disk.source_removed,
        vm: m,
    })
}
