//! The source host's half of a migration to a public cloud: export a running VM's disk at a
//! consistent point, convert it to the cloud's format, and upload it to the cloud's
//! object storage across the path from this host. The cloud is reached only through its
//! S3 endpoint with the account's key; the VM keeps running throughout.

use std::path::{Path, PathBuf};
use std::time::Instant;

use dczone_cloud::ec2::DiskFormat;
use dczone_cloud::s3::{Store, Upload};
use dczone_cloud::Account;
use dczone_storage::StorageError;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{Agent, AgentError};

/// Body of `POST /v1/vms/{name}/cloud-export`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExportBody {
    pub account: Account,
    /// The object's key in the account's bucket.
    pub key: String,
    /// `vmdk`, `vhd`, `raw` or `qcow2`.
    pub format: String,
    pub part_mib: u64,
    pub streams: usize,
}

/// One phase's clock: unix start and end (this host's clock) and its duration.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize)]
pub struct Phase {
    pub start_unix_ms: u64,
    pub end_unix_ms: u64,
    pub ms: f64,
}

impl Phase {
    fn time<T>(f: impl FnOnce() -> T) -> (T, Phase) {
        let start_unix_ms = dczone_storage::backup::unix_ms();
        let t = Instant::now();
        let out = f();
        let ms = t.elapsed().as_secs_f64() * 1e3;
        (
            out,
            Phase {
                start_unix_ms,
                end_unix_ms: dczone_storage::backup::unix_ms(),
                ms,
            },
        )
    }
}

/// What the export took.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ExportDone {
    /// The guest's journal position at the consistent point.
    pub checkpoint: Option<u64>,
    pub export: Phase,
    pub convert: Phase,
    pub transfer: Phase,
    /// The disk's size, and the bytes of the image uploaded (smaller when the format is
    /// sparse).
    pub disk_bytes: u64,
    pub object_bytes: u64,
    pub upload: Upload,
    /// The VM's configuration: memory, vCPUs, address.
    pub spec: dczone_hypervisor::VmSpec,
}

fn conflict(m: String) -> AgentError {
    StorageError::Conflict(m).into()
}

fn run(what: &str, cmd: &mut std::process::Command) -> Result<(), AgentError> {
    let out = cmd
        .output()
        .map_err(|e| conflict(format!("{what}: cannot run {cmd:?}: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(conflict(format!(
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// `qemu-img convert`'s output options for a cloud's format: VMDK as stream-optimized
/// (what EC2 and vSphere import), VHD as dynamic with its size kept exactly (Azure's and
/// EC2's rule), QCOW2 and raw as they are.
fn convert_args(format: DiskFormat) -> Vec<&'static str> {
    match format {
        DiskFormat::Vmdk => vec!["-O", "vmdk", "-o", "subformat=streamOptimized"],
        DiskFormat::Vhd => vec!["-O", "vpc", "-o", "subformat=dynamic,force_size=on"],
        DiskFormat::Qcow2 => vec!["-O", "qcow2"],
        DiskFormat::Raw => vec!["-O", "raw"],
    }
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Agent {
    pub(crate) fn cloud_export(&self, name: &str, b: ExportBody) -> Result<Value, AgentError> {
        let format = DiskFormat::parse(&b.format).ok_or_else(|| {
            conflict(format!(
                "unknown disk format '{}': use vmdk, vhd, raw or qcow2",
                b.format
            ))
        })?;
        let vm = self.here(name)?;
        let Some(disk) = vm.spec.disk.clone() else {
            return Err(conflict(format!(
                "VM '{name}' has no disk to export (`vm create --disk`)"
            )));
        };
        let s = &self.storage;
        let conf = s.conf_path(&disk.cluster).ok_or_else(|| {
            conflict(format!(
                "this host has no access to cluster {}",
                disk.cluster
            ))
        })?;
        let dir = TempDir(std::env::temp_dir().join(format!(
            "dczone-export-{name}-{}",
            dczone_storage::backup::unix_ms()
        )));
        std::fs::create_dir_all(&dir.0)
            .map_err(|e| conflict(format!("create {}: {e}", dir.0.display())))?;
        let snap = format!("cloud-{}", dczone_storage::backup::unix_ms());
        let source = format!(
            "rbd:{}/{}@{snap}:conf={}:id=vm",
            disk.pool,
            disk.image,
            conf.display()
        );
        let ip = dczone_virt::Platform::guest_ip(&vm);
        // Export: the guest's journal durable, and a snapshot at that point: the image. A
        // stopped VM's disk is still (its QEMU flushed it as it quit): no checkpoint.
        let running = vm.running.is_some();
        let (exported, export) = Phase::time(|| -> Result<Option<u64>, AgentError> {
            let checkpoint = if running {
                dczone_storage::backup::checkpoint(ip, std::time::Duration::from_secs(30))?
            } else {
                None
            };
            s.snapshot(&disk.cluster, &disk.pool, &disk.image, &snap)?;
            Ok(checkpoint)
        });
        let checkpoint = exported?;
        // Convert: one pass from the snapshot to the cloud's format (raw: a plain read),
        // no intermediate copy; the snapshot goes after it.
        let (converted, convert) = Phase::time(|| -> Result<PathBuf, AgentError> {
            let out = dir
                .0
                .join(format!("disk.{}", b.format.to_ascii_lowercase()));
            let r = run(
                &format!("convert the disk's snapshot to {}", format.name()),
                std::process::Command::new("qemu-img")
                    .args(["convert", "-f", "raw"])
                    .args(convert_args(format))
                    .arg(&source)
                    .arg(&out),
            );
            let _ = s.remove_snapshot(&disk.cluster, &disk.pool, &disk.image, &snap);
            r.map(|_| out)
        });
        let image: PathBuf = converted?;
        let object_bytes = size_of(&image);
        let (uploaded, transfer) = Phase::time(|| -> Result<Upload, AgentError> {
            let store = Store::new(&b.account).map_err(|e| conflict(e.to_string()))?;
            store
                .upload(&image, &b.key, b.part_mib << 20, b.streams, 3, &|_, _| {})
                .map_err(|e| conflict(e.to_string()))
        });
        let upload = uploaded?;
        Ok(json!(ExportDone {
            checkpoint,
            export,
            convert,
            transfer,
            disk_bytes: disk.size_mib << 20,
            object_bytes,
            upload,
            spec: vm.spec.clone(),
        }))
    }
}

fn size_of(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}
