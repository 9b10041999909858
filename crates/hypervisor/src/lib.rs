//! The QEMU driver: launches guests inside a host's network namespace with their NIC on the
//! host bridge, talks QMP to them, and picks the accelerator by probing.
//!
//! It knows QEMU and Linux; it knows nothing about sites, the APN or databases.

pub mod qmp;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use qmp::{Event, Qmp, QmpError};

/// `aa:bb:cc:dd:ee:ff`, hex, with the multicast bit clear.
fn valid_unicast_mac(mac: &str) -> bool {
    let octets: Vec<&str> = mac.split(':').collect();
    octets.len() == 6
        && octets
            .iter()
            .all(|o| o.len() == 2 && o.chars().all(|c| c.is_ascii_hexdigit()))
        && u8::from_str_radix(octets[0], 16).is_ok_and(|b| b & 1 == 0)
}

/// The largest resident working set, percent of the memory.
pub const MAX_RESIDENT_PCT: u8 = 90;

/// What a VM is, independent of where it runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmSpec {
    pub name: String,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub mac: String,
    /// Guest address with prefix, e.g. `10.77.1.101/16`.
    pub ip_cidr: String,
    /// Memory the guest workload dirties per second, MB/s.
    pub dirty_mbps: u32,
    /// Size of the area it rewrites, MiB.
    pub dirty_mib: u32,
    /// Share of the memory, percent, that the guest fills with incompressible data at boot:
    /// its working set, as full as a real VM's. The dirty area lies inside it.
    #[serde(default)]
    pub resident_pct: u8,
    /// Its disk, if it has one: an RBD image of the zone's storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskSpec>,
}

/// A VM's disk: an RBD image in the pool of a storage cluster of the zone. Each host opens
/// it with its own copy of that cluster's configuration and client key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// The storage cluster (`region-1`).
    pub cluster: String,
    pub pool: String,
    pub image: String,
    pub size_mib: u64,
}

/// The smallest and largest disks, MiB.
pub const DISK_MIB: std::ops::RangeInclusive<u64> = 64..=1 << 20;

/// How a host opens a VM's RBD disk: the cluster's `ceph.conf` on this host and the client
/// whose key it names.
#[derive(Debug, Clone)]
pub struct RbdAccess {
    pub conf: PathBuf,
    /// Ceph client id (`vm` for `client.vm`).
    pub user: String,
}

/// QEMU's node name of a VM's disk.
pub const DISK_NODE: &str = "disk0";

impl VmSpec {
    /// Checks everything that becomes part of a path, a TAP name or QEMU's options (name,
    /// MAC, address) and the sizes: a spec that arrives over the network (an incoming
    /// migration's record) is checked as CLI input is.
    pub fn validate(&self) -> Result<(), String> {
        let ok = !self.name.is_empty()
            && self.name.len() <= 12
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !ok {
            return Err(format!(
                "VM name '{}' must be 1-12 characters of a-z, 0-9, '-'",
                self.name
            ));
        }
        if !valid_unicast_mac(&self.mac) {
            return Err(format!(
                "MAC '{}' must be six hex pairs separated by ':', unicast (e.g. 02:dc:01:02:65:01)",
                self.mac
            ));
        }
        let ip_ok = self.ip_cidr.split_once('/').is_some_and(|(ip, len)| {
            ip.parse::<std::net::Ipv4Addr>().is_ok()
                && len.parse::<u8>().is_ok_and(|l| (1..=32).contains(&l))
        });
        if !ip_ok {
            return Err(format!(
                "guest address '{}' must be IPv4/prefix (e.g. 10.77.2.101/16)",
                self.ip_cidr
            ));
        }
        if !(1..=64).contains(&self.vcpus) {
            return Err(format!("{} vCPUs is outside 1-64", self.vcpus));
        }
        if !(64..=65536).contains(&self.memory_mib) {
            return Err(format!(
                "memory {} MiB is outside 64-65536",
                self.memory_mib
            ));
        }
        if self.resident_pct > MAX_RESIDENT_PCT {
            return Err(format!(
                "resident working set {} % is over {MAX_RESIDENT_PCT} % of the memory: the guest's kernel needs the rest",
                self.resident_pct
            ));
        }
        if let Some(d) = &self.disk {
            let name_ok = |n: &str| {
                !n.is_empty()
                    && n.len() <= 64
                    && n.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
            };
            if !(name_ok(&d.cluster) && name_ok(&d.pool) && name_ok(&d.image)) {
                return Err(format!(
                    "disk {}/{}/{} must name its cluster, pool and image with a-z, 0-9, '-', '_', '.'",
                    d.cluster, d.pool, d.image
                ));
            }
            if !DISK_MIB.contains(&d.size_mib) {
                return Err(format!(
                    "disk of {} MiB is outside {}-{} MiB",
                    d.size_mib,
                    DISK_MIB.start(),
                    DISK_MIB.end()
                ));
            }
        }
        if self.dirty_mib >= self.memory_mib / 2 {
            return Err(format!(
                "dirty area {} MiB must be under half of the memory ({} MiB)",
                self.dirty_mib, self.memory_mib
            ));
        }
        Ok(())
    }

