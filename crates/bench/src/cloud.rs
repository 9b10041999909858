//! Issue 13's scenario: VMs of DC1.2 (the standby site, "a system test when adding a new
//! financial service") migrated to the public cloud one after another, `runs` times, each
//! phase timed (SPEC.md §3, UC1-#2), through the cloud's API only.
//!
//! Per VM: T1 from the export's start until its application answers in the cloud, against
//! its physical floor (the image's bytes at the path's rate, plus the instance's boot to
//! service as the cloud's console log shows it); the upload's rate against the APN path's
//! and its most delayed part; how the two clocks agree.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use dczone_control::cloud::{self, VmReport};
use dczone_control::vms::{self, destroy_if_present};
use dczone_control::ZoneAgents;
use dczone_virt::Platform;

use crate::{quantile, Header, Observer};

/// The source site, and where the VMs' clients (and the operator) are.
const SOURCE_SITE: &str = "dc1.2";
const SOURCE_HOSTS: [&str; 2] = ["dc1.2-h1", "dc1.2-h2"];
const CLIENT_HOST: &str = "dc1.1-client";

#[derive(Debug, Clone)]
pub struct CloudOptions {
    pub runs: u32,
    pub vms: usize,
    /// Data at rest written into each VM's disk before the runs, MiB.
    pub data_mib: u32,
    pub format: String,
    /// The AP-DB comparison after the migrations ([`crate::ap_db`]); `None` skips it.
    pub ap_db: Option<crate::ap_db::ApDbOptions>,
}

/// Median, 95th percentile and worst of one figure over every VM of every run.
#[derive(Debug, Clone, Serialize)]
pub struct Spread {
    pub median: f64,
    pub p95: f64,
    pub worst: f64,
}

pub(crate) fn spread(v: &[f64], worst_is_max: bool) -> Spread {
    Spread {
        median: quantile(v, 0.5),
        p95: if worst_is_max {
            quantile(v, 0.95)
        } else {
            quantile(v, 0.05)
        },
        worst: if worst_is_max {
            v.iter().copied().fold(f64::NAN, f64::max)
        } else {
            v.iter().copied().fold(f64::NAN, f64::min)
        },
    }
}

/// One VM's migration in one run, with its floor.
#[derive(Debug, Clone, Serialize)]
pub struct VmRun {
    pub run: u32,
    #[serde(flatten)]
    pub report: VmReport,
    /// Image bytes at the path's rate, ms.
    pub transfer_floor_ms: f64,
    /// Transfer floor plus the boot to service, ms.
    pub t1_floor_ms: f64,
    pub t1_over_floor: f64,
    /// The upload's rate while a part was in flight, against the path's: a streamed
    /// image waits for its source's read, which is not the transfer's.
    pub transfer_share: f64,
    /// Its bytes over the whole transfer phase, against the path's.
    pub transfer_share_wall: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CloudReport {
    #[serde(flatten)]
    pub header: Header,
    pub format: String,
    pub data_mib: u32,
    pub runs: u32,
    /// Every VM of every run.
    pub vms: Vec<VmRun>,
    /// Each run's whole batch, ms.
    pub t1_total_ms: Vec<f64>,
    pub t1_ms: Spread,
    pub t1_over_floor: Spread,
    /// The upload's rate (median over VMs and runs), Mbit/s, and the path's.
    pub transfer_mbit_s: f64,
    pub path_mbit_s: f64,
    /// Rate while a part was in flight over the path's rate: median, 5th percentile
    /// ("p95" of the worst side), worst.
    pub transfer_share: Spread,
    /// The same over the whole transfer phase (a streamed image's waits included).
    pub transfer_share_wall: Spread,
    pub most_delayed_part_ms: Spread,
    /// Every import's start, logged by the cloud, lay between this side's request and
    /// its answer.
    pub clocks_agree: bool,
    /// Every source VM still ran after every run.
    pub sources_running: bool,
    /// The AP-DB comparison's medians ([`crate::ap_db`]), and its whole report.
    pub tat_dc_dc_ms: Option<f64>,
    pub tat_pub_dc_ms: Option<f64>,
    pub p_dc_dc: Option<f64>,
    pub p_pub_dc: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ap_db: Option<crate::ap_db::ApDbReport>,
    /// Why the AP-DB comparison did not finish (it then fails the verdict).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ap_db_error: Option<String>,
}

impl CloudReport {
    /// 2: the AP-DB comparison (`tat_*`, `p_*`, `ap_db`, `ap_db_error`). 3: a streamed
    /// image (VMDK, raw): `transfer_share` while a part was in flight,
    /// `transfer_share_wall` over the phase; `vms[].parts`, `vms[].transfer_busy_ms`.
    pub const VERSION: u32 = 3;

