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
    fn finished(start_unix_ms: u64, t: Instant) -> Phase {
        Phase {
            start_unix_ms,
            end_unix_ms: dczone_storage::backup::unix_ms(),
            ms: t.elapsed().as_secs_f64() * 1e3,
        }
    }

    fn time<T>(f: impl FnOnce() -> T) -> (T, Phase) {
        let start_unix_ms = dczone_storage::backup::unix_ms();
        let t = Instant::now();
        let out = f();
        (out, Phase::finished(start_unix_ms, t))
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
    /// The image was encoded while it was sent (convert and transfer overlap).
    #[serde(default)]
    pub streamed: bool,
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
            snapshot_disk(s, &vm, &snap)?;
            Ok(checkpoint)
        });
        let checkpoint = exported?;
        if dczone_cloud::stream::streams(format) {
            let streamed = self.stream_export(&disk, &snap, format, &b);
            // The snapshot goes behind the answer: its removal (a map change) is not the
            // migration's.
            let (s, disk, snap) = (s.clone(), disk.clone(), snap.clone());
            std::thread::spawn(move || {
                let _ = s.remove_snapshot(&disk.cluster, &disk.pool, &disk.image, &snap);
            });
            let (convert, transfer, upload) = streamed?;
            return Ok(json!(ExportDone {
                checkpoint,
                export,
                convert,
                transfer,
                disk_bytes: disk.size_mib << 20,
                object_bytes: upload.bytes,
                upload,
                spec: vm.spec.clone(),
                streamed: true,
            }));
        }
        // Convert: one pass from the snapshot to the cloud's format, no intermediate
        // copy; the snapshot goes after it.
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
            streamed: false,
        }))
    }

    /// The snapshot's data read (`rbd export-diff`: only what is allocated), encoded and
    /// uploaded at once: the image is never whole on this host, and the transfer starts
    /// with the first part. Convert is the encoding's time, transfer the upload's; they
    /// overlap.
    fn stream_export(
        &self,
        disk: &dczone_hypervisor::DiskSpec,
        snap: &str,
        format: DiskFormat,
        b: &ExportBody,
    ) -> Result<(Phase, Phase, Upload), AgentError> {
        let store = Store::new(&b.account).map_err(|e| conflict(e.to_string()))?;
        let part_bytes = (b.part_mib << 20).max(dczone_cloud::s3::MIN_PART);
        let (writer, source) = dczone_cloud::stream::parts(part_bytes, b.streams.max(1));
        let (store, key, streams) = (&store, &b.key, b.streams);
        std::thread::scope(|sc| {
            // The parts' receiving end lives in the upload thread and goes with it: an upload
            // that stops makes the encoder's next part fail at once, not wait for room.
            let upload = sc.spawn(move || {
                let start_unix_ms = dczone_storage::backup::unix_ms();
                let t = Instant::now();
                let r = store.upload_stream(&|| source.next(), key, streams, 3, &|_, _| {});
                drop(source);
                (r, Phase::finished(start_unix_ms, t))
            });
            let start_unix_ms = dczone_storage::backup::unix_ms();
            let t = Instant::now();
            let encoded = encode(&self.storage, disk, snap, format, writer);
            let convert = Phase::finished(start_unix_ms, t);
            let (uploaded, transfer) = upload
                .join()
                .map_err(|_| conflict("the upload thread panicked".into()))?;
            match (uploaded, encoded) {
                (Ok(upload), Ok(())) => Ok((convert, transfer, upload)),
                // The encoder only saw the upload stop: the upload says why.
                (Err(up), Err(enc))
                    if enc
                        .to_string()
                        .contains(dczone_cloud::stream::UPLOAD_STOPPED) =>
                {
                    Err(conflict(up.to_string()))
                }
                // The encoder's failure (the read, the format) is the cause; the upload
                // was aborted because of it.
                (_, Err(enc)) => Err(enc),
                (Err(up), Ok(())) => Err(conflict(up.to_string())),
            }
        })
    }
}

