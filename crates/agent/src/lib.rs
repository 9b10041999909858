//! `dczoned`, the host agent: one per host, inside the host's namespace, serving an HTTPS
//! API over the VMs of that host on the host's address only. Every connection is mutual
//! TLS with the zone's certificates (`dczone_pki::tls`): a client without a certificate
//! of the zone CA does not get past the handshake. Operator calls (the VM lifecycle,
//! migrate) need an operator's certificate and the destination's calls (`/v1/incoming`)
//! a peer host's; anything else is refused with 403 naming the certificate needed.
//!
//! API, version 1 (JSON in and out):
//!
//! | method and path | request |
//! |---|---|
//! | GET /v1/health | liveness (any certificate of the zone) |
//! | GET /v1/vms | [`AgentRequest::ListVms`] |
//! | POST /v1/vms | [`AgentRequest::CreateVm`], body [`CreateBody`] |
//! | GET /v1/vms/{name} | [`AgentRequest::GetVm`] |
//! | POST /v1/vms/{name}/start | [`AgentRequest::StartVm`] |
//! | POST /v1/vms/{name}/stop | [`AgentRequest::StopVm`] |
//! | DELETE /v1/vms/{name} | [`AgentRequest::DestroyVm`] |
//! | GET /v1/vms/{name}/serial | [`AgentRequest::SerialLog`] |
//! | POST /v1/vms/{name}/migrate | [`AgentRequest::Migrate`], body [`MigrateBody`] |
//! | GET /v1/vms/{name}/migration | [`AgentRequest::MigrationProgress`] |
//! | POST /v1/incoming | [`AgentRequest::Incoming`], body [`IncomingBody`] (host) |
//! | GET /v1/incoming/{name} | [`AgentRequest::IncomingAlive`] (host) |
//! | POST /v1/incoming/{name}/finish | [`AgentRequest::IncomingFinish`] (host) |
//! | DELETE /v1/incoming/{name} | [`AgentRequest::IncomingAbort`] (host) |
//! | GET /v1/incoming/{name}/status | [`AgentRequest::IncomingStatus`] (host) |
//! | GET /v1/incoming/{name}/outcome | [`AgentRequest::IncomingOutcome`] (host) |
//! | POST /v1/incoming/{name}/recover | [`AgentRequest::IncomingRecover`], body [`RecoverBody`] (host) |
//! | POST /v1/vms/{name}/leg | [`AgentRequest::OpenLeg`], body [`leg::LegBody`] |
//! | POST /v1/vms/{name}/leg/{id} | [`AgentRequest::LegStep`], body [`leg::LegStep`] |
//! | GET /v1/db/{site}/state | [`AgentRequest::DbState`] |
//! | POST /v1/db/{site}/switchover | [`AgentRequest::DbSwitchover`], body [`SwitchoverBody`] |
//! | DELETE /v1/db/{site}/switchover | [`AgentRequest::DbSwitchoverClear`] |
//! | PUT /v1/db/{site}/policy | [`AgentRequest::DbPolicy`], body [`PolicyBody`] |
//! | POST /v1/db/{site}/ha-agent | [`AgentRequest::HaStart`] |
//! | DELETE /v1/db/{site}/ha-agent | [`AgentRequest::HaStop`] |
//! | GET /v1/db/{site}/credentials | [`AgentRequest::DbCredentials`] |
//! | PUT /v1/db/{site}/credentials | [`AgentRequest::DbSetPassword`], body [`PasswordBody`] |
//! | POST /v1/db/{site}/fence | [`AgentRequest::DbFence`], body [`recovery::FenceBody`] |
//! | DELETE /v1/db/{site} | [`AgentRequest::DbPurge`] |
//! | POST /v1/etcd | [`AgentRequest::EtcdStart`] |
//! | GET /v1/etcd | [`AgentRequest::EtcdStatus`] |
//! | POST /v1/etcd/rebuild | [`AgentRequest::EtcdRebuild`], body [`recovery::RebuildBody`] |
//! | POST /v1/etcd/rejoin | [`AgentRequest::EtcdRejoin`] |
//! | DELETE /v1/etcd/keys | [`AgentRequest::EtcdClear`] |
//!
//! The `db` calls go to the HA agent of a database member on this host, over its local
//! control socket ([`dczone_ha::control`]): the operator reads the platform's state and
//! files a switchover without holding etcd credentials, which only HA agents hold.
//!
//! Live migration is driven between two agents, in libvirt's phases: the source agent
//! (`migrate`) asks the destination agent to *prepare* (`incoming`: QEMU waiting for the
//! stream, started with `-S` so it stays stopped afterwards), *performs* the pre-copy
//! through its own QMP, asks the destination to *finish* (`cont`, RESUME), and *confirms*
//! (source QEMU quits). If the destination or its agent disappears, or finish fails, the
//! source cancels or resumes its VM and the destination is killed (by its agent, or by
//! the agent's next start if the agent itself was killed).
//!
//! The HTTP layer only translates into [`AgentRequest`]; [`Agent::handle`] does the work on
//! a blocking thread (QEMU and namespaces are driven synchronously by `dczone-virt`).

pub mod access;
pub mod cloud;
pub mod host_db;
pub mod leg;
pub mod recovery;
pub mod storage;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::Extension;
use axum::{Json, Router};
use clap::Parser;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use dczone_pki::tls::{Identity, Peer};
use dczone_pki::Role;
use dczone_virt::migrate::{Destination, DiskCopy, LocalDestination, Params, Progress};
use dczone_virt::{CreateVm, HostPlacement, Platform, VirtError, VmRecord};

/// The port every agent listens on (on its host's lab address).
pub const AGENT_PORT: u16 = 7070;

/// Every agent also listens on the port after its own, for bulk data (backup chunks): the
/// WAN gives that port its bulk class, as an APN allocates a backup a path of its own,
/// while the agent's port stays in the strict-priority class of control traffic.
pub fn bulk_port(agent_port: u16) -> u16 {
    agent_port.wrapping_add(1)
}

/// The bulk endpoint of the agent at `url` (`https://IP:PORT`): the same address, the
/// port after its own.
pub fn bulk_url(url: &str) -> Result<String, String> {
    let (base, port) = url
        .trim_end_matches('/')
        .rsplit_once(':')
        .filter(|(b, _)| b.contains("://"))
        .ok_or_else(|| format!("agent endpoint {url} has no port (https://IP:PORT)"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("agent endpoint {url} has no port (https://IP:PORT)"))?;
    Ok(format!("{base}:{}", bulk_port(port)))
}

/// A destination whose source agent has not asked after it for this long is abandoned.
/// The source asks every 200 ms while it migrates.
pub const INCOMING_KEEPALIVE: Duration = Duration::from_secs(5);

/// Every request the agent accepts. Each is legal whenever the agent runs; the VM-state
/// rules are the platform's (e.g. `StartVm` needs a stopped VM).
#[derive(Debug, Clone)]
pub enum AgentRequest {
    /// The VMs on this host.
    ListVms,
    /// One VM of this host.
    GetVm { name: String },
    /// Create and boot a VM on this host (its name must be new in the lab).
    CreateVm(CreateBody),
    /// Boot a stopped VM of this host.
    StartVm { name: String },
    /// Power off a running VM of this host.
    StopVm { name: String },
    /// Stop (if running) and forget a VM of this host.
    DestroyVm { name: String },
    /// The serial console log of a running VM of this host.
    SerialLog { name: String },
    /// Live-migrate a VM of this host to another host, through that host's agent.
    Migrate { name: String, body: MigrateBody },
    /// The latest progress of an outgoing migration (bytes, rounds, expected downtime).
    MigrationProgress { name: String },
    /// Destination side: start a QEMU for `vm` waiting for its stream.
    Incoming(IncomingBody),
    /// Destination side: is the waiting QEMU still there?
    IncomingAlive { name: String },
    /// Destination side: the stream is complete; run the VM and take it over.
    IncomingFinish { name: String },
    /// Destination side: give up; kill the waiting QEMU.
    IncomingAbort { name: String },
    /// Destination side, post-copy: the incoming migration's status (from its events).
    IncomingStatus { name: String },
    /// Destination side, for the source host's agent settling a migration whose driver
    /// died: `runs` (this host runs the VM: its finish went through), `waiting` (a
    /// destination waits for a finish) or `none`.
    IncomingOutcome { name: String },
    /// Destination side, post-copy: one step of resuming a broken stream (pause, listen).
    IncomingRecover { name: String, body: RecoverBody },
    /// Source side of a group migration: open the leg of a VM of this host (its lock, its
    /// marker, its destination prepared through the destination's agent); a coordinator
    /// drives it ([`leg`]).
    OpenLeg { name: String, body: leg::LegBody },
    /// One step of an open leg.
    LegStep {
        name: String,
        id: u64,
        step: leg::LegStep,
    },
    /// The database platform's state, as the HA agent of `site` on this host reads it.
    DbState { site: String },
    /// File a planned switchover through the HA agent of `site` on this host.
    DbSwitchover { site: String, body: SwitchoverBody },
    /// Withdraw a switchover request through the HA agent of `site` on this host.
    DbSwitchoverClear { site: String },
    /// Set the replication policy through the HA agent of `site` on this host.
    DbPolicy { site: String, body: PolicyBody },
    /// Start the HA agent of database site `site`, whose member is on this host (it then
    /// runs its PostgreSQL); nothing if it runs.
    HaStart { site: String },
    /// Stop the HA agent of `site` on this host (its PostgreSQL dies with it).
    HaStop { site: String },
    /// The platform's `postgres` password (a libpq password file), as `site`'s member on
    /// this host holds it: the operator is the platform's superuser.
    DbCredentials { site: String },
    /// Start this host's etcd members that are not running (nothing waits for them: a
    /// new cluster answers once a majority runs).
    EtcdStart,
    /// Install the platform's password for `site`'s member on this host (unless it holds
    /// it already; another one is refused): the operator's `db up` sends it before the HA
    /// agents start, so that every member of a real zone has the same.
    DbSetPassword { site: String, body: PasswordBody },
    /// A manual failover's fence: stop `site`'s member on this host, then read how far its
    /// WAL reaches ([`recovery`]).
    DbFence {
        site: String,
        body: recovery::FenceBody,
    },
    /// Stop `site`'s member on this host and remove its directory (`db down`).
    DbPurge { site: String },
    /// This host's etcd members, each asked alone whether it follows a raft leader.
    EtcdStatus,
    /// Rebuild the consensus store on this host's member, with a failover order in it.
    EtcdRebuild(recovery::RebuildBody),
    /// Re-add this host's etcd members that are out of the cluster after a rebuild.
    EtcdRejoin,
    /// Delete the database platform's keys (`db down`).
    EtcdClear,
    /// Install storage cluster `cluster`'s plan and this host's keys ([`storage`]).
    StorageInstall {
        cluster: String,
        body: dczone_storage::operator::InstallBody,
    },
    /// What this host holds of storage cluster `cluster`: its fsid and daemons.
    StorageView { cluster: String },
    /// Create (once) and start this host's daemons of `cluster` of the given kinds.
    StorageStart {
        cluster: String,
        body: dczone_storage::operator::StartBody,
    },
    /// Stop this host's daemons of `cluster` (or one of them).
    StorageStop {
        cluster: String,
        body: dczone_storage::operator::StopBody,
    },
    /// Pools, CRUSH rules and stretch mode of `cluster` (a monitor's host).
    StorageSetup {
        cluster: String,
        body: dczone_storage::operator::SetupBody,
    },
    /// `cluster` as its monitors see it (a monitor's host).
    StorageStatus { cluster: String },
    /// Stop this host's daemons of `cluster` and remove its files.
    StoragePurge { cluster: String },
    /// Requests to the ledger of a VM of this host, from this host.
    Ledger {
        name: String,
        body: storage::LedgerBody,
    },
    /// Export a VM of this host's disk to a cloud's object storage ([`cloud`]): the
    /// migration to a public cloud's export, convert and transfer.
    CloudExport {
        name: String,
        body: cloud::ExportBody,
    },
    /// Back up the disk of a VM of this host to a store ([`storage`]).
    Backup {
        name: String,
        body: storage::BackupBody,
    },
    /// The store's side, from a source host: one chunk of backup `id`, checked against
    /// its SHA-256 and kept.
    BackupChunk {
        cluster: String,
        id: String,
        n: u32,
        sha256: String,
        bytes: Vec<u8>,
        arrived_unix_ms: u64,
    },
    /// The store's side, from a source host: the manifest that makes backup `id` exist.
    BackupCommit {
        cluster: String,
        id: String,
        manifest: dczone_storage::backup::Manifest,
    },
    /// The backups in this host's store of `cluster`.
    BackupList { cluster: String },
    /// Backups of this host's store whose transfer was cut (chunks without a manifest).
    BackupOrphans { cluster: String },
    /// What this host's store of `cluster` can still take.
    BackupSpace { cluster: String },
    /// Check every chunk of backup `id`.
    BackupVerify { cluster: String, id: String },
    /// Remove backup `id` (and the chunks of a cut transfer of that id).
    BackupDelete { cluster: String, id: String },
    /// Restore a chain of backups into a new image of `cluster`.
    BackupRestore {
        cluster: String,
        body: storage::RestoreBody,
    },
}

/// Body of `POST /v1/db/{site}/switchover`: the primary the operator saw, and the standby
/// that takes over. The HA agent stamps the request with its own clock.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchoverBody {
    pub from: String,
    pub to: String,
}

