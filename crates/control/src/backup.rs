//! `backup create|list|verify|delete|restore`: snapshot backups of VM disks to another
//! site's storage cluster, and recovery there, through the hosts' agents
//! (`dczone_storage::backup` has the format; the agent's `storage` module the steps).
//!
//! Metrics (SPEC.md §7):
//! - **T1**: the checkpoint (the guest's sync point) and the snapshot;
//! - **T2**: the transfer (every chunk checked and stored at the store) and the commit
//!   (the manifest: the backup exists);
//! - **arrivals**: when each chunk's last byte reached the store, from the transfer's
//!   start; the backup is as fast as its **most delayed** arrival, not its mean;
//! - **Trecovery**: from the restore's start until the VM's service listens again:
//!   `volume_ms` (chunks checked, image imported) + `boot_ms`.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde::Serialize;
use serde_json::json;

use dczone_agent::storage::{BackupDone, ChunkTiming};
use dczone_storage::backup::Manifest;
use dczone_storage::plan::{self, ClusterPlan};
use dczone_storage::PoolSpace;
use dczone_zone::Zone;

use crate::ZoneAgents;

const CALL: Duration = Duration::from_secs(60);
const BACKUP_CALL: Duration = Duration::from_secs(900);

/// The storage cluster of `site` and the host that keeps its backup store (its first
/// monitor's).
pub fn store_of(zone: &Zone, site: &str) -> anyhow::Result<(ClusterPlan, String)> {
    let clusters = plan::clusters(zone);
    let c = plan::cluster_of_site(&clusters, site)
        .ok_or_else(|| {
            anyhow!(
                "site {site} has no storage cluster; sites with storage: {}",
                clusters
                    .iter()
                    .flat_map(|c| c.sites.clone())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?
        .clone();
    let host = c.admin_hosts()[0].clone();
    Ok((c, host))
}

/// What `backup create` measured.
#[derive(Debug, Clone, Serialize)]
pub struct BackupReport {
    pub id: String,
    pub vm: String,
    pub to: String,
    pub full: bool,
    pub parent: Option<String>,
    /// The guest's journal position at the checkpoint.
    pub checkpoint: Option<u64>,
    pub t1_ms: f64,
    pub t2_ms: f64,
    pub checkpoint_ms: f64,
    pub snapshot_ms: f64,
    pub transfer_ms: f64,
    pub commit_ms: f64,
    pub bytes: u64,
    /// Bytes over the transfer's time.
    pub mbit_s: f64,
    pub chunks: usize,
    pub most_delayed_arrival_ms: f64,
    pub mean_arrival_ms: f64,
    /// The transfer's start (unix ms, the source host's clock): `arrivals` count from it.
    pub transfer_start_unix_ms: u64,
    pub arrivals: Vec<ChunkTiming>,
}

/// What `backup create --group` measured: the group's VMs backed up at once, each from its
/// own checkpoint, their chunks sharing the path to the store.
#[derive(Debug, Clone, Serialize)]
pub struct GroupBackupReport {
    pub group: String,
    pub to: String,
    /// The slowest VM's checkpoint and snapshot.
    pub t1_ms: f64,
    /// From the first VM's transfer start until the last VM's backup is committed.
    pub t2_ms: f64,
    /// The whole command, with finding the VMs' parents and orphans in the store first.
    pub wall_ms: f64,
    pub bytes: u64,
    /// Every VM's bytes over the time from the first transfer's start to the last chunk's
    /// arrival.
    pub mbit_s: f64,
    pub chunks: usize,
    /// Arrivals of every VM's chunks, from the first transfer's start.
    pub most_delayed_arrival_ms: f64,
    pub mean_arrival_ms: f64,
    pub vms: Vec<BackupReport>,
}

/// The VMs of `group`, by name.
pub fn group_members(agents: &dyn ZoneAgents, group: &str) -> anyhow::Result<Vec<String>> {
    let mut vms: Vec<String> = agents
        .list()?
        .into_iter()
        .filter(|v| v.group.as_deref() == Some(group))
        .map(|v| v.spec.name)
        .collect();
    vms.sort();
    if vms.is_empty() {
        bail!("no VM is in group '{group}' (`vm create --group`)");
    }
    Ok(vms)
}

/// `backup create --group G --to SITE`: every VM of the group at once. A VM whose backup
/// fails fails the group (the others' backups stay: each is whole on its own).
pub fn create_group(
    agents: &(dyn ZoneAgents + Sync),
    zone: &Zone,
    group: &str,
    to: &str,
    streams: usize,
) -> anyhow::Result<GroupBackupReport> {
    let vms = group_members(agents, group)?;
    let t = Instant::now();
    // The store is read once for the whole group, and its room shared by the group's VMs.
    let mut store = Store::read(agents, zone, to)?;
    store.refuse_if_full(agents, &vms, to, &format!("the backups of group {group}"))?;
    let store = &store;
    let share = vms.len() as u64;
    let results: Vec<anyhow::Result<BackupReport>> = std::thread::scope(|s| {
        let handles: Vec<_> = vms
            .iter()
            .map(|vm| s.spawn(move || create_in(agents, store, vm, to, streams, share)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("a backup thread panicked")))
            })
            .collect()
    });
    let wall_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut reports = Vec::new();
    let mut failed = Vec::new();
    for (vm, r) in vms.iter().zip(results) {
        match r {
            Ok(r) => reports.push(r),
            Err(e) => failed.push(format!("VM {vm}: {}", e.root_cause())),
        }
    }
    if !failed.is_empty() {
        let made: Vec<&str> = reports.iter().map(|r| r.id.as_str()).collect();
        bail!(
            "group {group}: {} of {} backups failed ({}); made, each whole on its own: {}",
            failed.len(),
            vms.len(),
            failed.join("; "),
            if made.is_empty() {
                "none".to_string()
            } else {
                made.join(", ")
            }
        );
    }
    let t1_ms = reports.iter().map(|r| r.t1_ms).fold(0.0, f64::max);
    let start = reports
        .iter()
        .map(|r| r.transfer_start_unix_ms)
        .min()
        .unwrap_or(0);
    let arrivals: Vec<f64> = reports
        .iter()
        .flat_map(|r| {
            let offset = r.transfer_start_unix_ms.saturating_sub(start) as f64;
            r.arrivals.iter().map(move |c| offset + c.arrived_ms)
        })
        .collect();
    let most_delayed = arrivals.iter().copied().fold(0.0, f64::max);
    let bytes = reports.iter().map(|r| r.bytes).sum();
    let committed = reports
        .iter()
        .map(|r| {
            r.transfer_start_unix_ms.saturating_sub(start) as f64 + r.transfer_ms + r.commit_ms
        })
        .fold(0.0, f64::max);
    Ok(GroupBackupReport {
        group: group.into(),
        to: to.into(),
        t1_ms,
        t2_ms: committed,
        wall_ms,
        bytes,
        mbit_s: if most_delayed > 0.0 {
            bytes as f64 * 8.0 / (most_delayed / 1e3) / 1e6
        } else {
            0.0
        },
        chunks: arrivals.len(),
        mean_arrival_ms: if arrivals.is_empty() {
            0.0
        } else {
            arrivals.iter().sum::<f64>() / arrivals.len() as f64
        },
        most_delayed_arrival_ms: most_delayed,
        vms: reports,
    })
}

/// The backups of the store at `site`.
pub fn list(agents: &dyn ZoneAgents, zone: &Zone, site: &str) -> anyhow::Result<Vec<Manifest>> {
    let (c, host) = store_of(zone, site)?;
    let v = agents.call(
        &host,
        "GET",
        &format!("/v1/backup-store/{}", c.name),
        None,
        CALL,
    )?;
    Ok(serde_json::from_value(v)?)
}

/// `backup create VM --to SITE`.
pub fn create(
    agents: &dyn ZoneAgents,
    zone: &Zone,
    vm: &str,
    to: &str,
    streams: usize,
) -> anyhow::Result<BackupReport> {
    let mut store = Store::read(agents, zone, to)?;
    store.refuse_if_full(
        agents,
        &[vm.to_string()],
        to,
        &format!("a backup of VM {vm}"),
    )?;
    create_in(agents, &store, vm, to, streams, 1)
}

/// What a backup needs of its store before it starts: where it is, its backups (for the
/// parent), its cut transfers' ids, and its room.
struct Store {
    cluster: ClusterPlan,
    host: String,
    manifests: Vec<Manifest>,
    orphans: Vec<String>,
    space: PoolSpace,
}

impl Store {
    fn read(agents: &dyn ZoneAgents, zone: &Zone, to: &str) -> anyhow::Result<Store> {
        let (cluster, host) = store_of(zone, to)?;
        let orphans = agents.call(
            &host,
            "GET",
            &format!("/v1/backup-store/{}/orphans", cluster.name),
            None,
            CALL,
        )?;
        let orphans = orphans
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        Ok(Store {
            manifests: list(agents, zone, to)?,
            space: Store::space(agents, &cluster.name, &host)?,
            cluster,
            host,
            orphans,
        })
    }

    fn space(agents: &dyn ZoneAgents, cluster: &str, host: &str) -> anyhow::Result<PoolSpace> {
        let v = agents.call(
            host,
            "GET",
            &format!("/v1/backup-store/{cluster}/space"),
            None,
            CALL,
        )?;
        serde_json::from_value(v).context("an unreadable store space")
    }

    /// Removes what cut transfers of `vm` left (chunks without a manifest): the store
    /// holds only whole backups. Whether there was any.
    fn remove_orphans(&self, agents: &dyn ZoneAgents, vm: &str) -> anyhow::Result<bool> {
        let mut removed = false;
        for id in self.orphans.iter().filter(|id| orphan_of(id, vm)) {
            agents.call(
                &self.host,
                "DELETE",
                &format!("/v1/backup-store/{}/{id}", self.cluster.name),
                None,
                CALL,
            )?;
            removed = true;
        }
        Ok(removed)
    }

    /// A full store refuses before any snapshot is taken: Ceph would hold the chunks'
    /// writes. What cut transfers of `vms` left goes first (a backup would remove it),
    /// and the room is read again.
    fn refuse_if_full(
        &mut self,
        agents: &dyn ZoneAgents,
        vms: &[String],
        to: &str,
        what: &str,
    ) -> anyhow::Result<()> {
        if self.space.free() > 0 {
            return Ok(());
        }
        let mut removed = false;
        for vm in vms {
            removed |= self.remove_orphans(agents, vm)?;
        }
        if removed {
            self.space = Store::space(agents, &self.cluster.name, &self.host)?;
            self.orphans
                .retain(|id| !vms.iter().any(|vm| orphan_of(id, vm)));
        }
        self.space
            .check_not_full(what)
            .with_context(|| format!("the backup store at {to} is full"))
    }
}

/// Whether backup id `id` is of VM `vm` (`<vm>-<unix ms>`).
fn orphan_of(id: &str, vm: &str) -> bool {
    id.strip_prefix(vm)
        .and_then(|rest| rest.strip_prefix('-'))
        .is_some_and(|ms| !ms.is_empty() && ms.chars().all(|c| c.is_ascii_digit()))
}

fn create_in(
    agents: &dyn ZoneAgents,
    store: &Store,
    vm: &str,
    to: &str,
    streams: usize,
    share: u64,
) -> anyhow::Result<BackupReport> {
    let (c, store_host) = (&store.cluster, &store.host);
    let host = agents.host_of(vm)?;
    // A transfer of this VM that was cut left chunks and no manifest: gone first, so that
    // the store holds only whole backups.
    store.remove_orphans(agents, vm)?;
    let parent = store
        .manifests
        .iter()
        .filter(|m| m.vm == vm)
        .max_by_key(|m| m.created_unix_ms)
        .map(|m| m.id.clone());
    let id = format!("{vm}-{}", dczone_storage::backup::unix_ms());
    let body = json!({
        "id": id,
        "parent": parent,
        "store_cluster": c.name,
        "store_host": store_host,
        "store_agent": agents.agent_url(store_host),
        "streams": streams,
        "store_space": store.space,
        "store_share": share,
    });
    let v = agents
        .call(
            &host,
            "POST",
            &format!("/v1/vms/{vm}/backup"),
            Some(body),
            BACKUP_CALL,
        )
        .with_context(|| format!("back up VM {vm} to {to}"))?;
    let done: BackupDone = serde_json::from_value(v).context("an unreadable backup answer")?;
    let arrivals: Vec<f64> = done.chunks.iter().map(|c| c.arrived_ms).collect();
    let mean = if arrivals.is_empty() {
        0.0
    } else {
        arrivals.iter().sum::<f64>() / arrivals.len() as f64
    };
    let bytes = done.manifest.bytes;
    Ok(BackupReport {
        id: done.manifest.id.clone(),
        vm: vm.into(),
        to: to.into(),
        full: done.manifest.parent.is_none(),
        parent: done.manifest.parent.clone(),
        checkpoint: done.manifest.checkpoint,
        t1_ms: done.checkpoint_ms + done.snapshot_ms,
        t2_ms: done.transfer_ms + done.commit_ms,
        checkpoint_ms: done.checkpoint_ms,
        snapshot_ms: done.snapshot_ms,
        transfer_ms: done.transfer_ms,
        commit_ms: done.commit_ms,
        bytes,
        mbit_s: if done.transfer_ms > 0.0 {
            bytes as f64 * 8.0 / (done.transfer_ms / 1e3) / 1e6
        } else {
            0.0
        },
        chunks: done.manifest.chunks.len(),
        most_delayed_arrival_ms: arrivals.iter().cloned().fold(0.0, f64::max),
        mean_arrival_ms: mean,
        transfer_start_unix_ms: done.manifest.created_unix_ms,
        arrivals: done.chunks,
    })
}

/// `backup verify ID --at SITE`: every chunk checked; the bytes.
pub fn verify(agents: &dyn ZoneAgents, zone: &Zone, site: &str, id: &str) -> anyhow::Result<u64> {
    let (c, host) = store_of(zone, site)?;
    let v = agents.call(
        &host,
        "POST",
        &format!("/v1/backup-store/{}/{id}/verify", c.name),
        None,
        BACKUP_CALL,
    )?;
    Ok(v["bytes"].as_u64().unwrap_or(0))
}

/// `backup delete ID --at SITE`: the objects removed.
pub fn delete(agents: &dyn ZoneAgents, zone: &Zone, site: &str, id: &str) -> anyhow::Result<u64> {
    let (c, host) = store_of(zone, site)?;
    let v = agents.call(
        &host,
        "DELETE",
        &format!("/v1/backup-store/{}/{id}", c.name),
        None,
        CALL,
    )?;
    Ok(v["objects"].as_u64().unwrap_or(0))
}

/// What `backup restore` measured and did.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub vm: String,
    pub at: String,
    pub host: String,
    /// The backups restored, the full one first.
    pub chain: Vec<String>,
    pub checkpoint: Option<u64>,
    pub trecovery_ms: f64,
    /// Chunks read and checked, then imported into a new image.
    pub volume_ms: f64,
    pub check_ms: f64,
    pub import_ms: f64,
    /// From the VM's creation until its service listened.
    pub boot_ms: f64,
    /// Logged transfers replayed after the restore: applied now (lost by the snapshot
    /// alone), and already present.
    pub replayed: u64,
    pub present: u64,
    /// Logged transfers the guest refused (must be 0).
    pub refused: u64,
}

