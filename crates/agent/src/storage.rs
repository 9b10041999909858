//! The host's part of the zone's storage clusters (`dczone_storage::host`), behind the
//! agent's `/v1/storage/...` routes (operator certificate only; the table is in
//! `dczone_storage::operator`). Calls that install, start or stop daemons take one lock,
//! so that two operators' calls at once create each daemon once.

use axum::http::StatusCode;
use serde_json::{json, Value};

use dczone_storage::operator::HostView;
use dczone_storage::StorageError;

use crate::{Agent, AgentError, AgentRequest};

pub(crate) fn status_code(e: &StorageError) -> StatusCode {
    match e {
        StorageError::Conflict(_) => StatusCode::CONFLICT,
        StorageError::NotInstalled { .. } | StorageError::NotAdmin { .. } => StatusCode::NOT_FOUND,
        StorageError::Command { .. } => StatusCode::SERVICE_UNAVAILABLE,
        StorageError::NoSpace { .. } => StatusCode::INSUFFICIENT_STORAGE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn check_name(cluster: &str) -> Result<(), AgentError> {
    check_a("cluster", cluster)
}

/// That `name` is a Ceph name of a `what`: letters, digits, '-', '.', '_', not a leading '.'.
fn check_a(what: &str, name: &str) -> Result<(), AgentError> {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(StorageError::Conflict(format!(
            "'{name}' is not a {what} name (letters, digits, '-', '.', '_')"
        ))
        .into())
    }
}

impl Agent {
    pub(crate) fn storage_request(&self, req: AgentRequest) -> Result<Value, AgentError> {
        let s = &self.storage;
        let busy = || self.storage_busy.lock().unwrap_or_else(|e| e.into_inner());
        Ok(match req {
            AgentRequest::StorageInstall { cluster, body } => {
                check_name(&cluster)?;
                if body.plan.name != cluster {
                    return Err(StorageError::Conflict(format!(
                        "the plan is of cluster {}, not {cluster}",
                        body.plan.name
                    ))
                    .into());
                }
                let _g = busy();
                json!(s.install(&body.plan, &body.keys, body.monmap.as_deref())?)
            }
            AgentRequest::StorageView { cluster } => {
                check_name(&cluster)?;
                let plan = s.plan(&cluster)?;
                let daemons = match &plan {
                    Some(_) => s.daemons(&cluster)?,
                    None => Vec::new(),
                };
                json!(HostView {
                    host: self.host.clone(),
                    fsid: plan.map(|p| p.fsid),
                    daemons,
                })
            }
            AgentRequest::StorageStart { cluster, body } => {
                check_name(&cluster)?;
                let _g = busy();
                json!(s.start(&cluster, &body.kinds)?)
            }
            AgentRequest::StorageStop { cluster, body } => {
                check_name(&cluster)?;
                let _g = busy();
                json!(s.stop(&cluster, body.daemon.as_deref())?)
            }
            AgentRequest::StorageSetup { cluster, body } => {
                check_name(&cluster)?;
                if body.monitors_only {
                    json!(s.locate_monitors(&cluster)?)
                } else {
                    let _g = busy();
                    json!(s.setup(&cluster)?)
                }
            }
            AgentRequest::StorageStatus { cluster } => {
                check_name(&cluster)?;
                json!(s.status(&cluster)?)
            }
            AgentRequest::StoragePurge { cluster } => {
                check_name(&cluster)?;
                let _g = busy();
                json!(s.purge(&cluster)?)
            }
            AgentRequest::Backup { name, body } => self.backup(&name, body)?,
            AgentRequest::Ledger { name, body } => {
                let vm = self.here(&name)?;
                let ip = dczone_virt::Platform::guest_ip(&vm);
                json!(ledger_requests(ip, &body.requests)?)
            }
            AgentRequest::BackupChunk {
                cluster,
                id,
                n,
                sha256,
                bytes,
                arrived_unix_ms,
            } => {
                check_name(&cluster)?;
                json!(s.store_chunk(&cluster, &id, n, &sha256, bytes, arrived_unix_ms)?)
            }
            AgentRequest::BackupCommit {
                cluster,
                id,
                manifest,
            } => {
                check_name(&cluster)?;
                if id != manifest.id {
                    return Err(StorageError::Conflict(format!(
                        "the manifest is of backup {}, not {id}",
                        manifest.id
                    ))
                    .into());
                }
                s.store_manifest(&cluster, &manifest)?;
                json!({ "id": manifest.id })
            }
            AgentRequest::BackupList { cluster } => {
                check_name(&cluster)?;
                json!(s.manifests(&cluster)?)
            }
            AgentRequest::BackupOrphans { cluster } => {
                check_name(&cluster)?;
                json!(s.orphans(&cluster)?)
            }
            AgentRequest::BackupSpace { cluster } => {
                check_name(&cluster)?;
                s.ensure_backup_pool(&cluster)?;
                json!(s.pool_space(&cluster, dczone_storage::backup::POOL)?)
            }
            AgentRequest::BackupVerify { cluster, id } => {
                check_name(&cluster)?;
                json!({ "bytes": s.verify(&cluster, &id)? })
            }
            AgentRequest::BackupDelete { cluster, id } => {
                check_name(&cluster)?;
                json!({ "objects": s.delete_backup(&cluster, &id)? })
            }
            AgentRequest::BackupRestore { cluster, body } => {
                check_name(&cluster)?;
                dczone_storage::backup::check_id(&body.image)?;
                let plan = s
                    .plan(&cluster)?
                    .ok_or_else(|| StorageError::NotInstalled {
                        cluster: cluster.clone(),
                        host: self.host.clone(),
                    })?;
                let pool = body.pool.unwrap_or_else(|| plan.pool.name.clone());
                let pools: Vec<String> = plan.site_pools().into_iter().map(|p| p.name).collect();
                if !pools.contains(&pool) {
                    return Err(StorageError::Conflict(format!(
                        "'{pool}' is not a pool of VM disks of cluster {cluster} ({})",
                        pools.join(", ")
                    ))
                    .into());
                }
                let (check_ms, import_ms) =
                    s.restore_chain(&cluster, &body.chain, &pool, &body.image)?;
                json!({ "check_ms": check_ms, "import_ms": import_ms, "pool": pool })
            }
            other => unreachable!("not a storage request: {other:?}"),
        })
    }
}

/// Body of `POST /v1/vms/{name}/backup`: where the backup goes, and the backup it may be
/// a diff from.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackupBody {
    pub id: String,
    /// The latest backup of the VM in the store: the new one is a diff from it if its
    /// snapshot is still on the VM's image (else it is full).
    #[serde(default)]
    pub parent: Option<String>,
    /// The store: its cluster and its host's agent.
    pub store_cluster: String,
    pub store_host: String,
    #[serde(default)]
    pub store_agent: Option<String>,
    /// Chunks in flight at once.
    #[serde(default = "default_streams")]
    pub streams: usize,
    /// The room in the store's pool when the backup started (`GET
    /// /v1/backup-store/{cluster}/space`), shared by `store_share` backups started at once
    /// (a group's): the transfer stops once its bytes times the share outgrow it.
    #[serde(default)]
    pub store_space: Option<dczone_storage::PoolSpace>,
    #[serde(default = "one")]
    pub store_share: u64,
}