/// Body of `PUT /v1/db/{site}/credentials`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PasswordBody {
    /// A libpq password file's text with a line for user `postgres`.
    pub pgpass: String,
}

/// Body of `PUT /v1/db/{site}/policy`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyBody {
    /// One of the zone's tiers (`[database.policies]`).
    pub tier: String,
}

impl AgentRequest {
    /// The certificate role a caller needs: a peer host for a migration's destination
    /// half, an operator for everything else.
    pub fn role(&self) -> Role {
        match self {
            AgentRequest::Incoming(_)
            | AgentRequest::IncomingAlive { .. }
            | AgentRequest::IncomingFinish { .. }
            | AgentRequest::IncomingAbort { .. }
            | AgentRequest::IncomingStatus { .. }
            | AgentRequest::IncomingOutcome { .. }
            | AgentRequest::IncomingRecover { .. }
            | AgentRequest::BackupChunk { .. }
            | AgentRequest::BackupCommit { .. } => Role::Host,
            _ => Role::Operator,
        }
    }
}

/// Body of `POST /v1/vms/{name}/migrate`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateBody {
    /// The destination host.
    pub to: String,
    /// The destination agent's URL; default `https://<to's address>:7070`.
    pub agent: Option<String>,
    pub downtime_limit_ms: Option<u64>,
    /// Replay the frames that reach the source during the switchover (default true).
    #[serde(default)]
    pub frame_replay: Option<bool>,
    /// Encrypt a stream between sites (default true).
    #[serde(default)]
    pub tls: Option<bool>,
}

/// Body of `POST /v1/incoming`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IncomingBody {
    pub vm: VmRecord,
    pub port: u16,
    /// The source asks for an encrypted stream (between sites).
    #[serde(default)]
    pub tls: bool,
    /// Ready for post-copy: the capability set before the stream, and the guest runs as
    /// soon as the source switches (not held until `finish`).
    #[serde(default)]
    pub postcopy: bool,
    /// The source can take a disk along (mirror it into this host's cluster). A source
    /// that cannot is refused a VM whose disk is in another cluster: it would move the
    /// memory alone, and the VM would run here on an empty disk.
    #[serde(default)]
    pub copy_disk: bool,
}

/// Body of `POST /v1/incoming/{name}/recover`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RecoverBody {
    /// Where the destination listens for the resumed stream.
    pub uri: String,
    /// The handshake hangs: break it off.
    #[serde(default)]
    pub unstick: bool,
}

/// Body of `POST /v1/vms`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    pub name: String,
    #[serde(default = "default_memory")]
    pub memory_mib: u32,
    #[serde(default)]
    pub dirty_mbps: u32,
    #[serde(default = "default_dirty_mib")]
    pub dirty_mib: u32,
    #[serde(default = "default_resident_pct")]
    pub resident_pct: u8,
    pub group: Option<String>,
    /// A disk of this many MiB in the storage cluster of the host's site, in the site's
    /// pool.
    #[serde(default)]
    pub disk_mib: Option<u64>,
    /// Or an existing image of that pool (a restored backup).
    #[serde(default)]
    pub disk_image: Option<String>,
}

fn default_memory() -> u32 {
    256
}

fn default_dirty_mib() -> u32 {
    32
}

fn default_resident_pct() -> u8 {
    dczone_virt::DEFAULT_RESIDENT_PCT
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("this call needs {need} certificate; the caller presented {got}")]
    Forbidden { need: &'static str, got: String },
    #[error("VM '{vm}' is not on this host ({host})")]
    NotHere { vm: String, host: String },
    #[error("no incoming migration of VM '{0}' on this host")]
    NoIncoming(String),
    #[error("no migration of VM '{0}' in progress on this host")]
    NoMigration(String),
    #[error("no HA agent of database site '{site}' runs on this host ({host}): {reason}")]
    NoHaAgent {
        site: String,
        host: String,
        reason: String,
    },
    #[error("the HA agent of '{site}' on this host: {reason}")]
    Ha { site: String, reason: String },
    #[error("the etcd members of {host}: {reason}")]
    Etcd { host: String, reason: String },
    /// The request contradicts what the host holds (and keeps).
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Storage(#[from] dczone_storage::StorageError),
    #[error(transparent)]
    Virt(#[from] VirtError),
}

impl AgentError {
    fn status(&self) -> StatusCode {
        match self {
            AgentError::Forbidden { .. } => StatusCode::FORBIDDEN,
            AgentError::NotHere { .. }
            | AgentError::NoHaAgent { .. }
            | AgentError::NoIncoming(_)
            | AgentError::NoMigration(_)
            | AgentError::Virt(VirtError::UnknownVm { .. }) => StatusCode::NOT_FOUND,
            AgentError::Virt(VirtError::Exists(_)) | AgentError::Conflict(_) => {
                StatusCode::CONFLICT
            }
            AgentError::Ha { .. } | AgentError::Etcd { .. } => StatusCode::SERVICE_UNAVAILABLE,
            AgentError::Virt(VirtError::BadSpec(_) | VirtError::NoMemory { .. }) => {
                StatusCode::BAD_REQUEST
            }
            AgentError::Virt(
                VirtError::AlreadyRunning(_)
                | VirtError::NotRunning(_)
                | VirtError::Busy(_)
                | VirtError::SameHost { .. },
            ) => StatusCode::CONFLICT,
            AgentError::Virt(_) => StatusCode::INTERNAL_SERVER_ERROR,
            AgentError::Storage(e) => storage::status_code(e),
        }
    }
}

impl IntoResponse for AgentError {
    fn into_response(self) -> Response {
        let message = dczone_lab::error_chain(&self);
        (self.status(), Json(json!({ "error": message }))).into_response()
    }
}

/// The agent of one host.
#[derive(Debug)]
pub struct Agent {
    platform: Platform,
    host: String,
    /// How this host calls its peers' agents: its own certificate, the zone CA.
    peers: Arc<rustls::ClientConfig>,
    /// Destination QEMUs waiting for (or receiving) a stream, by VM name; `None` while one
    /// starts (its name is taken). The map's lock is only held to find or change an entry:
    /// QMP calls hold their entry's own lock, so one slow destination QEMU (launched,
    /// queried, finished) never holds up another VM's keepalive.
    incoming: Mutex<HashMap<String, Option<Slot>>>,
    /// Outgoing migrations in flight: their latest progress, by VM name.
    outgoing: Mutex<HashMap<String, Progress>>,
    /// The zone's agents by host (a real host's, from its zone file); in the lab each is
    /// at its host's address, port [`AGENT_PORT`].
    endpoints: HashMap<String, String>,
    /// Legs of group migrations from this host, driven by a coordinator.
    legs: leg::Legs,
    /// Where the database members of this host keep their directories (`<site>/`, each
    /// with its HA agent's control socket).
    db_dir: PathBuf,
    /// How this agent starts HA agents (`dczone ha-agent` beside `dczoned`) and its host's
    /// etcd members in a lab (`None` on a real host).
    ha_launcher: Option<HaLauncher>,
    /// On a real host: its zone, for its etcd members (`None` in a lab).
    host_zone: Option<HostZone>,
    /// VMs that run here after a finish whose record could not be saved, for `outcome`.
    unrecorded: Mutex<HashMap<String, dczone_hypervisor::Running>>,
    /// Held while an HA agent starts or stops: two calls at once start one.
    ha_starting: Mutex<()>,
    /// Held while this host's etcd members start: two calls at once start each once.
    etcd_starting: Mutex<()>,
    /// This host's part of the zone's storage clusters.
    storage: dczone_storage::host::HostStorage,
    /// Held while storage daemons are installed, started or stopped.
    storage_busy: Mutex<()>,
}

/// A destination QEMU waiting for (or receiving) a stream: when its source agent last asked
/// after it (the migration's keepalive), and the VM's record as the source sent it.
#[derive(Debug)]
struct Incoming {
    dest: LocalDestination,
    seen: Instant,
    record: VmRecord,
}

/// One incoming migration; empty once it was finished or aborted.
type Slot = Arc<Mutex<Option<Incoming>>>;

/// Takes a VM's name in the incoming map while its destination QEMU starts; gives it back
/// unless [`Reservation::fill`] put the destination in its place.
struct Reservation<'a> {
    map: &'a Mutex<HashMap<String, Option<Slot>>>,
    name: String,
    filled: bool,
}

impl Reservation<'_> {
    fn fill(mut self, incoming: Incoming) {
        self.filled = true;
        self.map.lock().unwrap_or_else(|e| e.into_inner()).insert(
            self.name.clone(),
            Some(Arc::new(Mutex::new(Some(incoming)))),
        );
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.filled {
            self.map
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&self.name);
        }
    }
}

