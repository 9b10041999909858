//! The cloud provider's side: what a public cloud site runs for its tenants, apart from
//! the bank's zone. Its own Ceph cluster (one monitor, manager and OSD, and radosgw for
//! S3), a compute API (the EC2 subset of [`crate::ec2`], every request checked with
//! SigV4), instances as QEMU guests on the site's host, security groups as nftables rules
//! on that host's bridge, and an execution log of every step with its time.
//!
//! Nothing here knows of dczone's zone, sites or agents: the provider has its host, its
//! address, its account and its guest kernel.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dczone_hypervisor::{Accel, DiskSpec, RbdAccess, VmSpec};
use dczone_storage::host::HostStorage;
use dczone_storage::plan::{ClusterPlan, Kind};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::ec2::{self, escape, Action, ApiError, DiskFormat, IpPermission};
use crate::{sigv4, Account};

/// The compute API's port (EC2-compatible APIs of OpenStack and Eucalyptus used 8773).
pub const API_PORT: u16 = 8773;
/// The pool instances' disks and imported images live in.
const POOL: &str = "rbd";
/// The S3 user of the account.
const S3_USER: &str = "tenant";

/// The pools radosgw makes on a bucket's first multipart upload and first object.
const RGW_LAZY_POOLS: [&str; 3] = [
    "default.rgw.buckets.index",
    "default.rgw.buckets.non-ec",
    "default.rgw.buckets.data",
];
/// The nftables table of the security groups.
const NFT_TABLE: &str = "dczone_cloud";

/// How the provider runs (written by whoever starts it: the lab, or a provider's own
/// deployment).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProviderConfig {
    /// State, log, instances and the Ceph cluster live here.
    pub dir: PathBuf,
    /// This host's name (the Ceph plan's).
    pub host: String,
    /// The compute API's address.
    pub listen: SocketAddr,
    pub account: Account,
    /// The provider's own cluster, its fsid set.
    pub cluster: ClusterPlan,
    /// The guest kernel and initramfs instances boot (the provider's stock kernel, as
    /// EC2's kernel images were).
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub accel: Accel,
    /// Instances' addresses: `first`, then the next `count - 1`, with this prefix length.
    pub first_ip: Ipv4Addr,
    pub ip_count: u8,
    pub prefix: u8,
    /// The host bridge instances' TAPs join.
    pub bridge: String,
}

/// An instance type: its memory and vCPUs.
pub const INSTANCE_TYPES: &[(&str, u32, u32)] = &[
    ("d1.small", 256, 1),
    ("d1.medium", 512, 1),
    ("d1.large", 1024, 2),
];

/// The smallest instance type with at least `memory_mib`.
pub fn instance_type_for(memory_mib: u32) -> Option<&'static str> {
    INSTANCE_TYPES
        .iter()
        .find(|(_, m, _)| *m >= memory_mib)
        .map(|(n, _, _)| *n)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImportTask {
    pub id: String,
    pub image_id: String,
    pub format: String,
    pub bucket: String,
    pub key: String,
    /// `active`, `completed` or `deleted` (failed), as EC2 says.
    pub status: String,
    pub status_message: String,
    pub progress: u8,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Image {
    pub id: String,
    pub size_mib: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Instance {
    pub id: String,
    pub image_id: String,
    pub instance_type: String,
    /// `pending`, `running`, `terminated`.
    pub state: String,
    pub ip: Ipv4Addr,
    pub groups: Vec<String>,
    pub launch_time: String,
    #[serde(default)]
    pub pid: Option<i32>,
    /// When it was terminated (unix ms): it is shown for [`TERMINATED_SHOWN_MS`] after.
    #[serde(default)]
    pub terminated_unix_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Group {
    pub id: String,
    pub name: String,
    pub description: String,
    pub rules: Vec<Rule>,
}

/// One ingress rule of a group, as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Rule {
    pub protocol: String,
    pub from_port: Option<u16>,
    pub to_port: Option<u16>,
    pub cidrs: Vec<String>,
}

impl From<&IpPermission> for Rule {
    fn from(p: &IpPermission) -> Rule {
        Rule {
            protocol: p.protocol.clone(),
            from_port: p.from_port,
            to_port: p.to_port,
            cidrs: p.cidrs.clone(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    pub tasks: BTreeMap<String, ImportTask>,
    pub images: BTreeMap<String, Image>,
    pub instances: BTreeMap<String, Instance>,
    pub groups: BTreeMap<String, Group>,
    /// Keys of the account issued for a while (`POST /keys`), by access key.
    #[serde(default)]
    pub keys: BTreeMap<String, IssuedKey>,
}

impl State {
    /// The instances terminated [`TERMINATED_SHOWN_MS`] or more before `now_ms`, to be
    /// forgotten (as EC2 stops showing a terminated instance after about an hour).
    pub fn terminated_before(&self, now_ms: u64) -> Vec<String> {
        self.instances
            .values()
            .filter(|i| i.state == "terminated")
            .filter(|i| {
                i.terminated_unix_ms
                    .is_some_and(|t| t.saturating_add(TERMINATED_SHOWN_MS) <= now_ms)
            })
            .map(|i| i.id.clone())
            .collect()
    }
}

/// How long a terminated instance is still described, ms.
pub const TERMINATED_SHOWN_MS: u64 = 3600 * 1000;

/// A key pair of the account that expires: both services take it until then.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IssuedKey {
    pub secret_key: String,
    pub expires_unix_ms: u64,
    /// Taken from the S3 gateway (after its expiry).
    #[serde(default)]
    pub revoked: bool,
}

/// The longest an issued key lives, s (STS's longest session).
pub const MAX_KEY_S: u64 = 43_200;

/// How long after a failed removal from the gateway an expired key is tried again.
const REVOKE_RETRY: Duration = Duration::from_secs(30);

/// How long a revoked key is remembered after its expiry (its requests told "expired",
/// not "unknown"), ms.
const FORGET_AFTER_MS: u64 = 24 * 3600 * 1000;

/// One line of the execution log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogEntry {
    pub unix_ms: u64,
    pub request_id: String,
    /// The resource (`import-ami-…`, `i-…`, `sg-…`).
    pub resource: String,
    /// What happened (`import.download.start`, `instance.running`, …).
    pub event: String,
    #[serde(default)]
    pub detail: Value,
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

struct Provider {
    cfg: ProviderConfig,
    storage: HostStorage,
    state: Mutex<State>,
    log: Mutex<std::fs::File>,
}

/// Whether `pid` is a live QEMU (not a recycled pid).
fn qemu_alive(pid: i32) -> bool {
    dczone_hypervisor::alive(pid)
        && std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.starts_with("qemu"))
}

struct RemoveOnDrop(PathBuf);

/// How long a streamed import waited on the object's arrival and on `rbd import`
/// taking its input: what is left of its time is its own (inflating, copying).
#[derive(Default)]
struct Waits {
    read: std::cell::Cell<std::time::Duration>,
    write: std::cell::Cell<std::time::Duration>,
}

/// A reader or writer whose calls add up their time in `waited`.
struct Timed<'a, T> {
    inner: T,
    waited: &'a std::cell::Cell<std::time::Duration>,
}

impl<T> Timed<'_, T> {
    fn time<R>(&mut self, f: impl FnOnce(&mut T) -> R) -> R {
        let t = std::time::Instant::now();
        let r = f(&mut self.inner);
        self.waited.set(self.waited.get() + t.elapsed());
        r
    }
}

impl<T: std::io::Read> std::io::Read for Timed<'_, T> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.time(|r| r.read(buf))
    }
}