fn default_streams() -> usize {
    4
}

fn one() -> u64 {
    1
}

/// One chunk's journey, each time from the transfer's start (the store's arrival on its
/// own clock, taken against the source's unix start time): handed to a sender, arrived
/// whole at the store, answered by the store (checked, its write under way behind).
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct ChunkTiming {
    pub n: u32,
    pub bytes: u64,
    pub sent_ms: f64,
    pub arrived_ms: f64,
    pub stored_ms: f64,
}

/// What a backup took at its source.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct BackupDone {
    pub manifest: dczone_storage::backup::Manifest,
    pub checkpoint_ms: f64,
    pub snapshot_ms: f64,
    /// From the first chunk's read to the last chunk stored.
    pub transfer_ms: f64,
    /// Writing the manifest: the backup exists.
    pub commit_ms: f64,
    pub chunks: Vec<ChunkTiming>,
}

/// Body of `POST /v1/vms/{name}/ledger`: requests to the guest's ledger, sent in order on
/// one connection from the VM's host (a restore's replay of logged transfers).
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerBody {
    pub requests: Vec<String>,
}

/// Body of `POST /v1/backup-store/{cluster}/restore`.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreBody {
    /// A full backup's id, then each incremental after it.
    pub chain: Vec<String>,
    /// The new image.
    pub image: String,
    /// Its pool: the restoring site's (`ClusterPlan::site_pool`); the cluster's first
    /// pool when not given.
    #[serde(default)]
    pub pool: Option<String>,
}

