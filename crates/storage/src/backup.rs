//! Snapshot backups of VM disks to another site's cluster, and recovery from them.
//!
//! A backup is the `rbd export-diff` of one snapshot of a VM's image (from the previous
//! backup's snapshot, or from nothing: a full backup), cut into [`CHUNK`]-byte chunks. The
//! source host's agent sends the chunks to the backup store, several at once; the store
//! checks each chunk's SHA-256 on arrival, writes it as a RADOS object of the destination
//! cluster's `backups` pool (replicated: durable once written), and records when it
//! arrived. The manifest, written last, makes the backup exist:
//!
//! ```text
//! source agent                                  store agent (DC2.1)
//!   checkpoint (guest `C`), snapshot (in QEMU)
//!   rbd export-diff ──chunks, N at once──PUT──▶  arrival time, SHA-256 check, answer;
//!                                                rados put behind (WRITE_BEHIND at most)
//!                   ──manifest──────────PUT──▶  every write done and listed, then
//!                                                rados put (the backup now exists)
//! ```
//!
//! As SPEC.md §7 has it, the transfer goes on while the receiver writes: a chunk is
//! answered once it arrived whole and checked, and written behind, so the path is not idle
//! while the store's cluster writes. [`WRITE_BEHIND`] writes at most run at once; the next
//! chunk waits for a slot (the store's pace then sets the sender's). The commit waits for
//! every write of its backup ([`SETTLE_WITHIN`] at most) and fails if one failed; it then
//! lists the objects, so a write lost with a restarted agent is found too. Every `rados`
//! call has deadlines (connect 30 s, each operation 60 s).
//!
//! A backup whose transfer was cut has no manifest: it does not exist, the previous one is
//! untouched, and its chunks are removed by the next run (or `backup delete`). Restore reads
//! a chain (a full backup and the incrementals after it), checks every chunk first, and only
//! then imports it: a corrupted backup is refused, naming the chunk, before any image is
//! made. Both ends check the room first, because Ceph holds a write to a full pool (until
//! the client's timeout) instead of failing it: a backup does not start when the store's
//! pool is full and stops once it outgrows the room it was given; a restore needs room
//! in the destination pool for every byte of its chain.
//!
//! Objects: `<id>.manifest` and `<id>.<n>` (n from 0) in pool [`POOL`].

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::host::HostStorage;
use crate::keys;
use crate::StorageError;

/// The pool backups are kept in.
pub const POOL: &str = "backups";
/// A chunk's size: 4 MiB, RBD's object size.
pub const CHUNK: usize = 4 << 20;

/// Chunks read from the store at once (a restore, a verify).
pub const READERS: usize = 4;
/// Chunk writes under way at once on a store, for every backup (4 MiB each, plus the
/// chunks waiting for a slot).
pub const WRITE_BEHIND: usize = 16;
/// How long a commit waits for its backup's writes (within the source's 60 s call).
pub const SETTLE_WITHIN: Duration = Duration::from_secs(45);

/// The store's writes behind arrival: how many are under way, and per backup those still
/// writing and those that failed.
#[derive(Debug, Default)]
pub struct WriteBehind {
    state: std::sync::Mutex<Writes>,
    changed: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct Writes {
    in_flight: usize,
    /// By (cluster, backup id).
    backups: std::collections::HashMap<(String, String), Pending>,
}

#[derive(Debug, Default)]
struct Pending {
    /// Chunks from their arrival (checking, waiting for a slot, writing) to their end.
    writing: usize,
    failed: Vec<String>,
}

impl WriteBehind {
    fn lock(&self) -> std::sync::MutexGuard<'_, Writes> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether backup `id` of `cluster` has had a chunk here since its last commit.
    #[cfg(test)]
    fn known(&self, cluster: &str, id: &str) -> bool {
        self.lock()
            .backups
            .contains_key(&(cluster.to_string(), id.to_string()))
    }

    /// Counts a chunk of `id` from its arrival, before it is checked: a commit or a delete
    /// of `id` waits for it from now on. Whether it is the backup's first chunk since its
    /// last commit (then its manifest must be checked absent).
    fn arrive(&self, cluster: &str, id: &str) -> bool {
        let mut s = self.lock();
        let entry = s.backups.entry((cluster.to_string(), id.to_string()));
        let first = matches!(entry, std::collections::hash_map::Entry::Vacant(_));
        entry.or_default().writing += 1;
        first
    }

