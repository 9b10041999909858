//! One host's part of the zone's Ceph clusters, as its agent runs it: the plan and keys it
//! was sent, its daemons (created as Ceph's `src/vstart.sh` does, then run in the
//! foreground, detached from the agent so that they outlive its restart), and, on a
//! monitor's host, the cluster's administration with the admin key.
//!
//! Files, under `<root>/<cluster>/` (`root` is `<lab>/ceph/<host>` in a lab, `<data
//! dir>/ceph` on a real host): `plan.json`, `ceph.conf`, `keyring.<entity>` (0600),
//! `monmap`, `mon.ID/`, `mgr.ID/`, `osd.N/` (with `osd.json`: its uuid and secret, kept
//! until `osd new` and mkfs are done), `blocks/osd.N.block` (sparse), `run/` (pid files,
//! admin sockets), `log/`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::keys::{self, Keys};
use crate::plan::{ClusterPlan, Kind};
use crate::StorageError;

/// How long one `ceph` command may wait for the monitors.
const CONNECT_TIMEOUT_S: &str = "20";

/// One host's storage.
#[derive(Debug, Clone)]
pub struct HostStorage {
    pub root: PathBuf,
    pub host: String,
    /// The backup store's chunks being written behind their arrival (shared by clones).
    pub(crate) writes: std::sync::Arc<crate::backup::WriteBehind>,
}

/// One daemon of this host and whether it runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonState {
    /// `mon.a`, `osd.3`.
    pub name: String,
    pub pid: Option<i32>,
    pub running: bool,
}

/// What a host answers to the plan it was sent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Installed {
    /// The monitors' initial map (base64), made by the first monitor's host, for the others.
    pub monmap: Option<String>,
    /// The plan was already installed with this fsid (nothing was written).
    pub already: bool,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> StorageError {
    move |source| StorageError::Io { what, source }
}

fn write_private(path: &Path, text: &[u8]) -> Result<(), StorageError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io(format!("write {}", path.display())))?;
    std::io::Write::write_all(&mut f, text).map_err(io(format!("write {}", path.display())))
}

