//! The virtualization platform of the lab: which VMs exist, on which host each runs, and
//! their lifecycle (create, start, stop, destroy), plus live migration (`migrate`).
//!
//! Intra-region is one cluster stretched across DC1.1 and DC1.2: guests are
//! initramfs-only, so nothing but memory and device state moves.
//!
//! The registry is `<dir>/vms/registry.json`; each VM's runtime files (QMP socket,
//! serial log, pid file) live in `<dir>/vms/<name>/<host>/`, where `<dir>` is the lab's
//! directory, shared by all its hosts, or a real host's own ([`placement`]).

pub mod keeper;
pub mod migrate;
pub mod placement;
pub mod switchover;
pub mod tls;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use dczone_hypervisor::{self as hv, Accel, Running, VmSpec};
use dczone_lab::{Lab, LabError};

pub use placement::{HostPlacement, Placement, ZoneHost};

/// A VM of the lab.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmRecord {
    pub spec: VmSpec,
    pub host: String,
    pub group: Option<String>,
    pub accel: Accel,
    pub running: Option<Running>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Registry {
    vms: Vec<VmRecord>,
}

/// What `create` needs besides the name.
#[derive(Debug, Clone)]
pub struct CreateVm {
    pub name: String,
    pub host: String,
    pub memory_mib: u32,
    pub dirty_mbps: u32,
    pub dirty_mib: u32,
    /// Working set, percent of the memory (see `VmSpec::resident_pct`).
    pub resident_pct: u8,
    pub group: Option<String>,
    /// A disk of this many MiB in the storage cluster of the host's site, in the site's
    /// pool (`ClusterPlan::site_pool`).
    pub disk_mib: Option<u64>,
    /// Or an image that exists in that pool (a restored backup) as its disk.
    pub disk_image: Option<String>,
}

/// The guest image to boot.
#[derive(Debug, Clone)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum VirtError {
    #[error(transparent)]
    Lab(#[from] LabError),
    #[error("unknown VM '{vm}'; VMs are: {known}")]
    UnknownVm { vm: String, known: String },
    #[error("VM '{0}' already exists")]
    Exists(String),
    #[error("invalid VM: {0}")]
    BadSpec(String),
    #[error("host {host} has no free VM address in its site's block {block}")]
    NoAddress { host: String, block: String },
    #[error("unknown host '{host}'; the zone's hosts are: {known}")]
    UnknownHost { host: String, known: String },
    #[error("{0} needs the embedded lab; a real host's agent cannot do it yet")]
    LabOnly(&'static str),
    #[error("disk of VM '{vm}'")]
    Disk {
        vm: String,
        #[source]
        source: dczone_storage::StorageError,
    },
    #[error("VM '{0}' is not running")]
    NotRunning(String),
    #[error("VM '{0}' is already running")]
    AlreadyRunning(String),
    #[error("VM '{vm}' is already on host {host}; pick another destination")]
    SameHost { vm: String, host: String },
    #[error(
        "host {host} lacks memory for VM '{vm}': needs {need_mib} MiB, {free_mib} MiB available"
    )]
    NoMemory {
        vm: String,
        host: String,
        need_mib: u64,
        free_mib: u64,
    },
    #[error("VM '{0}' is already being migrated by another command")]
    Busy(String),
    #[error("VM '{vm}' did not boot within {secs} s (serial log: {})", log.display())]
    Boot { vm: String, secs: u64, log: PathBuf },
    #[error("hypervisor step for VM '{vm}' failed")]
    Hypervisor {
        vm: String,
        #[source]
        source: hv::HvError,
    },
    #[error("QMP with VM '{vm}' failed")]
    Qmp {
        vm: String,
        #[source]
        source: hv::QmpError,
    },
    #[error(
        "migration of VM '{vm}' failed ({reason}); the source VM on {source_host} keeps running"
    )]
    MigrationFailed {
        vm: String,
        source_host: String,
        reason: String,
    },
    /// The destination took over, and the rest failed: the source host's agent completes
    /// the move from the in-flight marker.
    #[error(
        "migration of VM '{vm}' ended unsettled ({reason}); the agent of {source_host} settles \
         it: the move completes if its destination on {destination} runs it, else the VM \
         resumes at {source_host}"
    )]
    Unsettled {
        vm: String,
        source_host: String,
        destination: String,
        reason: String,
    },
    /// After a post-copy switch the VM runs at its destination and never goes back.
    #[error(
        "post-copy migration of VM '{vm}' did not finish ({reason}); the VM runs at {destination} \
         and still needs pages from {source_host}: restore the path between them, or lose the VM \
         with either host"
    )]
    PostcopyUnfinished {
        vm: String,
        source_host: String,
        destination: String,
        reason: String,
    },
    /// A step of a VM's migration that its source host's agent refused or failed.
    #[error("migration of VM '{vm}' through the agent {agent}: {reason}")]
    Remote {
        vm: String,
        agent: String,
        reason: String,
    },
    #[error("{what} failed")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the guest image is unavailable")]
    Image(#[from] dczone_image::ImageError),
    #[error("group '{0}' has no VMs")]
    EmptyGroup(String),
    #[error("no certificate for an encrypted migration stream")]
    Pki(#[from] dczone_pki::PkiError),
    #[error("injected failure at {0} (FAILPOINTS)")]
    Injected(&'static str),
}

/// Guest memory overhead of a TCG QEMU process beyond guest RAM, MiB.
const QEMU_OVERHEAD_MIB: u64 = 64;
/// The working set a VM gets unless told otherwise, percent of its memory: a real VM's memory
/// is mostly full, and the lab's scale rule (a 256 MiB VM over a link 64 times slower takes
/// as long as a 16 GiB VM over the real one) holds only for memory that has to be sent.
pub const DEFAULT_RESIDENT_PCT: u8 = 75;

/// Activates the fault-injection points named in `FAILPOINTS` (e.g.
/// `FAILPOINTS=migrate-after-start=return`) while the returned guard lives; none without
/// it. The migration's points are listed in [`migrate`]; the e2e tests of its failure
/// paths use them.
pub fn failpoints_from_env() -> fail::FailScenario<'static> {
    fail::FailScenario::setup()
}

pub const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// The virtualization platform: of the whole lab, or of one real host.
#[derive(Debug, Clone)]
pub struct Platform {
    placement: Placement,
    image: GuestImage,
    accel: Accel,
    /// Where migration credentials come from (see [`tls`]).
    pki: PathBuf,
}

fn mem_available_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}