impl Agent {
    /// `POST /v1/vms/{name}/backup`: checkpoint, snapshot, then the diff to the store in
    /// chunks, several at once, and the manifest last. A failure removes the new
    /// snapshot: the previous backup stays the base of the next.
    pub(crate) fn backup(&self, name: &str, b: BackupBody) -> Result<Value, AgentError> {
        use dczone_storage::backup::{self, Chunk, Manifest};
        backup::check_id(&b.id)?;
        check_name(&b.store_cluster)?;
        let vm = self.here(name)?;
        let Some(disk) = vm.spec.disk.clone() else {
            return Err(StorageError::Conflict(format!(
                "VM '{name}' has no disk to back up (`vm create --disk`)"
            ))
            .into());
        };
        if vm.running.is_none() {
            return Err(AgentError::Virt(dczone_virt::VirtError::NotRunning(
                name.into(),
            )));
        }
        let s = &self.storage;
        let t = std::time::Instant::now();
        let ip = dczone_virt::Platform::guest_ip(&vm);
        let checkpoint = backup::checkpoint(ip, std::time::Duration::from_secs(30))?;
        let checkpoint_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = std::time::Instant::now();
        // By `rbd`, not in QEMU: a backup runs against production VMs, and a snapshot in
        // QEMU holds the guest's devices while Ceph answers (see the cloud export's).
        s.snapshot(&disk.cluster, &disk.pool, &disk.image, &b.id)?;
        let snapshot_ms = t.elapsed().as_secs_f64() * 1e3;
        let parent = b.parent.clone().filter(|p| {
            s.rbd(
                &disk.cluster,
                &[
                    "snap",
                    "ls",
                    "--format",
                    "json",
                    &format!("{}/{}", disk.pool, disk.image),
                ],
            )
            .ok()
            .and_then(|out| serde_json::from_str::<Value>(&out).ok())
            .is_some_and(|v| {
                v.as_array()
                    .is_some_and(|a| a.iter().any(|x| x["name"].as_str() == Some(p.as_str())))
            })
        });
        let url = self.peer_url(&b.store_host, b.store_agent.clone())?;
        let client = crate::AgentClient::new(&url, self.peers.clone());
        // Chunks go to the store's bulk port (the WAN's bulk class); the manifest, a
        // control call, to its agent port.
        let bulk = crate::AgentClient::new(
            &crate::bulk_url(&url).map_err(StorageError::Conflict)?,
            self.peers.clone(),
        );
        let start_unix = dczone_storage::backup::unix_ms();
        let t = std::time::Instant::now();
        let result = (|| -> Result<(Vec<Chunk>, Vec<ChunkTiming>), AgentError> {
            let (tx, rx) =
                std::sync::mpsc::sync_channel::<(u32, Vec<u8>, f64)>(b.streams.clamp(1, 32));
            let rx = std::sync::Mutex::new(rx);
            let chunks = std::sync::Mutex::new(Vec::new());
            let timings = std::sync::Mutex::new(Vec::new());
            let failure = std::sync::Mutex::new(None::<String>);
            std::thread::scope(|scope| -> Result<(), AgentError> {
                for _ in 0..b.streams.clamp(1, 32) {
                    scope.spawn(|| loop {
                        let next = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        let Ok((n, bytes, sent_ms)) = next else {
                            return;
                        };
                        if failure.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
                            continue;
                        }
                        let sha = backup::sha256_hex(&bytes);
                        let path = format!("/v1/backup-store/{}/{}/{n}", b.store_cluster, b.id);
                        match bulk.put_bytes(&path, &sha, &bytes, CHUNK_TIMEOUT) {
                            Ok(v) => {
                                let stored_ms = t.elapsed().as_secs_f64() * 1e3;
                                let arrived = v["arrived_unix_ms"].as_u64().unwrap_or(0);
                                timings.lock().unwrap_or_else(|e| e.into_inner()).push(
                                    ChunkTiming {
                                        n,
                                        bytes: bytes.len() as u64,
                                        sent_ms,
                                        arrived_ms: arrived.saturating_sub(start_unix) as f64,
                                        stored_ms,
                                    },
                                );
                                chunks
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .push(Chunk {
                                        n,
                                        bytes: bytes.len() as u64,
                                        sha256: sha,
                                    });
                            }
                            Err(e) => {
                                *failure.lock().unwrap_or_else(|e| e.into_inner()) =
                                    Some(format!("chunk {n} to {}: {e}", b.store_host));
                            }
                        }
                    });
                }
                let mut sent = 0u64;
                let exported = s.export_diff(
                    &disk.cluster,
                    &disk.pool,
                    &disk.image,
                    &b.id,
                    parent.as_deref(),
                    None,
                    |n, bytes| {
                        if let Some(f) = failure.lock().unwrap_or_else(|e| e.into_inner()).clone() {
                            return Err(StorageError::Conflict(f));
                        }
                        sent += bytes.len() as u64;
                        if let Some(space) = &b.store_space {
                            let share = b.store_share.max(1);
                            let what = if share == 1 {
                                format!("backup {} (so far)", b.id)
                            } else {
                                format!(
                                    "backup {} ({} so far, times the {share} backups that \
                                     share the store's room)",
                                    b.id,
                                    dczone_storage::size(sent)
                                )
                            };
                            space.check(sent.saturating_mul(share), &what)?;
                        }
                        tx.send((n, bytes, t.elapsed().as_secs_f64() * 1e3))
                            .map_err(|_| StorageError::Conflict("the senders stopped".into()))
                    },
                );
                drop(tx);
                exported.map_err(AgentError::from)
            })?;
            if let Some(f) = failure.into_inner().unwrap_or_else(|e| e.into_inner()) {
                return Err(
                    StorageError::Conflict(format!("backup {} transfer cut: {f}", b.id)).into(),
                );
            }
            let mut chunks = chunks.into_inner().unwrap_or_else(|e| e.into_inner());
            chunks.sort_by_key(|c| c.n);
            let mut timings = timings.into_inner().unwrap_or_else(|e| e.into_inner());
            timings.sort_by_key(|c| c.n);
            Ok((chunks, timings))
        })();
        let (chunks, timings) = match result {
            Ok(v) => v,
            Err(e) => {
                let _ = s.remove_snapshot(&disk.cluster, &disk.pool, &disk.image, &b.id);
                // Stopped for lack of room: what was sent would keep the store full (and
                // the VM's next backup refused), so it goes now.
                if matches!(e, AgentError::Storage(StorageError::NoSpace { .. })) {
                    let _ = client.call(
                        "DELETE",
                        &format!("/v1/backup-store/{}/{}", b.store_cluster, b.id),
                        None,
                        std::time::Duration::from_secs(60),
                    );
                }
                return Err(e);
            }
        };
        let transfer_ms = t.elapsed().as_secs_f64() * 1e3;
        let manifest = Manifest {
            id: b.id.clone(),
            vm: name.into(),
            cluster: disk.cluster.clone(),
            pool: disk.pool.clone(),
            image: disk.image.clone(),
            size_mib: disk.size_mib,
            parent: parent.clone(),
            checkpoint,
            created_unix_ms: start_unix,
            bytes: chunks.iter().map(|c| c.bytes).sum(),
            chunks,
        };
        let t = std::time::Instant::now();
        let committed = client.call(
            "PUT",
            &format!("/v1/backup-store/{}/{}", b.store_cluster, b.id),
            Some(json!(manifest)),
            std::time::Duration::from_secs(60),
        );
        if let Err(e) = committed {
            let _ = s.remove_snapshot(&disk.cluster, &disk.pool, &disk.image, &b.id);
            return Err(StorageError::Conflict(format!(
                "backup {}: the store did not take its manifest: {e}",
                b.id
            ))
            .into());
        }
        let commit_ms = t.elapsed().as_secs_f64() * 1e3;
        // The new snapshot is the base of the next backup; the parent's is done with.
        if let Some(p) = &parent {
            let _ = s.remove_snapshot(&disk.cluster, &disk.pool, &disk.image, p);
        }
        Ok(json!(BackupDone {
            manifest,
            checkpoint_ms,
            snapshot_ms,
            transfer_ms,
            commit_ms,
            chunks: timings,
        }))
    }
}