/// Removes a finished incoming migration's entry from the map when dropped (if it is
/// still that entry).
struct Departure<'a> {
    map: &'a Mutex<HashMap<String, Option<Slot>>>,
    name: &'a str,
    slot: &'a Slot,
}

impl Drop for Departure<'_> {
    fn drop(&mut self) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(map.get(self.name), Some(Some(s)) if Arc::ptr_eq(s, self.slot)) {
            map.remove(self.name);
        }
    }
}

/// What a real host's agent knows of its zone (`dczoned --zone`): the zone file, the
/// certificates installed on the host, and its data directory.
#[derive(Debug, Clone)]
pub struct HostZone {
    /// The zone file (`--zone`), as read at start.
    pub file: PathBuf,
    pub bundle: access::Bundle,
    pub pki: PathBuf,
    pub data_dir: PathBuf,
}

/// What a lab's agent needs to start its host's HA agents and etcd members.
#[derive(Debug, Clone)]
pub struct HaLauncher {
    pub lab: dczone_lab::Lab,
    pub state_dir: PathBuf,
    /// `dczone`, whose hidden `ha-agent` command is the HA agent.
    pub exe: PathBuf,
}

/// Where a host's agent keeps the services it runs besides VMs.
#[derive(Debug, Clone)]
pub struct HostDirs {
    /// The database members' directories (`<site>/`).
    pub db: PathBuf,
    /// The storage clusters' directories (`<cluster>/`, [`storage`]).
    pub storage: PathBuf,
}

impl Agent {
    pub fn new(
        platform: Platform,
        host: String,
        peers: Arc<rustls::ClientConfig>,
        endpoints: HashMap<String, String>,
        dirs: HostDirs,
        ha_launcher: Option<HaLauncher>,
        host_zone: Option<HostZone>,
    ) -> Agent {
        let db_dir = dirs.db;
        let agent = Agent {
            storage: dczone_storage::host::HostStorage::new(dirs.storage, &host),
            storage_busy: Mutex::new(()),
            db_dir,
            ha_launcher,
            host_zone,
            ha_starting: Mutex::new(()),
            unrecorded: Mutex::new(HashMap::new()),
            etcd_starting: Mutex::new(()),
            platform,
            host,
            peers,
            incoming: Mutex::new(HashMap::new()),
            outgoing: Mutex::new(HashMap::new()),
            endpoints,
            legs: leg::Legs::default(),
        };
        for line in agent.recover_interrupted() {
            eprintln!("dczoned: {line}");
        }
        agent.reap_strays();
        agent
    }

    /// Settles the migrations from this host whose driver died (see
    /// [`Platform::recover_interrupted`]): a source VM never stays paused for want of one.
    /// Returns one line per migration settled, or tried.
    pub fn recover_interrupted(&self) -> Vec<String> {
        let ask = |url: &str, vm: &str| self.destination_fate(url, vm);
        self.platform.recover_interrupted(&self.host, &ask)
    }

    /// What became of `vm` at the destination whose agent is at `url`, for settling its
    /// migration here: a destination still waiting there is aborted first.
    fn destination_fate(&self, url: &str, vm: &str) -> dczone_virt::migrate::DestinationFate {
        use dczone_virt::migrate::DestinationFate;
        let client = AgentClient::new(url, self.peers.clone());
        let timeout = Duration::from_secs(3);
        let outcome = || -> Result<(String, Value), String> {
            let v = client
                .call("GET", &format!("/v1/incoming/{vm}/outcome"), None, timeout)
                .map_err(|e| e.to_string())?;
            Ok((v["state"].as_str().unwrap_or_default().to_string(), v))
        };
        let fate = |state: &str, v: &Value| match state {
            "runs" => DestinationFate::Runs(serde_json::from_value(v["running"].clone()).ok()),
            "none" => DestinationFate::NotThere,
            other => DestinationFate::Unknown(format!("the destination is {other}")),
        };
        match outcome() {
            Ok((state, _)) if state == "waiting" => {
                if let Err(e) = client.call("DELETE", &format!("/v1/incoming/{vm}"), None, timeout)
                {
                    return DestinationFate::Unknown(e.to_string());
                }
                // Asked again: a finish may have come in between.
                match outcome() {
                    Ok((state, v)) => fate(&state, &v),
                    Err(e) => DestinationFate::Unknown(e),
                }
            }
            Ok((state, v)) => fate(&state, &v),
            Err(e) => DestinationFate::Unknown(e),
        }
    }

    /// A previous agent of this host may have died with a destination QEMU waiting: kill
    /// every QEMU of this host that no VM record claims.
    fn reap_strays(&self) {
        let Ok(vms) = self.platform.list() else {
            return;
        };
        let mut known: Vec<i32> = vms
            .iter()
            .filter_map(|v| v.running.as_ref().map(|r| r.pid))
            .collect();
        known.extend(self.platform.in_flight_destinations());
        for pid in self.platform.qemus_of(&self.host) {
            if !known.contains(&pid) {
                eprintln!("dczoned: killing stray QEMU {pid} (a destination nobody finished)");
                dczone_lab::sys::kill(pid, libc::SIGKILL);
            }
        }
    }