impl Platform {
    pub fn new(lab: Lab, image: GuestImage, accel: Accel) -> Platform {
        let pki = lab.dir().join("pki");
        Platform {
            placement: Placement::Lab(lab),
            image,
            accel,
            pki,
        }
    }

    /// The platform of one real host: builds (or finds) the guest image and picks the
    /// accelerator by probing (cached). `pki` holds the zone CA's certificate and this
    /// host's (see `dczone pki issue`).
    pub fn on_host(
        host: HostPlacement,
        pki: PathBuf,
        inputs: &dczone_image::ImageInputs,
    ) -> Result<Platform, VirtError> {
        let img = dczone_image::ensure(inputs)?;
        let accel = hv::probe_accel(
            &img.kernel,
            &img.initramfs,
            &host.dir.join("probe"),
            &inputs.cache_root.join("accel"),
        );
        Ok(Platform {
            placement: Placement::Host(host),
            image: GuestImage {
                kernel: img.kernel,
                initramfs: img.initramfs,
            },
            accel,
            pki,
        })
    }

    /// The platform of a running lab: builds (or finds) the guest image and picks the
    /// accelerator by probing (cached).
    pub fn open(lab: Lab, inputs: &dczone_image::ImageInputs) -> Result<Platform, VirtError> {
        lab.state()?;
        let img = dczone_image::ensure(inputs)?;
        let accel = hv::probe_accel(
            &img.kernel,
            &img.initramfs,
            &lab.dir().join("probe"),
            &inputs.cache_root.join("accel"),
        );
        Ok(Platform::new(
            lab,
            GuestImage {
                kernel: img.kernel,
                initramfs: img.initramfs,
            },
            accel,
        ))
    }

    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    pub fn accel(&self) -> Accel {
        self.accel
    }

    fn vms_dir(&self) -> PathBuf {
        self.placement.dir().join("vms")
    }

    fn registry_path(&self) -> PathBuf {
        self.vms_dir().join("registry.json")
    }

    fn io(what: &str) -> impl FnOnce(std::io::Error) -> VirtError {
        let what = what.to_string();
        move |source| VirtError::Io { what, source }
    }

    /// Exclusive lock over the registry for the duration of a change.
    fn lock(&self) -> Result<File, VirtError> {
        std::fs::create_dir_all(self.vms_dir()).map_err(Self::io("create the VM directory"))?;
        let f = File::create(self.vms_dir().join("registry.lock"))
            .map_err(Self::io("lock the registry"))?;
        // SAFETY: flock on an fd we own; released when `f` drops.
        unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        Ok(f)
    }