    /// A chunk refused before its write: done with, and if it was its backup's first one
    /// and nothing else of the backup is under way or failed, the backup is forgotten.
    fn refuse(&self, cluster: &str, id: &str, first: bool) {
        self.end(cluster, id, false, None);
        if first {
            let key = (cluster.to_string(), id.to_string());
            let mut s = self.lock();
            if s.backups
                .get(&key)
                .is_some_and(|p| p.writing == 0 && p.failed.is_empty())
            {
                s.backups.remove(&key);
            }
        }
    }

    /// Waits for a write slot and takes it.
    fn slot(&self) {
        let mut s = self.lock();
        while s.in_flight >= WRITE_BEHIND {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.in_flight += 1;
    }

    /// A chunk of `id` is done with: written (or refused before its write, `slot` false),
    /// or failed with `failure`.
    fn end(&self, cluster: &str, id: &str, slot: bool, failure: Option<String>) {
        let mut s = self.lock();
        if slot {
            s.in_flight -= 1;
        }
        if let Some(p) = s.backups.get_mut(&(cluster.to_string(), id.to_string())) {
            p.writing -= 1;
            p.failed.extend(failure);
        }
        self.changed.notify_all();
    }

    /// Waits until no chunk of `id` is being written, for `within` at most; forgets the
    /// backup and returns the writes that failed, or how many were still under way.
    fn settle(&self, cluster: &str, id: &str, within: Duration) -> Result<Vec<String>, usize> {
        let key = (cluster.to_string(), id.to_string());
        let deadline = Instant::now() + within;
        let mut s = self.lock();
        while let Some(writing) = s.backups.get(&key).map(|p| p.writing).filter(|w| *w > 0) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(writing);
            }
            s = self
                .changed
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(s.backups.remove(&key).map(|p| p.failed).unwrap_or_default())
    }
}

/// One chunk of a backup, as the store received it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Chunk {
    pub n: u32,
    pub bytes: u64,
    pub sha256: String,
}

/// What makes a backup: written last, to the store.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// `<vm>-<unix ms>`: sorts by time for one VM.
    pub id: String,
    pub vm: String,
    /// The source image (`pool/image` in `cluster`) and its snapshot (named as the id).
    pub cluster: String,
    pub pool: String,
    pub image: String,
    pub size_mib: u64,
    /// The backup this one is a diff from (`None`: a full backup).
    pub parent: Option<String>,
    /// The guest's journal position at the checkpoint (`None`: it had no journal).
    pub checkpoint: Option<u64>,
    pub created_unix_ms: u64,
    pub chunks: Vec<Chunk>,
    pub bytes: u64,
}

/// What the store answers for one chunk: whether it was new, and when the last byte of it
/// arrived (unix ms, the store's clock).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stored {
    pub arrived_unix_ms: u64,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// A backup id or VM name that is safe as a RADOS object name's part.
pub fn check_id(id: &str) -> Result<(), StorageError> {
    let ok = !id.is_empty()
        && id.len() <= 80
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(StorageError::Conflict(format!(
            "'{id}' is not a backup id (letters, digits, '-', '_')"
        )))
    }
}