    /// Kills every waiting destination whose source agent has not asked after it for
    /// [`INCOMING_KEEPALIVE`] (libvirt's keepalive does the same between its daemons): the
    /// source or the path to it is gone, and nobody else would clean it up.
    pub fn reap_abandoned(&self) {
        let slots: Vec<(String, Slot)> = self
            .incoming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|(name, slot)| Some((name.clone(), slot.clone()?)))
            .collect();
        for (name, slot) in slots {
            // An entry in use (a call of its source's, a QMP query) is not abandoned.
            let Ok(mut entry) = slot.try_lock() else {
                continue;
            };
            let Some(inc) = entry.as_mut() else {
                continue;
            };
            if inc.seen.elapsed() <= INCOMING_KEEPALIVE {
                continue;
            }
            // After a post-copy switch the VM runs here and holds the newer state: a silent
            // source (a cut path) is waited for, never killed for.
            let status = inc.dest.incoming_status().unwrap_or_default();
            if status.starts_with("postcopy")
                || (inc.dest.runs_by_itself() && status == "completed")
            {
                eprintln!(
                    "dczoned: the source of {name}'s post-copy migration is silent; the VM runs \
                     here and waits for its pages"
                );
                inc.seen = Instant::now();
                continue;
            }
            let Some(mut inc) = entry.take() else {
                continue;
            };
            drop(entry);
            {
                let mut map = self.incoming.lock().unwrap_or_else(|e| e.into_inner());
                if matches!(map.get(&name), Some(Some(s)) if Arc::ptr_eq(s, &slot)) {
                    map.remove(&name);
                }
            }
            eprintln!(
                "dczoned: the source of {name}'s migration went silent; killing the destination"
            );
            inc.dest.abort();
        }
    }

    /// The incoming migration of `name`, to be locked for one call.
    fn incoming_slot(&self, name: &str) -> Result<Slot, AgentError> {
        self.incoming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
            .flatten()
            .ok_or(AgentError::NoIncoming(name.to_string()))
    }

    /// Calls `f` on the incoming migration of `name` (holding its lock, not the map's), as
    /// a call of its source's: the keepalive is renewed.
    fn with_incoming<T>(
        &self,
        name: &str,
        f: impl FnOnce(&mut LocalDestination) -> Result<T, AgentError>,
    ) -> Result<T, AgentError> {
        let slot = self.incoming_slot(name)?;
        let mut entry = slot.lock().unwrap_or_else(|e| e.into_inner());
        let inc = entry
            .as_mut()
            .ok_or(AgentError::NoIncoming(name.to_string()))?;
        inc.seen = Instant::now();
        f(&mut inc.dest)
    }

    /// Removes the incoming migration of `name` from the map and returns it, once no call
    /// holds it any more. One still starting stays: its source gave up, so the keepalive
    /// reaps it.
    fn take_incoming(&self, name: &str) -> Option<Incoming> {
        let slot = {
            let mut map = self.incoming.lock().unwrap_or_else(|e| e.into_inner());
            let slot = map.get(name)?.clone()?;
            map.remove(name);
            slot
        };
        let taken = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        taken
    }

    /// Drops the legs whose coordinator went silent ([`leg::Legs::reap`]).
    pub fn reap_legs(&self) {
        self.legs.reap();
    }

    /// `to`'s agent: as the caller named it, from the zone file, or (the lab) at its
    /// host's address.
    fn peer_url(&self, to: &str, given: Option<String>) -> Result<String, AgentError> {
        Ok(match (given, self.endpoints.get(to)) {
            (Some(u), _) => u,
            (None, Some(u)) => u.clone(),
            (None, None) => {
                let h = self.platform.placement().host(to)?;
                format!("https://{}:{AGENT_PORT}", h.ip)
            }
        })
    }

    fn here(&self, name: &str) -> Result<dczone_virt::VmRecord, AgentError> {
        let vm = self.platform.get(name)?;
        if vm.host != self.host {
            return Err(AgentError::NotHere {
                vm: name.into(),
                host: self.host.clone(),
            });
        }
        Ok(vm)
    }

    /// A site name from a request, checked before it becomes part of a path.
    fn site_name(site: &str) -> Result<(), AgentError> {
        let valid = !site.is_empty()
            && site.len() <= 64
            && !site.starts_with('.')
            && site
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
        if !valid {
            return Err(VirtError::BadSpec(format!(
                "'{site}' is not a site name (letters, digits, '.', '-', '_')"
            ))
            .into());
        }
        Ok(())
    }

    /// The pid of `site`'s HA agent on this host, if it runs: the pid file's process, if
    /// it is still an HA agent (a pid may have been reused since).
    fn ha_pid(&self, site: &str) -> Option<i32> {
        std::fs::read_to_string(self.db_dir.join(site).join("agent.pid"))
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .filter(|&p| dczone_lab::sys::alive(p))
            .filter(|p| {
                // Empty for a moment while `ip netns exec` execs the HA agent: still ours.
                // `dczone ha-agent` in a lab, `dczoned --ha-agent` on a real host.
                std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| {
                    c.is_empty()
                        || c.split(|&b| b == 0)
                            .any(|arg| arg == b"ha-agent" || arg == b"--ha-agent")
                })
            })
    }

    /// Refuses a site whose database member is not on this host. A lab's hosts share one
    /// filesystem, so the member directory alone does not say whose it is; a real host's
    /// holds only its own.
    fn own_member(&self, site: &str) -> Result<(), AgentError> {
        Self::site_name(site)?;
        let Some(l) = &self.ha_launcher else {
            let Some(hz) = &self.host_zone else {
                return Ok(());
            };
            return hz
                .own_member(&self.host, site)
                .map_err(|e| AgentError::NoHaAgent {
                    site: site.into(),
                    host: self.host.clone(),
                    reason: e.to_string(),
                });
        };
        let zone = l
            .lab
            .state()
            .and_then(|s| s.zone())
            .map_err(|e| AgentError::Ha {
                site: site.into(),
                reason: format!("read the lab's zone: {}", dczone_lab::error_chain(&e)),
            })?;
        let member_host = zone.database.as_ref().and_then(|plan| {
            plan.members().contains(&site.to_string()).then_some(())?;
            let idx = zone.site_index(site)?;
            zone.sites[idx].hosts.get(plan.host_index).cloned()
        });
        if member_host.as_deref() != Some(self.host.as_str()) {
            return Err(AgentError::NoHaAgent {
                site: site.into(),
                host: self.host.clone(),
                reason: match member_host {
                    Some(h) => format!("its member runs on {h}"),
                    None => "it is not a database site of the zone".into(),
                },
            });
        }
        Ok(())
    }

    /// Starts the HA agent of `site` (a database member of this host), unless it runs.
    fn ha_start(&self, site: &str) -> Result<Value, AgentError> {
        self.own_member(site)?;
        let _one_at_a_time = self.ha_starting.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pid) = self.ha_pid(site) {
            return Ok(json!({ "site": site, "pid": pid, "started": false }));
        }
        let dir = self.db_dir.join(site);
        let io = |what: String| move |source| AgentError::Virt(VirtError::Io { what, source });
        std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
        let Some(l) = &self.ha_launcher else {
            return self.ha_start_on_host(site);
        };
        let state_dir = l.state_dir.display().to_string();
        let pid = l
            .lab
            .spawn_daemon(
                &l.lab.host_namespace(&self.host),
                &l.exe,
                &[
                    "--lab",
                    l.lab.name(),
                    "--state-dir",
                    &state_dir,
                    "ha-agent",
                    "--site",
                    site,
                ],
                &dir.join("agent.log"),
                "the HA agent",
            )
            .map_err(|e| AgentError::Ha {
                site: site.into(),
                reason: dczone_lab::error_chain(&e),
            })?;
        let pid_file = dir.join("agent.pid");
        std::fs::write(&pid_file, pid.to_string())
            .map_err(io(format!("write {}", pid_file.display())))?;
        Ok(json!({ "site": site, "pid": pid, "started": true }))
    }

    /// Stops the HA agent of `site` on this host; its PostgreSQL dies with it.
    ///
    /// This is also the fence of a manual failover, which then reads the member's WAL: it
    /// answers only once the postmaster is gone too (killed if it outlives its agent by
    /// 5 s), or fails saying so.
    fn ha_stop(&self, site: &str) -> Result<Value, AgentError> {
        self.own_member(site)?;
        let _one_at_a_time = self.ha_starting.lock().unwrap_or_else(|e| e.into_inner());
        let gone = |pid: i32, within: Duration| {
            let t = Instant::now();
            while dczone_lab::sys::alive(pid) && t.elapsed() < within {
                std::thread::sleep(Duration::from_millis(10));
            }
            !dczone_lab::sys::alive(pid)
        };
        let stopped = match self.ha_pid(site) {
            Some(pid) => {
                dczone_lab::sys::kill(pid, libc::SIGKILL);
                gone(pid, Duration::from_secs(5));
                let _ = std::fs::remove_file(self.db_dir.join(site).join("agent.pid"));
                true
            }
            None => false,
        };
        // PostgreSQL dies with its HA agent (an orphan one is stopped all the same).
        let postmaster =
            std::fs::read_to_string(self.db_dir.join(site).join("data/postmaster.pid"))
                .ok()
                .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<i32>().ok()))
                .filter(|pm| {
                    std::fs::read(format!("/proc/{pm}/cmdline"))
                        .is_ok_and(|c| String::from_utf8_lossy(&c).contains("postgres"))
                });
        if let Some(pm) = postmaster {
            if !gone(pm, Duration::from_secs(5)) {
                dczone_lab::sys::kill(pm, libc::SIGKILL);
                if !gone(pm, Duration::from_secs(5)) {
                    return Err(AgentError::Ha {
                        site: site.into(),
                        reason: format!("its postmaster (pid {pm}) survives SIGKILL"),
                    });
                }
            }
        }
        Ok(json!({ "site": site, "stopped": stopped }))
    }

    /// The password file `site`'s member was set up with (its HA agent makes it as it
    /// starts: `<db dir>/pgpass`).
    fn db_credentials(&self, site: &str) -> Result<Value, AgentError> {
        self.own_member(site)?;
        let file = self.db_dir.join("pgpass");
        match std::fs::read_to_string(&file) {
            Ok(text) => Ok(json!({ "site": site, "pgpass": text })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(AgentError::NoHaAgent {
                site: site.into(),
                host: self.host.clone(),
                reason: format!(
                    "{} does not exist: the member has not been set up (`dczone db up`)",
                    file.display()
                ),
            }),
            Err(source) => Err(VirtError::Io {
                what: format!("read {}", file.display()),
                source,
            }
            .into()),
        }
    }

    /// Asks the HA agent of database site `site` on this host.
    fn ha(&self, site: &str, req: dczone_ha::control::ControlRequest) -> Result<Value, AgentError> {
        self.own_member(site)?;
        let socket = dczone_ha::control::socket_path(&self.db_dir.join(site));
        if !socket.exists() {
            return Err(AgentError::NoHaAgent {
                site: site.into(),
                host: self.host.clone(),
                reason: format!("{} does not exist", socket.display()),
            });
        }
        dczone_ha::control::ask(&socket, &req, Duration::from_secs(10)).map_err(|e| match e {
            dczone_ha::control::ControlError::Unreachable { reason, .. } => AgentError::NoHaAgent {
                site: site.into(),
                host: self.host.clone(),
                reason,
            },
            dczone_ha::control::ControlError::Invalid(reason) => {
                AgentError::Virt(VirtError::BadSpec(reason))
            }
            dczone_ha::control::ControlError::Unavailable(reason) => AgentError::Ha {
                site: site.into(),
                reason,
            },
        })
    }

    /// Carries out one request.
    pub fn handle(&self, req: AgentRequest) -> Result<Value, AgentError> {
        let to_json = |v: &dczone_virt::VmRecord| serde_json::to_value(v).unwrap_or(Value::Null);
        Ok(match req {
            AgentRequest::ListVms => Value::Array(
                self.platform
                    .list()?
                    .iter()
                    .filter(|v| v.host == self.host)
                    .map(to_json)
                    .collect(),
            ),
            AgentRequest::GetVm { name } => to_json(&self.here(&name)?),
            AgentRequest::CreateVm(b) => to_json(&self.platform.create(&CreateVm {
                name: b.name,
                host: self.host.clone(),
                memory_mib: b.memory_mib,
                dirty_mbps: b.dirty_mbps,
                dirty_mib: b.dirty_mib,
                resident_pct: b.resident_pct,
                group: b.group,
                disk_mib: b.disk_mib,
                disk_image: b.disk_image,
            })?),
            AgentRequest::StartVm { name } => {
                self.here(&name)?;
                to_json(&self.platform.start(&name)?)
            }
            AgentRequest::StopVm { name } => {
                self.here(&name)?;
                to_json(&self.platform.stop(&name)?)
            }
            AgentRequest::DestroyVm { name } => {
                self.here(&name)?;
                self.platform.destroy(&name)?;
                json!({ "destroyed": name })
            }
            AgentRequest::SerialLog { name } => {
                let vm = self.here(&name)?;
                let log = vm
                    .running
                    .map(|r| std::fs::read_to_string(r.serial).unwrap_or_default())
                    .ok_or(VirtError::NotRunning(name))?;
                json!({ "serial": log })
            }
            AgentRequest::Migrate { name, body } => {
                self.here(&name)?;
                let url = self.peer_url(&body.to, body.agent)?;
                let mut params = Params::default();
                if let Some(ms) = body.downtime_limit_ms {
                    params.downtime_limit_ms = ms;
                }
                if let Some(on) = body.tls {
                    params.tls = on;
                }
                if let Some(on) = body.frame_replay {
                    params.keep_frames = on;
                }
                let peers = self.peers.clone();
                let report = |ps: &[Progress]| {
                    if let Some(p) = ps.first() {
                        self.outgoing
                            .lock()
                            .expect("not poisoned")
                            .insert(name.clone(), p.clone());
                    }
                };
                let m = self.platform.migrate_via(
                    &name,
                    &body.to,
                    &params,
                    &report,
                    &|vm, _to, port, tls| {
                        Ok(Box::new(RemoteDestination::prepare(
                            &url,
                            peers.clone(),
                            vm,
                            port,
                            tls,
                            false,
                        )?))
                    },
                );
                self.outgoing.lock().expect("not poisoned").remove(&name);
                serde_json::to_value(&m?).unwrap_or(Value::Null)
            }
            AgentRequest::MigrationProgress { name } => {
                let p = self
                    .outgoing
                    .lock()
                    .expect("not poisoned")
                    .get(&name)
                    .cloned();
                serde_json::to_value(p.ok_or(AgentError::NoMigration(name))?).unwrap_or(Value::Null)
            }
            AgentRequest::Incoming(b) => {
                // The record came over the network: its name becomes a path and part of
                // QEMU's options, so it is checked as CLI input is.
                b.vm.spec.validate().map_err(VirtError::BadSpec)?;
                if b.vm.host == self.host {
                    return Err(VirtError::SameHost {
                        vm: b.vm.spec.name.clone(),
                        host: self.host.clone(),
                    }
                    .into());
                }
                let name = b.vm.spec.name.clone();
                if !b.copy_disk && self.platform.disk_copy_needed(&b.vm, &self.host)? {
                    return Err(VirtError::BadSpec(format!(
                        "VM {name}'s disk is in another cluster than {}'s and its source's \
                         agent cannot copy disks: upgrade the source host's dczoned",
                        self.host
                    ))
                    .into());
                }
                let reservation = {
                    let mut incoming = self.incoming.lock().unwrap_or_else(|e| e.into_inner());
                    if incoming.contains_key(&name) {
                        return Err(VirtError::Busy(name).into());
                    }
                    incoming.insert(name.clone(), None);
                    Reservation {
                        map: &self.incoming,
                        name,
                        filled: false,
                    }
                };
                let d = self.platform.launch_incoming_with(
                    &b.vm,
                    &self.host,
                    b.port,
                    !b.postcopy,
                    b.postcopy,
                    b.tls,
                )?;
                let uri = d.uri();
                let copy = d.disk_copy();
                let mut record = b.vm;
                if let Some(c) = &copy {
                    // It runs here on its disk's copy in this host's cluster.
                    record.spec.disk = Some(c.disk.clone());
                }
                reservation.fill(Incoming {
                    dest: d,
                    seen: Instant::now(),
                    record,
                });
                json!({ "uri": uri, "disk_copy": copy })
            }
            AgentRequest::IncomingAlive { name } => {
                let alive = self.with_incoming(&name, |d| Ok(d.alive()))?;
                json!({ "alive": alive })
            }
            AgentRequest::IncomingFinish { name } => {
                // The entry stays in the map, locked, until the VM runs here and its record
                // says so: an `outcome` asked meanwhile waits for the answer.
                let slot = self.incoming_slot(&name)?;
                let mut entry = slot.lock().unwrap_or_else(|e| e.into_inner());
                let Incoming {
                    dest: mut d,
                    record,
                    ..
                } = entry.take().ok_or(AgentError::NoIncoming(name.clone()))?;
                let _gone = Departure {
                    map: &self.incoming,
                    name: &name,
                    slot: &slot,
                };
                match d.finish() {
                    Ok((resume_us, running)) => {
                        if let Err(e) = self.platform.adopt(&record, &self.host, &running) {
                            self.unrecorded
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .insert(name.clone(), running.clone());
                            eprintln!(
                                "dczoned: {name} runs here (pid {}), but its record could not be \
                                 saved: {}",
                                running.pid,
                                dczone_lab::error_chain(&e)
                            );
                        }
                        json!({ "resume_us": resume_us, "running": running })
                    }
                    Err(e) => {
                        d.abort();
                        return Err(e.into());
                    }
                }
            }
            AgentRequest::OpenLeg { name, body } => {
                let vm = self.here(&name)?;
                if body.params.timeout > Duration::from_secs(24 * 3600)
                    || body.params.max_hold > Duration::from_secs(24 * 3600)
                    || body.params.max_drain > Duration::from_secs(24 * 3600)
                {
                    return Err(VirtError::BadSpec(
                        "a migration's timeout, max hold and max drain are at most 24 h".into(),
                    )
                    .into());
                }
                if body.port < 1024 {
                    return Err(VirtError::BadSpec(format!(
                        "migration port {} is privileged; give one of 1024-65535",
                        body.port
                    ))
                    .into());
                }
                if self.legs.contains(&name) {
                    return Err(VirtError::Busy(name).into());
                }
                let url = self.peer_url(&body.to, body.agent.clone())?;
                let peers = self.peers.clone();
                let session = self.platform.open_leg(
                    &vm,
                    &body.to,
                    body.port,
                    &body.params,
                    &|vm, _to, port, tls| {
                        Ok(Box::new(RemoteDestination::prepare(
                            &url,
                            peers.clone(),
                            vm,
                            port,
                            tls,
                            body.postcopy,
                        )?))
                    },
                )?;
                let destination = AgentClient::new(&url, self.peers.clone());
                let (id, view) = self.legs.insert(&name, session, body.params, destination);
                serde_json::to_value(leg::LegAnswer {
                    leg: Some(id),
                    view: Some(view),
                    ..Default::default()
                })
                .unwrap_or(Value::Null)
            }
            AgentRequest::LegStep { name, id, step } => {
                let answer = self
                    .legs
                    .step(&name, id, step)?
                    .ok_or(AgentError::NoMigration(name))?;
                serde_json::to_value(answer).unwrap_or(Value::Null)
            }
            AgentRequest::DbState { site } => {
                self.ha(&site, dczone_ha::control::ControlRequest::Snapshot)?
            }
            AgentRequest::DbSwitchover { site, body } => {
                self.ha(
                    &site,
                    dczone_ha::control::ControlRequest::RequestSwitchover {
                        from: body.from,
                        to: body.to,
                    },
                )?;
                json!({ "requested": true })
            }
            AgentRequest::DbSwitchoverClear { site } => {
                self.ha(&site, dczone_ha::control::ControlRequest::ClearSwitchover)?;
                json!({ "cleared": true })
            }
            AgentRequest::HaStart { site } => self.ha_start(&site)?,
            AgentRequest::HaStop { site } => self.ha_stop(&site)?,
            AgentRequest::DbCredentials { site } => self.db_credentials(&site)?,
            AgentRequest::DbSetPassword { site, body } => {
                self.db_set_password(&site, &body.pgpass)?
            }
            AgentRequest::EtcdStart => self.etcd_start()?,
            AgentRequest::DbFence { site, body } => self.db_fence(&site, body.after_lsn)?,
            AgentRequest::DbPurge { site } => self.db_purge(&site)?,
            AgentRequest::EtcdStatus => self.etcd_status()?,
            AgentRequest::EtcdRebuild(body) => self.etcd_rebuild(body.order)?,
            AgentRequest::EtcdRejoin => self.etcd_rejoin()?,
            AgentRequest::EtcdClear => self.etcd_clear()?,
            AgentRequest::StorageInstall { .. }
            | AgentRequest::StorageView { .. }
            | AgentRequest::StorageStart { .. }
            | AgentRequest::StorageStop { .. }
            | AgentRequest::StorageSetup { .. }
            | AgentRequest::StorageStatus { .. }
            | AgentRequest::StoragePurge { .. }
            | AgentRequest::Backup { .. }
            | AgentRequest::Ledger { .. }
            | AgentRequest::BackupChunk { .. }
            | AgentRequest::BackupCommit { .. }
            | AgentRequest::BackupList { .. }
            | AgentRequest::BackupOrphans { .. }
            | AgentRequest::BackupSpace { .. }
            | AgentRequest::BackupVerify { .. }
            | AgentRequest::BackupDelete { .. }
            | AgentRequest::BackupRestore { .. } => self.storage_request(req)?,
            AgentRequest::CloudExport { name, body } => self.cloud_export(&name, body)?,
            AgentRequest::DbPolicy { site, body } => {
                let tier = body.tier;
                self.ha(
                    &site,
                    dczone_ha::control::ControlRequest::SetPolicy { tier: tier.clone() },
                )?;
                json!({ "policy": tier })
            }
            AgentRequest::IncomingOutcome { name } => {
                // A destination still in the map: waiting for its finish, or running the VM
                // by itself (post-copy, or started without -S), which holds the newer state.
                // Locking it waits for a finish under way: its answer is then final.
                let incoming = self.incoming_slot(&name).ok().and_then(|slot| {
                    let mut entry = slot.lock().unwrap_or_else(|e| e.into_inner());
                    let state = entry.as_mut().map(|inc| {
                        let by_itself = inc.dest.runs_by_itself()
                            || inc
                                .dest
                                .incoming_status()
                                .is_ok_and(|st| st.starts_with("postcopy"));
                        (by_itself, inc.dest.running().clone())
                    });
                    state
                });
                match incoming {
                    Some((true, running)) => json!({ "state": "runs", "running": running }),
                    Some((false, _)) => json!({ "state": "waiting" }),
                    // Finished: the VM runs here, as its record says (a real host's), or as
                    // its QEMU shows (a lab's record moves with the source's side), or as
                    // this agent saw it finish when the record could not be saved.
                    None => match self.platform.running_here(&name, &self.host).or_else(|| {
                        self.unrecorded
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get(&name)
                            .filter(|r| dczone_lab::sys::alive(r.pid))
                            .cloned()
                    }) {
                        Some(running) => json!({ "state": "runs", "running": running }),
                        None => json!({ "state": "none" }),
                    },
                }
            }
            AgentRequest::IncomingStatus { name } => {
                let status = self.with_incoming(&name, |d| Ok(d.incoming_status()?))?;
                json!({ "status": status })
            }
            AgentRequest::IncomingRecover { name, body } => {
                let status =
                    self.with_incoming(&name, |d| Ok(d.recover_step(&body.uri, body.unstick)?))?;
                json!({ "status": status })
            }
            AgentRequest::IncomingAbort { name } => {
                if let Some(mut inc) = self.take_incoming(&name) {
                    inc.dest.abort();
                }
                json!({ "aborted": name })
            }
        })
    }
}