    /// The working set in MiB.
    pub fn resident_mib(&self) -> u32 {
        (u64::from(self.memory_mib) * u64::from(self.resident_pct) / 100) as u32
    }

    pub fn tap(&self) -> String {
        format!("t-{}", self.name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// The `-accel` argument. TCG runs single-threaded: with multi-threaded TCG, QEMU 7.2
    /// misses guest writes in migration's dirty tracking now and then, and the migrated
    /// guest's kernel finds its lists corrupted (seen here in 1 of 2 migrations of a
    /// dirtying guest).
    pub fn qemu_arg(&self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg,thread=single",
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HvError {
    #[error("{step} failed: `{command}`: {stderr}")]
    Command {
        step: String,
        command: String,
        stderr: String,
    },
    #[error("{what} failed")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU of VM {vm} did not write its pid file {}", pidfile.display())]
    NoPid { vm: String, pidfile: PathBuf },
    #[error("VM {vm}'s disk is in storage cluster {cluster}, which this host has not installed (`dczone storage up`)")]
    NoDiskAccess { vm: String, cluster: String },
    #[error(transparent)]
    Qmp(#[from] QmpError),
}

/// Where a guest's files live and what it boots.
#[derive(Debug, Clone)]
pub struct Launch<'a> {
    /// The network namespace to run in (the lab's host); `None`: this process's own (a
    /// real host).
    pub namespace: Option<&'a str>,
    /// Per-VM runtime directory (QMP socket, serial log, pid file).
    pub dir: &'a Path,
    pub spec: &'a VmSpec,
    pub kernel: &'a Path,
    pub initramfs: &'a Path,
    pub accel: Accel,
    /// Start paused, waiting for `migrate-incoming`.
    pub incoming: bool,
    /// Stay stopped after the incoming stream until `cont` (QEMU's `-S`), so that the
    /// one driving the migration decides when the destination runs.
    pub paused: bool,
    /// The host bridge the TAP joins.
    pub bridge: &'a str,
    /// How this host opens the VM's disk (required when the spec has one).
    pub disk: Option<&'a RbdAccess>,
}

/// A running QEMU.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Running {
    pub pid: i32,
    pub qmp: PathBuf,
    pub serial: PathBuf,
    pub tap: String,
    /// Its network namespace; empty on a real host (the host's own).
    pub namespace: String,
}

fn run(step: &str, cmd: &mut Command) -> Result<(), HvError> {
    let command = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| HvError::Command {
        step: step.to_string(),
        command: command.clone(),
        stderr: e.to_string(),
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(HvError::Command {
            step: step.to_string(),
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Starts QEMU daemonized (in `l.namespace`, if any) and puts its TAP on the host bridge.
pub fn launch(l: &Launch) -> Result<Running, HvError> {
    let io = |what: &str| {
        let what = what.to_string();
        move |source| HvError::Io { what, source }
    };
    std::fs::create_dir_all(l.dir).map_err(io("create the VM directory"))?;
    let qmp = l.dir.join("qmp.sock");
    let serial = l.dir.join("serial.log");
    let pidfile = l.dir.join("qemu.pid");
    let _ = std::fs::remove_file(&qmp);
    let _ = std::fs::remove_file(&pidfile);
    let s = l.spec;
    // Under TCG, QEMU before 9.0 has a fast path in cpu_physical_memory_sync_dirty_bitmap()
    // for RAM blocks whose length is a multiple of 64 pages; it clears dirty bits without
    // bringing the TCG TLB up to date, so later stores through cached TLB entries are never
    // marked dirty and the destination gets stale pages (QEMU commit "physmem: Fix
    // migration dirty bitmap coherency with TCG memory access", 9.0). Seen here: 3 of 3
    // migrated guests dirtying 8 MB/s crashed on corrupted kernel lists. Giving TCG guests
    // 4 KiB more than a multiple of 256 KiB keeps QEMU on the slow path, which resets the
    // TLB. KVM tracks dirty pages in the kernel and needs none of this, and neither does
    // QEMU 9.0 or later: there the slow path is only a cost. For every dirty page it walks
    // every vCPU's TLB, under the big QEMU lock: measured with QEMU 10.0 on a 512 MiB guest,
    // the migration's setup (its first sync, when every page is dirty) then held the guest
    // for 720 ms, which its clients saw as an outage at the start of every migration.
    let memory = if l.accel == Accel::Tcg && qemu_version().is_some_and(|v| v < (9, 0)) {
        format!("{}K", u64::from(s.memory_mib) * 1024 + 4)
    } else {
        format!("{}M", s.memory_mib)
    };
    let append = format!(
        "console=ttyS0 quiet panic=-1 dczone.ip={} dczone.dirty_mbps={} dczone.dirty_mib={} dczone.resident_mib={} {}",
        s.ip_cidr,
        s.dirty_mbps,
        s.dirty_mib,
        s.resident_mib(),
        std::env::var("DCZONE_GUEST_APPEND").unwrap_or_default()
    );
    // A guest with a disk journals to it, and must not serve without it.
    let append = if s.disk.is_some() {
        format!("{append} dczone.disk=1")
    } else {
        append
    };
    let mut cmd = match l.namespace {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "qemu-system-x86_64"]);
            c
        }
        None => Command::new("qemu-system-x86_64"),
    };
    cmd.args([
        "-name",
        &s.name,
        "-machine",
        "pc",
        "-nodefaults",
        "-no-user-config",
    ])
    .args(["-accel", l.accel.qemu_arg()])
    .args(["-m", &memory, "-smp", &s.vcpus.to_string()])
    .arg("-kernel")
    .arg(l.kernel)
    .arg("-initrd")
    .arg(l.initramfs)
    .args(["-append", &append])
    .args([
        "-netdev",
        &format!("tap,id=n0,ifname={},script=no,downscript=no", s.tap()),
        "-device",
        &format!("virtio-net-pci,netdev=n0,mac={},romfile=", s.mac),
    ])
    .arg("-qmp")
    .arg(format!("unix:{},server=on,wait=off", qmp.display()))
    .arg("-serial")
    .arg(format!("file:{}", serial.display()))
    .args(["-display", "none", "-daemonize", "-pidfile"])
    .arg(&pidfile);
    if let Some(d) = &s.disk {
        let access = l.disk.ok_or_else(|| HvError::NoDiskAccess {
            vm: s.name.clone(),
            cluster: d.cluster.clone(),
        })?;
        // The disk as a raw node over QEMU's RBD driver (librbd, its writeback cache
        // flushed on the guest's flushes): shared storage, so a migration within the
        // cluster moves memory only. Discards and zeroed ranges free the image's objects
        // (thin, as OpenStack's `hw_disk_discard=unmap`); a disk copied into another
        // cluster is zeroed that way before the data comes (see dczone-virt's migrate).
        let blockdev = serde_json::json!({
            "driver": "raw",
            "node-name": DISK_NODE,
            "discard": "unmap",
            "file": {
                "driver": "rbd",
                "node-name": "rbd0",
                "discard": "unmap",
                "pool": d.pool,
                "image": d.image,
                "conf": access.conf,
                "user": access.user,
            },
        });
        // The disk's I/O, and block jobs on it (a mirror into another cluster), run in an
        // I/O thread of their own, not in the main loop under QEMU's big lock, which a
        // busy TCG vCPU holds most of the time (measured: a mirror crawled at about
        // 3 MiB/s in the main loop while the guest served a saturating client).
        cmd.args(["-object", "iothread,id=disk-io"])
            .args(["-blockdev", &blockdev.to_string()])
            .args([
                "-device",
                &format!("virtio-blk-pci,drive={DISK_NODE},id=vd0,iothread=disk-io"),
            ]);
    }
    if l.incoming {
        cmd.args(["-incoming", "defer"]);
    }
    if l.paused {
        cmd.arg("-S");
    }
    run(&format!("start QEMU for VM {}", s.name), &mut cmd)?;
    let pid = std::fs::read_to_string(&pidfile)
        .ok()
        .and_then(|p| p.trim().parse().ok())
        .ok_or_else(|| HvError::NoPid {
            vm: s.name.clone(),
            pidfile: pidfile.clone(),
        })?;
    let running = Running {
        pid,
        qmp,
        serial,
        tap: s.tap(),
        namespace: l.namespace.unwrap_or_default().to_string(),
    };
    let mut ip = Command::new("ip");
    if let Some(ns) = l.namespace {
        ip.args(["-n", ns]);
    }
    let attach = run(
        &format!("attach {} to {}", s.tap(), l.bridge),
        ip.args(["link", "set", &s.tap(), "master", l.bridge, "up"]),
    );
    if let Err(e) = attach {
        kill(&running);
        return Err(e);
    }
    Ok(running)
}

/// Quits a QEMU through QMP, so that it closes its disks (an RBD image's watch goes with
/// it, where a killed client's stays 30 s), then kills it if it is still there after 5 s.
pub fn quit(r: &Running) {
    if let Ok(mut q) = Qmp::connect(&r.qmp, Duration::from_secs(2)) {
        let _ = q.execute("quit", serde_json::json!({}));
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(r.pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    kill(r);
}

/// Takes snapshot `name` of a running VM's disk inside its QEMU
/// (`blockdev-snapshot-internal-sync`, which the raw node passes to its RBD node:
/// `rbd_snap_create` by the image's exclusive-lock owner, once in-flight requests have
/// drained). Quicker than the `rbd` CLI, which starts a client, authenticates, and asks
/// the lock owner to take it (measured on a stretch cluster: 50-70 ms against 100-240 ms).
/// The command holds QEMU's main loop and its big lock until Ceph has answered, so the
/// guest's devices (its disk, its network) wait that long (a client of the guest saw one
/// answer take 47-60 ms, against at most 12 ms while the CLI took it: that way only held
/// the disk's writes).
pub fn snapshot_disk(r: &Running, name: &str) -> Result<(), SnapshotError> {
    // A QMP client already there (a migration) holds the socket: not waited for.
    let mut q = Qmp::connect_with_reads(&r.qmp, Duration::from_secs(2), Duration::from_secs(2))
        .map_err(|source| SnapshotError {
            attempted: false,
            source,
        })?;
    let _ = q.set_read_timeout(Duration::from_secs(60));
    q.execute(
        "blockdev-snapshot-internal-sync",
        serde_json::json!({ "device": DISK_NODE, "name": name }),
    )
    .map(|_| ())
    .map_err(|source| SnapshotError {
        // QEMU's own refusal (a block job, an inactive node) made nothing.
        attempted: !matches!(source, QmpError::Command { .. }),
        source,
    })
}

/// A snapshot QEMU did not take. `attempted`: QEMU may have taken it (the answer did not
/// come); otherwise it was refused or never asked, and nothing was made.
#[derive(Debug, thiserror::Error)]
#[error("the snapshot in QEMU")]
pub struct SnapshotError {
    pub attempted: bool,
    #[source]
    pub source: QmpError,
}

/// Kills a QEMU (its TAP disappears with it).
pub fn kill(r: &Running) {
    if alive(r.pid) {
        // SAFETY: kill(2) on a pid we started; no memory effects.
        unsafe { libc::kill(r.pid, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while alive(r.pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Is this pid a live (non-zombie) process?
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Waits until the guest's serial log contains `needle`.
pub fn wait_serial(serial: &Path, needle: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::fs::read_to_string(serial).is_ok_and(|s| s.contains(needle)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// The line `dczone-guest` prints once it serves.
pub const GUEST_READY: &str = "dczone-guest: ledger listening";

/// Chooses the accelerator: `$DCZONE_ACCEL` if set; TCG without /dev/kvm; otherwise boots
/// a probe guest under KVM and keeps KVM only if the guest actually reaches its service
/// (a nested-PVM /dev/kvm exists but hangs a stock kernel). The verdict is cached in
/// `cache_file`.
pub fn probe_accel(kernel: &Path, initramfs: &Path, work: &Path, cache_file: &Path) -> Accel {
    match std::env::var("DCZONE_ACCEL").as_deref() {
        Ok("kvm") => return Accel::Kvm,
        Ok("tcg") => return Accel::Tcg,
        _ => {}
    }
    if let Ok(s) = std::fs::read_to_string(cache_file) {
        match s.trim() {
            "kvm" => return Accel::Kvm,
            "tcg" => return Accel::Tcg,
            _ => {}
        }
    }
    let verdict = if Path::new("/dev/kvm").exists() && kvm_boots(kernel, initramfs, work) {
        Accel::Kvm
    } else {
        Accel::Tcg
    };
    if let Some(dir) = cache_file.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = std::fs::write(cache_file, verdict.as_str());
    verdict
}

fn kvm_boots(kernel: &Path, initramfs: &Path, work: &Path) -> bool {
    let _ = std::fs::create_dir_all(work);
    let serial = work.join("kvm-probe.log");
    let _ = std::fs::remove_file(&serial);
    let child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "kvm",
            "-m",
            "256",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
        ])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", "console=ttyS0 quiet", "-serial"])
        .arg(format!("file:{}", serial.display()))
        .spawn();
    let Ok(mut child) = child else { return false };
    let ok = wait_serial(&serial, GUEST_READY, Duration::from_secs(10));
    let _ = child.kill();
    let _ = child.wait();
    ok
}

/// The installed QEMU's (major, minor), from `qemu-system-x86_64 --version` (read once).
pub fn qemu_version() -> Option<(u32, u32)> {
    static VERSION: std::sync::OnceLock<Option<(u32, u32)>> = std::sync::OnceLock::new();
    *VERSION.get_or_init(|| {
        let out = Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
            .ok()?;
        parse_version(&String::from_utf8_lossy(&out.stdout))
    })
}

/// "QEMU emulator version 10.0.2 (Debian ...)" -> (10, 0).
fn parse_version(text: &str) -> Option<(u32, u32)> {
    let v = text.split("version ").nth(1)?.split_whitespace().next()?;
    let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??))
}

#[cfg(test)]
mod version_tests {
    #[test]
    fn qemu_version_lines_parse() {
        assert_eq!(
            super::parse_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)\n"),
            Some((10, 0))
        );
        assert_eq!(
            super::parse_version("QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)"),
            Some((7, 2))
        );
        assert_eq!(super::parse_version("something else"), None);
    }
}

#[cfg(test)]
mod spec_tests {
    use super::VmSpec;

    fn spec() -> VmSpec {
        VmSpec {
            name: "web".into(),
            memory_mib: 256,
            vcpus: 1,
            mac: "02:dc:01:02:65:01".into(),
            ip_cidr: "10.77.2.101/16".into(),
            dirty_mbps: 1,
            dirty_mib: 32,
            resident_pct: 75,
            disk: None,
        }
    }

    #[test]
    fn a_disk_names_its_image_safely_and_has_a_sane_size() {
        let mut s = spec();
        s.disk = Some(super::DiskSpec {
            cluster: "region-1".into(),
            pool: "rbd".into(),
            image: "vm-web".into(),
            size_mib: 1536,
        });
        assert_eq!(s.validate(), Ok(()));
        let mut bad = s.clone();
        bad.disk.as_mut().unwrap().image = "x:conf=/etc/passwd".into();
        assert!(bad.validate().unwrap_err().contains("must name"));
        let mut small = s;
        small.disk.as_mut().unwrap().size_mib = 1;
        assert!(small.validate().unwrap_err().contains("outside"));
    }

    #[test]
    fn a_well_formed_spec_passes() {
        assert_eq!(spec().validate(), Ok(()));
    }

    #[test]
    fn a_path_in_the_name_is_refused_and_the_error_says_what_is_allowed() {
        for name in ["../etc", "a/b", "web,x=1", "", "thirteen-char"] {
            let err = VmSpec {
                name: name.into(),
                ..spec()
            }
            .validate()
            .unwrap_err();
            assert!(err.contains("a-z, 0-9, '-'"), "{name}: {err}");
        }
    }

    #[test]
    fn malformed_or_multicast_macs_and_bad_addresses_are_refused() {
        for mac in [
            "02:dc:01:02:65",
            "02:dc:01:02:65:zz",
            "03:dc:01:02:65:01",
            "02-dc-01-02-65-01",
            "02:dc:01:02:65:01,x",
        ] {
            let err = VmSpec {
                mac: mac.into(),
                ..spec()
            }
            .validate()
            .unwrap_err();
            assert!(err.contains("MAC"), "{mac}: {err}");
        }
        for ip in ["10.77.2.101", "10.77.2.300/16", "10.77.2.101/33", "x/16"] {
            let err = VmSpec {
                ip_cidr: ip.into(),
                ..spec()
            }
            .validate()
            .unwrap_err();
            assert!(err.contains("IPv4/prefix"), "{ip}: {err}");
        }
    }
}