    fn load(&self) -> Result<Registry, VirtError> {
        match std::fs::read(self.registry_path()) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| VirtError::Io {
                what: "read the VM registry".into(),
                source: std::io::Error::other(e),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Registry::default()),
            Err(e) => Err(Self::io("read the VM registry")(e)),
        }
    }

    fn save(&self, reg: &Registry) -> Result<(), VirtError> {
        let tmp = self.registry_path().with_extension("tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(reg).expect("registry serializes"),
        )
        .map_err(Self::io("write the VM registry"))?;
        std::fs::rename(&tmp, self.registry_path()).map_err(Self::io("write the VM registry"))
    }

    pub fn list(&self) -> Result<Vec<VmRecord>, VirtError> {
        let mut vms = self.load()?.vms;
        for vm in &mut vms {
            if vm.running.as_ref().is_some_and(|r| !hv::alive(r.pid)) {
                vm.running = None;
            }
        }
        Ok(vms)
    }

    pub fn get(&self, name: &str) -> Result<VmRecord, VirtError> {
        let vms = self.list()?;
        vms.iter()
            .find(|v| v.spec.name == name)
            .cloned()
            .ok_or_else(|| VirtError::UnknownVm {
                vm: name.to_string(),
                known: if vms.is_empty() {
                    "none".into()
                } else {
                    vms.iter()
                        .map(|v| v.spec.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            })
    }

    fn update(&self, record: &VmRecord) -> Result<(), VirtError> {
        let _l = self.lock()?;
        let mut reg = self.load()?;
        match reg.vms.iter_mut().find(|v| v.spec.name == record.spec.name) {
            Some(v) => *v = record.clone(),
            None => reg.vms.push(record.clone()),
        }
        self.save(&reg)
    }

    pub(crate) fn vm_dir(&self, name: &str, host: &str) -> PathBuf {
        self.vms_dir().join(name).join(host)
    }

    /// Checks that `host` can take `memory_mib` more of guest memory.
    pub(crate) fn check_memory(
        &self,
        vm: &str,
        host: &str,
        memory_mib: u32,
    ) -> Result<(), VirtError> {
        let need = u64::from(memory_mib) + QEMU_OVERHEAD_MIB;
        let free = mem_available_mib();
        if need > free {
            return Err(VirtError::NoMemory {
                vm: vm.into(),
                host: host.into(),
                need_mib: need,
                free_mib: free,
            });
        }
        Ok(())
    }

    /// Creates and boots a VM on `host`, waiting until its service answers.
    pub fn create(&self, req: &CreateVm) -> Result<VmRecord, VirtError> {
        let h = self.placement.host(&req.host)?;
        let record = {
            let _l = self.lock()?;
            let mut reg = self.load()?;
            // On a real host, a forwarding record (the VM moved away; see [`placement`])
            // does not hold the name: the operator's CLI checks the whole zone first.
            let forwarding = |v: &VmRecord| !self.placement.shared_registry() && v.host != req.host;
            if reg
                .vms
                .iter()
                .any(|v| v.spec.name == req.name && !forwarding(v))
            {
                return Err(VirtError::Exists(req.name.clone()));
            }
            // A forwarding record's address stays taken: the VM may still use it elsewhere.
            let used: Vec<String> = reg.vms.iter().map(|v| v.spec.ip_cidr.clone()).collect();
            reg.vms.retain(|v| v.spec.name != req.name);
            let site = h.site_index + 1;
            let block = h.vm_octets(self.placement.shared_registry());
            let n = block
                .clone()
                .find(|n| !used.contains(&format!("10.77.{site}.{n}/16")))
                .ok_or_else(|| VirtError::NoAddress {
                    host: h.id.clone(),
                    block: format!("10.77.{site}.{}-{}", block.start(), block.end()),
                })?;
            let spec = VmSpec {
                name: req.name.clone(),
                memory_mib: req.memory_mib,
                vcpus: 1,
                mac: format!("02:dc:01:{site:02x}:{n:02x}:01"),
                ip_cidr: format!("10.77.{site}.{n}/16"),
                dirty_mbps: req.dirty_mbps,
                dirty_mib: req.dirty_mib,
                resident_pct: req.resident_pct,
                disk: None,
            };
            spec.validate().map_err(VirtError::BadSpec)?;
            self.check_memory(&req.name, &req.host, req.memory_mib)?;
            let mut spec = spec;
            if let Some(image) = &req.disk_image {
                spec.disk = Some(self.adopt_disk(&req.name, &h, image)?);
            } else if let Some(mib) = req.disk_mib {
                spec.disk = Some(self.create_disk(&req.name, &h, mib)?);
            }
            let record = VmRecord {
                spec,
                host: req.host.clone(),
                group: req.group.clone(),
                accel: self.accel,
                running: None,
            };
            reg.vms.push(record.clone());
            self.save(&reg)?;
            record
        };
        self.start(&record.spec.name).inspect_err(|_| {
            // An adopted image (a restored backup) outlives a failed start; a new one goes.
            let _ = self.remove(&record.spec.name, req.disk_image.is_none());
        })
    }

    /// Boots a stopped VM on its host.
    pub fn start(&self, name: &str) -> Result<VmRecord, VirtError> {
        let mut vm = self.get(name)?;
        if vm.running.is_some() {
            return Err(VirtError::AlreadyRunning(name.into()));
        }
        let ns = self.placement.namespace(&vm.host);
        let dir = self.vm_dir(name, &vm.host);
        let disk = self.rbd_access(&vm.host, &vm.spec);
        let running = hv::launch(&hv::Launch {
            disk: disk.as_ref(),
            namespace: ns.as_deref(),
            dir: &dir,
            spec: &vm.spec,
            kernel: &self.image.kernel,
            initramfs: &self.image.initramfs,
            accel: vm.accel,
            incoming: false,
            paused: false,
            bridge: self.placement.bridge(),
        })
        .map_err(|source| VirtError::Hypervisor {
            vm: name.into(),
            source,
        })?;
        vm.running = Some(running.clone());
        self.update(&vm)?;
        if !hv::wait_serial(&running.serial, hv::GUEST_READY, BOOT_TIMEOUT) {
            return Err(VirtError::Boot {
                vm: name.into(),
                secs: BOOT_TIMEOUT.as_secs(),
                log: running.serial,
            });
        }
        Ok(vm)
    }

    /// Powers a VM off (its state is lost; it can be started again).
    pub fn stop(&self, name: &str) -> Result<VmRecord, VirtError> {
        let mut vm = self.get(name)?;
        let Some(r) = vm.running.take() else {
            return Err(VirtError::NotRunning(name.into()));
        };
        hv::kill(&r);
        self.update(&vm)?;
        Ok(vm)
    }

    /// A new disk for VM `name` on host `h`: an image in the pool of `h`'s site in the
    /// storage cluster of the site (`ClusterPlan::site_pool`: its primaries are in that
    /// site), made with the hypervisors' client key.
    fn create_disk(
        &self,
        name: &str,
        h: &placement::ZoneHost,
        size_mib: u64,
    ) -> Result<hv::DiskSpec, VirtError> {
        let disk_err = |source| VirtError::Disk {
            vm: name.into(),
            source,
        };
        if !hv::DISK_MIB.contains(&size_mib) {
            return Err(VirtError::BadSpec(format!(
                "disk of {size_mib} MiB is outside {}-{} MiB",
                hv::DISK_MIB.start(),
                hv::DISK_MIB.end()
            )));
        }
        let storage = self.placement.storage(&h.id);
        let cluster = storage.cluster_for_site(&h.site).map_err(disk_err)?;
        let disk = hv::DiskSpec {
            cluster: cluster.name.clone(),
            pool: cluster.site_pool(&h.site).name,
            image: format!("vm-{name}"),
            size_mib,
        };
        storage
            .create_image(&disk.cluster, &disk.pool, &disk.image, size_mib)
            .map_err(disk_err)?;
        Ok(disk)
    }

    /// An existing image of the pool of `h`'s site (where a restore puts it) as VM `name`'s
    /// disk.
    fn adopt_disk(
        &self,
        name: &str,
        h: &placement::ZoneHost,
        image: &str,
    ) -> Result<hv::DiskSpec, VirtError> {
        let disk_err = |source| VirtError::Disk {
            vm: name.into(),
            source,
        };
        let storage = self.placement.storage(&h.id);
        let cluster = storage.cluster_for_site(&h.site).map_err(disk_err)?;
        let pool = cluster.site_pool(&h.site).name;
        let info = storage
            .rbd(
                &cluster.name,
                &["info", "--format", "json", &format!("{pool}/{image}")],
            )
            .map_err(disk_err)?;
        let size = serde_json::from_str::<serde_json::Value>(&info)
            .ok()
            .and_then(|v| v["size"].as_u64())
            .ok_or_else(|| VirtError::BadSpec(format!("image {image}: unreadable `rbd info`")))?;
        Ok(hv::DiskSpec {
            cluster: cluster.name.clone(),
            pool,
            image: image.to_string(),
            size_mib: size >> 20,
        })
    }

    /// How `host` opens `spec`'s disk (`None` without a disk, or where its cluster is not
    /// installed: the launch then says so).
    pub(crate) fn rbd_access(&self, host: &str, spec: &VmSpec) -> Option<hv::RbdAccess> {
        let d = spec.disk.as_ref()?;
        Some(hv::RbdAccess {
            conf: self.placement.storage(host).conf_path(&d.cluster)?,
            user: dczone_storage::host::VM_USER.into(),
        })
    }

    /// Stops a VM if it runs and forgets it, its disk included. Refused while the VM
    /// migrates: its destination may run on the same disk.
    pub fn destroy(&self, name: &str) -> Result<(), VirtError> {
        self.remove(name, true)
    }

    fn remove(&self, name: &str, with_disk: bool) -> Result<(), VirtError> {
        let _migrating = self.migration_lock(name)?;
        if self.vms_dir().join(name).join("migrating.json").exists() {
            return Err(VirtError::Busy(name.into()));
        }
        let vm = self.get(name)?;
        if let Some(r) = &vm.running {
            if vm.spec.disk.is_some() {
                hv::quit(r);
            } else {
                hv::kill(r);
            }
        }
        if let Some(d) = vm.spec.disk.as_ref().filter(|_| with_disk) {
            self.placement
                .storage(&vm.host)
                .remove_image(&d.cluster, &d.pool, &d.image)
                .map_err(|source| VirtError::Disk {
                    vm: name.into(),
                    source,
                })?;
        }
        let _l = self.lock()?;
        let mut reg = self.load()?;
        reg.vms.retain(|v| v.spec.name != name);
        self.save(&reg)?;
        let _ = std::fs::remove_dir_all(self.vms_dir().join(name));
        Ok(())
    }

    /// The guest's address without prefix.
    pub fn guest_ip(vm: &VmRecord) -> std::net::Ipv4Addr {
        vm.spec
            .ip_cidr
            .split('/')
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED)
    }

    pub fn image(&self) -> &GuestImage {
        &self.image
    }

    /// The QEMUs this platform started on `host`: every QEMU of the host's namespace in
    /// the lab; on a real host, those whose files are in this platform's directory.
    pub fn qemus_of(&self, host: &str) -> Vec<i32> {
        let is_qemu = |pid: &i32| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.starts_with("qemu-system"))
        };
        match self.placement.namespace(host) {
            Some(ns) => dczone_lab::sys::pids_in_namespace(&ns)
                .into_iter()
                .filter(is_qemu)
                .collect(),
            None => {
                let ours = format!("{}/", self.vms_dir().display());
                std::fs::read_dir("/proc")
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                    .filter(is_qemu)
                    .filter(|pid| {
                        std::fs::read(format!("/proc/{pid}/cmdline"))
                            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&ours))
                    })
                    .collect()
            }
        }
    }

    /// A VM that migrated in and runs here (`running` on `host`). On a real host its record
    /// joins this host's registry; in the lab the registry is shared and the migration's
    /// driver moves the record, so nothing is done here.
    pub fn adopt(&self, record: &VmRecord, host: &str, running: &Running) -> Result<(), VirtError> {
        if self.placement.shared_registry() {
            return Ok(());
        }
        let mut moved = record.clone();
        moved.host = host.to_string();
        moved.running = Some(running.clone());
        self.update(&moved)
    }

    pub(crate) fn save_record(&self, vm: &VmRecord) -> Result<(), VirtError> {
        self.update(vm)
    }

    /// A non-blocking exclusive lock that marks a VM as migrating.
    pub(crate) fn migration_lock(&self, name: &str) -> Result<File, VirtError> {
        let dir = self.vms_dir().join(name);
        std::fs::create_dir_all(&dir).map_err(Self::io("create the VM directory"))?;
        let f = File::create(dir.join("migrate.lock")).map_err(Self::io("lock the VM"))?;
        // SAFETY: flock on an fd we own; released when `f` drops.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(VirtError::Busy(name.into()));
        }
        Ok(f)
    }
}

/// Where VM runtime files of a host live, for `lab down`-style cleanup by callers.
pub fn runtime_dir(lab_dir: &Path) -> PathBuf {
    lab_dir.join("vms")
}
