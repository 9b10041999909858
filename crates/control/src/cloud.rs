//! Migration to a public cloud (SPEC.md §3, scenario UC1-#2): each VM in turn is exported
//! by its host's agent (consistent snapshot, conversion, multipart upload to the cloud's
//! object storage), then imported, given its security group and started through the
//! cloud's compute API. The cloud is only ever reached through its [`Account`].
//!
//! In a lab, [`lab_up`] plays the cloud provider: it starts `dczone cloud serve` on the
//! public-cloud site's host, with a Ceph cluster of its own.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use dczone_agent::cloud::{ExportBody, ExportDone, Phase};
use dczone_cloud::client::Compute;
use dczone_cloud::ec2::{DiskFormat, IpPermission};
use dczone_cloud::provider::{self, ProviderConfig};
use dczone_cloud::Account;
use dczone_lab::Lab;
use dczone_zone::{SiteKind, Zone};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::ZoneAgents;

pub mod inventory;

/// The guest ledger's port: the application a cloud instance must answer on.
pub const APP_PORT: u16 = 7000;

/// The public-cloud site of a zone.
pub fn cloud_site(zone: &Zone) -> anyhow::Result<&dczone_zone::Site> {
    zone.sites
        .iter()
        .find(|s| s.kind == SiteKind::PublicCloud && !s.hosts.is_empty())
        .ok_or_else(|| anyhow!("the zone has no public-cloud site with a host"))
}

fn account_file(lab: &Lab) -> PathBuf {
    provider::lab_dir(lab.dir(), "cloud").join("account.json")
}

/// Runs `f` from the lab's first client host, where the operator is: the cloud's
/// endpoints are addresses of the zone's network, which this machine's own namespace does
/// not route to.
pub fn from_client<T: Send + 'static>(
    lab: &Lab,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    let zone = lab.state()?.zone()?;
    let client = zone
        .hosts()
        .into_iter()
        .find(|h| h.id.ends_with("-client"))
        .ok_or_else(|| anyhow!("the zone has no client host to reach the cloud from"))?;
    let ns = lab.host(&client.id)?.1;
    dczone_lab::sys::in_namespace(&ns, f)?
        .join()
        .map_err(|_| anyhow!("a call to the cloud panicked"))
}

/// The lab cloud's account (made on its first start).
pub fn lab_account(lab: &Lab) -> anyhow::Result<Account> {
    let f = account_file(lab);
    let bytes = std::fs::read(&f).with_context(|| {
        format!(
            "the lab's cloud is not up (no {}): `dczone cloud up`",
            f.display()
        )
    })?;
    Ok(serde_json::from_slice(&bytes)?)
}