impl HostStorage {
    /// Runs `rados` on `pool` of `cluster` with the admin key (a monitor's host: the store),
    /// with `input` on its stdin; its stdout.
    fn rados(
        &self,
        cluster: &str,
        args: &[&str],
        input: Option<&[u8]>,
    ) -> Result<Vec<u8>, StorageError> {
        let dir = self.dir(cluster);
        let keyring = dir.join(format!("keyring.{}", keys::ADMIN));
        if !keyring.is_file() {
            return Err(StorageError::NotAdmin {
                cluster: cluster.into(),
                host: self.host.clone(),
            });
        }
        let conf = dir.join("ceph.conf");
        let what = format!("rados {}", args.join(" "));
        let mut child = Command::new("rados")
            .arg("-c")
            .arg(&conf)
            .args(["-n", keys::ADMIN, "-k"])
            .arg(&keyring)
            .args(["-p", POOL])
            .args([
                "--client-mount-timeout=30",
                "--rados-osd-op-timeout=60",
                "--rados-mon-op-timeout=60",
            ])
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| StorageError::Io {
                what: what.clone(),
                source,
            })?;
        if let Some(bytes) = input {
            let mut stdin = child.stdin.take().expect("piped");
            let bytes = bytes.to_vec();
            std::thread::spawn(move || {
                let _ = stdin.write_all(&bytes);
            });
        }
        let out = child
            .wait_with_output()
            .map_err(|source| StorageError::Io {
                what: what.clone(),
                source,
            })?;
        if !out.status.success() {
            return Err(StorageError::Command {
                what,
                status: out.status.code().unwrap_or(-1),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(out.stdout)
    }

    /// Makes the `backups` pool, once.
    pub fn ensure_backup_pool(&self, cluster: &str) -> Result<(), StorageError> {
        let pools = self.ceph(cluster, &["osd", "pool", "ls"])?;
        if pools.lines().any(|l| l.trim() == POOL) {
            return Ok(());
        }
        self.ceph(
            cluster,
            &["osd", "pool", "create", POOL, "8", "8", "replicated"],
        )?;
        self.ceph(
            cluster,
            &[
                "osd",
                "pool",
                "application",
                "enable",
                POOL,
                "dczone-backup",
                "--yes-i-really-mean-it",
            ],
        )?;
        Ok(())
    }

    /// Takes one chunk after checking it against `sha256`, and writes it behind (see the
    /// module's docs); when its last byte arrived.
    pub fn store_chunk(
        &self,
        cluster: &str,
        id: &str,
        n: u32,
        sha256: &str,
        bytes: Vec<u8>,
        arrived_unix_ms: u64,
    ) -> Result<Stored, StorageError> {
        check_id(id)?;
        // Counted from here, so that a delete waits for it. A committed backup's entry is
        // gone: its manifest refuses a late chunk.
        let first = self.writes.arrive(cluster, id);
        if first {
            let refused = match self.has_manifest(cluster, id) {
                Ok(false) => None,
                Ok(true) => Some(StorageError::Conflict(format!(
                    "backup {id} exists: its chunks are not written again"
                ))),
                Err(e) => Some(e),
            };
            if let Some(e) = refused {
                self.writes.refuse(cluster, id, true);
                return Err(e);
            }
        }
        let got = sha256_hex(&bytes);
        if got != sha256 {
            self.writes.refuse(cluster, id, first);
            return Err(StorageError::Conflict(format!(
                "chunk {n} of backup {id} arrived damaged: SHA-256 {got}, sent as {sha256}"
            )));
        }
        self.writes.slot();
        let store = self.clone();
        let (c, i) = (cluster.to_string(), id.to_string());
        let spawned = std::thread::Builder::new()
            .name(format!("put {id}.{n}"))
            .spawn(move || {
                let written = store.rados(&c, &["put", &format!("{i}.{n}"), "-"], Some(&bytes));
                let failure = written.err().map(|e| format!("chunk {n}: {e}"));
                store.writes.end(&c, &i, true, failure);
            });
        if let Err(e) = spawned {
            self.writes.end(
                cluster,
                id,
                true,
                Some(format!("chunk {n}: no thread to write it: {e}")),
            );
            return Err(StorageError::Io {
                what: format!("start writing chunk {n} of backup {id}"),
                source: e,
            });
        }
        Ok(Stored { arrived_unix_ms })
    }

    /// Writes a backup's manifest once every chunk of it written behind is in the store:
    /// the backup exists from now on. Every chunk it names must be listed.
    pub fn store_manifest(&self, cluster: &str, m: &Manifest) -> Result<(), StorageError> {
        check_id(&m.id)?;
        let failed = self
            .writes
            .settle(cluster, &m.id, SETTLE_WITHIN)
            .map_err(|writing| {
                StorageError::Conflict(format!(
                    "backup {}: {writing} of its chunks were still being written after {} s; \
                 the store's cluster is slow or unhealthy (`dczone storage status`)",
                    m.id,
                    SETTLE_WITHIN.as_secs()
                ))
            })?;
        if !failed.is_empty() {
            return Err(StorageError::Conflict(format!(
                "backup {}: the store could not write {}",
                m.id,
                failed.join("; ")
            )));
        }
        let listed = self.objects(cluster)?;
        if listed.contains(&format!("{}.manifest", m.id)) {
            return Err(StorageError::Conflict(format!("backup {} exists", m.id)));
        }
        for c in &m.chunks {
            if !listed.contains(&format!("{}.{}", m.id, c.n)) {
                return Err(StorageError::Conflict(format!(
                    "backup {}: chunk {} never arrived",
                    m.id, c.n
                )));
            }
        }
        let text = serde_json::to_vec_pretty(m).expect("a manifest serializes");
        self.rados(
            cluster,
            &["put", &format!("{}.manifest", m.id), "-"],
            Some(&text),
        )?;
        Ok(())
    }

    fn has_manifest(&self, cluster: &str, id: &str) -> Result<bool, StorageError> {
        match self.rados(cluster, &["stat", &format!("{id}.manifest")], None) {
            Ok(_) => Ok(true),
            Err(StorageError::Command { stderr, .. }) if stderr.contains("No such file") => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    fn objects(&self, cluster: &str) -> Result<Vec<String>, StorageError> {
        let out = self.rados(cluster, &["ls"], None)?;
        Ok(String::from_utf8_lossy(&out)
            .lines()
            .map(str::to_string)
            .collect())
    }

    /// Every backup in the store, oldest first.
    pub fn manifests(&self, cluster: &str) -> Result<Vec<Manifest>, StorageError> {
        self.ensure_backup_pool(cluster)?;
        let mut ids: Vec<String> = self
            .objects(cluster)?
            .into_iter()
            .filter_map(|o| o.strip_suffix(".manifest").map(str::to_string))
            .collect();
        ids.sort();
        let mut out = Vec::new();
        for id in ids {
            out.push(self.manifest(cluster, &id)?);
        }
        out.sort_by_key(|m| m.created_unix_ms);
        Ok(out)
    }

    pub fn manifest(&self, cluster: &str, id: &str) -> Result<Manifest, StorageError> {
        check_id(id)?;
        let bytes = self
            .rados(cluster, &["get", &format!("{id}.manifest"), "-"], None)
            .map_err(|e| match e {
                StorageError::Command { stderr, .. } if stderr.contains("No such file") => {
                    StorageError::Conflict(format!("no backup {id} in the store"))
                }
                e => e,
            })?;
        serde_json::from_slice(&bytes).map_err(|e| StorageError::Corrupt {
            what: format!("the manifest of backup {id}"),
            reason: e.to_string(),
        })
    }

    /// Reads chunk `n` of backup `id` and checks it against the manifest.
    fn read_chunk(&self, cluster: &str, m: &Manifest, c: &Chunk) -> Result<Vec<u8>, StorageError> {
        let bytes = self.rados(cluster, &["get", &format!("{}.{}", m.id, c.n), "-"], None)?;
        let got = sha256_hex(&bytes);
        if got != c.sha256 || bytes.len() as u64 != c.bytes {
            return Err(StorageError::Damaged {
                backup: m.id.clone(),
                chunk: c.n,
                reason: format!(
                    "{} bytes with SHA-256 {got}; the manifest says {} bytes, {}",
                    bytes.len(),
                    c.bytes,
                    c.sha256
                ),
            });
        }
        Ok(bytes)
    }

    /// Reads and checks every chunk of `manifests`, [`READERS`] at once: per manifest, its
    /// chunks in order. A damaged or missing chunk fails the whole read, the first of the
    /// chain's order named.
    fn read_chunks(
        &self,
        cluster: &str,
        manifests: &[Manifest],
    ) -> Result<Vec<Vec<Vec<u8>>>, StorageError> {
        let all: Vec<(usize, &Chunk)> = manifests
            .iter()
            .enumerate()
            .flat_map(|(i, m)| m.chunks.iter().map(move |c| (i, c)))
            .collect();
        let next = std::sync::atomic::AtomicUsize::new(0);
        type Read = Option<Result<Vec<u8>, StorageError>>;
        let read: std::sync::Mutex<Vec<Read>> =
            std::sync::Mutex::new((0..all.len()).map(|_| None).collect());
        std::thread::scope(|s| {
            for _ in 0..READERS.min(all.len()) {
                s.spawn(|| loop {
                    let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&(i, c)) = all.get(k) else {
                        return;
                    };
                    let r = self.read_chunk(cluster, &manifests[i], c);
                    let failed = r.is_err();
                    read.lock().unwrap_or_else(|e| e.into_inner())[k] = Some(r);
                    if failed {
                        // The others stop at their next chunk.
                        next.store(all.len(), std::sync::atomic::Ordering::Relaxed);
                    }
                });
            }
        });
        let mut out: Vec<Vec<Vec<u8>>> = manifests.iter().map(|_| Vec::new()).collect();
        let read = read.into_inner().unwrap_or_else(|e| e.into_inner());
        for ((i, c), r) in all.iter().zip(read) {
            match r {
                Some(r) => out[*i].push(r?),
                None => {
                    return Err(StorageError::Conflict(format!(
                        "backup {}: chunk {} was not read",
                        manifests[*i].id, c.n
                    )))
                }
            }
        }
        Ok(out)
    }

    /// Checks every chunk of backup `id`; the bytes checked.
    pub fn verify(&self, cluster: &str, id: &str) -> Result<u64, StorageError> {
        let m = self.manifest(cluster, id)?;
        let read = self.read_chunks(cluster, std::slice::from_ref(&m))?;
        Ok(read.iter().flatten().map(|c| c.len() as u64).sum())
    }

    /// Backups whose transfer was cut: chunks that no manifest names, by id.
    pub fn orphans(&self, cluster: &str) -> Result<Vec<String>, StorageError> {
        self.ensure_backup_pool(cluster)?;
        let objects = self.objects(cluster)?;
        let mut ids: Vec<String> = objects
            .iter()
            .filter_map(|o| o.rsplit_once('.').map(|(id, _)| id.to_string()))
            .filter(|id| !objects.contains(&format!("{id}.manifest")))
            .collect();
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    /// Removes backup `id`: its manifest first (it no longer exists), then its chunks. Also
    /// removes chunks that no manifest names (a cut transfer's).
    pub fn delete_backup(&self, cluster: &str, id: &str) -> Result<u32, StorageError> {
        check_id(id)?;
        // A cut transfer's writes behind land before its chunks are listed for removal.
        let _ = self.writes.settle(cluster, id, SETTLE_WITHIN);
        let children: Vec<String> = self
            .manifests(cluster)?
            .into_iter()
            .filter(|m| m.parent.as_deref() == Some(id))
            .map(|m| m.id)
            .collect();
        if !children.is_empty() {
            return Err(StorageError::Conflict(format!(
                "backup {id} is the base of {}: delete those first",
                children.join(", ")
            )));
        }
        // The manifest first (the backup is gone from then on), then its chunks.
        // `--force-full`: Ceph holds even a delete from a full pool without it, and deleting
        // is how a full store is freed.
        let manifest = format!("{id}.manifest");
        if self.has_manifest(cluster, id)? {
            self.rados(cluster, &["rm", &manifest, "--force-full"], None)?;
        }
        let prefix = format!("{id}.");
        let mut removed = 0;
        for o in self.objects(cluster)? {
            if o.starts_with(&prefix) && o != manifest {
                self.rados(cluster, &["rm", &o, "--force-full"], None)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Restores the chain of backups `chain` (a full backup first, then each incremental
    /// in order) into a new image `pool/image` of `cluster`, this store's: every chunk is
    /// checked before the image is made. Returns (check ms, import ms).
    pub fn restore_chain(
        &self,
        cluster: &str,
        chain: &[String],
        pool: &str,
        image: &str,
    ) -> Result<(f64, f64), StorageError> {
        let t = Instant::now();
        let manifests: Vec<Manifest> = chain
            .iter()
            .map(|id| self.manifest(cluster, id))
            .collect::<Result<_, _>>()?;
        let Some(first) = manifests.first() else {
            return Err(StorageError::Conflict("no backup to restore".into()));
        };
        if first.parent.is_some() {
            return Err(StorageError::Conflict(format!(
                "backup {} is incremental: a chain starts with a full backup",
                first.id
            )));
        }
        for w in manifests.windows(2) {
            if w[1].parent.as_deref() != Some(w[0].id.as_str()) {
                return Err(StorageError::Conflict(format!(
                    "backup {} does not follow {}",
                    w[1].id, w[0].id
                )));
            }
        }
        // Room before the image: Ceph would hold the import's writes to a full pool, not
        // fail them. Read while the chunks are (it is on Trecovery's path).
        let last = manifests.last().expect("one");
        // At most the chain's bytes (incrementals may rewrite the same extents), at most
        // the image's size.
        let need = manifests
            .iter()
            .map(|m| m.bytes)
            .sum::<u64>()
            .min(last.size_mib << 20);
        let (space, data) = std::thread::scope(|s| {
            let space = s.spawn(|| self.pool_space(cluster, pool));
            let data = self.read_chunks(cluster, &manifests);
            (space.join(), data)
        });
        // A damaged chunk first: it is the finding that matters.
        let data = data?;
        let space = space.map_err(|_| StorageError::Conflict("the room check panicked".into()))?;
        space?.check(
            need,
            &format!("the restore of VM {}'s backup {}", last.vm, last.id),
        )?;
        let checked = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        self.create_image(cluster, pool, image, last.size_mib)?;
        let spec = format!("{pool}/{image}");
        let result = (|| {
            for (m, chunks) in manifests.iter().zip(&data) {
                self.import_diff(cluster, &spec, chunks)
                    .map_err(|e| StorageError::Conflict(format!("import backup {}: {e}", m.id)))?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            let _ = self.remove_image(cluster, pool, image);
            return Err(e);
        }
        Ok((checked, t.elapsed().as_secs_f64() * 1e3))
    }

    fn import_diff(
        &self,
        cluster: &str,
        spec: &str,
        chunks: &[Vec<u8>],
    ) -> Result<(), StorageError> {
        self.import_diff_from(cluster, spec, &mut |stdin| {
            for c in chunks {
                stdin.write_all(c)?;
            }
            Ok(())
        })
    }

    /// Runs `rbd import-diff - spec` (the image exists), `write` giving its stream as it
    /// makes it (an `rbd diff v1` stream: [`crate::diff::Writer::new`]). Fails if either
    /// fails.
    pub fn import_diff_from(
        &self,
        cluster: &str,
        spec: &str,
        write: &mut dyn FnMut(&mut dyn Write) -> std::io::Result<()>,
    ) -> Result<(), StorageError> {
        self.rbd_from(cluster, &["import-diff"], spec, true, write)
    }

    /// Runs `rbd import --export-format 2 - spec`, which creates image `spec` (it must not
    /// exist), `write` giving its stream as it makes it ([`crate::diff::Writer::image`]):
    /// one `rbd` for what `create` and `import-diff` did in two. Fails if either fails.
    /// A stream cut short ends rbd's input without its end record: rbd fails on the short
    /// read, closes the image and removes it (`do_import`); the snapshot is only made after
    /// the end record.
    pub fn import_from(
        &self,
        cluster: &str,
        spec: &str,
        write: &mut dyn FnMut(&mut dyn Write) -> std::io::Result<()>,
    ) -> Result<(), StorageError> {
        self.rbd_from(
            cluster,
            &["import", "--export-format", "2"],
            spec,
            false,
            write,
        )
    }

    /// `rbd COMMAND --no-progress - spec` fed by `write`; `kill_if_cut`: a stream cut
    /// short kills rbd rather than ending its input.
    fn rbd_from(
        &self,
        cluster: &str,
        command: &[&str],
        spec: &str,
        kill_if_cut: bool,
        write: &mut dyn FnMut(&mut dyn Write) -> std::io::Result<()>,
    ) -> Result<(), StorageError> {
        let what = command[0];
        let conf = self.dir(cluster).join("ceph.conf");
        let mut child = Command::new("rbd")
            .arg("-c")
            .arg(&conf)
            .args(["--id", crate::host::VM_USER])
            .args(command)
            .args(["--no-progress", "-", spec])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| StorageError::Io {
                what: format!("run rbd {what}"),
                source,
            })?;
        let mut stdin = child.stdin.take().expect("piped");
        let written = write(&mut stdin);
        if written.is_err() && kill_if_cut {
            // A diff cut short must not be applied in part: rbd goes before its input
            // closes (it would apply what it has and say the stream ended early).
            let _ = child.kill();
        }
        drop(stdin);
        let out = child
            .wait_with_output()
            .map_err(|source| StorageError::Io {
                what: format!("rbd {what}"),
                source,
            })?;
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        match written {
            // rbd's own words, when it stopped first.
            _ if !out.status.success() && !stderr.is_empty() => Err(StorageError::Command {
                what: format!("rbd {what} into {spec}"),
                status: out.status.code().unwrap_or(-1),
                stderr,
            }),
            Err(source) => Err(StorageError::Io {
                what: format!("the stream into rbd {what} of {spec}"),
                source,
            }),
            Ok(()) if !out.status.success() => Err(StorageError::Command {
                what: format!("rbd {what} into {spec}"),
                status: out.status.code().unwrap_or(-1),
                stderr,
            }),
            Ok(()) => Ok(()),
        }
    }

    /// Snapshot `snap` of `pool/image` (for a backup).
    pub fn snapshot(
        &self,
        cluster: &str,
        pool: &str,
        image: &str,
        snap: &str,
    ) -> Result<(), StorageError> {
        self.rbd(
            cluster,
            &["snap", "create", &format!("{pool}/{image}@{snap}")],
        )
        .map(|_| ())
    }

    /// Removes snapshot `snap` of `pool/image`, if it is there.
    pub fn remove_snapshot(
        &self,
        cluster: &str,
        pool: &str,
        image: &str,
        snap: &str,
    ) -> Result<(), StorageError> {
        match self.rbd(
            cluster,
            &[
                "snap",
                "rm",
                "--no-progress",
                &format!("{pool}/{image}@{snap}"),
            ],
        ) {
            Err(StorageError::Command { stderr, .. }) if stderr.contains("No such file") => Ok(()),
            r => r.map(|_| ()),
        }
    }

    /// Streams `rbd export-diff` of `pool/image@snap` (from `from`, or everything) to
    /// `each`, one chunk of up to [`CHUNK`] bytes at a time, in order. `reads` objects
    /// are read at once (`None`: rbd's 10). rbd writes in order, so its output waits for
    /// the first of them: across a 390 Mbit/s path, 10 at once gave the first 24 MiB by
    /// 0.77 s and the next 40 MiB together at 1.65 s; 4 gave them evenly, in the same
    /// 1.72 s.
    #[allow(clippy::too_many_arguments)]
    pub fn export_diff(
        &self,
        cluster: &str,
        pool: &str,
        image: &str,
        snap: &str,
        from: Option<&str>,
        reads: Option<u32>,
        mut each: impl FnMut(u32, Vec<u8>) -> Result<(), StorageError>,
    ) -> Result<(), StorageError> {
        let conf = self
            .conf_path(cluster)
            .ok_or_else(|| StorageError::NotInstalled {
                cluster: cluster.into(),
                host: self.host.clone(),
            })?;
        let mut cmd = Command::new("rbd");
        cmd.arg("-c").arg(&conf).args([
            "--id",
            crate::host::VM_USER,
            "export-diff",
            "--no-progress",
        ]);
        if let Some(f) = from {
            cmd.args(["--from-snap", f]);
        }
        if let Some(n) = reads {
            cmd.arg("--rbd-concurrent-management-ops")
                .arg(n.to_string());
        }
        let mut child = cmd
            .arg(format!("{pool}/{image}@{snap}"))
            .arg("-")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| StorageError::Io {
                what: "run rbd export-diff".into(),
                source,
            })?;
        let mut out = child.stdout.take().expect("piped");
        let mut n = 0u32;
        let mut failed = None;
        loop {
            let mut buf = vec![0u8; CHUNK];
            let mut filled = 0;
            while filled < CHUNK {
                match out.read(&mut buf[filled..]) {
                    Ok(0) => break,
                    Ok(k) => filled += k,
                    Err(e) => {
                        failed = Some(StorageError::Io {
                            what: "read rbd export-diff".into(),
                            source: e,
                        });
                        break;
                    }
                }
            }
            if failed.is_some() || filled == 0 {
                break;
            }
            buf.truncate(filled);
            if let Err(e) = each(n, buf) {
                failed = Some(e);
                break;
            }
            n += 1;
            if filled < CHUNK {
                break;
            }
        }
        drop(out);
        if failed.is_some() {
            let _ = child.kill();
        }
        let status = child
            .wait_with_output()
            .map_err(|source| StorageError::Io {
                what: "rbd export-diff".into(),
                source,
            })?;
        if let Some(e) = failed {
            return Err(e);
        }
        if !status.status.success() {
            return Err(StorageError::Command {
                what: format!("rbd export-diff {pool}/{image}@{snap}"),
                status: status.status.code().unwrap_or(-1),
                stderr: String::from_utf8_lossy(&status.stderr).trim().to_string(),
            });
        }
        Ok(())
    }
}

/// Asks the guest ledger at `ip` for a checkpoint (`C`): its journal position, or `None`
/// if it has no disk.
pub fn checkpoint(ip: std::net::Ipv4Addr, timeout: Duration) -> Result<Option<u64>, StorageError> {
    let io = |what: &str| {
        let what = what.to_string();
        move |source| StorageError::Io { what, source }
    };
    let s = std::net::TcpStream::connect_timeout(&(ip, 7000).into(), timeout)
        .map_err(io("connect to the guest's ledger for its checkpoint"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(io("set a timeout"))?;
    let mut w = s.try_clone().map_err(io("clone a socket"))?;
    w.write_all(b"C\n").map_err(io("ask for a checkpoint"))?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(s), &mut line)
        .map_err(io("read the checkpoint"))?;
    let line = line.trim();
    if line.starts_with("ERR no disk") {
        return Ok(None);
    }
    line.strip_prefix("CP ")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .map(Some)
        .ok_or_else(|| StorageError::Conflict(format!("the guest refused the checkpoint: {line}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A chunk of `id` arrived, checked, and given a slot.
    fn begin(w: &WriteBehind, cluster: &str, id: &str) {
        w.arrive(cluster, id);
        w.slot();
    }

    #[test]
    fn a_commit_waits_for_its_writes_and_reports_their_failures() {
        let w = Arc::new(WriteBehind::default());
        begin(&w, "c", "b1");
        begin(&w, "c", "b1");
        begin(&w, "c", "b2");
        assert!(w.known("c", "b1") && !w.known("c", "b3"));
        let settled = {
            let w = w.clone();
            std::thread::spawn(move || w.settle("c", "b1", Duration::from_secs(30)))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!settled.is_finished(), "settled with two writes under way");
        w.end("c", "b1", true, None);
        // Another backup's write does not hold this one up.
        std::thread::sleep(Duration::from_millis(20));
        assert!(!settled.is_finished(), "settled with one write under way");
        w.end("c", "b1", true, Some("chunk 1: rados put failed".into()));
        assert_eq!(
            settled.join().unwrap().unwrap(),
            ["chunk 1: rados put failed"]
        );
        assert!(!w.known("c", "b1"), "a settled backup is forgotten");
        assert_eq!(
            w.settle("c", "b2", Duration::from_millis(20)),
            Err(1),
            "a write still under way at the deadline"
        );
        w.end("c", "b2", true, None);
        assert_eq!(w.settle("c", "b2", Duration::from_millis(20)), Ok(vec![]));
    }

    #[test]
    fn chunks_beyond_the_bound_wait_for_a_slot() {
        let w = Arc::new(WriteBehind::default());
        for _ in 0..WRITE_BEHIND {
            begin(&w, "c", "b");
        }
        let next = {
            let w = w.clone();
            std::thread::spawn(move || begin(&w, "c", "b"))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!next.is_finished(), "a chunk past the bound was taken");
        w.end("c", "b", true, None);
        next.join().unwrap();
        assert_eq!(w.lock().in_flight, WRITE_BEHIND);
    }

    #[test]
    fn a_chunk_still_being_checked_or_waiting_for_a_slot_holds_its_commit() {
        let w = Arc::new(WriteBehind::default());
        // Arrived, not yet checked: a commit (or a delete) of its backup waits for it.
        assert!(w.arrive("c", "b"), "the first chunk");
        assert!(!w.arrive("c", "b"), "not the first");
        assert_eq!(w.settle("c", "b", Duration::from_millis(20)), Err(2));
        // Refused by their checks: done with, without a slot; the backup is forgotten
        // with its first chunk's refusal only once nothing of it is under way.
        w.refuse("c", "b", false);
        w.refuse("c", "b", true);
        assert_eq!(w.lock().in_flight, 0);
        assert!(!w.known("c", "b"), "a refused first chunk leaves no entry");
        // Waiting for a slot behind a full bound: counted too.
        for _ in 0..WRITE_BEHIND {
            begin(&w, "c", "other");
        }
        w.arrive("c", "b");
        let waiting = {
            let w = w.clone();
            std::thread::spawn(move || w.slot())
        };
        assert_eq!(w.settle("c", "b", Duration::from_millis(20)), Err(1));
        w.end("c", "other", true, None);
        waiting.join().unwrap();
        w.end("c", "b", true, None);
        assert_eq!(w.settle("c", "b", Duration::from_millis(20)), Ok(vec![]));
    }
}