    /// The targets: transfer at least 80 % of the path, T1 within 1.3x its
    /// floor, on every VM of every run; the sources never stopped; the AP's extra
    /// turnaround in the cloud within 20 % of its round trips' ([`ApDbReport::pass`]).
    ///
    /// [`ApDbReport::pass`]: crate::ap_db::ApDbReport::pass
    pub fn pass(&self) -> bool {
        self.sources_running
            && self.transfer_share.worst >= 0.8
            && self.t1_over_floor.worst <= 1.3
            && self.ap_db.as_ref().is_none_or(|a| a.pass())
            && self.ap_db_error.is_none()
    }
}

fn vm_name(i: usize) -> String {
    format!("cb-app{}", i + 1)
}

pub fn cloud(
    lab: &dczone_lab::Lab,
    exe: &Path,
    state_dir: &Path,
    o: &CloudOptions,
    observer: &dyn Observer,
) -> anyhow::Result<CloudReport> {
    if o.runs == 0 || o.vms == 0 {
        anyhow::bail!("at least one run of one VM is needed");
    }
    let agents = crate::migration::reference_agents(lab, exe, state_dir)?;
    let zone = lab.state()?.zone()?;
    observer.step("storage up (the VMs' disks)");
    dczone_storage::operator::up(&agents, &zone, &|m: &str| observer.step(m))?;
    observer.step("the cloud provider up");
    let account = cloud::lab_up(lab, exe, &|m| observer.step(m))?;
    let path_mbit_s =
        crate::migration::site_path_mbit_s(&zone, SOURCE_SITE, &cloud::cloud_site(&zone)?.id);

    let names: Vec<String> = (0..o.vms).map(vm_name).collect();
    for n in &names {
        destroy_if_present(&agents, n)?;
    }
    observer.step(&format!(
        "booting {} VMs in {SOURCE_SITE} with disks",
        o.vms
    ));
    let create: Vec<dczone_virt::CreateVm> = names
        .iter()
        .enumerate()
        .map(|(i, n)| dczone_virt::CreateVm {
            name: n.clone(),
            host: SOURCE_HOSTS[i % SOURCE_HOSTS.len()].into(),
            memory_mib: 256,
            dirty_mbps: 0,
            dirty_mib: 0,
            resident_pct: dczone_virt::DEFAULT_RESIDENT_PCT,
            group: None,
            disk_mib: Some(1536),
            disk_image: None,
        })
        .collect();
    vms::boot_all(&agents, &create)?;
    let client = lab.host_namespace(CLIENT_HOST);
    for n in &names {
        let vm = agents
            .list()?
            .into_iter()
            .find(|v| &v.spec.name == n)
            .ok_or_else(|| anyhow::anyhow!("{n} was not created"))?;
        let filled = dczone_workload::query_waiting(
            &client,
            Platform::guest_ip(&vm),
            &format!("F {}", o.data_mib),
            Some(Duration::from_secs(120)),
        )?;
        if !filled.starts_with("FILLED") {
            anyhow::bail!("{n} did not write its data: {filled}");
        }
    }

    let mut all = Vec::new();
    let mut totals = Vec::new();
    let mut sources_running = true;
    for run in 1..=o.runs {
        observer.step(&format!("run {run}/{}: {} VMs to the cloud", o.runs, o.vms));
        let (lab2, exe2, dir2) = (lab.clone(), exe.to_path_buf(), PathBuf::from(state_dir));
        let (acc, ns, fmt) = (account.clone(), names.clone(), o.format.clone());
        let report = cloud::from_client(lab, move || -> anyhow::Result<cloud::MigrateReport> {
            let agents = dczone_control::lab_agents(&lab2, &exe2, &dir2)?;
            let r = cloud::migrate(
                &agents,
                &acc,
                &ns,
                &cloud::MigrateOptions::new(&fmt),
                &|ip| cloud::app_answers(ip, cloud::PROBE_TIMEOUT),
                &|_| {},
            );
            // The instances, images, groups and objects go after each run: imported
            // images filled the cloud's storage run after run.
            if let Ok(r) = &r {
                for v in &r.vms {
                    let _ = cloud::inventory::remove_migrated(&acc, v);
                }
            }
            r
        })??;
        sources_running &= report.source_running;
        totals.push(report.t1_total_ms);
        for v in report.vms {
            let transfer_floor_ms = v.object_bytes as f64 * 8.0 / (path_mbit_s * 1e6) * 1e3;
            let t1_floor_ms = transfer_floor_ms + v.boot_ms.unwrap_or(f64::NAN);
            all.push(VmRun {
                run,
                transfer_floor_ms,
                t1_floor_ms,
                t1_over_floor: v.t1_ms / t1_floor_ms,
                transfer_share: if v.transfer_busy_ms > 0.0 {
                    v.object_bytes as f64 * 8.0 / (v.transfer_busy_ms / 1e3) / 1e6 / path_mbit_s
                } else {
                    v.transfer_mbit_s / path_mbit_s
                },
                transfer_share_wall: v.transfer_mbit_s / path_mbit_s,
                report: v,
            });
        }
    }
    for n in &names {
        destroy_if_present(&agents, n)?;
    }
    // A failed comparison is reported with the migrations' figures, not instead of them.
    let (ap_db, ap_db_error) = match &o.ap_db {
        Some(a) => match crate::ap_db::run(lab, exe, state_dir, &agents, &account, a, observer) {
            Ok(r) => (Some(r), None),
            Err(e) => (None, Some(format!("{e:#}"))),
        },
        None => (None, None),
    };
    let f = |sel: fn(&VmRun) -> f64| all.iter().map(sel).collect::<Vec<f64>>();
    Ok(CloudReport {
        header: Header::new("cloud", CloudReport::VERSION),
        format: o.format.clone(),
        data_mib: o.data_mib,
        runs: o.runs,
        t1_total_ms: totals,
        t1_ms: spread(&f(|v| v.report.t1_ms), true),
        t1_over_floor: spread(&f(|v| v.t1_over_floor), true),
        transfer_mbit_s: quantile(&f(|v| v.report.transfer_mbit_s), 0.5),
        path_mbit_s,
        transfer_share: spread(&f(|v| v.transfer_share), false),
        transfer_share_wall: spread(&f(|v| v.transfer_share_wall), false),
        most_delayed_part_ms: spread(&f(|v| v.report.most_delayed_part_ms), true),
        clocks_agree: all.iter().all(|v| v.report.clock.agree),
        sources_running,
        vms: all,
        tat_dc_dc_ms: ap_db.as_ref().map(|a| a.tat_dc_dc_ms),
        tat_pub_dc_ms: ap_db.as_ref().map(|a| a.tat_pub_dc_ms),
        p_dc_dc: ap_db.as_ref().map(|a| a.p_dc_dc),
        p_pub_dc: ap_db.as_ref().map(|a| a.p_pub_dc),
        ap_db,
        ap_db_error,
    })
}