/// Snapshot `snap` of VM `vm`'s disk: inside its QEMU when it runs (quicker than a
/// client of its own, see [`dczone_hypervisor::snapshot_disk`]); by `rbd` when it does not,
/// or when its QEMU refused or could not be asked (its reason logged). For the cloud
/// export, whose source is the standby site's VM: the guest's devices wait while QEMU
/// takes it (measured: a client of the guest saw one answer take 47-60 ms, against at most
/// 12 ms while `rbd` took it; backups of production VMs keep `rbd`). A QEMU that was
/// asked and did not answer may still take it: that fails, naming the snapshot, rather
/// than race it with `rbd`.
fn snapshot_disk(
    s: &dczone_storage::host::HostStorage,
    vm: &dczone_virt::VmRecord,
    snap: &str,
) -> Result<(), AgentError> {
    let Some(disk) = &vm.spec.disk else {
        return Err(StorageError::Conflict(format!("VM '{}' has no disk", vm.spec.name)).into());
    };
    if let Some(r) = &vm.running {
        match dczone_hypervisor::snapshot_disk(r, snap) {
            Ok(()) => return Ok(()),
            Err(e) if e.attempted => {
                return Err(StorageError::Conflict(format!(
                    "snapshot {snap} of VM {}'s disk: its QEMU did not answer ({}); it may \
                     still make it: see `rbd snap ls {}/{}`",
                    vm.spec.name,
                    dczone_zone::error_chain(&e),
                    disk.pool,
                    disk.image
                ))
                .into())
            }
            Err(e) => eprintln!(
                "dczoned: snapshot {snap} of VM {}'s disk by rbd: its QEMU: {}",
                vm.spec.name,
                dczone_zone::error_chain(&e)
            ),
        }
    }
    Ok(s.snapshot(&disk.cluster, &disk.pool, &disk.image, snap)?)
}

/// Feeds the snapshot's `rbd export-diff` through an encoder of `format` into `writer`.
fn encode(
    s: &dczone_storage::host::HostStorage,
    disk: &dczone_hypervisor::DiskSpec,
    snap: &str,
    format: DiskFormat,
    writer: dczone_cloud::stream::PartWriter,
) -> Result<(), AgentError> {
    use dczone_cloud::stream::Encoder;
    use dczone_storage::diff::{DiffParser, Piece};
    let io = |e: std::io::Error| -> StorageError {
        StorageError::Conflict(format!("encode the disk as {}: {e}", format.name()))
    };
    let mut parser = DiffParser::default();
    let mut writer = Some(writer);
    let mut encoder: Option<Encoder<dczone_cloud::stream::PartWriter>> = None;
    // Four objects read at once: the parts come evenly, so the upload keeps up.
    s.export_diff(
        &disk.cluster,
        &disk.pool,
        &disk.image,
        snap,
        None,
        Some(4),
        |_, chunk| {
            parser.feed(&chunk, &mut |p| {
                match p {
                    Piece::Size(size) => {
                        let w = writer.take().ok_or_else(|| {
                            StorageError::Conflict("the diff gives the size twice".into())
                        })?;
                        encoder = Some(Encoder::new(format, size, w, 2).map_err(io)?);
                    }
                    Piece::Data { offset, bytes } => encoder
                        .as_mut()
                        .ok_or_else(|| StorageError::Conflict("data before the size".into()))?
                        .data(offset, bytes)
                        .map_err(io)?,
                    // A full export's zeroes are holes: they read as zeroes anyway.
                    Piece::Zero { .. } => {}
                }
                Ok(())
            })
        },
    )?;
    if !parser.ended() {
        return Err(conflict(
            "rbd export-diff ended before its end record".into(),
        ));
    }
    let encoder = encoder.ok_or_else(|| conflict("rbd export-diff gave no size".into()))?;
    let (w, _) = encoder.finish().map_err(io)?;
    w.finish().map_err(io)?;
    Ok(())
}

fn size_of(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}