/// Starts the lab's cloud provider (once) and waits until it serves; its account.
pub fn lab_up(lab: &Lab, exe: &Path, progress: &dyn Fn(&str)) -> anyhow::Result<Account> {
    let zone = lab.state()?.zone()?;
    let site = cloud_site(&zone)?;
    let host = &site.hosts[0];
    let (href, ns) = lab.host(host)?;
    let dir = provider::lab_dir(lab.dir(), &site.id);
    std::fs::create_dir_all(&dir)?;
    let ready = dir.join("ready");
    let pid_file = dir.join("provider.pid");
    let cfg_file = dir.join("provider.json");
    // The pid of a provider that went with its lab may be another process's now: it is
    // ours if it serves this configuration.
    let running = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok())
        .filter(|pid| dczone_lab::sys::alive(*pid))
        .and_then(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).ok())
        .is_some_and(|cmdline| {
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            args.contains(&b"serve".as_slice())
                && args.contains(&cfg_file.display().to_string().as_bytes())
        });
    if running && ready.is_file() {
        return lab_account(lab);
    }
    let account = match lab_account(lab) {
        Ok(a) => a,
        Err(_) => {
            let keys = dczone_cloud::new_key_pair()?;
            let ip = href.ip();
            let a = Account {
                region: "dczone-cloud-1".into(),
                s3_endpoint: format!("http://{ip}:{}", dczone_storage::plan::RGW_PORT),
                compute_endpoint: format!("http://{ip}:{}", provider::API_PORT),
                access_key: keys.access_key,
                secret_key: keys.secret_key,
                bucket: "images".into(),
                expires: None,
            };
            std::fs::write(account_file(lab), serde_json::to_vec_pretty(&a)?)?;
            a
        }
    };
    let mut cluster = dczone_storage::plan::cloud_cluster(&zone, &site.id)
        .ok_or_else(|| anyhow!("site {} is not a public cloud", site.id))?;
    cluster.fsid = match std::fs::read(&cfg_file)
        .ok()
        .and_then(|b| serde_json::from_slice::<ProviderConfig>(&b).ok())
    {
        Some(old) => old.cluster.fsid,
        None => dczone_storage::host::new_fsid()?,
    };
    let platform = crate::platform(lab, exe)?;
    let ip = href.ip();
    let o = ip.octets();
    let cfg = ProviderConfig {
        dir: dir.clone(),
        host: host.clone(),
        listen: (ip, provider::API_PORT).into(),
        account: account.clone(),
        cluster,
        kernel: platform.image().kernel.clone(),
        initramfs: platform.image().initramfs.clone(),
        accel: platform.accel(),
        // Beside the zone's VM addresses of the site (.101-.199).
        first_ip: Ipv4Addr::new(o[0], o[1], o[2], 200),
        ip_count: 50,
        prefix: 16,
        bridge: "br0".into(),
    };
    std::fs::write(&cfg_file, serde_json::to_vec_pretty(&cfg)?)?;
    let _ = std::fs::remove_file(&ready);
    progress(&format!(
        "starting the cloud provider on {host} (its own Ceph and S3 gateway)"
    ));
    let cfg_arg = cfg_file.display().to_string();
    let pid = dczone_lab::spawn_detached(
        Some(&ns),
        exe,
        &["cloud", "serve", "--config", &cfg_arg],
        &dir.join("provider.log"),
        "dczone cloud serve",
    )?;
    std::fs::write(&pid_file, pid.to_string())?;
    let t = Instant::now();
    while !ready.is_file() {
        if !dczone_lab::sys::alive(pid) {
            bail!(
                "the cloud provider stopped: see {}",
                dir.join("provider.log").display()
            );
        }
        if t.elapsed() > Duration::from_secs(600) {
            bail!(
                "the cloud provider was not ready in 600 s: see {}",
                dir.join("provider.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    progress(&format!("cloud up in {:.1} s", t.elapsed().as_secs_f64()));
    Ok(account)
}

/// One VM's migration to the cloud.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmReport {
    pub vm: String,
    pub instance: String,
    pub image: String,
    pub object: String,
    /// The security group the migration made for the instance (none when groups were
    /// given).
    #[serde(default)]
    pub security_group_made: Option<String>,
    pub ip: String,
    pub format: String,
    pub disk_bytes: u64,
    pub object_bytes: u64,
    pub phases: Phases,
    /// From the export's start until the application answers in the cloud.
    pub t1_ms: f64,
    /// A cold move's downtime: from the VM's stop until it answers in the cloud.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<f64>,
    pub transfer_mbit_s: f64,
    /// The part that took longest, from its send to its answer.
    pub most_delayed_part_ms: f64,
    /// The upload's time with a part in flight: its transfer less the waits for a
    /// streamed image's next part (the source's read, not the path).
    #[serde(default)]
    pub transfer_busy_ms: f64,
    /// Each part of the upload: sent and answered, ms from the upload's start.
    #[serde(default)]
    pub parts: Vec<dczone_cloud::s3::PartTiming>,
    /// Encoded while it was sent: convert and transfer overlap.
    #[serde(default)]
    pub streamed: bool,
    /// The cloud's own log of this VM's import and instance (its clock).
    pub cloud_log: Vec<dczone_cloud::provider::LogEntry>,
    /// From the instance running to its console saying the application listens (the
    /// cloud's clock): the boot to service.
    pub boot_ms: Option<f64>,
    /// How the two clocks agree: the cloud logged the import's start at
    /// `cloud_unix_ms`, which must lie between this side's sending the request and
    /// receiving its answer.
    pub clock: ClockCheck,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClockCheck {
    pub sent_unix_ms: u64,
    pub cloud_unix_ms: u64,
    pub answered_unix_ms: u64,
    pub agree: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Phases {
    pub export_ms: f64,
    pub convert_ms: f64,
    pub transfer_ms: f64,
    pub import_ms: f64,
    pub settings_ms: f64,
    pub start_ms: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrateReport {
    pub vms: Vec<VmReport>,
    pub t1_total_ms: f64,
    pub transfer_mbit_s: f64,
    /// Every source VM runs (a live-source move) after the move.
    pub source_running: bool,
    /// A cold move's reference downtime, ms, and whether every VM's stayed within it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_reference_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_within_reference: Option<bool>,
}

fn now_ms() -> u64 {
    dczone_storage::backup::unix_ms()
}

fn elapsed(p: &Phase) -> f64 {
    p.ms
}

/// How `dczone cloud migrate` moves its VMs.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// The image format the cloud imports: vmdk, vhd, raw or qcow2.
    pub format: String,
    /// Multipart upload part size, MiB, and parts in flight.
    pub part_mib: u64,
    pub streams: usize,
    /// Start the instances in these groups instead of one made per VM.
    pub security_groups: Vec<String>,
    /// Stop each VM before its export (a cold move: the image needs no checkpoint, and the
    /// service is down from the stop until it answers in the cloud). A failed move starts
    /// the VM again in its DC.
    pub stop_source: bool,
    /// The downtime a cold move is judged against, ms.
    pub downtime_reference_ms: f64,
}

impl MigrateOptions {
    /// A live-source move (the VM keeps running) in `format`, 8 MiB parts, 4 streams.
    pub fn new(format: &str) -> MigrateOptions {
        MigrateOptions {
            format: format.into(),
            part_mib: 5,
            streams: 4,
            security_groups: Vec::new(),
            stop_source: false,
            downtime_reference_ms: DOWNTIME_REFERENCE_MS,
        }
    }
}

/// The default reference a cold move's downtime is judged against: a minute.
pub const DOWNTIME_REFERENCE_MS: f64 = 60_000.0;

/// `dczone cloud migrate`: each VM in turn. `probe` asks the instance's application
/// from where the VM's clients are (true once it answers).
pub fn migrate(
    agents: &dyn ZoneAgents,
    account: &Account,
    vms: &[String],
    o: &MigrateOptions,
    probe: &(dyn Fn(Ipv4Addr) -> bool + Sync),
    progress: &dyn Fn(&str),
) -> anyhow::Result<MigrateReport> {
    let format = DiskFormat::parse(&o.format).ok_or_else(|| {
        anyhow!(
            "unknown disk format '{}': use vmdk, vhd, raw or qcow2",
            o.format
        )
    })?;
    let (part_mib, streams, security_groups) = (o.part_mib, o.streams, &o.security_groups);
    let compute = Compute::new(account);
    check_account(account)?;
    let t_all = Instant::now();
    let mut reports = Vec::new();
    for vm in vms {
        let host = agents.host_of(vm)?;
        // A cold move: the service stops here.
        let stopped = if o.stop_source {
            progress(&format!("{vm}: stopping it (a cold move)"));
            let at = Instant::now();
            crate::vms::stop(agents, vm).with_context(|| format!("stop VM {vm}"))?;
            Some(at)
        } else {
            None
        };
        // A group made for this VM is removed again if no instance came to use it.
        let mut made_group: Option<String> = None;
        let mut launched = false;
        let moved = (|| -> anyhow::Result<VmReport> {
            let key = format!("{vm}-{}.{}", now_ms(), format.name().to_ascii_lowercase());
            progress(&format!(
                "{vm}: export, convert to {} and upload from {host}",
                format.name()
            ));
            let started = Instant::now();
            let v = agents
                .call(
                    &host,
                    "POST",
                    &format!("/v1/vms/{vm}/cloud-export"),
                    Some(json!(ExportBody {
                        account: account.clone(),
                        key: key.clone(),
                        format: format.name().to_ascii_lowercase(),
                        part_mib,
                        streams,
                    })),
                    Duration::from_secs(3600),
                )
                .with_context(|| format!("export VM {vm} to the cloud's object storage"))?;
            let done: ExportDone =
                serde_json::from_value(v).context("an unreadable export answer")?;
            progress(&format!(
                "{vm}: {} uploaded in {:.1} s; importing",
                dczone_storage::size(done.object_bytes),
                done.transfer.ms / 1e3
            ));
            // Import: the cloud's task, polled until it completes.
            let t = Instant::now();
            let sent_unix_ms = now_ms();
            let task =
                compute.import_image(format, &account.bucket, &key, &format!("dczone: VM {vm}"))?;
            let answered_unix_ms = now_ms();
            let image = loop {
                let s = compute.describe_import(&task)?;
                match s.status.as_str() {
                "completed" => {
                    break s.image_id.ok_or_else(|| anyhow!("import {task} completed without an image"))?
                }
                "deleted" | "deleting" => bail!(
                    "the cloud's import of {key} failed: {} (the object stays in bucket {}: `dczone cloud delete {key}`)",
                    s.status_message,
                    account.bucket
                ),
                _ => std::thread::sleep(POLL_EVERY),
            }
                if t.elapsed() > Duration::from_secs(1800) {
                    bail!("the cloud's import {task} did not complete in 30 min");
                }
            };
            let import_ms = t.elapsed().as_secs_f64() * 1e3;
            // Settings: the given groups, or one of its own with the application's port open
            // to the zone and nothing else.
            let t = Instant::now();
            let groups: Vec<String> = if security_groups.is_empty() {
                let group = compute.create_security_group(
                    &format!("dczone-{vm}-{}", now_ms()),
                    &format!("dczone: the application of VM {vm}"),
                )?;
                made_group = Some(group.clone());
                compute.authorize_ingress(
                    &group,
                    &[IpPermission {
                        protocol: "tcp".into(),
                        from_port: Some(APP_PORT),
                        to_port: Some(APP_PORT),
                        cidrs: vec![zone_cidr(&done.spec.ip_cidr)],
                    }],
                )?;
                vec![group]
            } else {
                security_groups.to_vec()
            };
            let settings_ms = t.elapsed().as_secs_f64() * 1e3;
            progress(&format!("{vm}: image {image}; starting an instance"));
            let t = Instant::now();
            let itype = dczone_cloud::provider::instance_type_for(done.spec.memory_mib)
                .ok_or_else(|| anyhow!("no instance type has {} MiB", done.spec.memory_mib))?;
            let inst = compute.run_instance(&image, itype, &groups)?;
            launched = true;
            let ip: Ipv4Addr = inst
                .ip
                .parse()
                .map_err(|_| anyhow!("instance {} has no address", inst.id))?;
            // The cloud's console says when the application listens; if it listens and
            // does not answer from here, a packet filter is in the way: reported at once.
            let mut listening_since: Option<Instant> = None;
            // A probe starts every POLL_EVERY without waiting for the one before: a SYN
            // sent before the guest's network was up goes unanswered until its timeout,
            // which a lone probe would add to the start (up to 0.25 s).
            let answered = std::thread::scope(|s| -> anyhow::Result<Instant> {
                let (tx, rx) = std::sync::mpsc::channel();
                // The console's log is read every LOG_EVERY, not at every probe.
                let mut log_read: Option<Instant> = None;
                loop {
                    let tx = tx.clone();
                    s.spawn(move || {
                        if probe(ip) {
                            let _ = tx.send(Instant::now());
                        }
                    });
                    if let Ok(at) = rx.recv_timeout(POLL_EVERY) {
                        return Ok(at);
                    }
                    if listening_since.is_none()
                        && log_read.is_none_or(|at| at.elapsed() >= LOG_EVERY)
                    {
                        log_read = Some(Instant::now());
                        let ready = compute
                            .log(now_ms().saturating_sub(600_000))
                            .unwrap_or_default()
                            .iter()
                            .any(|e| e.resource == inst.id && e.event == "instance.console.ready");
                        if ready {
                            listening_since = Some(Instant::now());
                        }
                    }
                    if listening_since.is_some_and(|s| s.elapsed() > BLOCKED_AFTER) {
                        bail!(
                            "instance {} ({ip}) runs and its console says the application listens, but \
                             port {APP_PORT} does not answer from the zone: security group(s) {} do not \
                             allow tcp/{APP_PORT} from {}. Add a rule (AuthorizeSecurityGroupIngress), \
                             or migrate without --security-group; the instance, its image and object \
                             stay: `dczone cloud terminate {}`, `dczone cloud deregister {image}`, \
                             `dczone cloud delete {key}`",
                            inst.id,
                            groups.join(", "),
                            zone_cidr(&done.spec.ip_cidr),
                            inst.id
                        );
                    }
                    if t.elapsed() > Duration::from_secs(600) {
                        bail!(
                            "instance {} ({ip}) did not answer on port {APP_PORT} in 600 s; it runs: \
                             `dczone cloud terminate {}`, then `dczone cloud deregister {image}`, \
                             `dczone cloud delete {key}`",
                            inst.id,
                            inst.id
                        );
                    }
                }
            })?;
            let start_ms = answered.duration_since(t).as_secs_f64() * 1e3;
            let t1_ms = answered.duration_since(started).as_secs_f64() * 1e3;
            // The console's line may reach the log a moment after the first answer.
            let mut cloud_log: Vec<dczone_cloud::provider::LogEntry> = Vec::new();
            for _ in 0..10 {
                cloud_log = compute
                    .log(done.export.start_unix_ms)
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|e| e.resource == task || e.resource == inst.id)
                    .collect();
                if cloud_log
                    .iter()
                    .any(|e| e.event == "instance.console.ready")
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            let at = |event: &str| {
                cloud_log
                    .iter()
                    .find(|e| e.event == event)
                    .map(|e| e.unix_ms)
            };
            let boot_ms = match (at("instance.running"), at("instance.console.ready")) {
                (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64),
                _ => None,
            };
            let cloud_unix_ms = at("import.start").unwrap_or(0);
            let clock = ClockCheck {
                sent_unix_ms,
                cloud_unix_ms,
                answered_unix_ms,
                agree: (sent_unix_ms..=answered_unix_ms).contains(&cloud_unix_ms),
            };
            let transfer_s = done.upload.ms / 1e3;
            progress(&format!(
                "{vm}: runs in the cloud as {} ({ip}), T1 {:.1} s",
                inst.id,
                t1_ms / 1e3
            ));
            Ok(VmReport {
                downtime_ms: stopped.map(|s| answered.duration_since(s).as_secs_f64() * 1e3),
                vm: vm.clone(),
                security_group_made: made_group.clone(),
                instance: inst.id,
                image,
                object: key,
                ip: ip.to_string(),
                format: format.name().into(),
                disk_bytes: done.disk_bytes,
                object_bytes: done.object_bytes,
                phases: Phases {
                    export_ms: elapsed(&done.export),
                    convert_ms: elapsed(&done.convert),
                    transfer_ms: elapsed(&done.transfer),
                    import_ms,
                    settings_ms,
                    start_ms,
                },
                t1_ms,
                transfer_mbit_s: if transfer_s > 0.0 {
                    done.object_bytes as f64 * 8.0 / transfer_s / 1e6
                } else {
                    0.0
                },
                most_delayed_part_ms: done
                    .upload
                    .parts
                    .iter()
                    .map(|p| p.done_ms - p.sent_ms)
                    .fold(0.0, f64::max),
                transfer_busy_ms: busy_ms(&done.upload.parts),
                parts: done.upload.parts.clone(),
                streamed: done.streamed,
                cloud_log,
                boot_ms,
                clock,
            })
        })();
        let moved = moved.map_err(|e| match made_group.filter(|_| !launched) {
            Some(g) => match compute.delete_security_group(&g) {
                Ok(()) => e,
                Err(d) => e.context(format!(
                    "security group {g} made for {vm} stays ({d}): `dczone cloud delete-group {g}`"
                )),
            },
            None => e,
        });
        let moved = moved.map_err(|e| {
            // A key that expired on the way: the services' refusals do not say so.
            let e = match &account.expires {
                Some(at) if account.expired() => e.context(format!(
                    "the account's key {} expired at {at}, during the migration: get a new key \
                     (`dczone cloud key`)",
                    account.access_key
                )),
                _ => e,
            };
            e.context(format!(
                "the migration of {vm} to the cloud failed; what it left there is listed by \
                 `dczone cloud list` (`--account FILE` for another cloud)"
            ))
        });
        match moved {
            Ok(r) => reports.push(r),
            // Nothing is lost: a stopped source starts again from its disk.
            Err(e) if stopped.is_some() => {
                return Err(match crate::vms::start(agents, vm) {
                    Ok(_) => e.context(format!("the cold move of {vm} failed; {vm} runs again in its DC")),
                    Err(s) => e.context(format!(
                        "the cold move of {vm} failed, and {vm} did not start again ({s:#}): `dczone vm start {vm}`"
                    )),
                })
            }
            Err(e) => return Err(e),
        }
    }
    let total_bytes: u64 = reports.iter().map(|r| r.object_bytes).sum();
    let total_s: f64 = reports.iter().map(|r| r.phases.transfer_ms).sum::<f64>() / 1e3;
    let source_running = vms.iter().all(|vm| {
        agents
            .list()
            .ok()
            .and_then(|l| l.into_iter().find(|r| &r.spec.name == vm))
            .is_some_and(|r| r.running.is_some())
    });
    Ok(MigrateReport {
        t1_total_ms: t_all.elapsed().as_secs_f64() * 1e3,
        transfer_mbit_s: if total_s > 0.0 {
            total_bytes as f64 * 8.0 / total_s / 1e6
        } else {
            0.0
        },
        source_running,
        downtime_reference_ms: o.stop_source.then_some(o.downtime_reference_ms),
        downtime_within_reference: o.stop_source.then(|| {
            reports
                .iter()
                .all(|r| r.downtime_ms.is_some_and(|d| d <= o.downtime_reference_ms))
        }),
        vms: reports,
    })
}

/// How long an application that listens (the cloud's console says so) may stay silent to
/// the zone before its port is taken for blocked.
const BLOCKED_AFTER: Duration = Duration::from_secs(5);

/// Both services take the account's key: checked before anything leaves the DC, so that a
/// wrong or expired key costs no export.
pub fn check_account(account: &Account) -> anyhow::Result<()> {
    if let Some(at) = account.expires.as_ref().filter(|_| account.expired()) {
        bail!(
            "the account's key {} expired at {at}: get a new key (`dczone cloud key`)",
            account.access_key
        );
    }
    let fix = "check the account's access_key and secret_key (`dczone cloud account`, or a \
               key that has not expired: `dczone cloud key`), and this host's clock";
    Compute::new(account)
        .describe_instances(&[])
        .with_context(|| {
            format!(
                "the compute API at {} refused the account: {fix}",
                account.compute_endpoint
            )
        })?;
    dczone_cloud::s3::Store::new(account)?
        .list()
        .with_context(|| {
            format!(
                "the object storage at {} refused the account: {fix}",
                account.s3_endpoint
            )
        })?;
    Ok(())
}

/// A key pair of the account that both services take for `expires_in_s` (what the cloud's
/// console issues): the account with that key, its expiry in `expires`.
pub fn issue_key(account: &Account, expires_in_s: u64) -> anyhow::Result<Account> {
    if !(1..=provider::MAX_KEY_S).contains(&expires_in_s) {
        bail!(
            "--expires-in {expires_in_s}: a key lives from 1 s to {} s",
            provider::MAX_KEY_S
        );
    }
    Ok(Compute::new(account).issue_key(expires_in_s)?)
}

/// How long at least one of `parts` was in flight, ms.
fn busy_ms(parts: &[dczone_cloud::s3::PartTiming]) -> f64 {
    let mut spans: Vec<(f64, f64)> = parts.iter().map(|p| (p.sent_ms, p.done_ms)).collect();
    spans.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut busy = 0.0;
    let mut open: Option<(f64, f64)> = None;
    for (s, e) in spans {
        open = match open {
            Some((os, oe)) if s <= oe => Some((os, oe.max(e))),
            Some((os, oe)) => {
                busy += oe - os;
                Some((s, e))
            }
            None => Some((s, e)),
        };
    }
    busy + open.map_or(0.0, |(s, e)| e - s)
}

/// The zone's network of a VM address (`10.77.2.101/16` → `10.77.0.0/16`).
fn zone_cidr(ip_cidr: &str) -> String {
    let (ip, len) = ip_cidr.split_once('/').unwrap_or((ip_cidr, "32"));
    let len: u32 = len.parse().unwrap_or(32).min(32);
    let ip: Ipv4Addr = ip.parse().unwrap_or(Ipv4Addr::UNSPECIFIED);
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    format!("{}/{len}", Ipv4Addr::from(u32::from(ip) & mask))
}

/// How long one look at a starting instance's application waits. Short, and repeated
/// every [`POLL_EVERY`]: a connection to an instance not up yet is not refused but left
/// unanswered, and a long wait would count in its start (1 s added up to 1.2 s).
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(250);
/// How often an import task and a starting instance are looked at.
const POLL_EVERY: Duration = Duration::from_millis(50);
/// How often a starting instance's console is read for its "listening" line (which only
/// starts the count to a blocked port's report).
const LOG_EVERY: Duration = Duration::from_millis(250);

/// Whether the ledger at `ip` answers a balance request within `timeout`.
pub fn app_answers(ip: Ipv4Addr, timeout: Duration) -> bool {
    use std::io::{BufRead, BufReader, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&(ip, APP_PORT).into(), timeout) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(timeout));
    if s.write_all(b"Z\n").is_err() {
        return false;
    }
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).is_ok() && !line.trim().is_empty()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_time_with_a_part_in_flight() {
        let part = |n, sent_ms, done_ms| dczone_cloud::s3::PartTiming {
            n,
            bytes: 1,
            sent_ms,
            done_ms,
        };
        // Two overlapping, a wait, one more.
        let parts = [
            part(2, 50.0, 300.0),
            part(1, 0.0, 100.0),
            part(3, 500.0, 600.0),
        ];
        assert_eq!(super::busy_ms(&parts), 400.0);
        assert_eq!(super::busy_ms(&[]), 0.0);
    }

    #[test]
    fn the_zone_network_of_an_address() {
        assert_eq!(super::zone_cidr("10.77.2.101/16"), "10.77.0.0/16");
        assert_eq!(super::zone_cidr("10.77.2.101/24"), "10.77.2.0/24");
    }
}