/// Sends `requests` to the guest ledger at `ip` on one connection; its answers.
fn ledger_requests(ip: std::net::Ipv4Addr, requests: &[String]) -> Result<Vec<String>, AgentError> {
    use std::io::{BufRead, Write};
    let io = |what: &'static str| {
        move |e: std::io::Error| StorageError::Io {
            what: what.into(),
            source: e,
        }
    };
    let s = std::net::TcpStream::connect_timeout(
        &(ip, 7000).into(),
        std::time::Duration::from_secs(10),
    )
    .map_err(io("connect to the guest's ledger"))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .map_err(io("set a timeout"))?;
    let mut w = std::io::BufWriter::new(s.try_clone().map_err(io("clone a socket"))?);
    let mut r = std::io::BufReader::new(s);
    let mut answers = Vec::with_capacity(requests.len());
    // Pipelined: every request is sent, then every answer read (in order).
    for req in requests {
        if req.contains('\n') {
            return Err(
                StorageError::Conflict(format!("a ledger request is one line: {req:?}")).into(),
            );
        }
        writeln!(w, "{req}").map_err(io("send to the guest's ledger"))?;
    }
    w.flush().map_err(io("send to the guest's ledger"))?;
    for _ in requests {
        let mut line = String::new();
        r.read_line(&mut line)
            .map_err(io("read the guest ledger's answer"))?;
        answers.push(line.trim().to_string());
    }
    Ok(answers)
}

/// How long one chunk may take to reach the store and be kept there: a 4 MiB chunk needs
/// this long only below about 2 Mbit/s, so a cut path fails the backup within it.
const CHUNK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);