/// Runs a program to its end; its stdout, or an error naming `what` with its stderr.
fn run(what: &str, program: &str, args: &[&str]) -> Result<String, StorageError> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| StorageError::Io {
            what: format!("{what}: run {program}"),
            source,
        })?;
    if !out.status.success() {
        return Err(StorageError::Command {
            what: what.to_string(),
            status: out.status.code().unwrap_or(-1),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl HostStorage {
    pub fn new(root: PathBuf, host: &str) -> HostStorage {
        HostStorage {
            root,
            host: host.to_string(),
            writes: Default::default(),
        }
    }

    pub fn dir(&self, cluster: &str) -> PathBuf {
        self.root.join(cluster)
    }

    /// The plan installed for `cluster`, if any.
    pub fn plan(&self, cluster: &str) -> Result<Option<ClusterPlan>, StorageError> {
        let path = self.dir(cluster).join("plan.json");
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| StorageError::Corrupt {
                    what: path.display().to_string(),
                    reason: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(format!("read {}", path.display()))(e)),
        }
    }

    fn require_plan(&self, cluster: &str) -> Result<ClusterPlan, StorageError> {
        self.plan(cluster)?
            .ok_or_else(|| StorageError::NotInstalled {
                cluster: cluster.into(),
                host: self.host.clone(),
            })
    }

    /// The clusters installed on this host.
    pub fn clusters(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .flatten()
            .filter(|e| e.path().join("plan.json").is_file())
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .collect();
        names.sort();
        names
    }

    /// Installs `plan` with the keys this host needs: writes the plan, the keyrings and
    /// `ceph.conf`. A host whose cluster has another fsid refuses it (`storage down`
    /// first). The first monitor's host makes the monitors' initial map and answers it;
    /// the other monitors' hosts must be sent it.
    pub fn install(
        &self,
        plan: &ClusterPlan,
        keys: &Keys,
        monmap: Option<&str>,
    ) -> Result<Installed, StorageError> {
        if !plan.hosts().contains(&self.host) {
            return Err(StorageError::Conflict(format!(
                "host {} holds no daemon of cluster {}",
                self.host, plan.name
            )));
        }
        if plan.fsid.is_empty() {
            return Err(StorageError::Conflict("the plan has no fsid".into()));
        }
        if let Some(old) = self.plan(&plan.name)? {
            if old.fsid != plan.fsid {
                return Err(StorageError::Conflict(format!(
                    "{} holds cluster {} with fsid {}, not {}: `dczone storage down` removes it",
                    self.host, plan.name, old.fsid, plan.fsid
                )));
            }
            if old != *plan {
                return Err(StorageError::Conflict(format!(
                    "{} holds cluster {} laid out otherwise: `dczone storage down` removes it",
                    self.host, plan.name
                )));
            }
            return Ok(Installed {
                monmap: self.monmap_text(&plan.name),
                already: true,
            });
        }
        let dir = self.dir(&plan.name);
        for sub in ["run", "log", "blocks"] {
            std::fs::create_dir_all(dir.join(sub))
                .map_err(io(format!("create {}", dir.join(sub).display())))?;
        }
        let mine = keys.for_host(plan, &self.host);
        for e in &mine.entities {
            let file = if e.name == "mon." {
                // A monitor's keyring seeds its store: every entity, with its caps.
                dir.join("keyring.mon")
            } else {
                dir.join(format!("keyring.{}", e.name))
            };
            let text = if e.name == "mon." {
                mine.keyring(None)
            } else {
                mine.keyring(Some(&[e.name.as_str()]))
            };
            write_private(&file, text.as_bytes())?;
        }
        let conf = crate::conf::render(plan, &self.host, &dir);
        std::fs::write(dir.join("ceph.conf"), conf)
            .map_err(io(format!("write {}", dir.join("ceph.conf").display())))?;
        let has_mon = !plan.on_host(Kind::Mon, &self.host).is_empty();
        let monmap_path = dir.join("monmap");
        let made = match monmap {
            Some(b64) => {
                use base64::Engine;
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|e| {
                        StorageError::Conflict(format!("the monmap is not base64: {e}"))
                    })?;
                std::fs::write(&monmap_path, bytes)
                    .map_err(io(format!("write {}", monmap_path.display())))?;
                None
            }
            None if has_mon => {
                let mut args: Vec<String> = vec![
                    "--create".into(),
                    "--clobber".into(),
                    "--fsid".into(),
                    plan.fsid.clone(),
                ];
                for m in &plan.mons {
                    args.push("--addv".into());
                    args.push(m.id.clone());
                    args.push(format!("[v2:{ip}:3300,v1:{ip}:6789]", ip = m.ip));
                }
                args.push(monmap_path.display().to_string());
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                run("make the monitors' map", "monmaptool", &args)?;
                self.monmap_text(&plan.name)
            }
            None => None,
        };
        // The plan last: a host with a plan is fully installed.
        let text = serde_json::to_vec_pretty(plan).expect("a plan serializes");
        std::fs::write(dir.join("plan.json"), text)
            .map_err(io(format!("write {}", dir.join("plan.json").display())))?;
        Ok(Installed {
            monmap: made,
            already: false,
        })
    }

    fn monmap_text(&self, cluster: &str) -> Option<String> {
        use base64::Engine;
        let bytes = std::fs::read(self.dir(cluster).join("monmap")).ok()?;
        Some(base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    fn conf(&self, cluster: &str) -> String {
        self.dir(cluster).join("ceph.conf").display().to_string()
    }

    fn pid_file(&self, cluster: &str, name: &str) -> PathBuf {
        self.dir(cluster)
            .join("run")
            .join(format!("{name}.dczone.pid"))
    }

    fn pid(&self, cluster: &str, name: &str) -> Option<i32> {
        let pid = std::fs::read_to_string(self.pid_file(cluster, name))
            .ok()?
            .trim()
            .parse::<i32>()
            .ok()?;
        // A recycled pid is some other program: the daemon's command line names its conf
        // and its daemon's name (a `ceph -c CONF` call, which names the conf too, was
        // taken for a radosgw that had died with its lab).
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let conf = self.conf(cluster);
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let (kind, id) = name.split_once('.')?;
        let client = match kind {
            "rgw" => format!("client.rgw.{id}"),
            _ => name.to_string(),
        };
        // (`-i ID`: daemons started before they were started with `-n NAME`.)
        let named = args.contains(&client.as_bytes())
            || args
                .windows(2)
                .any(|w| w[0] == b"-i" && w[1] == id.as_bytes());
        let ours = args.contains(&conf.as_bytes()) && named;
        (ours && dczone_lab::sys::alive(pid)).then_some(pid)
    }

    /// This host's daemons of `cluster`, in start order.
    pub fn daemons(&self, cluster: &str) -> Result<Vec<DaemonState>, StorageError> {
        let plan = self.require_plan(cluster)?;
        let mut out = Vec::new();
        for kind in [Kind::Mon, Kind::Mgr, Kind::Osd, Kind::Rgw] {
            for p in plan.on_host(kind, &self.host) {
                let name = format!("{}.{}", kind.as_str(), p.id);
                let pid = self.pid(cluster, &name);
                out.push(DaemonState {
                    running: pid.is_some(),
                    pid,
                    name,
                });
            }
        }
        Ok(out)
    }

    /// Creates (once) and starts this host's daemons of `kinds` that do not run; returns
    /// those started. An OSD is registered with the monitors first (`osd new`), so the
    /// monitors must have a quorum.
    pub fn start(&self, cluster: &str, kinds: &[Kind]) -> Result<Vec<String>, StorageError> {
        let plan = self.require_plan(cluster)?;
        let mut started = Vec::new();
        for kind in [Kind::Mon, Kind::Mgr, Kind::Osd, Kind::Rgw] {
            if !kinds.contains(&kind) {
                continue;
            }
            for p in plan.on_host(kind, &self.host) {
                let name = format!("{}.{}", kind.as_str(), p.id);
                if self.pid(cluster, &name).is_some() {
                    continue;
                }
                self.create(cluster, kind, &p.id)?;
                self.spawn(cluster, kind, &p.id)?;
                started.push(name);
            }
        }
        Ok(started)
    }

    /// Makes a daemon's data directory, once (a marker says it is done).
    fn create(&self, cluster: &str, kind: Kind, id: &str) -> Result<(), StorageError> {
        let dir = self.dir(cluster);
        let data = dir.join(format!("{}.{id}", kind.as_str()));
        let marker = data.join("dczone.created");
        if marker.is_file() {
            return Ok(());
        }
        let conf = self.conf(cluster);
        match kind {
            Kind::Mon => {
                let _ = std::fs::remove_dir_all(&data);
                std::fs::create_dir_all(&data).map_err(io(format!("create {}", data.display())))?;
                let monmap = dir.join("monmap").display().to_string();
                let keyring = dir.join("keyring.mon").display().to_string();
                run(
                    &format!("mkfs of mon.{id}"),
                    "ceph-mon",
                    &[
                        "-c",
                        &conf,
                        "--mkfs",
                        "-i",
                        id,
                        "--monmap",
                        &monmap,
                        "--keyring",
                        &keyring,
                    ],
                )?;
            }
            Kind::Mgr | Kind::Rgw => {
                std::fs::create_dir_all(&data).map_err(io(format!("create {}", data.display())))?;
            }
            Kind::Osd => {
                std::fs::create_dir_all(&data).map_err(io(format!("create {}", data.display())))?;
                // The uuid and secret are kept until the OSD is made, so that a retry
                // registers the same OSD again (which `osd new` accepts).
                let reg = data.join("osd.json");
                let (uuid, secret) = match std::fs::read(&reg)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<(String, String)>(&b).ok())
                {
                    Some(v) => v,
                    None => {
                        let v = (uuid()?, keys::generate()?);
                        write_private(&reg, &serde_json::to_vec(&v).expect("serializes"))?;
                        v
                    }
                };
                let new = data.join("new.json");
                write_private(
                    &new,
                    serde_json::json!({ "cephx_secret": secret })
                        .to_string()
                        .as_bytes(),
                )?;
                let keyring = dir
                    .join(format!("keyring.{}", keys::BOOTSTRAP_OSD))
                    .display()
                    .to_string();
                run(
                    &format!("register osd.{id} with the monitors"),
                    "ceph",
                    &[
                        "-c",
                        &conf,
                        "-n",
                        keys::BOOTSTRAP_OSD,
                        "-k",
                        &keyring,
                        "--connect-timeout",
                        CONNECT_TIMEOUT_S,
                        "osd",
                        "new",
                        &uuid,
                        id,
                        "-i",
                        &new.display().to_string(),
                    ],
                )?;
                let _ = std::fs::remove_file(dir.join("blocks").join(format!("osd.{id}.block")));
                run(
                    &format!("mkfs of osd.{id}"),
                    "ceph-osd",
                    &[
                        "-c",
                        &conf,
                        "-i",
                        id,
                        "--mkfs",
                        "--key",
                        &secret,
                        "--osd-uuid",
                        &uuid,
                    ],
                )?;
                write_private(
                    &data.join("keyring"),
                    format!("[osd.{id}]\n\tkey = {secret}\n").as_bytes(),
                )?;
            }
        }
        std::fs::write(&marker, b"").map_err(io(format!("write {}", marker.display())))
    }

    fn spawn(&self, cluster: &str, kind: Kind, id: &str) -> Result<(), StorageError> {
        let (program, client) = match kind {
            Kind::Rgw => ("radosgw".to_string(), format!("client.rgw.{id}")),
            _ => (
                format!("ceph-{}", kind.as_str()),
                format!("{}.{id}", kind.as_str()),
            ),
        };
        let conf = self.conf(cluster);
        let name = format!("{}.{id}", kind.as_str());
        let log = self.dir(cluster).join("log").join(format!("{name}.out"));
        let binary = which(&program)?;
        let pid = dczone_lab::spawn_detached(
            None,
            &binary,
            &["-f", "-c", &conf, "-n", &client],
            &log,
            &program,
        )
        .map_err(|e| StorageError::Start {
            daemon: name.clone(),
            reason: dczone_lab::error_chain(&e),
        })?;
        let pid_file = self.pid_file(cluster, &name);
        std::fs::write(&pid_file, pid.to_string())
            .map_err(io(format!("write {}", pid_file.display())))
    }

    /// Stops this host's daemons of `cluster` (only `daemon`, if given); returns those
    /// stopped. Each is killed and waited for.
    pub fn stop(&self, cluster: &str, daemon: Option<&str>) -> Result<Vec<String>, StorageError> {
        let mut stopped = Vec::new();
        let daemons = self.daemons(cluster)?;
        if let Some(d) = daemon {
            if !daemons.iter().any(|x| x.name == d) {
                return Err(StorageError::Conflict(format!(
                    "{} runs no daemon {d} of cluster {cluster} (it has: {})",
                    self.host,
                    daemons
                        .iter()
                        .map(|x| x.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        let mut pids = Vec::new();
        for d in daemons {
            if daemon.is_some_and(|n| n != d.name) {
                continue;
            }
            if let Some(pid) = d.pid {
                dczone_lab::sys::kill(pid, libc::SIGKILL);
                pids.push(pid);
                stopped.push(d.name);
            }
        }
        let t = Instant::now();
        while pids.iter().any(|&p| dczone_lab::sys::alive(p))
            && t.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(stopped)
    }

    /// Stops this host's daemons of `cluster` and removes its files (OSD block files
    /// included). Nothing installed: nothing to do.
    pub fn purge(&self, cluster: &str) -> Result<Vec<String>, StorageError> {
        let stopped = match self.plan(cluster)? {
            Some(_) => self.stop(cluster, None)?,
            None => Vec::new(),
        };
        let dir = self.dir(cluster);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io(format!("remove {}", dir.display())))?;
        }
        Ok(stopped)
    }

    /// The admin key's file: only a host that holds a monitor has it.
    fn admin_keyring(&self, cluster: &str) -> Result<String, StorageError> {
        let keyring = self.dir(cluster).join(format!("keyring.{}", keys::ADMIN));
        if !keyring.is_file() {
            return Err(StorageError::NotAdmin {
                cluster: cluster.into(),
                host: self.host.clone(),
            });
        }
        Ok(keyring.display().to_string())
    }

    /// Runs `ceph` with the admin key (this host must hold a monitor); its stdout.
    pub fn ceph(&self, cluster: &str, args: &[&str]) -> Result<String, StorageError> {
        let keyring = self.admin_keyring(cluster)?;
        let conf = self.conf(cluster);
        let mut all = vec![
            "-c",
            &conf,
            "-n",
            keys::ADMIN,
            "-k",
            &keyring,
            "--connect-timeout",
            CONNECT_TIMEOUT_S,
        ];
        all.extend_from_slice(args);
        run(&format!("ceph {}", args.join(" ")), "ceph", &all)
    }

    /// Makes S3 user `uid` of the cluster's gateways with this access key and secret, once
    /// (a user that exists keeps its keys; another secret for it is refused).
    pub fn s3_user(
        &self,
        cluster: &str,
        uid: &str,
        access_key: &str,
        secret_key: &str,
    ) -> Result<(), StorageError> {
        let admin = |args: &[&str]| self.radosgw_admin(cluster, args);
        if let Ok(info) = admin(&["user", "info", "--uid", uid]) {
            let v: Value = serde_json::from_str(&info).unwrap_or_default();
            let same = v["keys"].as_array().is_some_and(|k| {
                k.iter().any(|k| {
                    k["access_key"].as_str() == Some(access_key)
                        && k["secret_key"].as_str() == Some(secret_key)
                })
            });
            return if same {
                Ok(())
            } else {
                Err(StorageError::Conflict(format!(
                    "S3 user {uid} of cluster {cluster} exists with other keys"
                )))
            };
        }
        admin(&[
            "user",
            "create",
            "--uid",
            uid,
            "--display-name",
            uid,
            "--access-key",
            access_key,
            "--secret-key",
            secret_key,
        ])
        .map(|_| ())
    }

    /// Gives S3 user `uid` another key pair (a key the cloud issues for a while).
    pub fn s3_key_add(
        &self,
        cluster: &str,
        uid: &str,
        access_key: &str,
        secret_key: &str,
    ) -> Result<(), StorageError> {
        self.radosgw_admin(
            cluster,
            &[
                "key",
                "create",
                "--uid",
                uid,
                "--key-type",
                "s3",
                "--access-key",
                access_key,
                "--secret-key",
                secret_key,
            ],
        )
        .map(|_| ())
    }

    /// Takes a key pair from S3 user `uid`: the gateway refuses it from then on.
    pub fn s3_key_remove(
        &self,
        cluster: &str,
        uid: &str,
        access_key: &str,
    ) -> Result<(), StorageError> {
        self.radosgw_admin(
            cluster,
            &[
                "key",
                "rm",
                "--uid",
                uid,
                "--key-type",
                "s3",
                "--access-key",
                access_key,
            ],
        )
        .map(|_| ())
    }

    fn radosgw_admin(&self, cluster: &str, args: &[&str]) -> Result<String, StorageError> {
        let keyring = self.admin_keyring(cluster)?;
        let conf = self.conf(cluster);
        let mut all = vec!["-c", &conf, "-n", keys::ADMIN, "-k", &keyring];
        // Bounded as `ceph` is by its --connect-timeout: a cluster that does not answer
        // fails the command instead of holding its caller.
        let timeouts = [
            format!("--client-mount-timeout={CONNECT_TIMEOUT_S}"),
            format!("--rados-mon-op-timeout={CONNECT_TIMEOUT_S}"),
            format!("--rados-osd-op-timeout={CONNECT_TIMEOUT_S}"),
        ];
        all.extend(timeouts.iter().map(String::as_str));
        all.extend_from_slice(args);
        run(
            &format!("radosgw-admin {}", args.join(" ")),
            "radosgw-admin",
            &all,
        )
    }

    fn ceph_json(&self, cluster: &str, args: &[&str]) -> Result<Value, StorageError> {
        let mut all = args.to_vec();
        all.extend_from_slice(&["-f", "json"]);
        let out = self.ceph(cluster, &all)?;
        serde_json::from_str(&out).map_err(|e| StorageError::Corrupt {
            what: format!("the answer of `ceph {}`", args.join(" ")),
            reason: e.to_string(),
        })
    }

    /// What pool `pool` can still take (this host must hold a monitor).
    /// A new pool's figures come within a few seconds (the managers' statistics).
    pub fn pool_space(&self, cluster: &str, pool: &str) -> Result<crate::PoolSpace, StorageError> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let (dump, df, pg) = std::thread::scope(|s| {
                let dump = s.spawn(|| self.ceph_json(cluster, &["osd", "dump"]));
                let df = s.spawn(|| self.ceph_json(cluster, &["df", "detail"]));
                let pg = self.ceph_json(cluster, &["pg", "dump", "pools"]);
                let join = |h: std::thread::ScopedJoinHandle<'_, Result<Value, StorageError>>| {
                    h.join().unwrap_or_else(|_| {
                        Err(StorageError::Conflict("a `ceph` call panicked".into()))
                    })
                };
                (join(dump), join(df), pg)
            });
            let (dump, df, pg) = (dump?, df?, pg?);
            if let Some(space) = crate::PoolSpace::from_json(cluster, pool, &dump, &df, &pg) {
                return Ok(space);
            }
            if Instant::now() >= deadline {
                return Err(StorageError::Conflict(format!(
                    "cluster {cluster} reports no figures for pool {pool} (`ceph df detail`, \
                     `ceph pg dump pools`): does the pool exist, and do its managers run?"
                )));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The cluster as the monitors see it (this host must hold a monitor), with this
    /// host's daemons.
    pub fn status(&self, cluster: &str) -> Result<crate::ClusterStatus, StorageError> {
        let s = self.ceph_json(cluster, &["status"])?;
        let mon = self.ceph_json(cluster, &["mon", "dump"])?;
        Ok(crate::ClusterStatus::from_json(cluster, &s, &mon))
    }

    /// Pools, CRUSH rule and stretch mode, each step once (run again, it does what is
    /// left). Every OSD must be up: stretch mode checks both sites' CRUSH weights.
    /// A stretched cluster's monitors told their sites (each change is a monitor
    /// election, a few seconds: `storage up` runs this while the OSDs are made). Only
    /// the monitors not located yet.
    pub fn locate_monitors(&self, cluster: &str) -> Result<Vec<String>, StorageError> {
        let plan = self.require_plan(cluster)?;
        let mut done = Vec::new();
        if plan.stretch.is_none() {
            return Ok(done);
        }
        let mon = self.ceph_json(cluster, &["mon", "dump"])?;
        if mon["election_strategy"].as_u64() != Some(3) {
            self.ceph(
                cluster,
                &["mon", "set", "election_strategy", "connectivity"],
            )?;
            done.push("connectivity elections".into());
        }
        for m in &plan.mons {
            let want = format!("datacenter={}", m.site);
            let located = mon["mons"].as_array().is_some_and(|a| {
                a.iter().any(|x| {
                    x["name"].as_str() == Some(m.id.as_str())
                        && x["crush_location"].as_str() == Some(format!("{{{want}}}").as_str())
                })
            });
            if !located {
                self.ceph(cluster, &["mon", "set_location", &m.id, &want])?;
                done.push(format!("mon.{} in {}", m.id, m.site));
            }
        }
        Ok(done)
    }

    pub fn setup(&self, cluster: &str) -> Result<Vec<String>, StorageError> {
        let plan = self.require_plan(cluster)?;
        let mut done = self.locate_monitors(cluster)?;
        self.ceph(
            cluster,
            &[
                "osd",
                "set-require-min-compat-client",
                "mimic",
                "--yes-i-really-mean-it",
            ],
        )?;
        let rules = self.ceph_json(cluster, &["osd", "crush", "rule", "ls"])?;
        let has_rule = |name: &str| {
            rules
                .as_array()
                .is_some_and(|r| r.iter().any(|x| x.as_str() == Some(name)))
        };
        let pools = self.ceph_json(cluster, &["osd", "pool", "ls"])?;
        let has_pool = pools.as_array().is_some_and(|p| {
            p.iter()
                .any(|x| x.as_str() == Some(plan.pool.name.as_str()))
        });
        let pg = plan.pool.pg_num.to_string();
        let pool = plan.pool.name.as_str();
        if let Some(stretch) = &plan.stretch {
            if !has_rule("stretch_rule") {
                self.add_stretch_rule(cluster, "stretch_rule", &stretch.sites)?;
                done.push("CRUSH rule stretch_rule".into());
            }
            if !has_pool {
                self.ceph(
                    cluster,
                    &[
                        "osd",
                        "pool",
                        "create",
                        pool,
                        &pg,
                        &pg,
                        "replicated",
                        "stretch_rule",
                    ],
                )?;
                done.push(format!("pool {pool}"));
            }
            let mon = self.ceph_json(cluster, &["mon", "dump"])?;
            if mon["stretch_mode"].as_bool() != Some(true) {
                self.ceph(
                    cluster,
                    &[
                        "mon",
                        "enable_stretch_mode",
                        &stretch.tiebreaker,
                        "stretch_rule",
                        "datacenter",
                    ],
                )?;
                done.push(format!(
                    "stretch mode, tiebreaker mon.{}",
                    stretch.tiebreaker
                ));
            }
            let rule =
                self.ceph_json(cluster, &["osd", "crush", "rule", "dump", "stretch_rule"])?;
            if let Some(id) = rule["rule_id"].as_u64() {
                // Pools made later (e.g. by radosgw) follow the stretch rule too.
                self.ceph(
                    cluster,
                    &[
                        "config",
                        "set",
                        "global",
                        "osd_pool_default_crush_rule",
                        &id.to_string(),
                    ],
                )?;
            }
        } else if !has_pool {
            self.ceph(
                cluster,
                &["osd", "pool", "create", pool, &pg, &pg, "replicated"],
            )?;
            let size = plan.pool.size.to_string();
            let mut args = vec!["osd", "pool", "set", pool, "size", &size];
            if plan.pool.size == 1 {
                // Pacific asks for this on top of `mon_allow_pool_size_one`.
                args.push("--yes-i-really-mean-it");
            }
            self.ceph(cluster, &args)?;
            self.ceph(
                cluster,
                &[
                    "osd",
                    "pool",
                    "set",
                    pool,
                    "min_size",
                    &plan.pool.min_size.to_string(),
                ],
            )?;
            done.push(format!("pool {pool}"));
        }
        // The other sites' pools, made once the stretch mode is on (it gives every pool
        // the stretch rule it names): each site's VMs read from their own site.
        for sp in plan.site_pools().into_iter().skip(1) {
            if !has_rule(&sp.rule) {
                self.add_stretch_rule(cluster, &sp.rule, &sp.sites)?;
                done.push(format!("CRUSH rule {}", sp.rule));
            }
            let exists = pools
                .as_array()
                .is_some_and(|p| p.iter().any(|x| x.as_str() == Some(sp.name.as_str())));
            if !exists {
                self.ceph(
                    cluster,
                    &[
                        "osd",
                        "pool",
                        "create",
                        &sp.name,
                        &pg,
                        &pg,
                        "replicated",
                        &sp.rule,
                    ],
                )?;
                done.push(format!("pool {} (primaries in {})", sp.name, sp.sites[0]));
            }
        }
        // Each made, then tagged: a setup cut between the two is finished by the next.
        for sp in plan.site_pools() {
            let apps = self.ceph_json(cluster, &["osd", "pool", "application", "get", &sp.name])?;
            if apps.get("rbd").is_none() {
                self.init_rbd_pool(cluster, &sp.name)?;
            }
        }
        Ok(done)
    }

    /// Tags `pool` for RBD and initialises it.
    fn init_rbd_pool(&self, cluster: &str, pool: &str) -> Result<(), StorageError> {
        self.ceph(
            cluster,
            &["osd", "pool", "application", "enable", pool, "rbd"],
        )?;
        let dir = self.dir(cluster);
        let keyring = dir
            .join(format!("keyring.{}", keys::ADMIN))
            .display()
            .to_string();
        run(
            &format!("rbd pool init {pool}"),
            "rbd",
            &[
                "-c",
                &self.conf(cluster),
                "-n",
                keys::ADMIN,
                "-k",
                &keyring,
                "pool",
                "init",
                pool,
            ],
        )?;
        Ok(())
    }

    /// Makes pool `pool` for `application` with the cluster's defaults, unless it exists.
    pub fn ensure_pool(
        &self,
        cluster: &str,
        pool: &str,
        application: &str,
    ) -> Result<(), StorageError> {
        let pools = self.ceph_json(cluster, &["osd", "pool", "ls"])?;
        if pools
            .as_array()
            .is_some_and(|p| p.iter().any(|x| x.as_str() == Some(pool)))
        {
            return Ok(());
        }
        self.ceph(cluster, &["osd", "pool", "create", pool])?;
        self.ceph(
            cluster,
            &["osd", "pool", "application", "enable", pool, application],
        )?;
        Ok(())
    }

    /// Adds the stretch rule `name` (two copies on distinct hosts of each of the two sites,
    /// `sites[0]`'s first: its OSDs are the primaries) with `crushtool`, as Ceph's
    /// stretch-mode documentation does.
    fn add_stretch_rule(
        &self,
        cluster: &str,
        name: &str,
        sites: &[String; 2],
    ) -> Result<(), StorageError> {
        let dir = self.dir(cluster).join("run");
        let bin = dir.join("crush.bin").display().to_string();
        let txt = dir.join("crush.txt");
        let new = dir.join("crush.new").display().to_string();
        self.ceph(cluster, &["osd", "getcrushmap", "-o", &bin])?;
        run(
            "decompile the CRUSH map",
            "crushtool",
            &["-d", &bin, "-o", &txt.display().to_string()],
        )?;
        let mut text =
            std::fs::read_to_string(&txt).map_err(io(format!("read {}", txt.display())))?;
        let max_id = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("id "))
            .filter_map(|v| v.trim().parse::<i64>().ok())
            .filter(|&v| v >= 0)
            .max()
            .unwrap_or(0);
        // Rule ids are small and counted apart from bucket ids (negative).
        let id = max_id.max(0) + 1;
        text.push_str(&format!(
            "rule {name} {{\n\tid {id}\n\ttype replicated\n\tmin_size 1\n\tmax_size 10\n\
             \tstep take {a}\n\tstep chooseleaf firstn 2 type host\n\tstep emit\n\
             \tstep take {b}\n\tstep chooseleaf firstn 2 type host\n\tstep emit\n}}\n",
            a = sites[0],
            b = sites[1],
        ));
        std::fs::write(&txt, text).map_err(io(format!("write {}", txt.display())))?;
        run(
            "compile the CRUSH map",
            "crushtool",
            &["-c", &txt.display().to_string(), "-o", &new],
        )?;
        self.ceph(cluster, &["osd", "setcrushmap", "-i", &new])?;
        Ok(())
    }
}

fn which(program: &str) -> Result<PathBuf, StorageError> {
    for dir in std::env::var("PATH")
        .unwrap_or_else(|_| "/usr/bin:/usr/sbin".into())
        .split(':')
        .chain(["/usr/bin", "/usr/sbin"])
    {
        let p = Path::new(dir).join(program);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(StorageError::NotInstalledBinary(program.to_string()))
}

/// A random (version 4) UUID.
fn uuid() -> Result<String, StorageError> {
    let mut b = [0u8; 16];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").map_err(io("open /dev/urandom".into()))?,
        &mut b,
    )
    .map_err(io("read /dev/urandom".into()))?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

/// A new cluster id.
pub fn new_fsid() -> Result<String, StorageError> {
    uuid()
}

/// A lab host's storage directory: `<lab>/ceph/<host>` (a lab's hosts share one
/// filesystem).
pub fn lab_root(lab_dir: &Path, host: &str) -> PathBuf {
    lab_dir.join("ceph").join(host)
}

/// A real host's storage directory: `<data dir>/ceph`.
pub fn host_root(data_dir: &Path) -> PathBuf {
    data_dir.join("ceph")
}

/// The client the hypervisors open disks as (`client.vm`), by its id.
pub const VM_USER: &str = "vm";

impl HostStorage {
    /// The cluster installed here that stores the disks of `site`'s VMs.
    pub fn cluster_for_site(&self, site: &str) -> Result<ClusterPlan, StorageError> {
        for name in self.clusters() {
            if let Some(p) = self.plan(&name)? {
                if p.sites.iter().any(|s| s == site) {
                    return Ok(p);
                }
            }
        }
        Err(StorageError::NoCluster {
            site: site.into(),
            host: self.host.clone(),
        })
    }

    /// `cluster`'s `ceph.conf` on this host, if it is installed here.
    pub fn conf_path(&self, cluster: &str) -> Option<PathBuf> {
        let p = self.dir(cluster).join("ceph.conf");
        p.is_file().then_some(p)
    }

    /// Runs `rbd` as the hypervisors' client; its stdout.
    pub fn rbd(&self, cluster: &str, args: &[&str]) -> Result<String, StorageError> {
        let conf = self
            .conf_path(cluster)
            .ok_or_else(|| StorageError::NotInstalled {
                cluster: cluster.into(),
                host: self.host.clone(),
            })?;
        let conf = conf.display().to_string();
        let mut all = vec!["-c", &conf, "--id", VM_USER];
        all.extend_from_slice(args);
        run(&format!("rbd {}", args.join(" ")), "rbd", &all)
    }

    /// Creates image `pool/image` of `size_mib` in `cluster`. An image of that name must
    /// not exist.
    pub fn create_image(
        &self,
        cluster: &str,
        pool: &str,
        image: &str,
        size_mib: u64,
    ) -> Result<(), StorageError> {
        let spec = format!("{pool}/{image}");
        match self.rbd(
            cluster,
            &["create", "--size", &format!("{size_mib}M"), &spec],
        ) {
            Err(StorageError::Command { stderr, .. }) if stderr.contains("File exists") => {
                Err(StorageError::Conflict(format!(
                    "image {spec} exists in cluster {cluster}: another VM's disk, or one a \
                     failed command left (`rbd rm {spec}` with the cluster's admin key)"
                )))
            }
            r => r.map(|_| ()),
        }
    }

    /// Removes image `pool/image` of `cluster` and its snapshots; nothing if it is gone.
    /// Its user must be gone: a watcher left by a dead client is cut off first.
    pub fn remove_image(&self, cluster: &str, pool: &str, image: &str) -> Result<(), StorageError> {
        let spec = format!("{pool}/{image}");
        let gone = |e: &StorageError| matches!(e, StorageError::Command { stderr, .. } if stderr.contains("No such file"));
        match self.rbd(cluster, &["snap", "purge", &spec]) {
            Err(e) if gone(&e) => return Ok(()),
            r => r.map(|_| ())?,
        }
        let watched = |e: &StorageError| matches!(e, StorageError::Command { stderr, .. } if stderr.contains("has watchers"));
        match self.rbd(cluster, &["rm", "--no-progress", &spec]) {
            Err(e) if gone(&e) => Ok(()),
            Err(e) if watched(&e) => {
                // A client that died (a killed QEMU) keeps its watch for 30 s: it is cut
                // off from the cluster (blocklisted, as `rbd lock break` does), then the
                // image goes.
                let status = self.rbd(cluster, &["status", "--format", "json", &spec])?;
                let v: Value =
                    serde_json::from_str(&status).map_err(|e| StorageError::Corrupt {
                        what: format!("rbd status {spec}"),
                        reason: e.to_string(),
                    })?;
                let conf = self.conf(cluster);
                // Only a client of this host (the VM's, whose QEMU is gone): a watcher
                // elsewhere is a live user of the image, and the image stays.
                let plan = self.require_plan(cluster)?;
                let mine = plan
                    .osds
                    .iter()
                    .chain(&plan.mons)
                    .find(|p| p.host == self.host)
                    .map(|p| format!("{}:", p.ip));
                for w in v["watchers"].as_array().into_iter().flatten() {
                    if let Some(addr) = w["address"].as_str() {
                        if mine.as_deref().is_none_or(|m| !addr.starts_with(m)) {
                            return Err(StorageError::Conflict(format!(
                                "image {spec} is in use by {addr}, not a client of {}: it stays",
                                self.host
                            )));
                        }
                        run(
                            &format!("blocklist the dead watcher {addr} of {spec}"),
                            "ceph",
                            &[
                                "-c",
                                &conf,
                                "--id",
                                VM_USER,
                                "--connect-timeout",
                                CONNECT_TIMEOUT_S,
                                "osd",
                                "blocklist",
                                "add",
                                addr,
                            ],
                        )?;
                    }
                }
                self.rbd(cluster, &["rm", "--no-progress", &spec])
                    .map(|_| ())
            }
            r => r.map(|_| ()),
        }
    }
}