impl<T: std::io::Write> std::io::Write for Timed<'_, T> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.time(|w| w.write(buf))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.time(|w| w.flush())
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn new_id(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        crate::random_string(b"0123456789abcdef", 8).unwrap_or_else(|_| "00000000".into())
    )
}

fn run(what: &str, cmd: &mut std::process::Command) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("{what}: cannot run {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Provider {
    fn state_file(&self) -> PathBuf {
        self.cfg.dir.join("state.json")
    }

    fn save(&self, s: &State) {
        use std::os::unix::fs::OpenOptionsExt;
        // It holds the secrets of issued keys: readable by the provider only.
        let tmp = self.cfg.dir.join("state.json.tmp");
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| f.write_all(&serde_json::to_vec_pretty(s).expect("serializes")));
        if written.is_ok() {
            let _ = std::fs::rename(&tmp, self.state_file());
        }
    }

    fn event(&self, request_id: &str, resource: &str, event: &str, detail: Value) {
        let e = LogEntry {
            unix_ms: unix_ms(),
            request_id: request_id.into(),
            resource: resource.into(),
            event: event.into(),
            detail,
        };
        let mut f = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(f, "{}", serde_json::to_string(&e).expect("serializes"));
        let _ = f.flush();
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let out = f(&mut s);
        self.save(&s);
        out
    }

    fn conf(&self) -> Result<PathBuf, String> {
        self.storage
            .conf_path(&self.cfg.cluster.name)
            .ok_or_else(|| "the provider's storage is not installed".to_string())
    }

    fn rbd(&self, args: &[&str]) -> Result<String, String> {
        self.storage
            .rbd(&self.cfg.cluster.name, args)
            .map_err(|e| e.to_string())
    }

    /// A stream-optimized VMDK or a raw image imported as it is read: each grain inflated
    /// and written (`rbd import --export-format 2`, which makes the image, and the base snapshot at its end) while the
    /// object still arrives. `None`: the image is not one that streams (a VMDK whose
    /// tables come first, VHD, QCOW2): read it whole.
    fn import_streamed(&self, task: &ImportTask, request_id: &str) -> Result<Option<u64>, String> {
        use crate::vmdk::{ReadError, StreamReader};
        let format = DiskFormat::parse(&task.format).ok_or("unknown format")?;
        if !matches!(format, DiskFormat::Vmdk | DiskFormat::Raw) {
            return Ok(None);
        }
        let unreadable = |e: String| format!("ClientError: the disk image could not be read: {e}");
        let invalid = |e: String| {
            format!(
                "ClientError: the disk image is not valid {}: {e}",
                task.format
            )
        };
        let store = crate::s3::Store::new(&self.cfg.account).map_err(|e| e.to_string())?;
        let size_of_raw = match format {
            DiskFormat::Raw => Some(
                store
                    .head(&task.key)
                    .map_err(|e| unreadable(e.to_string()))?
                    .ok_or_else(|| unreadable(format!("no object {}", task.key)))?,
            ),
            _ => None,
        };
        let waits = Waits::default();
        let r = Timed {
            inner: store
                .reader(&task.key)
                .map_err(|e| unreadable(e.to_string()))?,
            waited: &waits.read,
        };
        // A VMDK's reader is inside its grains' reader, a raw image's is read as it is.
        let (mut grains, mut raw, size) = match size_of_raw {
            Some(size) => (None, Some(r), size),
            None => match StreamReader::open(r) {
                Ok((g, size)) => (Some(g), None, size),
                Err(ReadError::NotStreamOptimized) => return Ok(None),
                Err(ReadError::Io(e)) => return Err(invalid(e.to_string())),
            },
        };
        if size == 0 {
            return Err(invalid("a disk of 0 bytes".into()));
        }
        self.event(
            request_id,
            &task.id,
            "import.stream.start",
            json!({"key": task.key, "from": task.format, "bytes": size}),
        );
        let image = format!("{POOL}/{}", task.image_id);
        let mut read = 0u64;
        let written = self
            .storage
            .import_from(&self.cfg.cluster.name, &image, &mut |stdin| {
                let stdin = Timed {
                    inner: stdin,
                    waited: &waits.write,
                };
                let mut w = dczone_storage::diff::Writer::image(stdin, size, Some("base"))?;
                if let Some(g) = grains.as_mut() {
                    while let Some((offset, data)) = g.next_grain()? {
                        read += data.len() as u64;
                        w.data(offset, &data)?;
                    }
                } else if let Some(r) = raw.as_mut() {
                    // Blocks of zeroes are holes of the new image.
                    let mut block = vec![0u8; crate::vmdk::GRAIN as usize];
                    let mut offset = 0u64;
                    loop {
                        let n = crate::vmdk::read_full(r, &mut block)?;
                        if n == 0 {
                            break;
                        }
                        read += n as u64;
                        if !crate::stream::is_zero(&block[..n]) {
                            w.data(offset, &block[..n])?;
                        }
                        offset += n as u64;
                    }
                    if offset != size {
                        return Err(std::io::Error::other(format!(
                            "{offset} bytes read of {size}"
                        )));
                    }
                }
                w.finish().map(|_| ())
            });
        written.map_err(|e| match &e {
            // rbd's own failure (the pool full, the cluster down): the cloud's side.
            dczone_storage::StorageError::Command { .. } => {
                format!("ServerError: the image could not be written: {e}")
            }
            dczone_storage::StorageError::Io { source, .. }
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
                ) =>
            {
                invalid(e.to_string())
            }
            _ => {
                format!("ServerError: the image could not be read from the bucket and written: {e}")
            }
        })?;
        self.event(
            request_id,
            &task.id,
            "import.stream.end",
            json!({
                "data_bytes": read,
                "read_wait_ms": waits.read.get().as_millis() as u64,
                "write_wait_ms": waits.write.get().as_millis() as u64,
            }),
        );
        self.set_progress(&task.id, 80);
        Ok(Some(size))
    }

    /// An import task: the object read from the account's bucket, converted into an image
    /// of the provider's pool, and a base snapshot that instances are cloned from.
    fn import(self: &Arc<Self>, task: ImportTask, request_id: String) {
        let id = task.id.clone();
        let result = (|| -> Result<u64, String> {
            if let Some(size) = self.import_streamed(&task, &request_id)? {
                return Ok(size);
            }
            let store = crate::s3::Store::new(&self.cfg.account).map_err(|e| e.to_string())?;
            let dir = self.cfg.dir.join("import");
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            let file = dir.join(format!("{id}.{}", task.format.to_ascii_lowercase()));
            // The downloaded copy goes however the import ends.
            let _remove = RemoveOnDrop(file.clone());
            self.event(
                &request_id,
                &id,
                "import.download.start",
                json!({"key": task.key}),
            );
            let bytes = store.download(&task.key, &file);
            let bytes = match bytes {
                Ok(b) => b,
                Err(e) => {
                    return Err(format!(
                        "ClientError: the disk image could not be read: {e}"
                    ));
                }
            };
            self.event(
                &request_id,
                &id,
                "import.download.end",
                json!({"bytes": bytes}),
            );
            self.set_progress(&id, 40);
            let info = run(
                "read the disk image's header",
                std::process::Command::new("qemu-img")
                    .args(["info", "--output=json", "-f"])
                    .arg(DiskFormat::parse(&task.format).map_or("raw", |f| f.qemu_format()))
                    .arg(&file),
            )
            .map_err(|e| {
                format!(
                    "ClientError: the disk image is not valid {}: {e}",
                    task.format
                )
            })?;
            let size = serde_json::from_str::<Value>(&info)
                .ok()
                .and_then(|v| v["virtual-size"].as_u64())
                .ok_or("an unreadable `qemu-img info`")?;
            let format = DiskFormat::parse(&task.format).ok_or("unknown format")?;
            let conf = self.conf()?;
            let target = format!("rbd:{POOL}/{}:conf={}:id=vm", task.image_id, conf.display());
            self.event(
                &request_id,
                &id,
                "import.convert.start",
                json!({"from": task.format}),
            );
            let converted = run(
                "convert the disk image",
                // Out-of-order writes, 16 at once: RBD takes them in parallel.
                std::process::Command::new("qemu-img")
                    .args([
                        "convert",
                        "-W",
                        "-m",
                        "16",
                        "-f",
                        format.qemu_format(),
                        "-O",
                        "raw",
                    ])
                    .arg(&file)
                    .arg(&target),
            );
            converted.map_err(|e| {
                format!(
                    "ClientError: the disk image is not valid {}: {e}",
                    task.format
                )
            })?;
            self.event(&request_id, &id, "import.convert.end", json!({}));
            self.set_progress(&id, 80);
            // The base instances are cloned from (clone v2: the cluster requires Mimic
            // clients, so the snapshot needs no protection).
            let image = format!("{POOL}/{}", task.image_id);
            self.rbd(&["snap", "create", &format!("{image}@base")])?;
            Ok(size)
        })();
        match result {
            Ok(size) => {
                self.with_state(|s| {
                    s.images.insert(
                        task.image_id.clone(),
                        Image {
                            id: task.image_id.clone(),
                            size_mib: size.div_ceil(1 << 20),
                        },
                    );
                    if let Some(t) = s.tasks.get_mut(&id) {
                        t.status = "completed".into();
                        t.progress = 100;
                        t.status_message = "completed".into();
                    }
                });
                self.event(
                    &request_id,
                    &id,
                    "import.completed",
                    json!({"image_id": task.image_id, "bytes": size}),
                );
            }
            Err(e) => {
                // Whatever was made of the image goes.
                let image = format!("{POOL}/{}", task.image_id);
                let _ = self.rbd(&["snap", "unprotect", &format!("{image}@base")]);
                let _ = self.rbd(&["snap", "purge", &image]);
                match self.rbd(&["rm", "--no-progress", &image]) {
                    Err(why) if !why.contains("No such file") => self.event(
                        &request_id,
                        &id,
                        "import.cleanup.failed",
                        json!({"image": image, "reason": why}),
                    ),
                    _ => {}
                }
                self.with_state(|s| {
                    if let Some(t) = s.tasks.get_mut(&id) {
                        t.status = "deleted".into();
                        t.status_message = e.clone();
                    }
                });
                self.event(&request_id, &id, "import.failed", json!({"reason": e}));
            }
        }
    }

    fn set_progress(&self, id: &str, p: u8) {
        self.with_state(|s| {
            if let Some(t) = s.tasks.get_mut(id) {
                t.progress = p;
            }
        });
    }

    /// The ruleset of every running instance's groups: on the bridge, a frame towards an
    /// instance's TAP passes if a rule of its groups allows it, else it is dropped. The
    /// kernel here has no bridge conntrack, so the filter is stateless in the way of
    /// network ACLs: a TCP segment without SYN (an answer, or a segment of a connection
    /// the instance opened) passes; a new connection needs a rule; ARP always passes.
    fn nft_ruleset(&self, s: &State) -> String {
        let mut chain = String::new();
        for i in s.instances.values().filter(|i| i.state != "terminated") {
            let tap = format!("t-{}", i.id);
            chain.push_str(&format!(
                "    oifname \"{tap}\" ether type arp accept\n    oifname \"{tap}\" tcp flags & (syn | ack) != syn accept\n"
            ));
            for g in i.groups.iter().filter_map(|g| s.groups.get(g)) {
                for r in &g.rules {
                    for cidr in &r.cidrs {
                        let proto = match r.protocol.as_str() {
                            "-1" => String::new(),
                            "icmp" => " ip protocol icmp".to_string(),
                            p => match (r.from_port, r.to_port) {
                                (Some(a), Some(b)) if a == b => format!(" {p} dport {a}"),
                                (Some(a), Some(b)) => format!(" {p} dport {a}-{b}"),
                                _ => format!(" meta l4proto {p}"),
                            },
                        };
                        chain.push_str(&format!(
                            "    oifname \"{tap}\" ip saddr {cidr}{proto} accept\n"
                        ));
                    }
                }
            }
            chain.push_str(&format!("    oifname \"{tap}\" drop\n"));
        }
        format!(
            "table bridge {NFT_TABLE}\ndelete table bridge {NFT_TABLE}\ntable bridge {NFT_TABLE} {{\n  chain ingress {{\n{chain}  }}\n  chain forward {{\n    type filter hook forward priority 0; policy accept;\n    jump ingress\n  }}\n  chain output {{\n    type filter hook output priority 0; policy accept;\n    jump ingress\n  }}\n}}\n"
        )
    }

    fn apply_groups(&self, request_id: &str) -> Result<(), String> {
        let text = {
            let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            self.nft_ruleset(&s)
        };
        let path = self.cfg.dir.join("security-groups.nft");
        std::fs::write(&path, &text).map_err(|e| e.to_string())?;
        run(
            "apply the security groups",
            std::process::Command::new("nft").arg("-f").arg(&path),
        )?;
        self.event(request_id, "nftables", "security-groups.applied", json!({}));
        Ok(())
    }

    fn launch(&self, i: &Instance, request_id: &str) -> Result<i32, String> {
        let (_, memory, vcpus) = INSTANCE_TYPES
            .iter()
            .find(|(n, _, _)| *n == i.instance_type)
            .copied()
            .ok_or("unknown instance type")?;
        let image = self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .images
            .get(&i.image_id)
            .cloned()
            .ok_or("unknown image")?;
        self.rbd(&[
            "clone",
            &format!("{POOL}/{}@base", i.image_id),
            &format!("{POOL}/{}", i.id),
        ])?;
        self.event(request_id, &i.id, "instance.disk.cloned", json!({}));
        let o = i.ip.octets();
        let spec = VmSpec {
            name: i.id.clone(),
            memory_mib: memory,
            vcpus,
            mac: format!("02:c1:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3]),
            ip_cidr: format!("{}/{}", i.ip, self.cfg.prefix),
            dirty_mbps: 0,
            dirty_mib: 0,
            resident_pct: 0,
            disk: Some(DiskSpec {
                cluster: self.cfg.cluster.name.clone(),
                pool: POOL.into(),
                image: i.id.clone(),
                size_mib: image.size_mib.max(*dczone_hypervisor::DISK_MIB.start()),
            }),
        };
        spec.validate()?;
        let access = RbdAccess {
            conf: self.conf()?,
            user: "vm".into(),
        };
        let dir = self.cfg.dir.join("instances").join(&i.id);
        let r = dczone_hypervisor::launch(&dczone_hypervisor::Launch {
            namespace: None,
            dir: &dir,
            spec: &spec,
            kernel: &self.cfg.kernel,
            initramfs: &self.cfg.initramfs,
            accel: self.cfg.accel,
            incoming: false,
            paused: false,
            bridge: &self.cfg.bridge,
            disk: Some(&access),
        })
        .map_err(|e| e.to_string())?;
        let _ = std::fs::write(
            dir.join("running.json"),
            serde_json::to_vec(&r).expect("serializes"),
        );
        Ok(r.pid)
    }

    /// Logs when the instance's console says its guest serves (what a cloud's console
    /// output shows), from a thread of its own.
    fn watch_console(self: &Arc<Self>, id: &str, request_id: &str) {
        let me = self.clone();
        let (id, rid) = (id.to_string(), request_id.to_string());
        std::thread::spawn(move || {
            let serial = me.cfg.dir.join("instances").join(&id).join("serial.log");
            let t = Instant::now();
            if dczone_hypervisor::wait_serial(
                &serial,
                dczone_hypervisor::GUEST_READY,
                Duration::from_secs(600),
            ) {
                me.event(
                    &rid,
                    &id,
                    "instance.console.ready",
                    json!({"after_running_ms": t.elapsed().as_millis() as u64}),
                );
            }
        });
    }

    /// A new key pair that both services take for `secs`.
    fn issue_key(&self, secs: u64, request_id: &str) -> Result<Value, ApiError> {
        let internal = |e: String| ApiError::new("InternalError", e);
        let k = crate::new_key_pair().map_err(|e| internal(e.to_string()))?;
        let expires_unix_ms = unix_ms() + secs * 1000;
        // Recorded before the gateway knows it: a key the gateway takes is always one the
        // reaper will take away.
        self.with_state(|s| {
            s.keys.insert(
                k.access_key.clone(),
                IssuedKey {
                    secret_key: k.secret_key.clone(),
                    expires_unix_ms,
                    revoked: false,
                },
            )
        });
        if let Err(e) = self.storage.s3_key_add(
            &self.cfg.cluster.name,
            S3_USER,
            &k.access_key,
            &k.secret_key,
        ) {
            self.with_state(|s| s.keys.remove(&k.access_key));
            return Err(internal(e.to_string()));
        }
        self.event(
            request_id,
            &k.access_key,
            "key.issued",
            json!({"expires": rfc3339(expires_unix_ms)}),
        );
        Ok(json!({
            "access_key": k.access_key,
            "secret_key": k.secret_key,
            "expires_unix_ms": expires_unix_ms,
        }))
    }

    /// Takes expired keys from the S3 gateway, every second (the compute API refuses them
    /// from their expiry on); a removal that failed is tried again after `REVOKE_RETRY`.
    /// A key revoked `FORGET_AFTER_MS` after its expiry is forgotten, and so is an
    /// instance terminated `TERMINATED_SHOWN_MS` ago.
    fn reap(self: &Arc<Self>) {
        let me = self.clone();
        let mut failed: BTreeMap<String, Instant> = BTreeMap::new();
        std::thread::spawn(move || loop {
            let now = unix_ms();
            let (due, stale): (Vec<String>, Vec<String>) = {
                let s = me.state.lock().unwrap_or_else(|e| e.into_inner());
                let due = s
                    .keys
                    .iter()
                    .filter(|(_, k)| !k.revoked && k.expires_unix_ms <= now)
                    .map(|(a, _)| a.clone())
                    .filter(|a| failed.get(a).is_none_or(|t| t.elapsed() >= REVOKE_RETRY))
                    .collect();
                let stale = s
                    .keys
                    .iter()
                    .filter(|(_, k)| k.revoked && k.expires_unix_ms + FORGET_AFTER_MS <= now)
                    .map(|(a, _)| a.clone())
                    .collect();
                (due, stale)
            };
            if !stale.is_empty() {
                me.with_state(|s| s.keys.retain(|a, _| !stale.contains(a)));
            }
            me.forget_terminated(now);
            for ak in due {
                let removed = match me.storage.s3_key_remove(&me.cfg.cluster.name, S3_USER, &ak) {
                    // Not the gateway's (any more; radosgw-admin: "unable to find access
                    // key"): nothing to take away.
                    Err(e) if e.to_string().contains("unable to find access key") => Ok(()),
                    r => r,
                };
                match removed {
                    Ok(()) => {
                        failed.remove(&ak);
                        me.with_state(|s| {
                            if let Some(k) = s.keys.get_mut(&ak) {
                                k.revoked = true;
                            }
                        });
                        me.event("reaper", &ak, "key.expired", json!({}));
                    }
                    Err(e) => {
                        failed.insert(ak.clone(), Instant::now());
                        me.event(
                            "reaper",
                            &ak,
                            "key.revoke.failed",
                            json!({"reason": e.to_string(), "retry_s": REVOKE_RETRY.as_secs()}),
                        );
                    }
                }
            }
            std::thread::sleep(Duration::from_secs(1));
        });
    }

    /// Terminated instances described for their hour are forgotten, with their directory
    /// (console log, QEMU's files), once their disk is gone: one whose removal failed at
    /// termination (a watch left by a killed QEMU) is removed here first, and stays
    /// described while it cannot be.
    fn forget_terminated(&self, now: u64) {
        let due = self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .terminated_before(now);
        for id in due {
            match self.rbd(&["rm", "--no-progress", &format!("{POOL}/{id}")]) {
                Err(why) if !why.contains("No such file") => {
                    self.event(
                        "reaper",
                        &id,
                        "instance.disk.remove.failed",
                        json!({"reason": why}),
                    );
                    continue;
                }
                _ => {}
            }
            self.with_state(|s| s.instances.remove(&id));
            let _ = std::fs::remove_dir_all(self.cfg.dir.join("instances").join(&id));
            self.event("reaper", &id, "instance.forgotten", json!({}));
        }
    }

    fn terminate(&self, id: &str, request_id: &str) {
        let dir = self.cfg.dir.join("instances").join(id);
        if let Some(r) = std::fs::read(dir.join("running.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<dczone_hypervisor::Running>(&b).ok())
            .filter(|r| qemu_alive(r.pid))
        {
            dczone_hypervisor::quit(&r);
        }
        let _ = self.rbd(&["rm", &format!("{POOL}/{id}")]);
        self.with_state(|s| {
            if let Some(x) = s.instances.get_mut(id) {
                x.state = "terminated".into();
                x.terminated_unix_ms = Some(unix_ms());
            }
        });
        self.event(request_id, id, "instance.terminated", json!({}));
    }

    /// After a restart: an instance whose QEMU is gone (its host went down) is `stopped`,
    /// as EC2 shows an instance whose host failed; its disk stays.
    fn reconcile(&self) {
        // Terminated before their time was kept: shown for an hour from now.
        self.with_state(|s| {
            for i in s.instances.values_mut() {
                if i.state == "terminated" && i.terminated_unix_ms.is_none() {
                    i.terminated_unix_ms = Some(unix_ms());
                }
            }
        });
        let gone: Vec<String> = {
            let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            s.instances
                .values()
                .filter(|i| i.state == "running" || i.state == "pending")
                .filter(|i| {
                    !std::fs::read(
                        self.cfg
                            .dir
                            .join("instances")
                            .join(&i.id)
                            .join("running.json"),
                    )
                    .ok()
                    .and_then(|b| serde_json::from_slice::<dczone_hypervisor::Running>(&b).ok())
                    .is_some_and(|r| qemu_alive(r.pid))
                })
                .map(|i| i.id.clone())
                .collect()
        };
        for id in gone {
            self.with_state(|s| {
                if let Some(i) = s.instances.get_mut(&id) {
                    i.state = "stopped".into();
                }
            });
            self.event(
                "start",
                &id,
                "instance.stopped",
                json!({"reason": "its QEMU is gone"}),
            );
        }
    }

    fn free_ip(&self, s: &State) -> Option<Ipv4Addr> {
        let first = u32::from(self.cfg.first_ip);
        (0..u32::from(self.cfg.ip_count))
            .map(|k| Ipv4Addr::from(first + k))
            .find(|ip| {
                !s.instances
                    .values()
                    .any(|i| i.state != "terminated" && i.ip == *ip)
            })
    }

    fn act(self: &Arc<Self>, action: Action, request_id: &str) -> Result<String, ApiError> {
        let invalid = |m: String| ApiError::new("InvalidParameterValue", m);
        match action {
            Action::ImportImage {
                format,
                bucket,
                key,
                ..
            } => {
                if bucket != self.cfg.account.bucket {
                    return Err(invalid(format!(
                        "bucket {bucket} is not this account's: use {}",
                        self.cfg.account.bucket
                    )));
                }
                let id = new_id("import-ami");
                let task = ImportTask {
                    image_id: id.trim_start_matches("import-").to_string(),
                    id: id.clone(),
                    format: format.name().into(),
                    bucket,
                    key,
                    status: "active".into(),
                    status_message: "pending".into(),
                    progress: 0,
                };
                self.with_state(|s| s.tasks.insert(id.clone(), task.clone()));
                self.event(
                    request_id,
                    &id,
                    "import.start",
                    json!({"key": task.key, "format": task.format}),
                );
                let me = self.clone();
                let rid = request_id.to_string();
                std::thread::spawn(move || me.import(task, rid));
                Ok(format!(
                    "<importTaskId>{id}</importTaskId><status>active</status><progress>0</progress>"
                ))
            }
            Action::DescribeImportImageTasks { ids } => {
                let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
                let mut items = String::new();
                for t in s
                    .tasks
                    .values()
                    .filter(|t| ids.is_empty() || ids.contains(&t.id))
                {
                    let image = if t.status == "completed" {
                        format!("<imageId>{}</imageId>", t.image_id)
                    } else {
                        String::new()
                    };
                    items.push_str(&format!(
                        "<item><importTaskId>{}</importTaskId>{image}<status>{}</status><statusMessage>{}</statusMessage><progress>{}</progress></item>",
                        t.id,
                        t.status,
                        escape(&t.status_message),
                        t.progress
                    ));
                }
                for id in &ids {
                    if !s.tasks.contains_key(id) {
                        return Err(ApiError::new(
                            "InvalidConversionTaskId.Malformed",
                            format!("import task {id} does not exist"),
                        ));
                    }
                }
                Ok(format!("<importImageTaskSet>{items}</importImageTaskSet>"))
            }
            Action::CreateSecurityGroup { name, description } => {
                let id = new_id("sg");
                let dup = self.with_state(|s| {
                    if s.groups.values().any(|g| g.name == name) {
                        return true;
                    }
                    s.groups.insert(
                        id.clone(),
                        Group {
                            id: id.clone(),
                            name: name.clone(),
                            description,
                            rules: Vec::new(),
                        },
                    );
                    false
                });
                if dup {
                    return Err(ApiError::new(
                        "InvalidGroup.Duplicate",
                        format!("security group {name} already exists"),
                    ));
                }
                self.event(
                    request_id,
                    &id,
                    "security-group.created",
                    json!({"name": name}),
                );
                Ok(format!("<return>true</return><groupId>{id}</groupId>"))
            }
            Action::AuthorizeSecurityGroupIngress {
                group_id,
                permissions,
            } => {
                let found = self.with_state(|s| match s.groups.get_mut(&group_id) {
                    Some(g) => {
                        for p in &permissions {
                            let r = Rule::from(p);
                            if !g.rules.contains(&r) {
                                g.rules.push(r);
                            }
                        }
                        true
                    }
                    None => false,
                });
                if !found {
                    return Err(ApiError::new(
                        "InvalidGroup.NotFound",
                        format!("security group {group_id} does not exist"),
                    ));
                }
                self.event(
                    request_id,
                    &group_id,
                    "security-group.ingress",
                    json!({"rules": permissions.iter().map(Rule::from).collect::<Vec<_>>()}),
                );
                self.apply_groups(request_id)
                    .map_err(|e| ApiError::new("InternalError", e))?;
                Ok("<return>true</return>".into())
            }
            Action::RunInstances {
                image_id,
                instance_type,
                count,
                security_groups,
                ..
            } => {
                if !INSTANCE_TYPES.iter().any(|(n, _, _)| *n == instance_type) {
                    return Err(invalid(format!(
                        "instance type {instance_type} is not offered: use one of {}",
                        INSTANCE_TYPES
                            .iter()
                            .map(|(n, m, c)| format!("{n} ({m} MiB, {c} vCPU)"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
                let mut made = Vec::new();
                {
                    let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
                    if !s.images.contains_key(&image_id) {
                        return Err(ApiError::new(
                            "InvalidAMIID.NotFound",
                            format!("image {image_id} does not exist (is its import completed?)"),
                        ));
                    }
                    for g in &security_groups {
                        if !s.groups.contains_key(g) {
                            return Err(ApiError::new(
                                "InvalidGroup.NotFound",
                                format!("security group {g} does not exist"),
                            ));
                        }
                    }
                    for _ in 0..count.max(1) {
                        let ip = self.free_ip(&s).ok_or_else(|| {
                            ApiError::new(
                                "InsufficientInstanceCapacity",
                                "no address left for another instance: terminate one",
                            )
                        })?;
                        let i = Instance {
                            id: new_id("i"),
                            image_id: image_id.clone(),
                            instance_type: instance_type.clone(),
                            state: "pending".into(),
                            ip,
                            groups: security_groups.clone(),
                            launch_time: rfc3339(unix_ms()),
                            pid: None,
                            terminated_unix_ms: None,
                        };
                        s.instances.insert(i.id.clone(), i.clone());
                        made.push(i);
                    }
                    self.save(&s);
                }
                // The filter is in place before the instance's TAP exists.
                self.apply_groups(request_id)
                    .map_err(|e| ApiError::new("InternalError", e))?;
                let mut items = String::new();
                for i in &made {
                    self.event(
                        request_id,
                        &i.id,
                        "instance.pending",
                        json!({"image_id": i.image_id, "ip": i.ip}),
                    );
                    match self.launch(i, request_id) {
                        Ok(pid) => {
                            self.with_state(|s| {
                                if let Some(x) = s.instances.get_mut(&i.id) {
                                    x.state = "running".into();
                                    x.pid = Some(pid);
                                }
                            });
                            self.event(request_id, &i.id, "instance.running", json!({"pid": pid}));
                            self.watch_console(&i.id, request_id);
                        }
                        Err(e) => {
                            self.terminate(&i.id, request_id);
                            self.event(request_id, &i.id, "instance.failed", json!({"reason": e}));
                            return Err(ApiError::new(
                                "InternalError",
                                format!("instance {} did not start: {e}", i.id),
                            ));
                        }
                    }
                    items.push_str(&instance_xml(
                        &self
                            .state
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .instances[&i.id],
                    ));
                }
                Ok(format!(
                    "<reservationId>{}</reservationId><instancesSet>{items}</instancesSet>",
                    new_id("r")
                ))
            }
            Action::DescribeInstances { ids } => {
                let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
                let mut items = String::new();
                for i in s
                    .instances
                    .values()
                    .filter(|i| ids.is_empty() || ids.contains(&i.id))
                {
                    items.push_str(&format!(
                        "<item><reservationId>r-{}</reservationId><instancesSet>{}</instancesSet></item>",
                        &i.id[2..],
                        instance_xml(i)
                    ));
                }
                for id in &ids {
                    if !s.instances.contains_key(id) {
                        return Err(ApiError::new(
                            "InvalidInstanceID.NotFound",
                            format!("instance {id} does not exist"),
                        ));
                    }
                }
                Ok(format!("<reservationSet>{items}</reservationSet>"))
            }
            Action::DescribeImages { ids } => {
                let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(id) = ids.iter().find(|id| !s.images.contains_key(*id)) {
                    return Err(ApiError::new(
                        "InvalidAMIID.NotFound",
                        format!("image {id} does not exist"),
                    ));
                }
                let items: String = s
                    .images
                    .values()
                    .filter(|i| ids.is_empty() || ids.contains(&i.id))
                    .map(|i| {
                        format!(
                            "<item><imageId>{}</imageId><imageState>available</imageState>\
                             <blockDeviceMapping><item><ebs><volumeSize>{}</volumeSize></ebs></item>\
                             </blockDeviceMapping></item>",
                            i.id,
                            i.size_mib.div_ceil(1024)
                        )
                    })
                    .collect();
                Ok(format!("<imagesSet>{items}</imagesSet>"))
            }
            Action::DeregisterImage { image_id } => {
                {
                    let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
                    if !s.images.contains_key(&image_id) {
                        return Err(ApiError::new(
                            "InvalidAMIID.NotFound",
                            format!("image {image_id} does not exist"),
                        ));
                    }
                    // An instance's disk is a clone of the image: it goes first.
                    let users: Vec<&str> = s
                        .instances
                        .values()
                        .filter(|i| i.image_id == image_id && i.state != "terminated")
                        .map(|i| i.id.as_str())
                        .collect();
                    if !users.is_empty() {
                        return Err(ApiError::new(
                            "InvalidParameterValue",
                            format!(
                                "image {image_id} is the disk of instance(s) {}: terminate them first",
                                users.join(", ")
                            ),
                        ));
                    }
                }
                let image = format!("{POOL}/{image_id}");
                let _ = self.rbd(&["snap", "purge", "--no-progress", &image]);
                if let Err(e) = self.rbd(&["rm", "--no-progress", &image]) {
                    if !e.contains("No such file") {
                        return Err(ApiError::new(
                            "InternalError",
                            format!("remove image {image_id}: {e}"),
                        ));
                    }
                }
                self.with_state(|s| {
                    s.images.remove(&image_id);
                });
                self.event(request_id, &image_id, "image.deregistered", json!({}));
                Ok("<return>true</return>".into())
            }
            Action::DescribeSecurityGroups { ids } => {
                let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(id) = ids.iter().find(|id| !s.groups.contains_key(*id)) {
                    return Err(ApiError::new(
                        "InvalidGroup.NotFound",
                        format!("security group {id} does not exist"),
                    ));
                }
                let items: String = s
                    .groups
                    .values()
                    .filter(|g| ids.is_empty() || ids.contains(&g.id))
                    .map(group_xml)
                    .collect();
                Ok(format!("<securityGroupInfo>{items}</securityGroupInfo>"))
            }
            Action::DeleteSecurityGroup { group_id } => {
                let refused = self.with_state(|s| {
                    if !s.groups.contains_key(&group_id) {
                        return Some(ApiError::new(
                            "InvalidGroup.NotFound",
                            format!("security group {group_id} does not exist"),
                        ));
                    }
                    let users: Vec<&str> = s
                        .instances
                        .values()
                        .filter(|i| i.state != "terminated" && i.groups.contains(&group_id))
                        .map(|i| i.id.as_str())
                        .collect();
                    if !users.is_empty() {
                        return Some(ApiError::new(
                            "DependencyViolation",
                            format!(
                                "security group {group_id} is used by instance(s) {}: terminate them first",
                                users.join(", ")
                            ),
                        ));
                    }
                    s.groups.remove(&group_id);
                    None
                });
                if let Some(e) = refused {
                    return Err(e);
                }
                // Only instances that are not terminated have rules: the ruleset is unchanged.
                self.event(request_id, &group_id, "security-group.deleted", json!({}));
                Ok("<return>true</return>".into())
            }
            Action::TerminateInstances { ids } => {
                let known: Vec<Instance> = {
                    let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
                    for id in &ids {
                        if !s.instances.contains_key(id) {
                            return Err(ApiError::new(
                                "InvalidInstanceID.NotFound",
                                format!("instance {id} does not exist"),
                            ));
                        }
                    }
                    ids.iter().map(|id| s.instances[id].clone()).collect()
                };
                let mut items = String::new();
                for i in known {
                    if i.state != "terminated" {
                        self.terminate(&i.id, request_id);
                    }
                    items.push_str(&format!(
                        "<item><instanceId>{}</instanceId><currentState><code>48</code><name>terminated</name></currentState><previousState><code>{}</code><name>{}</name></previousState></item>",
                        i.id,
                        state_code(&i.state),
                        i.state
                    ));
                }
                self.apply_groups(request_id)
                    .map_err(|e| ApiError::new("InternalError", e))?;
                Ok(format!("<instancesSet>{items}</instancesSet>"))
            }
        }
    }
}

fn state_code(state: &str) -> u16 {
    match state {
        "pending" => 0,
        "running" => 16,
        "terminated" => 48,
        _ => 80,
    }
}

pub fn rfc3339(ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

fn instance_xml(i: &Instance) -> String {
    let groups: String = i
        .groups
        .iter()
        .map(|g| format!("<item><groupId>{g}</groupId></item>"))
        .collect();
    format!(
        "<item><instanceId>{}</instanceId><imageId>{}</imageId><instanceState><code>{}</code><name>{}</name></instanceState><privateIpAddress>{}</privateIpAddress><instanceType>{}</instanceType><launchTime>{}</launchTime><groupSet>{groups}</groupSet></item>",
        i.id,
        i.image_id,
        state_code(&i.state),
        i.state,
        i.ip,
        i.instance_type,
        i.launch_time
    )
}

fn group_xml(g: &Group) -> String {
    let rules: String = g
        .rules
        .iter()
        .map(|r| {
            let ports = match (r.from_port, r.to_port) {
                (Some(a), Some(b)) => format!("<fromPort>{a}</fromPort><toPort>{b}</toPort>"),
                _ => String::new(),
            };
            let ranges: String = r
                .cidrs
                .iter()
                .map(|c| format!("<item><cidrIp>{c}</cidrIp></item>"))
                .collect();
            format!(
                "<item><ipProtocol>{}</ipProtocol>{ports}<ipRanges>{ranges}</ipRanges></item>",
                r.protocol
            )
        })
        .collect();
    format!(
        "<item><groupId>{}</groupId><groupName>{}</groupName><groupDescription>{}</groupDescription><ipPermissions>{rules}</ipPermissions></item>",
        g.id,
        escape(&g.name),
        escape(&g.description)
    )
}

impl DiskFormat {
    /// `qemu-img`'s name of the format.
    pub fn qemu_format(self) -> &'static str {
        match self {
            DiskFormat::Vmdk => "vmdk",
            DiskFormat::Vhd => "vpc",
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// Brings the provider's own cluster up (made on the first start) with its S3 gateway and
/// the account's S3 user and bucket. Progress lines go to `say`.
pub fn storage_up(cfg: &ProviderConfig, say: &dyn Fn(&str)) -> anyhow::Result<HostStorage> {
    use anyhow::Context;
    let hs = HostStorage::new(cfg.dir.join("ceph"), &cfg.host);
    let name = cfg.cluster.name.as_str();
    if hs.plan(name)?.is_none() {
        let keys = dczone_storage::keys::Keys::generate(&cfg.cluster)?;
        hs.install(&cfg.cluster, &keys, None)?;
        say("storage: installed");
    }
    let wait = |what: &str, ok: &dyn Fn(&dczone_storage::ClusterStatus) -> bool| {
        let t = Instant::now();
        loop {
            if let Ok(s) = hs.status(name) {
                if ok(&s) {
                    return Ok(());
                }
            }
            if t.elapsed() > Duration::from_secs(180) {
                anyhow::bail!("the provider's storage: no {what} after 180 s");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    hs.start(name, &[Kind::Mon])?;
    wait("monitor quorum", &|s| !s.quorum.is_empty())?;
    hs.start(name, &[Kind::Mgr, Kind::Osd])?;
    wait("OSD up", &|s| s.osds_up >= 1)?;
    hs.setup(name)?;
    wait("active PGs", &|s| s.all_active())?;
    say("storage: monitor, manager and OSD up, pool ready");
    // The gateway makes its bucket pools at their first use: the first upload then waits
    // for new PGs (a first migration's transfer ran at 0.30 of the path, the next at
    // 0.91). Made here instead, before any tenant writes.
    for pool in RGW_LAZY_POOLS {
        hs.ensure_pool(name, pool, "rgw")?;
    }
    hs.start(name, &[Kind::Rgw])?;
    let creds = &cfg.account;
    hs.s3_user(name, S3_USER, &creds.access_key, &creds.secret_key)?;
    // The gateway makes its pools on its first start: it answers once they exist.
    let store = crate::s3::Store::new(&cfg.account)?;
    let t = Instant::now();
    loop {
        match store.create_bucket() {
            Ok(()) => break,
            Err(e) if t.elapsed() > Duration::from_secs(120) => {
                return Err(e).context("the provider's S3 gateway did not come up in 120 s")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
    say("storage: S3 gateway up, bucket ready");
    Ok(hs)
}

/// Runs the provider until the process is killed: its storage, then the compute API.
pub fn serve(cfg: ProviderConfig) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.dir)?;
    let say = |m: &str| eprintln!("{} {m}", rfc3339(unix_ms()));
    let storage = storage_up(&cfg, &say)?;
    let state: State = std::fs::read(cfg.dir.join("state.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(cfg.dir.join("execution-log.jsonl"))?;
    let listen = cfg.listen;
    let p = Arc::new(Provider {
        cfg,
        storage,
        state: Mutex::new(state),
        log: Mutex::new(log),
    });
    p.reconcile();
    p.reap();
    p.apply_groups("start").map_err(anyhow::Error::msg)?;
    p.event(
        "start",
        "compute",
        "provider.ready",
        json!({"listen": listen}),
    );
    std::fs::write(p.cfg.dir.join("ready"), b"")?;
    say(&format!("compute API on http://{listen}"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let app = axum::Router::new()
            .route("/", axum::routing::any(handle))
            .route("/log", axum::routing::get(handle_log))
            .route("/keys", axum::routing::post(handle_keys))
            .with_state(p);
        // Answers leave at once (no Nagle wait on the caller's delayed ACK).
        let listener =
            axum::serve::ListenerExt::tap_io(tokio::net::TcpListener::bind(listen).await?, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
        axum::serve(listener, app).await?;
        Ok(())
    })
}

type Shared = Arc<Provider>;

fn decode_pairs(s: &str) -> Vec<(String, String)> {
    url::form_urlencoded::parse(s.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// Checks the request's signature; the query's pairs.
fn authenticate(
    p: &Provider,
    method: &axum::http::Method,
    uri: &axum::http::Uri,
    headers: &axum::http::HeaderMap,
    body: &[u8],
) -> Result<(Vec<(String, String)>, String), ApiError> {
    let query = decode_pairs(uri.query().unwrap_or_default());
    let hs: Vec<(String, String)> = headers
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_string(),
                v.to_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let req = sigv4::Request {
        method: method.as_str(),
        path: uri.path(),
        query: &query,
        headers: &hs,
        payload_sha256: sigv4::sha256_hex(body),
    };
    let account = &p.cfg.account;
    let issued = p
        .state
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .keys
        .clone();
    let key = sigv4::verify(
        &req,
        |k| {
            if k == account.access_key {
                Some(account.secret_key.clone())
            } else {
                issued.get(k).map(|i| i.secret_key.clone())
            }
        },
        &account.region,
        "ec2",
        (unix_ms() / 1000) as i64,
    )?;
    if let Some(i) = issued.get(&key).filter(|i| i.expires_unix_ms <= unix_ms()) {
        return Err(ApiError::new(
            "AuthFailure",
            format!(
                "access key {key} expired at {}: get a new key from the cloud's console",
                rfc3339(i.expires_unix_ms)
            ),
        ));
    }
    Ok((query, key))
}

fn xml_response(status: u16, body: String) -> axum::response::Response {
    axum::response::Response::builder()
        .status(status)
        .header("content-type", "text/xml;charset=UTF-8")
        .body(axum::body::Body::from(body))
        .expect("a valid response")
}

async fn handle(
    axum::extract::State(p): axum::extract::State<Shared>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> axum::response::Response {
    let request_id = new_id("req");
    let result = (|| {
        let (mut params, _) = authenticate(&p, &method, &uri, &headers, &body)?;
        params.extend(decode_pairs(&String::from_utf8_lossy(&body)));
        ec2::parse(&params)
    })();
    let action = match result {
        Ok(a) => a,
        Err(e) => {
            p.event(
                &request_id,
                "compute",
                "request.refused",
                json!({"code": e.code, "message": e.message}),
            );
            return xml_response(e.status(), e.xml(&request_id));
        }
    };
    let name = action_name(&action);
    let rid = request_id.clone();
    let pp = p.clone();
    let out = tokio::task::spawn_blocking(move || pp.act(action, &rid)).await;
    match out {
        Ok(Ok(inner)) => xml_response(
            200,
            format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<{name}Response xmlns=\"http://ec2.amazonaws.com/doc/{}/\"><requestId>{request_id}</requestId>{inner}</{name}Response>",
                ec2::VERSION
            ),
        ),
        Ok(Err(e)) => xml_response(e.status(), e.xml(&request_id)),
        Err(e) => xml_response(500, ApiError::new("InternalError", e.to_string()).xml(&request_id)),
    }
}

fn action_name(a: &Action) -> &'static str {
    match a {
        Action::ImportImage { .. } => "ImportImage",
        Action::DescribeImportImageTasks { .. } => "DescribeImportImageTasks",
        Action::DescribeImages { .. } => "DescribeImages",
        Action::DeregisterImage { .. } => "DeregisterImage",
        Action::RunInstances { .. } => "RunInstances",
        Action::DescribeInstances { .. } => "DescribeInstances",
        Action::TerminateInstances { .. } => "TerminateInstances",
        Action::CreateSecurityGroup { .. } => "CreateSecurityGroup",
        Action::AuthorizeSecurityGroupIngress { .. } => "AuthorizeSecurityGroupIngress",
        Action::DescribeSecurityGroups { .. } => "DescribeSecurityGroups",
        Action::DeleteSecurityGroup { .. } => "DeleteSecurityGroup",
    }
}

/// `GET /log?since=UNIX_MS`: the execution log (JSON lines), signed as any request.
async fn handle_log(
    axum::extract::State(p): axum::extract::State<Shared>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    let request_id = new_id("req");
    let query = match authenticate(&p, &method, &uri, &headers, b"") {
        Ok((q, _)) => q,
        Err(e) => return xml_response(e.status(), e.xml(&request_id)),
    };
    let since: u64 = query
        .iter()
        .find(|(k, _)| k == "since")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let text = std::fs::read_to_string(p.cfg.dir.join("execution-log.jsonl")).unwrap_or_default();
    let lines: Vec<LogEntry> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<LogEntry>(l).ok())
        .filter(|e| e.unix_ms >= since)
        .collect();
    axum::response::Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(axum::body::Body::from(
            serde_json::to_vec(&lines).expect("serializes"),
        ))
        .expect("a valid response")
}

/// `POST /keys` with `ExpiresIn=SECONDS` (the cloud's console): a new key pair of the
/// account that both services take until it expires (JSON: `access_key`, `secret_key`,
/// `expires_unix_ms`). Only the account's own key may ask; an issued key may not.
async fn handle_keys(
    axum::extract::State(p): axum::extract::State<Shared>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> axum::response::Response {
    let request_id = new_id("req");
    let pp = p.clone();
    let result = (|| {
        let (_, key) = authenticate(&p, &method, &uri, &headers, &body)?;
        if key != p.cfg.account.access_key {
            return Err(ApiError::new(
                "UnauthorizedOperation",
                format!(
                    "access key {key} is an issued key: only the account's own key issues keys"
                ),
            ));
        }
        let params = decode_pairs(&String::from_utf8_lossy(&body));
        let secs: u64 = params
            .iter()
            .find(|(k, _)| k == "ExpiresIn")
            .and_then(|(_, v)| v.parse().ok())
            .filter(|s| (1..=MAX_KEY_S).contains(s))
            .ok_or_else(|| {
                ApiError::new(
                    "InvalidParameterValue",
                    format!("ExpiresIn must be whole seconds from 1 to {MAX_KEY_S}"),
                )
            })?;
        Ok(secs)
    })();
    let secs = match result {
        Ok(s) => s,
        Err(e) => {
            p.event(
                &request_id,
                "console",
                "request.refused",
                json!({"code": e.code, "message": e.message}),
            );
            return xml_response(e.status(), e.xml(&request_id));
        }
    };
    let rid = request_id.clone();
    let out = tokio::task::spawn_blocking(move || pp.issue_key(secs, &rid)).await;
    match out {
        Ok(Ok(v)) => axum::response::Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(axum::body::Body::from(v.to_string()))
            .expect("a valid response"),
        Ok(Err(e)) => xml_response(e.status(), e.xml(&request_id)),
        Err(e) => xml_response(
            500,
            ApiError::new("InternalError", e.to_string()).xml(&request_id),
        ),
    }
}

/// The provider's directory in a lab (`<lab dir>/cloud/<site>`).
pub fn lab_dir(lab_dir: &Path, site: &str) -> PathBuf {
    lab_dir.join("cloud").join(site)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_terminated_instance_is_forgotten_an_hour_after() {
        let instance = |id: &str, state: &str, terminated: Option<u64>| Instance {
            id: id.into(),
            image_id: "ami-1".into(),
            instance_type: "d1.small".into(),
            state: state.into(),
            ip: Ipv4Addr::new(10, 0, 0, 1),
            groups: Vec::new(),
            launch_time: String::new(),
            pid: None,
            terminated_unix_ms: terminated,
        };
        let mut s = State::default();
        for i in [
            instance("i-old", "terminated", Some(1_000)),
            instance("i-new", "terminated", Some(1_000 + 60_000)),
            instance("i-run", "running", None),
            instance("i-undated", "terminated", None),
        ] {
            s.instances.insert(i.id.clone(), i);
        }
        assert!(s
            .terminated_before(1_000 + TERMINATED_SHOWN_MS - 1)
            .is_empty());
        assert_eq!(s.terminated_before(1_000 + TERMINATED_SHOWN_MS), ["i-old"]);
        // One terminated before the time was kept has none: the start dates it.
        assert_eq!(s.terminated_before(u64::MAX), ["i-new", "i-old"]);
    }

    #[test]
    fn a_group_reads_back_as_the_client_parses_it() {
        let g = Group {
            id: "sg-1".into(),
            name: "dczone-vm1-<1>".into(),
            description: "the application & more".into(),
            rules: vec![
                Rule {
                    protocol: "tcp".into(),
                    from_port: Some(8080),
                    to_port: Some(8080),
                    cidrs: vec!["10.0.0.0/8".into(), "192.168.0.0/16".into()],
                },
                Rule {
                    protocol: "icmp".into(),
                    from_port: None,
                    to_port: None,
                    cidrs: vec!["0.0.0.0/0".into()],
                },
            ],
        };
        let body = format!(
            "<DescribeSecurityGroupsResponse xmlns=\"{}\"><securityGroupInfo>{}</securityGroupInfo></DescribeSecurityGroupsResponse>",
            ec2::XMLNS,
            group_xml(&g)
        );
        let doc = roxmltree::Document::parse(&body).unwrap();
        let read = crate::client::groups_of(&doc);
        assert_eq!(read.len(), 1);
        assert_eq!(
            (
                read[0].id.as_str(),
                read[0].name.as_str(),
                read[0].description.as_str()
            ),
            ("sg-1", "dczone-vm1-<1>", "the application & more")
        );
        assert_eq!(
            read[0].rules,
            vec![
                "tcp/8080 from 10.0.0.0/8 192.168.0.0/16".to_string(),
                "icmp from 0.0.0.0/0".to_string()
            ]
        );
    }
}