/// The chain that ends at `target`: its full backup first.
fn chain(all: &[Manifest], target: &Manifest) -> anyhow::Result<Vec<String>> {
    let mut chain = vec![target.id.clone()];
    let mut at = target;
    while let Some(p) = &at.parent {
        at = all
            .iter()
            .find(|m| m.id == *p)
            .ok_or_else(|| anyhow!("backup {} needs {p}, which is not in the store", at.id))?;
        chain.push(at.id.clone());
    }
    chain.reverse();
    Ok(chain)
}

/// `backup restore VM --at SITE`: the VM's latest backup (or `snapshot`) restored into a
/// new image of the site's cluster and booted as `name` on `host` (the site's first host
/// by default); then the logged transfers `replay` (ledger `T` lines) are sent again.
#[allow(clippy::too_many_arguments)]
pub fn restore(
    agents: &dyn ZoneAgents,
    zone: &Zone,
    vm: &str,
    at: &str,
    snapshot: Option<&str>,
    name: &str,
    host: Option<&str>,
    replay: &[String],
) -> anyhow::Result<RestoreReport> {
    let t = Instant::now();
    let (c, store_host) = store_of(zone, at)?;
    let host = match host {
        Some(h) => h.to_string(),
        None => c
            .osds
            .iter()
            .find(|o| o.site == at)
            .map(|o| o.host.clone())
            .ok_or_else(|| anyhow!("site {at} has no storage host to run VM {name}"))?,
    };
    agents.check_host(&host)?;
    let site = zone
        .host(&host)
        .map(|h| zone.sites[h.site].id.clone())
        .unwrap_or_default();
    if !c.sites.contains(&site) {
        bail!(
            "host {host} is in site {site}, outside cluster {} ({}): restore to a host of {at}",
            c.name,
            c.sites.join(", ")
        );
    }
    if let Ok(on) = agents.host_of(name) {
        bail!(
            "VM '{name}' exists (on {on}): restore it under another name (--as), or destroy it first"
        );
    }
    let all = list(agents, zone, at)?;
    let target = match snapshot {
        Some(id) => all
            .iter()
            .find(|m| m.id == id)
            .ok_or_else(|| anyhow!("no backup {id} in the store of {at}"))?,
        None => all
            .iter()
            .filter(|m| m.vm == vm)
            .max_by_key(|m| m.created_unix_ms)
            .ok_or_else(|| anyhow!("VM {vm} has no backup in the store of {at}"))?,
    };
    if target.vm != vm {
        bail!("backup {} is of VM {}, not {vm}", target.id, target.vm);
    }
    let chain = chain(&all, target)?;
    let image = format!("vm-{name}");
    let v = agents
        .call(
            &store_host,
            "POST",
            &format!("/v1/backup-store/{}/restore", c.name),
            Some(json!({
                "chain": chain,
                "image": image,
                "pool": c.site_pool(&site).name,
            })),
            BACKUP_CALL,
        )
        .with_context(|| format!("restore {} at {at}", target.id))?;
    let volume_ms = t.elapsed().as_secs_f64() * 1e3;
    let tb = Instant::now();
    let created = crate::vms::boot(
        agents,
        &dczone_virt::CreateVm {
            name: name.into(),
            host: host.clone(),
            memory_mib: 256,
            dirty_mbps: 1,
            dirty_mib: 32,
            resident_pct: dczone_virt::DEFAULT_RESIDENT_PCT,
            group: None,
            disk_mib: None,
            disk_image: Some(image),
        },
    );
    if let Err(e) = created {
        return Err(e.context(format!(
            "the restored image vm-{name} stays in {}/{}; `dczone vm create {name} --host {host}` can retry",
            c.name,
            c.site_pool(&site).name
        )));
    }
    let boot_ms = tb.elapsed().as_secs_f64() * 1e3;
    let trecovery_ms = t.elapsed().as_secs_f64() * 1e3;
    let (mut replayed, mut present, mut refused) = (0, 0, 0);
    for batch in replay.chunks(500) {
        let v = agents.call(
            &host,
            "POST",
            &format!("/v1/vms/{name}/ledger"),
            Some(json!({ "requests": batch })),
            CALL,
        )?;
        for a in v.as_array().into_iter().flatten() {
            match a.as_str().unwrap_or_default() {
                s if s.starts_with("OK ") => replayed += 1,
                s if s.starts_with("DUP ") => present += 1,
                _ => refused += 1,
            }
        }
    }
    Ok(RestoreReport {
        vm: vm.into(),
        at: at.into(),
        host,
        chain,
        checkpoint: target.checkpoint,
        trecovery_ms,
        volume_ms,
        check_ms: v["check_ms"].as_f64().unwrap_or(0.0),
        import_ms: v["import_ms"].as_f64().unwrap_or(0.0),
        boot_ms,
        replayed,
        present,
        refused,
    })
}