type Shared = Arc<Agent>;

/// The verified certificate of a connection's client (`None`: one without a known role).
#[derive(Debug, Clone)]
pub struct Caller(pub Option<Peer>);

type By = Extension<Caller>;

async fn dispatch(
    agent: Shared,
    Extension(Caller(peer)): By,
    req: AgentRequest,
) -> Result<Json<Value>, AgentError> {
    let need = req.role();
    if peer.as_ref().map(|p| p.role) != Some(need) {
        return Err(AgentError::Forbidden {
            need: match need {
                Role::Host => "a peer host's",
                Role::Operator => "an operator's",
                Role::Consensus => "a consensus party's",
            },
            got: match peer {
                Some(p) => format!("the {} certificate of '{}'", p.role.unit(), p.name),
                None => "a certificate with no role".into(),
            },
        });
    }
    let result = tokio::task::spawn_blocking(move || agent.handle(req)).await;
    result
        .unwrap_or_else(|e| {
            Err(AgentError::Virt(VirtError::Io {
                what: "agent worker".into(),
                source: std::io::Error::other(e.to_string()),
            }))
        })
        .map(Json)
}

/// The HTTP routes.
pub fn router(agent: Shared) -> Router {
    Router::new()
        .route("/v1/health", get(|| async { Json(json!({ "ok": true })) }))
        .route(
            "/v1/vms",
            get(|State(a): State<Shared>, h: By| dispatch(a, h, AgentRequest::ListVms)).post(
                |State(a): State<Shared>, h: By, Json(body): Json<CreateBody>| {
                    dispatch(a, h, AgentRequest::CreateVm(body))
                },
            ),
        )
        .route(
            "/v1/vms/{name}",
            get(
                |State(a): State<Shared>, h: By, UrlPath(name): UrlPath<String>| {
                    dispatch(a, h, AgentRequest::GetVm { name })
                },
            )
            .delete(
                |State(a): State<Shared>, h: By, UrlPath(name): UrlPath<String>| {
                    dispatch(a, h, AgentRequest::DestroyVm { name })
                },
            ),
        )
        .route(
            "/v1/vms/{name}/start",
            post(
                |State(a): State<Shared>, h: By, UrlPath(name): UrlPath<String>| {
                    dispatch(a, h, AgentRequest::StartVm { name })
                },
            ),
        )
        .route(
            "/v1/vms/{name}/stop",
            post(
                |State(a): State<Shared>, h: By, UrlPath(name): UrlPath<String>| {
                    dispatch(a, h, AgentRequest::StopVm { name })
                },
            ),
        )
        .route(
            "/v1/vms/{name}/migrate",
            post(
                |State(a): State<Shared>,
                 h: By,
                 UrlPath(name): UrlPath<String>,
                 Json(body): Json<MigrateBody>| {
                    dispatch(a, h, AgentRequest::Migrate { name, body })
                },
            ),
        )
        .route(
            "/v1/vms/{name}/migration",
            get(
                |State(a): State<Shared>, h: By, UrlPath(name): UrlPath<String>| {
                    dispatch(a, h, AgentRequest::MigrationProgress { name })
                },
            ),
        )
        .route(
            "/v1/incoming",
            post(
                |State(a): State<Shared>, h: By, Json(body): Json<IncomingBody>| {
                    dispatch(a, h, AgentRequest::Incoming(body))
                },
            ),
        )
        .route(
            "/v1/incoming/{name}",
            get(
                |State(a): State<Shared>, h: By, UrlPath(name): UrlPath<String>| {
                    dispatch(a, h, AgentRequest::IncomingAlive { name })
                },
            )
            .delete(
                |State(a): State<Shared>, h: By, UrlPath(name): UrlPath<String>| {
                    dispatch(a, h, AgentRequest::IncomingAbort { name })
                },
            ),
        )
        .route(
            "/v1/incoming/{name}/status",
            get(
                |State(a): State<Shared>, h: By, UrlPath(name): UrlPath<String>| {
                    dispatch(a, h, AgentRequest::IncomingStatus { name })
                },
            ),
        )
        .route(
            "/v1/incoming/{name}/outcome",
            get(
                |State(a): State<Shared>, h: By, UrlPath(name): UrlPath<String>| {
                    dispatch(a, h, AgentRequest::IncomingOutcome { name })
                },
            ),
        )
        .route(
            "/v1/incoming/{name}/recover",
            post(
                |State(a): State<Shared>,
                 h: By,
                 UrlPath(name): UrlPath<String>,
                 Json(body): Json<RecoverBody>| {
                    dispatch(a, h, AgentRequest::IncomingRecover { name, body })
                },
            ),
        )
        .route(
            "/v1/incoming/{name}/finish",
            post(
                |State(a): State<Shared>, h: By, UrlPath(name): UrlPath<String>| {
                    dispatch(a, h, AgentRequest::IncomingFinish { name })
                },
            ),
        )
        .route(
            "/v1/vms/{name}/leg",
            post(
                |State(a): State<Shared>,
                 h: By,
                 UrlPath(name): UrlPath<String>,
                 Json(body): Json<leg::LegBody>| {
                    dispatch(a, h, AgentRequest::OpenLeg { name, body })
                },
            ),
        )
        .route(
            "/v1/vms/{name}/leg/{id}",
            post(
                |State(a): State<Shared>,
                 h: By,
                 UrlPath((name, id)): UrlPath<(String, u64)>,
                 Json(step): Json<leg::LegStep>| {
                    dispatch(a, h, AgentRequest::LegStep { name, id, step })
                },
            ),
        )
        .route(
            "/v1/db/{site}/state",
            get(
                |State(a): State<Shared>, h: By, UrlPath(site): UrlPath<String>| {
                    dispatch(a, h, AgentRequest::DbState { site })
                },
            ),
        )
        .route(
            "/v1/db/{site}/switchover",
            post(
                |State(a): State<Shared>,
                 h: By,
                 UrlPath(site): UrlPath<String>,
                 Json(body): Json<SwitchoverBody>| {
                    dispatch(a, h, AgentRequest::DbSwitchover { site, body })
                },
            )
            .delete(
                |State(a): State<Shared>, h: By, UrlPath(site): UrlPath<String>| {
                    dispatch(a, h, AgentRequest::DbSwitchoverClear { site })
                },
            ),
        )
        .route(
            "/v1/db/{site}/ha-agent",
            post(
                |State(a): State<Shared>, h: By, UrlPath(site): UrlPath<String>| {
                    dispatch(a, h, AgentRequest::HaStart { site })
                },
            )
            .delete(
                |State(a): State<Shared>, h: By, UrlPath(site): UrlPath<String>| {
                    dispatch(a, h, AgentRequest::HaStop { site })
                },
            ),
        )
        .route(
            "/v1/etcd",
            post(|State(a): State<Shared>, h: By| dispatch(a, h, AgentRequest::EtcdStart))
                .get(|State(a): State<Shared>, h: By| dispatch(a, h, AgentRequest::EtcdStatus)),
        )
        .route(
            "/v1/etcd/rebuild",
            post(
                |State(a): State<Shared>, h: By, Json(body): Json<recovery::RebuildBody>| {
                    dispatch(a, h, AgentRequest::EtcdRebuild(body))
                },
            ),
        )
        .route(
            "/v1/etcd/rejoin",
            post(|State(a): State<Shared>, h: By| dispatch(a, h, AgentRequest::EtcdRejoin)),
        )
        .route(
            "/v1/etcd/keys",
            delete(|State(a): State<Shared>, h: By| dispatch(a, h, AgentRequest::EtcdClear)),
        )
        .route(
            "/v1/db/{site}/fence",
            post(
                |State(a): State<Shared>,
                 h: By,
                 UrlPath(site): UrlPath<String>,
                 Json(body): Json<recovery::FenceBody>| {
                    dispatch(a, h, AgentRequest::DbFence { site, body })
                },
            ),
        )
        .route(
            "/v1/db/{site}",
            delete(
                |State(a): State<Shared>, h: By, UrlPath(site): UrlPath<String>| {
                    dispatch(a, h, AgentRequest::DbPurge { site })
                },
            ),
        )
        .route(
            "/v1/db/{site}/credentials",
            get(
                |State(a): State<Shared>, h: By, UrlPath(site): UrlPath<String>| {
                    dispatch(a, h, AgentRequest::DbCredentials { site })
                },
            )
            .put(
                |State(a): State<Shared>,
                 h: By,
                 UrlPath(site): UrlPath<String>,
                 Json(body): Json<PasswordBody>| {
                    dispatch(a, h, AgentRequest::DbSetPassword { site, body })
                },
            ),
        )
        .route(
            "/v1/db/{site}/policy",
            put(
                |State(a): State<Shared>,
                 h: By,
                 UrlPath(site): UrlPath<String>,
                 Json(body): Json<PolicyBody>| {
                    dispatch(a, h, AgentRequest::DbPolicy { site, body })
                },
            ),
        )
        .route(
            "/v1/storage/{cluster}",
            get(
                |State(a): State<Shared>, h: By, UrlPath(cluster): UrlPath<String>| {
                    dispatch(a, h, AgentRequest::StorageView { cluster })
                },
            )
            .put(
                |State(a): State<Shared>,
                 h: By,
                 UrlPath(cluster): UrlPath<String>,
                 Json(body): Json<dczone_storage::operator::InstallBody>| {
                    dispatch(a, h, AgentRequest::StorageInstall { cluster, body })
                },
            )
            .delete(
                |State(a): State<Shared>, h: By, UrlPath(cluster): UrlPath<String>| {
                    dispatch(a, h, AgentRequest::StoragePurge { cluster })
                },
            ),
        )
        .route(
            "/v1/storage/{cluster}/start",
            post(
                |State(a): State<Shared>,
                 h: By,
                 UrlPath(cluster): UrlPath<String>,
                 Json(body): Json<dczone_storage::operator::StartBody>| {
                    dispatch(a, h, AgentRequest::StorageStart { cluster, body })
                },
            ),
        )
        .route(
            "/v1/storage/{cluster}/stop",
            post(
                |State(a): State<Shared>,
                 h: By,
                 UrlPath(cluster): UrlPath<String>,
                 Json(body): Json<dczone_storage::operator::StopBody>| {
                    dispatch(a, h, AgentRequest::StorageStop { cluster, body })
                },
            ),
        )
        .route(
            "/v1/storage/{cluster}/setup",
            post(
                |State(a): State<Shared>,
                 h: By,
                 UrlPath(cluster): UrlPath<String>,
                 Json(body): Json<dczone_storage::operator::SetupBody>| {
                    dispatch(a, h, AgentRequest::StorageSetup { cluster, body })
                },
            ),
        )
        .route(
            "/v1/storage/{cluster}/status",
            get(
                |State(a): State<Shared>, h: By, UrlPath(cluster): UrlPath<String>| {
                    dispatch(a, h, AgentRequest::StorageStatus { cluster })
                },
            ),
        )
        .route(
            "/v1/vms/{name}/ledger",
            post(
                |State(a): State<Shared>,
                 h: By,
                 UrlPath(name): UrlPath<String>,
                 Json(body): Json<storage::LedgerBody>| {
                    dispatch(a, h, AgentRequest::Ledger { name, body })
                },
            ),
        )
        .route(
            "/v1/vms/{name}/backup",
            post(
                |State(a): State<Shared>,
                 h: By,
                 UrlPath(name): UrlPath<String>,
                 Json(body): Json<storage::BackupBody>| {
                    dispatch(a, h, AgentRequest::Backup { name, body })
                },
            ),
        )
        .route(
            "/v1/vms/{name}/cloud-export",
            post(
                |State(a): State<Shared>,
                 h: By,
                 UrlPath(name): UrlPath<String>,
                 Json(body): Json<cloud::ExportBody>| {
                    dispatch(a, h, AgentRequest::CloudExport { name, body })
                },
            ),
        )
        .route(
            "/v1/backup-store/{cluster}",
            get(
                |State(a): State<Shared>, h: By, UrlPath(cluster): UrlPath<String>| {
                    dispatch(a, h, AgentRequest::BackupList { cluster })
                },
            ),
        )
        .route(
            "/v1/backup-store/{cluster}/orphans",
            get(
                |State(a): State<Shared>, h: By, UrlPath(cluster): UrlPath<String>| {
                    dispatch(a, h, AgentRequest::BackupOrphans { cluster })
                },
            ),
        )
        .route(
            "/v1/backup-store/{cluster}/space",
            get(
                |State(a): State<Shared>, h: By, UrlPath(cluster): UrlPath<String>| {
                    dispatch(a, h, AgentRequest::BackupSpace { cluster })
                },
            ),
        )
        .route(
            "/v1/backup-store/{cluster}/restore",
            post(
                |State(a): State<Shared>,
                 h: By,
                 UrlPath(cluster): UrlPath<String>,
                 Json(body): Json<storage::RestoreBody>| {
                    dispatch(a, h, AgentRequest::BackupRestore { cluster, body })
                },
            ),
        )
        .route(
            "/v1/backup-store/{cluster}/{id}",
            put(
                |State(a): State<Shared>,
                 h: By,
                 UrlPath((cluster, id)): UrlPath<(String, String)>,
                 Json(manifest): Json<dczone_storage::backup::Manifest>| {
                    dispatch(
                        a,
                        h,
                        AgentRequest::BackupCommit {
                            cluster,
                            id,
                            manifest,
                        },
                    )
                },
            )
            .delete(
                |State(a): State<Shared>,
                 h: By,
                 UrlPath((cluster, id)): UrlPath<(String, String)>| {
                    dispatch(a, h, AgentRequest::BackupDelete { cluster, id })
                },
            ),
        )
        .route(
            "/v1/backup-store/{cluster}/{id}/verify",
            post(
                |State(a): State<Shared>,
                 h: By,
                 UrlPath((cluster, id)): UrlPath<(String, String)>| {
                    dispatch(a, h, AgentRequest::BackupVerify { cluster, id })
                },
            ),
        )
        .route(
            "/v1/backup-store/{cluster}/{id}/{n}",
            put(
                |State(a): State<Shared>,
                 h: By,
                 UrlPath((cluster, id, n)): UrlPath<(String, String, u32)>,
                 headers: axum::http::HeaderMap,
                 body: axum::body::Bytes| {
                    let arrived_unix_ms = dczone_storage::backup::unix_ms();
                    let sha256 = headers
                        .get(SHA256_HEADER)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    dispatch(
                        a,
                        h,
                        AgentRequest::BackupChunk {
                            cluster,
                            id,
                            n,
                            sha256,
                            bytes: body.to_vec(),
                            arrived_unix_ms,
                        },
                    )
                },
            )
            // A chunk is up to 4 MiB (axum's default limit is 2 MiB).
            .layer(axum::extract::DefaultBodyLimit::max(
                dczone_storage::backup::CHUNK + (1 << 20),
            )),
        )
        .route(
            "/v1/vms/{name}/serial",
            get(
                |State(a): State<Shared>, h: By, UrlPath(name): UrlPath<String>| {
                    dispatch(a, h, AgentRequest::SerialLog { name })
                },
            ),
        )
        .with_state(agent)
}

/// The header a backup chunk's SHA-256 travels in.
pub const SHA256_HEADER: &str = "x-dczone-sha256";

/// How long a TCP connection to an agent may take: two SYN retransmissions (1 s, then
/// 2 s more) on a lossy path, and a margin.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A client of one agent's API (blocking; callers in a lab run it on a thread inside a
/// namespace that reaches the agent).
#[derive(Debug, Clone)]
pub struct AgentClient {
    url: String,
    http: ureq::Agent,
}

/// Why a call to an agent failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The agent answered with an error; `message` is its explanation.
    #[error("{message} (HTTP {code})")]
    Refused { code: u16, message: String },
    /// Nothing listens at the agent's address: the agent is not running.
    #[error("agent {url} is not running: {reason}")]
    Down { url: String, reason: String },
    /// No answer in time (a slow host, a lost packet or a cut path).
    #[error("agent {url} unreachable: {reason}")]
    Unreachable { url: String, reason: String },
}

impl AgentClient {
    /// A client of the agent at `url` (`https://IP:PORT`), authenticated by the
    /// certificate in `tls` (see [`dczone_pki::tls::client_config`]).
    ///
    /// A connection not made within [`CONNECT_TIMEOUT`] fails the call whatever its own
    /// timeout: a cut-off host costs a caller that tries several agents no more.
    pub fn new(url: &str, tls: Arc<rustls::ClientConfig>) -> AgentClient {
        AgentClient {
            url: url.trim_end_matches('/').to_string(),
            http: ureq::AgentBuilder::new()
                .tls_config(tls)
                .timeout_connect(CONNECT_TIMEOUT)
                .build(),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, CallError> {
        let req = self
            .http
            .request(method, &format!("{}{path}", self.url))
            .timeout(timeout);
        let resp = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        self.answer(resp)
    }

    /// `PUT`s raw bytes (a backup chunk) with their SHA-256 in [`SHA256_HEADER`].
    pub fn put_bytes(
        &self,
        path: &str,
        sha256: &str,
        bytes: &[u8],
        timeout: Duration,
    ) -> Result<Value, CallError> {
        let resp = self
            .http
            .request("PUT", &format!("{}{path}", self.url))
            .timeout(timeout)
            .set(SHA256_HEADER, sha256)
            .set("content-type", "application/octet-stream")
            .send_bytes(bytes);
        self.answer(resp)
    }

    fn answer(&self, resp: Result<ureq::Response, ureq::Error>) -> Result<Value, CallError> {
        match resp {
            Ok(r) => r.into_json::<Value>().map_err(|e| CallError::Unreachable {
                url: self.url.clone(),
                reason: format!("unreadable answer: {e}"),
            }),
            Err(ureq::Error::Status(code, r)) => {
                let v: Value = r.into_json().unwrap_or(Value::Null);
                Err(CallError::Refused {
                    code,
                    message: v["error"].as_str().unwrap_or("").to_string(),
                })
            }
            Err(ureq::Error::Transport(t)) if t.kind() == ureq::ErrorKind::ConnectionFailed => {
                Err(CallError::Down {
                    url: self.url.clone(),
                    reason: t.to_string(),
                })
            }
            Err(e) => Err(CallError::Unreachable {
                url: self.url.clone(),
                reason: e.to_string(),
            }),
        }
    }
}

/// The destination of a migration, reached through its host's agent.
struct RemoteDestination {
    client: AgentClient,
    vm: String,
    uri: String,
    /// The agent's last answer to "alive?", and when it was asked.
    checked: Option<(Instant, bool)>,
    /// When the agent last said its destination was alive.
    answered: Instant,
    /// Its export of the disk's copy, when the disk goes along.
    copy: Option<DiskCopy>,
}

/// A destination agent that does not answer for this long counts as gone.
const UNANSWERED: Duration = Duration::from_secs(2);

impl RemoteDestination {
    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, String> {
        self.client
            .call(method, path, body, timeout)
            .map_err(|e| e.to_string())
    }

    fn prepare(
        url: &str,
        peers: Arc<rustls::ClientConfig>,
        vm: &VmRecord,
        port: u16,
        tls: bool,
        postcopy: bool,
    ) -> Result<RemoteDestination, VirtError> {
        let mut d = RemoteDestination {
            client: AgentClient::new(url, peers),
            vm: vm.spec.name.clone(),
            uri: String::new(),
            checked: None,
            answered: Instant::now(),
            copy: None,
        };
        let body = serde_json::to_value(IncomingBody {
            vm: vm.clone(),
            port,
            tls,
            postcopy,
            copy_disk: true,
        })
        .unwrap_or(Value::Null);
        let v = d
            .call("POST", "/v1/incoming", Some(body), Duration::from_secs(30))
            .map_err(|reason| VirtError::MigrationFailed {
                vm: vm.spec.name.clone(),
                source_host: vm.host.clone(),
                reason: format!("the destination agent {url} refused to prepare: {reason}"),
            })?;
        d.uri = v["uri"].as_str().unwrap_or_default().to_string();
        // Strict: a copy the source misread would have it move the memory alone.
        d.copy =
            match &v["disk_copy"] {
                Value::Null => None,
                c => Some(serde_json::from_value(c.clone()).map_err(|e| {
                    VirtError::MigrationFailed {
                        vm: vm.spec.name.clone(),
                        source_host: vm.host.clone(),
                        reason: format!(
                            "the destination agent {url} exported the disk's copy in a form this \
                         agent cannot read ({e}): the hosts' dczoned versions differ"
                        ),
                    }
                })?),
            };
        Ok(d)
    }
}

impl Destination for RemoteDestination {
    fn uri(&self) -> String {
        self.uri.clone()
    }

    fn agent(&self) -> Option<String> {
        Some(self.client.url().to_string())
    }

    fn disk_copy(&self) -> Option<DiskCopy> {
        self.copy.clone()
    }

    fn alive(&mut self) -> bool {
        if let Some((at, ok)) = self.checked {
            if at.elapsed() < Duration::from_millis(200) {
                return ok;
            }
        }
        let path = format!("/v1/incoming/{}", self.vm);
        let ok = match self
            .client
            .call("GET", &path, None, Duration::from_millis(500))
        {
            Ok(v) => {
                let alive = v["alive"] == true;
                if alive {
                    self.answered = Instant::now();
                }
                alive
            }
            // The agent says no (it has no such destination: killed, or reaped), or the
            // agent itself is gone.
            Err(CallError::Refused { .. } | CallError::Down { .. }) => false,
            // No answer: one slow or lost answer is not a dead destination.
            Err(CallError::Unreachable { .. }) => self.answered.elapsed() < UNANSWERED,
        };
        self.checked = Some((Instant::now(), ok));
        ok
    }

    fn finish(&mut self) -> Result<(u64, dczone_hypervisor::Running), VirtError> {
        let path = format!("/v1/incoming/{}/finish", self.vm);
        // Longer than the destination's own finish may take (30 s to load, 30 s to see its
        // RESUME): an answer lost to a short timeout would abort a VM that runs there.
        let v = self
            .call("POST", &path, None, Duration::from_secs(90))
            .map_err(|reason| VirtError::Io {
                what: format!("finish on the destination agent {}", self.client.url()),
                source: std::io::Error::other(reason),
            })?;
        let running = serde_json::from_value(v["running"].clone()).map_err(|e| VirtError::Io {
            what: "read the destination agent's answer".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        Ok((v["resume_us"].as_u64().unwrap_or(0), running))
    }

    fn abort(&mut self) {
        let path = format!("/v1/incoming/{}", self.vm);
        let _ = self.call("DELETE", &path, None, Duration::from_secs(5));
    }

    fn incoming_status(&mut self) -> Result<String, VirtError> {
        let path = format!("/v1/incoming/{}/status", self.vm);
        let v = self
            .call("GET", &path, None, Duration::from_secs(2))
            .map_err(|reason| self.unanswered("its status", reason))?;
        Ok(v["status"].as_str().unwrap_or_default().to_string())
    }

    fn recover_step(&mut self, uri: &str, unstick: bool) -> Result<String, VirtError> {
        let path = format!("/v1/incoming/{}/recover", self.vm);
        let body = serde_json::to_value(RecoverBody {
            uri: uri.into(),
            unstick,
        })
        .unwrap_or(Value::Null);
        let v = self
            .call("POST", &path, Some(body), Duration::from_secs(2))
            .map_err(|reason| self.unanswered("a recovery step", reason))?;
        Ok(v["status"].as_str().unwrap_or_default().to_string())
    }
}

impl RemoteDestination {
    fn unanswered(&self, what: &str, reason: String) -> VirtError {
        VirtError::Io {
            what: format!("{what} from the destination agent {}", self.client.url()),
            source: std::io::Error::other(reason),
        }
    }
}

/// `dczoned` arguments.
#[derive(Debug, Parser)]
#[command(
    name = "dczoned",
    about = "dczone host agent: HTTP API over one host's VMs"
)]
pub struct Args {
    /// The lab this agent's host belongs to (without --zone).
    #[arg(long, env = "DCZONE_LAB", default_value = "dcz")]
    pub lab: String,
    #[arg(long, env = "DCZONE_STATE_DIR", default_value = "/run/dczone")]
    pub state_dir: PathBuf,
    /// A real host: the zone file (an access bundle's `zone.toml`: every host's id, site and
    /// agent endpoint). The agent then runs QEMU in its own network namespace and keeps
    /// its state in --data-dir; nothing of a lab is used.
    #[arg(long)]
    pub zone: Option<PathBuf>,
    /// Where a real host keeps its VMs' records and runtime files (with --zone).
    #[arg(long, default_value = "/var/lib/dczone")]
    pub data_dir: PathBuf,
    /// A real host's bridge for the VMs' TAPs (with --zone).
    #[arg(long, default_value = dczone_lab::HOST_BRIDGE)]
    pub bridge: String,
    /// A real host's uplink, which carries the bridge out (with --zone).
    #[arg(long, default_value = dczone_lab::HOST_UPLINK)]
    pub uplink: String,
    /// The host this agent serves.
    #[arg(long)]
    pub host: String,
    /// Address to listen on; default: the host's agent endpoint in the zone file, or its
    /// lab address, port 7070.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// The host's PKI directory: `ca.crt` (the zone CA), `hosts/<host>.crt` and
    /// `hosts/<host>.key` (see `dczone pki issue`).
    #[arg(long)]
    pub pki: PathBuf,
    /// Run the HA agent of this database site instead of the host agent (with --zone;
    /// the host agent starts it so).
    #[arg(long, hide = true, requires = "zone")]
    pub ha_agent: Option<String>,
}

/// Entry point of `dczoned`.
pub fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

/// `dczoned --zone FILE --ha-agent SITE`: a real host's HA agent, readied and configured
/// from the zone file ([`host_db`]).
fn run_ha_agent(args: &Args, file: &Path, site: &str) -> anyhow::Result<()> {
    let hz = HostZone {
        file: file.to_path_buf(),
        bundle: access::Bundle::read(file)?,
        pki: args.pki.clone(),
        data_dir: args.data_dir.clone(),
    };
    hz.prepare_member(&args.host, site)?;
    let cfg = hz.ha_config(&args.host, site)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(dczone_ha::agent::run(cfg))?;
    Ok(())
}

fn run(args: Args) -> anyhow::Result<()> {
    if let (Some(site), Some(file)) = (&args.ha_agent, &args.zone) {
        return run_ha_agent(&args, file, site);
    }
    // The e2e tests of the migration's failure paths inject faults into a leg here.
    let _failpoints = dczone_virt::failpoints_from_env();
    let exe = std::env::current_exe()?;
    let identity = Identity::host(&args.pki, &args.host);
    let server_tls = dczone_pki::tls::server_config(&identity)?;
    let peers = dczone_pki::tls::client_config(&identity.ca, Some(&identity))?;
    let inputs = dczone_image::ImageInputs::for_executable(&exe);
    let (platform, default_listen, endpoints, dirs, ha_launcher, host_zone) = match &args.zone {
        Some(file) => {
            let bundle = access::Bundle::read(file)?;
            let hosts: Vec<_> = bundle
                .hosts
                .iter()
                .filter_map(|h| match h.address()?.ip() {
                    std::net::IpAddr::V4(ip) => Some((h.id.clone(), h.site.clone(), ip)),
                    std::net::IpAddr::V6(_) => None,
                })
                .collect();
            let mut placement =
                HostPlacement::new(&args.host, &bundle.zone, &args.data_dir, &hosts)?;
            placement.bridge = args.bridge.clone();
            placement.uplink = args.uplink.clone();
            let me = bundle
                .hosts
                .iter()
                .find(|h| h.id == args.host)
                .and_then(|h| h.address());
            let endpoints = bundle
                .hosts
                .iter()
                .map(|h| (h.id.clone(), h.agent.clone()))
                .collect();
            let platform = Platform::on_host(placement, args.pki.clone(), &inputs)?;
            let host_zone = HostZone {
                file: file.clone(),
                bundle,
                pki: args.pki.clone(),
                data_dir: args.data_dir.clone(),
            };
            (
                platform,
                me,
                endpoints,
                HostDirs {
                    db: args.data_dir.join("db"),
                    storage: args.data_dir.join("ceph"),
                },
                None,
                Some(host_zone),
            )
        }
        None => {
            let lab = dczone_lab::Lab::new(&args.lab, &args.state_dir, &exe)?;
            let (host, _) = lab.host(&args.host)?;
            let db_dir = lab.dir().join("db");
            let storage_root = lab.dir().join("ceph").join(&args.host);
            let launcher = HaLauncher {
                lab: lab.clone(),
                state_dir: args.state_dir.clone(),
                exe: exe.with_file_name("dczone"),
            };
            let platform = Platform::open(lab, &inputs)?.with_pki(args.pki.clone());
            let listen = SocketAddr::from((host.ip(), AGENT_PORT));
            (
                platform,
                Some(listen),
                HashMap::new(),
                HostDirs {
                    db: db_dir,
                    storage: storage_root,
                },
                Some(launcher),
                None,
            )
        }
    };
    let listen = args.listen.or(default_listen).ok_or_else(|| {
        anyhow::anyhow!(
            "host {}'s agent endpoint in the zone file is not an IPv4 https://IP:PORT; give --listen",
            args.host
        )
    })?;
    let agent = Arc::new(Agent::new(
        platform,
        args.host.clone(),
        peers,
        endpoints,
        dirs,
        ha_launcher,
        host_zone,
    ));
    let reaper = agent.clone();
    std::thread::Builder::new()
        .name("incoming-reaper".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_millis(500));
            reaper.reap_abandoned();
            reaper.reap_legs();
        })?;
    // Settling may wait on another host's agent: on a thread of its own, so that it never
    // holds up the keepalives above. A line is logged once.
    let settler = agent.clone();
    std::thread::Builder::new()
        .name("settler".into())
        .spawn(move || {
            let mut logged = std::collections::HashSet::new();
            loop {
                std::thread::sleep(Duration::from_millis(500));
                for line in settler.recover_interrupted() {
                    if logged.insert(line.clone()) {
                        eprintln!("dczoned: {line}");
                    }
                }
            }
        })?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let bulk = SocketAddr::new(listen.ip(), bulk_port(listen.port()));
        let bulk_listener = tokio::net::TcpListener::bind(bulk)
            .await
            .map_err(|e| anyhow::anyhow!("bind the bulk port {bulk}: {e}"))?;
        eprintln!(
            "dczoned: serving host {} on https://{listen} (bulk data on port {})",
            args.host,
            bulk.port()
        );
        let app = router(agent);
        tokio::try_join!(
            serve_tls(listener, server_tls.clone(), app.clone()),
            serve_tls(bulk_listener, server_tls, app),
        )?;
        Ok(())
    })
}

/// Serves `app` over mutual TLS: each connection's verified client certificate reaches the
/// handlers as a [`Caller`]. A handshake that fails (no certificate, another CA's) is
/// logged and dropped before any request is read.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
) -> std::io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, remote) = listener.accept().await?;
        // An answer leaves at once: without this, its last TLS record may wait for the
        // ACK of the one before, which the caller delays (Nagle against delayed ACK, ~40 ms).
        let _ = tcp.set_nodelay(true);
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let stream =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        eprintln!("dczoned: refused {remote}: TLS handshake failed: {e}");
                        return;
                    }
                    Err(_) => return,
                };
            let peer = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| Peer::from_der(c));
            let service =
                hyper_util::service::TowerToHyperService::new(app.layer(Extension(Caller(peer))));
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
        });
    }
}
