//! Live migration of one VM or a cluster, with QEMU pre-copy.
//!
//! One [`Session`] per VM drives two QEMUs over QMP:
//!
//! ```text
//!  orchestrator            source QEMU (host A)            destination QEMU (host B)
//!     | launch -incoming defer ----------------------------------> |
//!     | migrate-incoming tcp:B:port -------------------------------> |
//!     | migrate-set-parameters --> |                                 |
//!     | migrate tcp:B:port ------> | ==== RAM pre-copy rounds =====> |   T1
//!     |                            | STOP event (T2 starts)          |
//!     |                            | ==== last dirty pages + state => |   T2
//!     |                            |                   RESUME event (T2 ends)
//!     | quit -------------------> |                                  |
//! ```
//!
//! T1 = migrate command to the source's STOP; T2 = source STOP to destination RESUME, both
//! from QMP event timestamps (one host clock in the lab), reconciled with QEMU's own
//! `downtime` from `query-migrate`.
//!
//! Strategies for a cluster:
//! - `sequential`: one VM after another (OpenStack Nova's default);
//! - `parallel`: all at once, independently (what libvirt gives you);
//! - `coordinated` (the default): all at once, with paced first passes, every VM's dirty
//!   set drained to 1 MiB, then one common stop of every source VM, after which each
//!   migration completes with its VM stopped (the rules: [`crate::switchover`]). The
//!   staggered release that came before it (each VM released to converge by itself, at a
//!   predicted moment) measured 916 ms median SVC-T2 and missed KR1.1 in 3 of 10 runs on a
//!   noisy host; the common stop makes SVC-T2 the largest single T2 by construction;
//! - `postcopy`: the same paced first passes, then one `migrate-start-postcopy` of every VM
//!   at once; a stream broken by a cut path is resumed once the path is back.
//!
//! Every way out of a batch settles every session: finished, aborted (the source runs on,
//! the destination is killed; also by `Drop`, for an early return), or, past the point of
//! no return (a post-copy switch, or a destination that took over), left to the source
//! host's agent through the in-flight marker, which stays until then.
//!
//! Fault-injection points (`FAILPOINTS=<name>=return`, see
//! [`crate::failpoints_from_env`]): `migrate-after-destination` (a destination started,
//! not yet in the marker), `migrate-after-prepare`, `migrate-after-start`,
//! `migrate-after-common-stop`, `migrate-after-takeover`.
//!
//! Parameters (documented choices): `downtime-limit` = 100 ms (the institutions' target;
//! QEMU's default is 300 ms); `max-bandwidth` = 1 GiB/s so that the APN path, not QEMU,
//! is the limit; multifd off: a single TCP stream already fills a lab link and multifd
//! needs the capability on both sides before `migrate-incoming`.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use dczone_hypervisor::{self as hv, Qmp, Running};
use dczone_lab::error_chain;
use dczone_measure::{span_us, union_us, Interval};

use crate::keeper::{FrameKeeper, KeeperReport};
use crate::{Platform, VirtError, VmRecord};

/// How a cluster moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    Sequential,
    Parallel,
    /// Pre-copy with paced first passes, every VM's dirty set brought to a small target,
    /// then one common stop of every source VM; each migration completes with its VM
    /// stopped (see [`switchover`](crate::switchover)).
    Coordinated,
    /// Paced pre-copy first passes, then one post-copy switch of every VM at the same instant
    /// (see [`switchover`](crate::switchover)).
    Postcopy,
}

impl Strategy {
    pub const ALL: [Strategy; 4] = [
        Strategy::Sequential,
        Strategy::Parallel,
        Strategy::Coordinated,
        Strategy::Postcopy,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Strategy::Sequential => "sequential",
            Strategy::Parallel => "parallel",
            Strategy::Coordinated => "coordinated",
            Strategy::Postcopy => "postcopy",
        }
    }
}

/// How a batch of concurrent migrations is driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Batch {
    /// Each VM converges on its own (parallel, sequential).
    Free,
    /// Paced first passes, held VMs, staggered release (coordinated).
    Held,
    /// Paced first passes, held VMs, then every VM switched to post-copy at once.
    Postcopy,
}

/// Tunables of a migration.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Params {
    pub downtime_limit_ms: u64,
    pub max_bandwidth_bytes: u64,
    /// Give up (and keep the source running) after this long.
    pub timeout: Duration,
    /// Coordinated and post-copy: switch every VM after this long since the start, even one
    /// still in its first pass (pre-copy then sends the rest while stopped).
    pub max_hold: Duration,
    /// Coordinated: once every first pass is done, stop after this long even if some
    /// dirty set is still above the drain target.
    pub max_drain: Duration,
    /// Keep the frames sent to a VM during its switchover on the source host and replay
    /// them to the destination after the announce ([`crate::keeper`]).
    pub keep_frames: bool,
    /// Encrypt streams between sites ([`crate::tls`]).
    pub tls: bool,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            downtime_limit_ms: 100,
            max_bandwidth_bytes: 1 << 30,
            timeout: Duration::from_secs(180),
            max_hold: Duration::from_secs(120),
            max_drain: Duration::from_secs(30),
            keep_frames: true,
            tls: true,
        }
    }
}

/// The downtime-limit that holds a VM in pre-copy.
/// The downtime-limit that holds a VM in pre-copy: its convergence threshold is one
/// millisecond of bandwidth (tens of KB). Not zero: QEMU 7.2 only re-syncs the dirty bitmap
/// when the remaining bytes are below the threshold, so with zero it would stop after the
/// first pass with everything dirtied since still to send.
const HOLD_DOWNTIME_MS: u64 = 1;
/// `max-bandwidth` of a VM that is ahead of the cluster during its first pass.
const PACE_SLOW_BYTES: u64 = 2_000_000;
/// A held VM (first pass done, waiting for the others) is sent at this share of its dirty
/// rate, so its remaining never falls under the switchover threshold. At 0.9, QEMU's
/// measured dirty rate was sometimes low enough that a 4 MB/s dirtier converged while held.
const HOLD_SHARE: f64 = 0.5;
const HOLD_MIN_BYTES: u64 = 256 * 1024;
/// The slowest a held or draining VM is ever sent (bytes/s): QEMU still sends a page per
/// 100 ms rate window, so about 40 KB/s.
const TRICKLE_BYTES: u64 = 32 * 1024;
/// Coordinated: each VM's dirty set is steered to this before the common stop, so that
/// what the stopped VMs still send takes tens of milliseconds on the lab's path.
const DRAIN_TARGET_BYTES: u64 = 1 << 20;
/// The steering: a VM is sent at its dirty rate plus its excess over the target spread
/// over this many seconds (a set below the target grows back to it).
const DRAIN_TAU_S: f64 = 1.0;
/// With a 1 ms downtime-limit, a convergence threshold of 4 bytes: less than one page.
const PINNED_SWITCHOVER_BYTES_PER_S: u64 = 4096;
/// The downtime-limit once the VMs are stopped: they converge at once, whatever is left.
const STOPPED_DOWNTIME_MS: u64 = 10_000;
const POLL: Duration = Duration::from_millis(10);
/// While a held batch waits for its switch: a decision 50 ms later moves no stop apart
/// (they are back to back whenever they come), and a leg driven through its agent costs
/// an HTTPS round trip and a QMP command per poll, CPU the guests need.
const HELD_POLL: Duration = Duration::from_millis(50);
/// First self-announce after the switchover, and the spacing of the following ones, ms
/// (QEMU defaults: 50 and 100).
const ANNOUNCE_INITIAL_MS: u64 = 1;
const ANNOUNCE_STEP_MS: u64 = 20;
/// A migration whose stream moves no byte for this long has lost its path (a cut link, a
/// dead peer host) and is cancelled.
const STALL: Duration = Duration::from_secs(10);
const MIGRATION_PORT_BASE: u16 = 4600;
/// A resumed post-copy stream listens this far above the migration's port.
const RECOVERY_PORT_OFFSET: u16 = 100;
/// A post-copy recovery handshake (dirty bitmaps, then RESUME / RESUME_ACK) that takes
/// longer than this is broken off and tried again.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);
/// Between two attempts to resume a post-copy stream.
const RESUME_RETRY: Duration = Duration::from_secs(1);
/// A post-copy stream that moves nothing for this long is paused and resumed (a VM waiting
/// for a page cannot wait [`STALL`]).
const POSTCOPY_STALL: Duration = Duration::from_secs(2);
/// A VM whose disk is in another cluster than its destination's (another region) takes its
/// disk along, as libvirt's `--copy-storage-all` does: the destination QEMU exports a new,
/// empty image of its cluster over NBD, the source mirrors its disk into it
/// (`blockdev-mirror`, sync full) while the VM runs, RAM pre-copy starts once the mirror is
/// in sync (READY), and the switchover waits for the mirror's completion with the source
/// stopped (`pause-before-switchover`). The job, the source's NBD client node and the
/// destination's export:
const MIRROR_JOB: &str = "dczone-mirror";
const MIRROR_TARGET: &str = "dczone-mirror-target";
const DISK_EXPORT: &str = "dczone-disk";
/// The destination's NBD server listens this far above the migration's port.
const NBD_PORT_OFFSET: u16 = 200;
/// The source's mirror completion at the switchover (its last writes) may take this long:
/// well within an agent leg's 30 s step (`dczone_agent::leg`), which waits for it.
const MIRROR_COMPLETION: Duration = Duration::from_secs(15);

/// A disk copied to the destination's cluster during a migration: where the destination's
/// NBD export of the new image listens, and the VM's disk once it runs there.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskCopy {
    pub host: String,
    pub port: u16,
    pub export: String,
    pub disk: hv::DiskSpec,
}

/// What taking a disk along measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskCopyReport {
    pub from_cluster: String,
    pub to_cluster: String,
    pub image: String,
    /// The mirror job's progress counter at READY: the disk's size plus what the guest
    /// rewrote during the copy. Regions never written travel as NBD write-zeroes requests
    /// (a header each), not as data.
    pub mirrored_bytes: u64,
    /// From the mirror's start until it was in sync (READY), ms: the part of T1 before RAM
    /// pre-copy.
    pub copy_ms: f64,
    /// The mirror's completion with the source stopped (inside T2), ms.
    pub completion_ms: f64,
    /// The source's image was removed once the destination ran (false: it is left in its
    /// cluster, and the error says why).
    pub source_removed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_remove_error: Option<String>,
}

/// What one VM's migration measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmMigration {
    pub vm: String,
    pub from: String,
    pub to: String,
    pub t1: Interval,
    pub t2: Interval,
    pub t1_ms: f64,
    pub t2_ms: f64,
    /// QEMU's own figures from `query-migrate`.
    pub qemu_total_ms: u64,
    pub qemu_downtime_ms: u64,
    pub qemu_setup_ms: u64,
    pub bytes_sent: u64,
    pub dirty_pages_rate: u64,
    pub iterations: u64,
    /// Coordinated only: how long the VM was held in pre-copy waiting for the others.
    pub held_ms: f64,
    /// Post-copy only: from the switch (the source's STOP) until the last page arrived,
    /// the time the VM ran at its destination with pages still at its source.
    #[serde(default)]
    pub postcopy_ms: f64,
    /// Post-copy only: times the path failed during post-copy and the migration was
    /// recovered (QEMU's `migrate-pause` / `migrate-recover` / `resume`).
    #[serde(default)]
    pub postcopy_recoveries: u32,
    /// Where T2 goes (pre-copy; from QMP event timestamps, one host clock in the lab):
    /// source STOP to the source's `completed` event (the last byte sent) ...
    #[serde(default)]
    pub t2_send_ms: Option<f64>,
    /// ... to the destination's RESUME: the last bytes in flight, the destination loading
    /// the device state, and the start (QEMU marks the incoming side `completed` only after
    /// it has started the guest, so the two cannot be told apart from events). The announce
    /// follows at once.
    #[serde(default)]
    pub t2_load_resume_ms: Option<f64>,
    /// The frames kept on the source host during T2 and replayed to the destination
    /// (absent when the keeper was off).
    #[serde(default)]
    pub keeper: Option<KeeperReport>,
    /// Why the keeper could not run, if it could not (the migration went on without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keeper_error: Option<String>,
    /// Why a coordinated or post-copy batch switched (stopped or went post-copy) this VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch_reason: Option<crate::switchover::SwitchReason>,
    /// The stream was TLS, both QEMUs holding their host's certificate ([`crate::tls`]).
    #[serde(default)]
    pub tls: bool,
    /// The disk went along to the destination's cluster (another region).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskCopyReport>,
}

/// A cluster's migration.
#[derive(Debug, Clone, Serialize)]
pub struct GroupMigration {
    pub strategy: Strategy,
    pub vms: Vec<VmMigration>,
    /// Earliest T2 start to latest T2 end (the reference's SVC-T2).
    pub svc_t2_ms: f64,
    /// Time during which at least one VM was stopped.
    pub svc_t2_union_ms: f64,
    /// Earliest T1 start to latest T1 end.
    pub svc_t1_ms: f64,
    /// Why the batch switched (coordinated and post-copy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub switch_reason: Option<crate::switchover::SwitchReason>,
}

/// Progress of one VM, for display.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Progress {
    pub vm: String,
    pub status: String,
    pub transferred: u64,
    pub remaining: u64,
    pub rounds: u64,
    pub expected_downtime_ms: u64,
    pub held: bool,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The receiving side of one VM's migration: a QEMU on the destination host waiting for
/// the stream. [`LocalDestination`] drives its QMP from this process; the host agent
/// (`dczoned`) implements it over HTTP, so that a migration is driven between two agents
/// (libvirt's Prepare / Perform / Finish / Confirm phases).
pub trait Destination: Send {
    /// Where the source sends the stream (`tcp:IP:PORT`).
    fn uri(&self) -> String;
    /// Is the destination still there (QEMU alive, its agent answering)?
    fn alive(&mut self) -> bool;
    /// After the source reports `completed`: the destination runs. Returns the time of its
    /// RESUME event (unix us) and the running QEMU.
    fn finish(&mut self) -> Result<(u64, Running), VirtError>;
    /// Kills the destination QEMU (the source keeps the VM).
    fn abort(&mut self);
    /// The destination QEMU, when this process launched it (for [`InFlight`]).
    fn running(&self) -> Option<Running> {
        None
    }
    /// The agent that holds the destination, when another host's agent prepared it (for
    /// [`InFlight`]: the source host's agent asks it what became of the VM).
    fn agent(&self) -> Option<String> {
        None
    }
    /// The disk's copy, when the destination is in another cluster than the VM's disk:
    /// its NBD export waits for the source's mirror.
    fn disk_copy(&self) -> Option<DiskCopy> {
        None
    }
    /// One step of post-copy recovery, called until the source's stream is back: while the
    /// destination still uses the broken stream (`postcopy-active`, or a handshake that
    /// hangs), stop it (`migrate-pause`); once it is `postcopy-paused`, listen on `uri` for
    /// the source's new connection (`migrate-recover`), once: the listener stays open
    /// through failed attempts. Returns the destination's migration status.
    fn recover_step(&mut self, _uri: &str, _unstick: bool) -> Result<String, VirtError> {
        Err(no_recovery())
    }
    /// The incoming migration's status, read without touching it (events and out-of-band
    /// commands only, as in [`Destination::recover_step`]).
    fn incoming_status(&mut self) -> Result<String, VirtError> {
        Err(no_recovery())
    }
}

fn no_recovery() -> VirtError {
    VirtError::MigrationFailed {
        vm: "?".into(),
        source_host: "?".into(),
        reason: "this destination cannot recover a post-copy migration".into(),
    }
}

/// Prepares the destination of `vm` on a host, waiting on a port; the flag asks for an
/// encrypted stream ([`crate::tls`]).
pub type Prepare<'a> =
    &'a (dyn Fn(&VmRecord, &str, u16, bool) -> Result<Box<dyn Destination>, VirtError> + Sync);

/// A destination QEMU on a host of this lab, driven through its QMP socket.
#[derive(Debug)]
pub struct LocalDestination {
    vm: String,
    qmp: Qmp,
    running: Running,
    uri: String,
    /// Started with `-S`: [`Destination::finish`] resumes it (`cont`).
    paused: bool,
    /// `migrate-recover` was issued: it listens for a resumed post-copy stream.
    listening: bool,
    /// The incoming migration's status as its MIGRATION events tell it, during a
    /// post-copy recovery.
    status: String,
    /// The new disk this destination exports for the source's mirror, and the platform
    /// and host that remove it when the destination is aborted.
    copy: Option<(DiskCopy, Platform, String)>,
}

impl LocalDestination {
    pub fn running(&self) -> &Running {
        &self.running
    }

    /// Started without `-S`: it runs the VM as soon as the stream lets it (post-copy),
    /// not only at `finish`.
    pub fn runs_by_itself(&self) -> bool {
        !self.paused
    }
}

impl Destination for LocalDestination {
    fn uri(&self) -> String {
        self.uri.clone()
    }

    fn alive(&mut self) -> bool {
        hv::alive(self.running.pid)
    }

    fn finish(&mut self) -> Result<(u64, Running), VirtError> {
        let err = Session::qmp_err(&self.vm);
        // Wait until the incoming stream is fully loaded, then run it unless it runs by
        // itself. It does not when it waits with -S, nor when the source was paused before
        // it completed (QEMU carries the run state over).
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            let st = self.qmp.execute("query-status", json!({})).map_err(&err)?;
            let status = st["status"].as_str().unwrap_or("").to_string();
            if status != "inmigrate" {
                break status;
            }
            if Instant::now() > deadline {
                return Err(VirtError::MigrationFailed {
                    vm: self.vm.clone(),
                    source_host: "?".into(),
                    reason: "the destination never finished loading".into(),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        if self.copy.is_some() {
            // The source completed its mirror before it let the stream finish: the export
            // has no more use (libvirt's Finish phase stops it too).
            let _ = self
                .qmp
                .execute("block-export-del", json!({ "id": DISK_EXPORT }));
            let _ = self.qmp.execute("nbd-server-stop", json!({}));
        }
        if self.paused || status == "paused" {
            self.qmp.execute("cont", json!({})).map_err(&err)?;
        }
        let resume = self
            .qmp
            .wait_event("RESUME", Duration::from_secs(30))
            .map_err(&err)?;
        Ok((resume.timestamp_us, self.running.clone()))
    }

    fn abort(&mut self) {
        if self.copy.is_some() {
            // Closed cleanly, the copy's image has no watcher left and goes at once; a
            // killed QEMU's watch holds it for minutes. (Never post-copy: a copy is
            // refused with it, so this QEMU waits and cannot run the VM meanwhile.)
            let _ = self.qmp.execute("quit", json!({}));
            let deadline = Instant::now() + Duration::from_secs(5);
            while hv::alive(self.running.pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        hv::kill(&self.running);
        if let Some((copy, platform, host)) = self.copy.take() {
            // The copy never ran anything: its image goes with it.
            let d = &copy.disk;
            if let Err(e) = platform
                .placement()
                .storage(&host)
                .remove_image(&d.cluster, &d.pool, &d.image)
            {
                eprintln!(
                    "the aborted copy of {}'s disk ({}/{} in {}) could not be removed: {}",
                    self.vm,
                    d.pool,
                    d.image,
                    d.cluster,
                    error_chain(&e)
                );
            }
        }
    }

    fn running(&self) -> Option<Running> {
        Some(self.running.clone())
    }

    fn disk_copy(&self) -> Option<DiskCopy> {
        self.copy.as_ref().map(|(c, ..)| c.clone())
    }

    fn incoming_status(&mut self) -> Result<String, VirtError> {
        // Events only: the destination's main loop may be blocked (a device touching a
        // page that the broken stream will not bring), and an in-band command such as
        // query-migrate would hang with it.
        self.qmp
            .poll_events(Duration::from_millis(5))
            .map_err(Session::qmp_err(&self.vm))?;
        for e in self.qmp.take_events_named("MIGRATION") {
            if let Some(s) = e.data["status"].as_str() {
                self.status = s.to_string();
            }
        }
        Ok(self.status.clone())
    }

    fn recover_step(&mut self, uri: &str, unstick: bool) -> Result<String, VirtError> {
        self.incoming_status()?;
        match self.status.as_str() {
            // QEMU accepts migrate-pause only in these two states; in postcopy-recover it
            // aborts the handshake, so only when the driver says it hangs.
            "postcopy-active" => {
                let _ = self.qmp.execute_oob("migrate-pause", json!({}));
            }
            "postcopy-recover" if unstick => {
                let _ = self.qmp.execute_oob("migrate-pause", json!({}));
            }
            // Refused (a state that moved on meanwhile): tried again at the next step.
            "postcopy-paused" if !self.listening => {
                self.listening = self
                    .qmp
                    .execute_oob("migrate-recover", json!({ "uri": uri }))
                    .is_ok();
            }
            _ => {}
        }
        Ok(self.status.clone())
    }
}

/// What a migration in flight leaves on disk (`<vm>/migrating.json`) while its driver holds
/// the VM's migration lock. A driver that dies (a killed `dczone migrate`, a killed agent)
/// leaves a migration nobody finishes: a held VM (throttled, 1 ms downtime-limit) never
/// converges and keeps paying for dirty logging; one that completes by itself leaves the
/// VM running at a destination its record does not name, or stopped at both ends when the
/// destination waits paused for a `finish`. The source host's agent finds the marker with
/// the lock free and settles the migration ([`Platform::recover_interrupted`]), as
/// libvirt's Confirm phase would.
#[derive(Debug, Serialize, Deserialize)]
struct InFlight {
    from: String,
    to: String,
    /// The destination QEMU, when the driver launched it itself (it runs as soon as the
    /// stream is in); `None` when the destination's agent holds it paused until `finish`.
    destination: Option<Running>,
    /// The destination took over (`finish` succeeded, `destination` is the QEMU that runs
    /// the VM): the source must never run again, the record follows the VM.
    #[serde(default)]
    taken_over: bool,
    /// The agent that prepared the destination (another host's): asked by the source
    /// host's agent what became of the VM ([`DestinationFate`]).
    #[serde(default)]
    destination_agent: Option<String>,
    /// The disk's copy in the destination's cluster, when it went along: the record names
    /// it once the VM runs there.
    #[serde(default)]
    disk: Option<hv::DiskSpec>,
}

impl InFlight {
    /// `vm`'s record once it runs at the destination.
    fn moved(&self, vm: &VmRecord, running: Option<Running>) -> VmRecord {
        let mut moved = vm.clone();
        moved.host = self.to.clone();
        moved.running = running;
        if let Some(d) = &self.disk {
            moved.spec.disk = Some(d.clone());
        }
        moved
    }
}

/// What the destination host's agent says of a VM whose migration's driver died after the
/// stream completed: it runs there (its `finish` went through, or it runs by itself), or
/// it does not (no destination is left there: the agent aborted any that waited), or the
/// agent could not say.
#[derive(Debug, Clone)]
pub enum DestinationFate {
    /// It runs there, as this QEMU when the agent could say.
    Runs(Option<Running>),
    NotThere,
    Unknown(String),
}

/// QEMU statuses in which a migration is still under way.
const UNDER_WAY: [&str; 6] = [
    "setup",
    "active",
    "pre-switchover",
    "device",
    "wait-unplug",
    "cancelling",
];

impl Platform {
    fn in_flight_path(&self, vm: &str) -> std::path::PathBuf {
        self.vms_dir().join(vm).join("migrating.json")
    }

    /// Destination QEMUs of migrations in flight (so that an agent starting meanwhile does
    /// not take them for strays).
    pub fn in_flight_destinations(&self) -> Vec<i32> {
        let Ok(vms) = self.list() else {
            return Vec::new();
        };
        vms.iter()
            .filter_map(|v| std::fs::read_to_string(self.in_flight_path(&v.spec.name)).ok())
            .filter_map(|t| serde_json::from_str::<InFlight>(&t).ok())
            .filter_map(|f| f.destination.map(|d| d.pid))
            .collect()
    }

    /// Settles every migration from `host` whose driver is gone (its marker is there, its
    /// lock is free). Under way or completed with the destination gone or never resumed:
    /// cancel, kill the destination, the source runs on. Completed with a destination that
    /// has run (it holds the newer state): roll forward, the record follows the VM there and
    /// the source quits. Returns one line per VM settled.
    ///
    /// A destination another host's agent prepared is asked after through `ask` (its
    /// agent's URL, the VM): a completed stream whose destination may run is rolled forward
    /// if it runs, rolled back if it does not, and left alone (the source stopped, the
    /// marker kept for the next try) while nobody can say: the two must never both run.
    pub fn recover_interrupted(
        &self,
        host: &str,
        ask: &dyn Fn(&str, &str) -> DestinationFate,
    ) -> Vec<String> {
        let Ok(vms) = self.list() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for vm in vms.iter().filter(|v| v.host == host) {
            let name = vm.spec.name.as_str();
            let path = self.in_flight_path(name);
            if !path.exists() {
                continue;
            }
            // Busy: the driver lives and owns the migration.
            let Ok(_lock) = self.migration_lock(name) else {
                continue;
            };
            let (Ok(text), Ok(vm)) = (std::fs::read_to_string(&path), self.get(name)) else {
                continue;
            };
            if let Ok(flight) = serde_json::from_str::<InFlight>(&text) {
                if vm.host == flight.from {
                    match self.settle(&vm, &flight, ask) {
                        Ok(Some(line)) => out.push(line),
                        // Not settled yet: the marker stays for the next try.
                        Ok(None) => continue,
                        // The marker stays: the next try may get further.
                        Err(e) => {
                            out.push(format!(
                                "{name}: settling its interrupted migration failed (to be tried \
                                 again): {e}"
                            ));
                            continue;
                        }
                    }
                }
            }
            let _ = std::fs::remove_file(&path);
        }
        out
    }

    /// The QEMU started for `vm` on `to` by a driver that died before it recorded it in
    /// the marker: found by its pid file in the destination's directory, and only if that
    /// pid is a QEMU named for this VM and not the VM's own.
    /// (A destination prepared by another host's agent is found the same way in a lab; on
    /// real hosts it is on the other machine, where its agent's keepalive reaps it.)
    fn unrecorded_destination(&self, vm: &VmRecord, to: &str) -> Option<Running> {
        if vm.host == to {
            return None;
        }
        let dir = self.vm_dir(&vm.spec.name, to);
        let pid: i32 = std::fs::read_to_string(dir.join("qemu.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let named = format!("\0-name\0{}\0", vm.spec.name);
        let ours = cmdline.windows(named.len()).any(|w| w == named.as_bytes());
        let own = vm.running.as_ref().is_some_and(|r| r.pid == pid);
        (is_qemu(pid) && ours && !own).then(|| Running {
            pid,
            qmp: dir.join("qmp.sock"),
            serial: dir.join("serial.log"),
            tap: vm.spec.tap(),
            namespace: self.placement().namespace(to).unwrap_or_default(),
        })
    }

    /// The QEMU of `name` on `host` (this host) that runs the VM, whatever the record
    /// says: the record's own when it names `host`, else one found by its pid file (a
    /// destination whose record has not followed it yet, as in a lab, whose registry is
    /// shared and moved by the source's side).
    pub fn running_here(&self, name: &str, host: &str) -> Option<Running> {
        let vm = self.get(name).ok()?;
        let qemu = if vm.host == host {
            vm.running.filter(|r| is_qemu(r.pid))
        } else {
            self.unrecorded_destination(&vm, host)
        }?;
        runs(&qemu).then_some(qemu)
    }

    /// A completed migration whose driver died: the source quits and the record follows
    /// the VM to `to`, where `destination` runs it.
    fn roll_forward(
        &self,
        vm: &VmRecord,
        qmp: &mut Qmp,
        src: &Running,
        destination: Running,
        flight: &InFlight,
    ) -> Result<(), VirtError> {
        let _ = qmp.execute("quit", json!({}));
        hv::kill(src);
        self.save_record(&flight.moved(vm, Some(destination)))
    }

    fn settle(
        &self,
        vm: &VmRecord,
        flight: &InFlight,
        ask: &dyn Fn(&str, &str) -> DestinationFate,
    ) -> Result<Option<String>, VirtError> {
        let name = vm.spec.name.as_str();
        let err = Session::qmp_err(name);
        if let (true, Some(d)) = (flight.taken_over, &flight.destination) {
            // The destination runs the VM: the source (quit, or waiting stopped) goes, the
            // record follows.
            if let Some(src) = vm.running.as_ref().filter(|s| is_qemu(s.pid)) {
                hv::kill(src);
            }
            self.save_record(&flight.moved(vm, Some(d.clone())))?;
            return Ok(Some(format!(
                "{name}: its destination on {} had taken over when its driver died; the record follows it",
                flight.to
            )));
        }
        let destination = match flight.destination.clone().filter(|d| is_qemu(d.pid)) {
            Some(d) => Some(d),
            // A destination the marker does not name: its driver died before recording it,
            // or another host's agent prepared it. One that runs the VM took over (its
            // `finish` answer was lost): it is rolled forward below, never killed; one that
            // waits (incoming, or stopped before its `cont`) goes.
            // Another host's agent holds the destination: it is asked below, never guessed
            // at from this host's files.
            None if flight.destination_agent.is_some() => None,
            None => match self.unrecorded_destination(vm, &flight.to) {
                Some(d) if runs(&d) => Some(d),
                Some(d) => {
                    hv::kill(&d);
                    None
                }
                None => None,
            },
        };
        let Some(src) = vm.running.clone() else {
            if let Some(d) = destination.clone().filter(runs) {
                // The source is gone and the destination runs the VM: it is the VM now.
                self.save_record(&flight.moved(vm, Some(d)))?;
                return Ok(Some(format!(
                    "{name}: its source is gone and its destination on {} runs it; the record \
                     follows it",
                    flight.to
                )));
            }
            if let Some(d) = &destination {
                hv::kill(d);
            }
            return Ok(Some(format!(
                "{name}: its migration to {} was interrupted and its source is gone",
                flight.to
            )));
        };
        let mut qmp = Qmp::connect(&src.qmp, Duration::from_secs(5)).map_err(&err)?;
        let info = qmp.execute("query-migrate", json!({})).map_err(&err)?;
        let status = info["status"].as_str().unwrap_or("none").to_string();
        if status.starts_with("postcopy") {
            // Switched to post-copy: the destination holds the newer state and the source
            // must never run again. An active stream completes by itself.
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut st = status.clone();
            while st.starts_with("postcopy-active") && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
                let info = qmp.execute("query-migrate", json!({})).map_err(&err)?;
                st = info["status"].as_str().unwrap_or("none").to_string();
            }
            if st != "completed" {
                return Ok(Some(format!(
                    "{name}: its driver died after its post-copy switch to {} ({st}); the VM \
                     runs there and its source is left stopped, not resumed",
                    flight.to
                )));
            }
            if let Some(d) = destination {
                self.roll_forward(vm, &mut qmp, &src, d, flight)?;
                return Ok(Some(format!(
                    "{name}: its post-copy migration to {} completed after its driver died; \
                     the VM runs there",
                    flight.to
                )));
            }
            return Ok(Some(format!(
                "{name}: its post-copy migration to {} completed after its driver died; its \
                 source is left stopped, not resumed",
                flight.to
            )));
        }
        if status == "completed" {
            if let Some(d) = destination {
                self.roll_forward(vm, &mut qmp, &src, d, flight)?;
                return Ok(Some(format!(
                    "{name}: its migration to {} had completed when its driver died; the VM runs there",
                    flight.to
                )));
            }
            if let Some(agent) = &flight.destination_agent {
                match ask(agent, name) {
                    DestinationFate::Runs(Some(d)) => {
                        // The record follows the VM (on a real host, this host's copy is a
                        // forwarding record that no listing shows).
                        self.roll_forward(vm, &mut qmp, &src, d, flight)?;
                        return Ok(Some(format!(
                            "{name}: its migration to {} had completed when its driver died and \
                             the destination's agent runs it; the source quit",
                            flight.to
                        )));
                    }
                    DestinationFate::Runs(None) => {
                        let _ = qmp.execute("quit", json!({}));
                        hv::kill(&src);
                        if self.get(name).is_ok_and(|r| r.host == flight.from) {
                            self.save_record(&flight.moved(vm, None))?;
                        }
                        return Ok(Some(format!(
                            "{name}: its migration to {} had completed when its driver died and \
                             the destination's agent runs it; the source quit",
                            flight.to
                        )));
                    }
                    // No destination is left there: the source resumes below.
                    DestinationFate::NotThere => {}
                    // The source stays stopped until the destination's agent answers.
                    DestinationFate::Unknown(_) => return Ok(None),
                }
            }
        } else if UNDER_WAY.contains(&status.as_str()) {
            // (QEMU also kicks a migration paused at pre-switchover out of its pause.)
            let _ = qmp.execute("migrate_cancel", json!({}));
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                let st = qmp.execute("query-migrate", json!({})).map_err(&err)?;
                if !UNDER_WAY.contains(&st["status"].as_str().unwrap_or("none")) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // The destination goes first: the two must never run at once.
        if let Some(d) = &destination {
            hv::kill(d);
        }
        let st = qmp.execute("query-status", json!({})).map_err(&err)?;
        if st["running"] == false {
            qmp.execute("cont", json!({})).map_err(&err)?;
        }
        Ok(Some(format!(
            "{name}: its migration to {} was interrupted ({status}); cancelled, the VM runs on {}",
            flight.to, vm.host
        )))
    }
}

impl Platform {
    /// Launches `vm`'s destination QEMU on `to` (a host of this lab), waiting for the stream
    /// on `port`. With `paused`, the guest stays stopped after the stream until
    /// [`Destination::finish`] (the agent protocol); without it, it runs at once.
    /// With `tls`, the stream must be encrypted with `to`'s certificate ([`crate::tls`]).
    pub fn launch_incoming(
        &self,
        vm: &VmRecord,
        to: &str,
        port: u16,
        paused: bool,
        tls: bool,
    ) -> Result<LocalDestination, VirtError> {
        self.launch_incoming_with(vm, to, port, paused, false, tls)
    }

    /// [`Platform::launch_incoming`], ready for post-copy when `postcopy` (QEMU needs the
    /// capability on both sides before the stream starts).
    pub fn launch_incoming_with(
        &self,
        vm: &VmRecord,
        to: &str,
        port: u16,
        paused: bool,
        postcopy: bool,
        tls: bool,
    ) -> Result<LocalDestination, VirtError> {
        let name = vm.spec.name.as_str();
        let dest_host = self.placement().host(to)?;
        self.check_memory(name, to, vm.spec.memory_mib)?;
        let tls_dir = if tls {
            Some(self.qemu_tls_dir(to)?)
        } else {
            None
        };
        let dir = self.vm_dir(name, to);
        let ns = self.placement().namespace(to);
        // A disk in another cluster (another region) goes along: the destination starts
        // on a new image of its own cluster, which it exports for the source's mirror.
        let copy = match &vm.spec.disk {
            Some(d) if postcopy => {
                let cluster = self.destination_cluster(name, &dest_host)?;
                if cluster != d.cluster {
                    return Err(VirtError::BadSpec(format!(
                        "post-copy cannot take VM {name}'s disk from cluster {} to {cluster}: \
                         the VM would run at {to} before its disk is there; use a pre-copy \
                         strategy (coordinated, parallel or sequential)",
                        d.cluster
                    )));
                }
                None
            }
            Some(d) if self.destination_cluster(name, &dest_host)? != d.cluster => {
                let nbd_port = port.checked_add(NBD_PORT_OFFSET).ok_or_else(|| {
                    VirtError::BadSpec(format!(
                        "migration port {port} leaves no room for the disk's NBD export \
                         (port + {NBD_PORT_OFFSET}); use a port below {}",
                        u16::MAX - NBD_PORT_OFFSET
                    ))
                })?;
                let disk = self.create_disk(name, &dest_host, d.size_mib)?;
                Some(DiskCopy {
                    host: dest_host.ip.to_string(),
                    port: nbd_port,
                    export: DISK_EXPORT.into(),
                    disk,
                })
            }
            _ => None,
        };
        let remove_copy = || {
            if let Some(c) = &copy {
                let d = &c.disk;
                let _ = self
                    .placement()
                    .storage(to)
                    .remove_image(&d.cluster, &d.pool, &d.image);
            }
        };
        let mut spec = vm.spec.clone();
        if let Some(c) = &copy {
            spec.disk = Some(c.disk.clone());
        }
        let disk = self.rbd_access(to, &spec);
        let running = hv::launch(&hv::Launch {
            disk: disk.as_ref(),
            namespace: ns.as_deref(),
            dir: &dir,
            spec: &spec,
            kernel: &self.image().kernel,
            initramfs: &self.image().initramfs,
            accel: vm.accel,
            incoming: true,
            paused,
            bridge: self.placement().bridge(),
        })
        .map_err(|source| {
            remove_copy();
            VirtError::Hypervisor {
                vm: name.into(),
                source,
            }
        })?;
        let uri = format!("tcp:{}:{port}", dest_host.ip);
        let setup = || -> Result<Qmp, VirtError> {
            let err = Session::qmp_err(name);
            let mut dst = Qmp::connect(&running.qmp, Duration::from_secs(10)).map_err(&err)?;
            dst.execute(
                "migrate-set-capabilities",
                json!({"capabilities": [
                    {"capability": "events", "state": true},
                    {"capability": "postcopy-ram", "state": postcopy},
                ]}),
            )
            .map_err(&err)?;
            if postcopy && has_postcopy_preempt(&mut dst) {
                dst.execute(
                    "migrate-set-capabilities",
                    json!({"capabilities": [{"capability": "postcopy-preempt", "state": true}]}),
                )
                .map_err(&err)?;
            }
            // The destination announces the VM's MAC (RARP, and a virtio-net announce)
            // as soon as it runs, not after QEMU's default 50 ms, so that the switches learn
            // the new location and clients reach it without waiting.
            dst.execute(
                "migrate-set-parameters",
                json!({"announce-initial": ANNOUNCE_INITIAL_MS, "announce-step": ANNOUNCE_STEP_MS}),
            )
            .map_err(&err)?;
            if let Some(dir) = &tls_dir {
                crate::tls::enable(&mut dst, crate::tls::Endpoint::Server, dir, None)
                    .map_err(&err)?;
            }
            dst.execute("migrate-incoming", json!({ "uri": uri }))
                .map_err(&err)?;
            if let Some(c) = &copy {
                // The new image, activated and writable for the source's mirror before the
                // stream ends (QEMU activates an exported node of an incoming VM), over TLS
                // with the host's certificate when the stream is.
                // (nbd-server-start still takes QEMU's legacy socket address.)
                let mut server = json!({"addr": {
                    "type": "inet",
                    "data": {"host": c.host, "port": c.port.to_string()},
                }});
                if tls_dir.is_some() {
                    server["tls-creds"] = json!(crate::tls::SERVER_CREDS);
                }
                dst.execute("nbd-server-start", server).map_err(&err)?;
                dst.execute(
                    "block-export-add",
                    json!({
                        "type": "nbd",
                        "id": DISK_EXPORT,
                        "node-name": hv::DISK_NODE,
                        "name": c.export,
                        "writable": true,
                    }),
                )
                .map_err(&err)?;
            }
            Ok(dst)
        };
        match setup() {
            Ok(qmp) => Ok(LocalDestination {
                vm: name.to_string(),
                qmp,
                running,
                uri,
                paused,
                listening: false,
                status: "postcopy-active".into(),
                copy: copy.clone().map(|c| (c, self.clone(), to.to_string())),
            }),
            Err(e) => {
                if copy.is_some() {
                    // Quit, not killed: a killed QEMU's watch would hold the copy's image.
                    hv::quit(&running);
                } else {
                    hv::kill(&running);
                }
                remove_copy();
                Err(e)
            }
        }
    }
}

impl Platform {
    /// Does `vm`'s disk have to go along to `to` (its cluster is not `to`'s)?
    pub fn disk_copy_needed(&self, vm: &VmRecord, to: &str) -> Result<bool, VirtError> {
        let Some(d) = &vm.spec.disk else {
            return Ok(false);
        };
        let h = self.placement().host(to)?;
        Ok(self.destination_cluster(&vm.spec.name, &h)? != d.cluster)
    }

    /// The storage cluster a VM's disk lives in at host `h`.
    fn destination_cluster(
        &self,
        vm: &str,
        h: &crate::placement::ZoneHost,
    ) -> Result<String, VirtError> {
        self.placement()
            .storage(&h.id)
            .cluster_for_site(&h.site)
            .map(|c| c.name.clone())
            .map_err(|source| VirtError::Disk {
                vm: vm.into(),
                source,
            })
    }
}

/// One VM's migration in flight.
pub struct Session {
    platform: Platform,
    /// The VM's migration lock, held while the session lives.
    _lock: Option<std::fs::File>,
    vm: VmRecord,
    to: String,
    /// Its in-flight marker ([`InFlight`]), removed once the migration is settled here.
    marker: Option<PathBuf>,
    /// Finished or aborted: nothing is left for [`Drop`] to do.
    settled: bool,
    /// The destination was asked to take over: from then on only an agent that reads the
    /// marker may settle it (rolling forward if the destination runs), never a `cont` of
    /// the source here.
    finishing: bool,
    src: Qmp,
    dst: Box<dyn Destination>,
    started_us: u64,
    stop_us: Option<u64>,
    resume_us: Option<u64>,
    held_since: Option<Instant>,
    held_ms: f64,
    throttled: bool,
    /// The `max-bandwidth` last set on the source (0: never set by pacing).
    bandwidth: u64,
    last: Value,
    progressed_at: Instant,
    last_transferred: u64,
    done: bool,
    /// Prepared for post-copy (the capability on both sides).
    postcopy: bool,
    /// When `migrate-start-postcopy` was sent: from then on the VM must never resume at
    /// its source.
    switched: bool,
    /// When the source reported `completed` (unix us, our poll).
    completed_us: Option<u64>,
    /// The source's `MIGRATION completed` event (unix us, QEMU's timestamp).
    sent_us: Option<u64>,
    recoveries: u32,
    resume_attempts: u32,
    /// When the batch first saw its first pass over RAM done.
    first_pass_ended: Option<Instant>,
    switch_reason: Option<crate::switchover::SwitchReason>,
    keeper: Option<FrameKeeper>,
    keeper_error: Option<String>,
    /// Bytes dirty at the last dirty-bitmap sync (the first `remaining` seen after it).
    dirty_set: u64,
    sync_seen: u64,
    /// When that sync was first seen, and the dirty rate measured from consecutive ones
    /// (bytes/s): the dirty set over the round it was dirtied in.
    sync_at: Option<Instant>,
    own_rate: u64,
    /// The convergence threshold is pinned near zero (`avail-switchover-bandwidth`): the
    /// VM converges on its own only after a round in which its guest dirtied nothing.
    pin_threshold: bool,
    /// The stream is TLS.
    tls: bool,
    /// The disk goes along to the destination's cluster ([`DiskCopy`]).
    copy: Option<DiskCopy>,
    mirror: Mirror,
}

/// The source's side of a disk copy ([`DiskCopy`]).
#[derive(Debug, Default)]
struct Mirror {
    started_us: u64,
    /// When the mirror was first in sync (its BLOCK_JOB_READY, or `ready` in its poll).
    ready_us: Option<u64>,
    offset: u64,
    len: u64,
    /// The job ended: `Ok` completed in sync, `Err` why not.
    ended: Option<Result<(), String>>,
    completion_ms: f64,
    /// RAM pre-copy was asked for and waits for READY.
    deferred: bool,
    /// Completed at `pre-switchover`, and the stream told to go on.
    continued: bool,
}

impl Session {
    fn qmp_err(vm: &str) -> impl Fn(hv::QmpError) -> VirtError + '_ {
        move |source| VirtError::Qmp {
            vm: vm.to_string(),
            source,
        }
    }

    /// Prepares the destination, waiting for the incoming stream.
    /// `tls`: the source's credentials directory, for an encrypted stream.
    fn prepare(
        platform: &Platform,
        vm: &VmRecord,
        to: &str,
        port: u16,
        prepare: Prepare<'_>,
        tls: Option<PathBuf>,
    ) -> Result<Session, VirtError> {
        let name = vm.spec.name.as_str();
        let src_running = vm
            .running
            .clone()
            .ok_or_else(|| VirtError::NotRunning(name.into()))?;
        if vm.host == to {
            return Err(VirtError::SameHost {
                vm: name.into(),
                host: to.into(),
            });
        }
        let encrypted = tls.is_some();
        let mut dst = prepare(vm, to, port, encrypted)?;
        let connect = || -> Result<Qmp, VirtError> {
            let err = Self::qmp_err(name);
            let mut src = Qmp::connect(&src_running.qmp, Duration::from_secs(10)).map_err(&err)?;
            let copy = dst.disk_copy();
            // Set either way: a QEMU that once took its disk along must not pause before
            // the switchover of a later migration that does not.
            src.execute(
                "migrate-set-capabilities",
                json!({"capabilities": [
                    {"capability": "events", "state": true},
                    {"capability": "pause-before-switchover", "state": copy.is_some()},
                ]}),
            )
            .map_err(&err)?;
            match &tls {
                Some(dir) => {
                    // The destination's certificate must name the address the stream goes to.
                    let uri = dst.uri();
                    let host = uri
                        .strip_prefix("tcp:")
                        .and_then(|r| r.rsplit_once(':'))
                        .map(|(h, _)| h.to_string());
                    crate::tls::enable(
                        &mut src,
                        crate::tls::Endpoint::Client,
                        dir,
                        host.as_deref(),
                    )
                    .map_err(&err)?;
                }
                None => crate::tls::disable(&mut src).map_err(&err)?,
            }
            if let Some(c) = &copy {
                start_mirror(&mut src, c, tls.is_some()).map_err(&err)?;
            }
            Ok(src)
        };
        let mirror = Mirror {
            started_us: now_us(),
            ..Mirror::default()
        };
        let copy = dst.disk_copy();
        match connect() {
            Ok(src) => Ok(Session {
                platform: platform.clone(),
                _lock: None,
                vm: vm.clone(),
                to: to.to_string(),
                marker: None,
                settled: false,
                finishing: false,
                src,
                dst,
                started_us: 0,
                stop_us: None,
                resume_us: None,
                held_since: None,
                held_ms: 0.0,
                throttled: false,
                bandwidth: 0,
                last: Value::Null,
                progressed_at: Instant::now(),
                last_transferred: 0,
                done: false,
                postcopy: false,
                switched: false,
                completed_us: None,
                sent_us: None,
                recoveries: 0,
                resume_attempts: 0,
                first_pass_ended: None,
                switch_reason: None,
                keeper: None,
                keeper_error: None,
                dirty_set: u64::MAX,
                sync_seen: 0,
                sync_at: None,
                own_rate: 0,
                pin_threshold: false,
                tls: encrypted,
                copy,
                mirror,
            }),
            Err(e) => {
                dst.abort();
                Err(e)
            }
        }
    }

    fn start(&mut self, hold: bool, postcopy: bool, params: &Params) -> Result<(), VirtError> {
        let err = Self::qmp_err(&self.vm.spec.name);
        if self.started_us != 0 {
            return Err(VirtError::Busy(self.vm.spec.name.clone()));
        }
        self.postcopy = postcopy;
        if self.postcopy {
            let preempt = has_postcopy_preempt(&mut self.src);
            self.src
                .execute(
                    "migrate-set-capabilities",
                    json!({"capabilities": [
                        {"capability": "postcopy-ram", "state": true},
                        {"capability": "postcopy-preempt", "state": preempt},
                    ]}),
                )
                .map_err(&err)?;
        }
        let downtime_ms = if hold {
            HOLD_DOWNTIME_MS
        } else {
            params.downtime_limit_ms
        };
        self.src
            .execute(
                "migrate-set-parameters",
                json!({"downtime-limit": downtime_ms, "max-bandwidth": params.max_bandwidth_bytes}),
            )
            .map_err(&err)?;
        if hold {
            self.held_since = Some(Instant::now());
        }
        if hold && !self.postcopy {
            self.pin_threshold = pin_switchover_threshold(&mut self.src, true);
        }
        if self.copy.is_some() {
            // T1 counts from the disk copy's start; RAM pre-copy follows once it is in
            // sync ([`Session::poll`]).
            self.started_us = self.mirror.started_us;
            self.mirror.deferred = true;
            return Ok(());
        }
        self.started_us = now_us();
        self.src
            .execute("migrate", json!({ "uri": self.dst.uri() }))
            .map_err(&err)?;
        Ok(())
    }

    /// A disk copy in its first pass: follows the mirror, and sends the deferred
    /// `migrate` once it is in sync. Returns whether RAM pre-copy has started.
    fn poll_mirror(&mut self) -> Result<bool, VirtError> {
        let name = self.vm.spec.name.clone();
        let jobs = self
            .src
            .execute("query-block-jobs", json!({}))
            .map_err(Self::qmp_err(&name))?;
        for ev in self.src.take_events() {
            self.note(&ev);
        }
        if let Some(j) = jobs
            .as_array()
            .and_then(|a| a.iter().find(|j| j["device"] == MIRROR_JOB))
        {
            let offset = j["offset"].as_u64().unwrap_or(0);
            if offset != self.mirror.offset {
                self.mirror.offset = offset;
                self.progressed_at = Instant::now();
            }
            self.mirror.len = j["len"].as_u64().unwrap_or(0);
            if j["ready"] == true && self.mirror.ready_us.is_none() {
                self.mirror.ready_us = Some(now_us());
            }
        }
        self.last = json!({"status": "disk-copy", "ram": {
            "transferred": self.mirror.offset,
            "remaining": self.mirror.len.saturating_sub(self.mirror.offset),
        }});
        if self.mirror.ready_us.is_none() || !self.mirror.deferred {
            return Ok(!self.mirror.deferred);
        }
        self.mirror.deferred = false;
        self.progressed_at = Instant::now();
        self.src
            .execute("migrate", json!({ "uri": self.dst.uri() }))
            .map_err(Self::qmp_err(&name))?;
        Ok(true)
    }

    /// At `pre-switchover` (the source stopped, its RAM sent): the mirror completes, its
    /// last writes in the destination's image, and the stream goes on to the switchover.
    fn complete_mirror(&mut self) -> Result<(), VirtError> {
        let name = self.vm.spec.name.clone();
        let owned = name.clone();
        let err = Self::qmp_err(&owned);
        let t = Instant::now();
        if self.mirror.ended.is_none() {
            // A mirror in sync, cancelled without force, completes: its target holds the
            // whole disk (QEMU's "soft cancel" of a READY job).
            self.src
                .execute("block-job-cancel", json!({ "device": MIRROR_JOB }))
                .map_err(&err)?;
        }
        while self.mirror.ended.is_none() && t.elapsed() < MIRROR_COMPLETION {
            self.src
                .poll_events(Duration::from_millis(5))
                .map_err(&err)?;
            for ev in self.src.take_events() {
                self.note(&ev);
            }
        }
        self.mirror.completion_ms = t.elapsed().as_secs_f64() * 1e3;
        match self.mirror.ended.clone() {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                return Err(VirtError::MigrationFailed {
                    vm: name,
                    source_host: self.vm.host.clone(),
                    reason: format!("its disk's copy to {} failed: {e}", self.to),
                })
            }
            None => {
                return Err(VirtError::MigrationFailed {
                    vm: name,
                    source_host: self.vm.host.clone(),
                    reason: format!(
                        "its disk's copy to {} did not complete within {} s",
                        self.to,
                        MIRROR_COMPLETION.as_secs()
                    ),
                })
            }
        }
        let _ = self
            .src
            .execute("blockdev-del", json!({ "node-name": MIRROR_TARGET }));
        self.src
            .execute("migrate-continue", json!({ "state": "pre-switchover" }))
            .map_err(&err)?;
        Ok(())
    }

    /// Polls the source; returns the migration status.
    fn poll(&mut self) -> Result<String, VirtError> {
        let copy_ready = self.copy.is_none() || !self.mirror.deferred || self.poll_mirror()?;
        if let (Some(_), Some(Err(e))) = (&self.copy, &self.mirror.ended) {
            return Err(VirtError::MigrationFailed {
                vm: self.vm.spec.name.clone(),
                source_host: self.vm.host.clone(),
                reason: format!("its disk's copy to {} failed: {e}", self.to),
            });
        }
        if !copy_ready {
            return Ok("disk-copy".into());
        }
        let info = self
            .src
            .execute("query-migrate", json!({}))
            .map_err(Self::qmp_err(&self.vm.spec.name))?;
        for ev in self.src.take_events() {
            self.note(&ev);
        }
        let status = info["status"].as_str().unwrap_or("none").to_string();
        if status == "pre-switchover" && !self.mirror.continued {
            self.complete_mirror()?;
            self.mirror.continued = true;
            // The stream stood still while the mirror completed: not a stall.
            self.progressed_at = Instant::now();
        }
        if status == "completed" && self.completed_us.is_none() {
            self.completed_us = Some(now_us());
        }
        let sync = info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0);
        let remaining = info["ram"]["remaining"].as_u64().unwrap_or(u64::MAX);
        if sync != self.sync_seen {
            let now = Instant::now();
            if let (Some(at), true) = (self.sync_at, self.sync_seen >= 2) {
                let round = now.duration_since(at).as_secs_f64().max(0.02);
                let rate = (remaining as f64 / round) as u64;
                self.own_rate = if self.own_rate == 0 {
                    rate
                } else {
                    (self.own_rate + rate) / 2
                };
            }
            self.sync_seen = sync;
            self.sync_at = Some(now);
            self.dirty_set = remaining;
        } else {
            self.dirty_set = self.dirty_set.max(remaining);
        }
        let transferred = info["ram"]["transferred"].as_u64().unwrap_or(0);
        if transferred != self.last_transferred {
            self.last_transferred = transferred;
            self.progressed_at = Instant::now();
        }
        self.last = info;
        Ok(status)
    }

    /// Records the source events T1 and T2 are measured from.
    fn note(&mut self, ev: &hv::Event) {
        if ev.name == "STOP" && self.stop_us.is_none() {
            self.stop_us = Some(ev.timestamp_us);
        }
        if ev.name == "MIGRATION" && ev.data["status"] == "completed" {
            self.sent_us = Some(ev.timestamp_us);
        }
        if ev.data["device"] == MIRROR_JOB {
            match ev.name.as_str() {
                "BLOCK_JOB_READY" => {
                    self.mirror.ready_us.get_or_insert(ev.timestamp_us);
                }
                "BLOCK_JOB_COMPLETED" => {
                    self.mirror.ended = Some(match ev.data["error"].as_str() {
                        Some(e) => Err(e.to_string()),
                        None if self.mirror.ready_us.is_none() => {
                            Err("the mirror ended before it was in sync".into())
                        }
                        None => Ok(()),
                    });
                }
                "BLOCK_JOB_CANCELLED" => {
                    self.mirror.ended = Some(Err("the mirror was cancelled".into()));
                }
                "BLOCK_JOB_ERROR" => {
                    self.mirror.ended = Some(Err(format!(
                        "{} error on the copy",
                        ev.data["operation"].as_str().unwrap_or("an I/O")
                    )));
                }
                _ => {}
            }
        }
    }

    /// In the first pass over RAM (no dirty-bitmap re-sync yet)?
    fn first_pass(&self) -> bool {
        !self.done && self.last["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) < 2
    }

    /// Fraction of RAM the first pass has covered.
    fn first_pass_progress(&self) -> f64 {
        let ram = &self.last["ram"];
        let total = ram["total"].as_f64().unwrap_or(0.0);
        let remaining = ram["remaining"].as_f64().unwrap_or(total);
        if total > 0.0 {
            1.0 - remaining / total
        } else {
            0.0
        }
    }

    /// Throttles (or un-throttles) the VM's migration stream.
    fn pace(&mut self, slow: bool, params: &Params) -> Result<(), VirtError> {
        let bw = if slow {
            PACE_SLOW_BYTES
        } else {
            params.max_bandwidth_bytes
        };
        self.set_bandwidth(bw)?;
        self.throttled = slow;
        Ok(())
    }

    /// The guest's dirty rate as QEMU last measured it, bytes/s (0 before the first sync).
    fn dirty_rate(&self) -> u64 {
        let ram = &self.last["ram"];
        ram["dirty-pages-rate"].as_u64().unwrap_or(0) * ram["page-size"].as_u64().unwrap_or(4096)
    }

    /// Holds a VM that finished its first pass: it is sent a little slower than it dirties
    /// (HOLD_SHARE of its dirty rate), so its remaining never drops under the threshold
    /// (no premature switchover) and the backlog it builds meanwhile stays small. With the
    /// threshold pinned it cannot converge anyway: it is steered like a draining VM, its
    /// set kept at the target.
    fn hold(&mut self, params: &Params) -> Result<(), VirtError> {
        if self.pin_threshold {
            return self.steer(params);
        }
        let rate = self.dirty_rate();
        let bw = ((rate as f64 * HOLD_SHARE) as u64).max(HOLD_MIN_BYTES);
        self.set_bandwidth(if rate == 0 { PACE_SLOW_BYTES } else { bw })?;
        self.throttled = true;
        Ok(())
    }

    /// Steers the dirty set of a VM past its first pass to [`DRAIN_TARGET_BYTES`]: sent at
    /// its dirty rate plus the excess over [`DRAIN_TAU_S`]. A round then lasts about the
    /// time it took to dirty its set, so the set shrinks towards the target without ever
    /// collapsing: at full speed the set of a slow dirtier fell to nothing within a few
    /// rounds of milliseconds, faster than QMP polling can react, and QEMU converged and
    /// stopped the VM on its own, seconds before the others (seen here: 2.6 s SVC-T2).
    /// The rate is measured from consecutive syncs; QEMU's `dirty-pages-rate` read up to 7x
    /// the writer's rate here.
    fn steer(&mut self, params: &Params) -> Result<(), VirtError> {
        let rate = if self.own_rate > 0 {
            self.own_rate
        } else {
            self.dirty_rate()
        };
        if self.dirty_set == u64::MAX {
            return self.pace(false, params);
        }
        // A guest that dirties nothing (an idle one, or one starved of CPU on a busy host:
        // seen when a build ran beside a benchmark) must not be sent its set at full speed,
        // nor at a rate that empties it in a few seconds: with nothing left, QEMU converges
        // and stops the VM on its own, before the others are ready (SVC-T2 1.8 s). At the
        // trickle, a 1 MiB set lasts half a minute, longer than the drain may.
        let excess = self.dirty_set as f64 - DRAIN_TARGET_BYTES as f64;
        let bw = (rate as f64 + excess / DRAIN_TAU_S).max(TRICKLE_BYTES as f64) as u64;
        self.set_bandwidth(bw.min(params.max_bandwidth_bytes))?;
        self.throttled = true;
        Ok(())
    }

    fn set_bandwidth(&mut self, bw: u64) -> Result<(), VirtError> {
        // Only a change of more than 10 % is worth a QMP round trip.
        let close = self.bandwidth != 0 && bw.abs_diff(self.bandwidth) * 10 < self.bandwidth;
        if close {
            return Ok(());
        }
        self.src
            .execute("migrate-set-parameters", json!({"max-bandwidth": bw}))
            .map_err(Self::qmp_err(&self.vm.spec.name))?;
        self.bandwidth = bw;
        Ok(())
    }

    /// Stops the source VM (the common stop of a coordinated batch): T2 starts here.
    fn stop(&mut self) -> Result<(), VirtError> {
        self.src
            .execute("stop", json!({}))
            .map_err(Self::qmp_err(&self.vm.spec.name))?;
        Ok(())
    }

    /// After the common stop: whatever is left converges now (nothing dirties it any
    /// more), at full speed.
    fn complete_stopped(&mut self, params: &Params) -> Result<(), VirtError> {
        if let Some(since) = self.held_since.take() {
            self.held_ms = since.elapsed().as_secs_f64() * 1e3;
        }
        if self.pin_threshold {
            pin_switchover_threshold(&mut self.src, false);
        }
        self.src
            .execute(
                "migrate-set-parameters",
                json!({"downtime-limit": STOPPED_DOWNTIME_MS, "max-bandwidth": params.max_bandwidth_bytes}),
            )
            .map_err(Self::qmp_err(&self.vm.spec.name))?;
        self.throttled = false;
        self.bandwidth = params.max_bandwidth_bytes;
        Ok(())
    }

    fn unthrottle(&mut self, params: &Params) -> Result<(), VirtError> {
        if let Some(since) = self.held_since.take() {
            self.held_ms = since.elapsed().as_secs_f64() * 1e3;
        }
        self.src
            .execute(
                "migrate-set-parameters",
                json!({"max-bandwidth": params.max_bandwidth_bytes}),
            )
            .map_err(Self::qmp_err(&self.vm.spec.name))?;
        self.throttled = false;
        self.bandwidth = params.max_bandwidth_bytes;
        Ok(())
    }

    /// Switches to post-copy: the source stops at its next iteration, sends the device
    /// state, and the destination runs, fetching the pages it still lacks.
    fn switch(&mut self) -> Result<(), VirtError> {
        // The source stops at this command and never runs again: what reaches it from
        // now on belongs to the destination.
        if let Some(k) = &self.keeper {
            k.replay_from(now_us());
        }
        self.src
            .execute("migrate-start-postcopy", json!({}))
            .map_err(Self::qmp_err(&self.vm.spec.name))?;
        self.switched = true;
        Ok(())
    }

    /// The post-copy stream broke (a cut path): pause both ends, and resume the stream on a
    /// new connection as soon as the path carries it, until `deadline`. The VM keeps
    /// running at its destination meanwhile; a page it lacks stalls it until the resume.
    ///
    /// QEMU's rules, which this follows (`migration/migration.c`, 9.1 to 10.x):
    /// - a silently cut path is noticed by neither end (no keepalive), so both are paused
    ///   with `migrate-pause`, which is accepted only in `postcopy-active` and
    ///   `postcopy-recover`. The source goes first: a source whose stream another end
    ///   broke may fail instead of pausing;
    /// - a source that has sent every page (`remaining` 0) is completing: it waits on its
    ///   return path for the destination's word that it has everything, and a break then
    ///   fails the migration. Neither end is paused: the kernel's TCP delivers what is
    ///   queued once the path is back, and the migration completes by itself;
    /// - the destination listens (`migrate-recover`) only once `postcopy-paused`, and keeps
    ///   listening through failed attempts;
    /// - `migrate resume=true` connects in `postcopy-recover-setup` with the kernel's SYN
    ///   retries and no timeout of QEMU's; a failed connect or handshake goes back to
    ///   `postcopy-paused`, and is retried;
    /// - `migrate-pause` during `postcopy-recover` aborts the handshake: only a handshake
    ///   that hangs for [`HANDSHAKE_TIMEOUT`] is broken off.
    fn recover(&mut self, deadline: Instant) -> Result<(), VirtError> {
        let name = self.vm.spec.name.clone();
        let err = Self::qmp_err(&name);
        let uri = recovery_uri(&self.dst.uri());
        let mut resumed_at: Option<Instant> = None;
        let mut handshake_since: Option<Instant> = None;
        let mut last = String::new();
        while Instant::now() < deadline {
            let st = self.src.execute("query-migrate", json!({})).map_err(&err)?;
            let src = st["status"].as_str().unwrap_or("").to_string();
            let remaining = st["ram"]["remaining"].as_u64().unwrap_or(u64::MAX);
            let hung = handshake_since.is_some_and(|t| t.elapsed() > HANDSHAKE_TIMEOUT);
            let completing = src == "postcopy-active" && resumed_at.is_none() && remaining == 0;
            match src.as_str() {
                "completed" => return Ok(()),
                "postcopy-active" if resumed_at.is_some() => {
                    self.recoveries += 1;
                    self.progressed_at = Instant::now();
                    return Ok(());
                }
                // Everything sent: waits for the path, untouched (see above).
                "postcopy-active" if completing => {}
                // Still on the broken stream.
                "postcopy-active" => {
                    let _ = self.src.execute("migrate-pause", json!({}));
                }
                "postcopy-recover" => {
                    handshake_since.get_or_insert_with(Instant::now);
                    if hung {
                        let _ = self.src.execute("migrate-pause", json!({}));
                        handshake_since = None;
                    }
                }
                "postcopy-paused" => handshake_since = None,
                "failed" | "cancelled" => {}
                // postcopy-recover-setup: connecting.
                _ => {}
            }
            // A destination that does not answer this time is asked again at the next step.
            let dst = if completing {
                self.dst.incoming_status()
            } else {
                self.dst.recover_step(&uri, hung)
            }
            .unwrap_or_else(|e| format!("unknown ({e})"));
            last = format!(
                "source {src}{}{}, destination {dst}, {} resume attempts",
                if completing {
                    " with every page sent"
                } else {
                    ""
                },
                st["error-desc"]
                    .as_str()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default(),
                self.resume_attempts
            );
            if src == "postcopy-paused"
                && dst == "postcopy-paused"
                && resumed_at.is_none_or(|t| t.elapsed() > RESUME_RETRY)
            {
                // The destination listens. Refused or lost while the path is still cut:
                // tried again.
                let _ = self
                    .src
                    .execute("migrate", json!({ "uri": uri, "resume": true }));
                resumed_at = Some(Instant::now());
                self.resume_attempts += 1;
            }
            if dst == "completed" {
                // Every page arrived: the source's own status no longer matters.
                return Ok(());
            }
            // A source that failed cannot be resumed; nor can a destination that failed (it
            // had not started running yet when the stream broke, so it could not pause).
            if matches!(src.as_str(), "failed" | "cancelled") || dst == "failed" {
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        Err(VirtError::PostcopyUnfinished {
            vm: name.clone(),
            source_host: self.vm.host.clone(),
            destination: self.to.clone(),
            reason: format!("its stream broke and could not be resumed: {last}"),
        })
    }

    fn progress(&self) -> Progress {
        let ram = &self.last["ram"];
        Progress {
            vm: self.vm.spec.name.clone(),
            status: self.last["status"].as_str().unwrap_or("setup").to_string(),
            transferred: ram["transferred"].as_u64().unwrap_or(0),
            remaining: ram["remaining"].as_u64().unwrap_or(0),
            rounds: ram["dirty-sync-count"].as_u64().unwrap_or(0),
            expected_downtime_ms: self.last["expected-downtime"].as_u64().unwrap_or(0),
            held: self.held_since.is_some(),
        }
    }

    /// After `completed`: the destination runs (or, if it cannot be confirmed, the source
    /// resumes and the destination is killed), the source quits, the record moves.
    ///
    /// The frame keeper keeps running: it replays after the announce and ends by itself
    /// ([`Leg::keeper_report`] waits for it); waiting for it here would delay the next VM's
    /// resume.
    fn finish_here(&mut self) -> Result<VmMigration, VirtError> {
        let name = self.vm.spec.name.clone();
        if !self.done || self.settled {
            // Nothing happens: a finish before `completed` would quit a source that still
            // holds pages (post-copy) or the VM's only copy.
            return Err(VirtError::MigrationFailed {
                vm: name,
                source_host: self.vm.host.clone(),
                reason: "finish asked before the migration completed (or after it was settled)"
                    .into(),
            });
        }
        let err = Self::qmp_err(&name);
        fail::fail_point!("migrate-before-finish", |_| Err(
            self.abort_here(VirtError::Injected("migrate-before-finish").to_string())
        ));
        let (resume_us, dst_running) = match self.dst.finish() {
            Ok(r) => r,
            Err(e) => {
                return Err(self.abort_here(format!("the destination did not take over: {e}")))
            }
        };
        // The destination runs: whatever fails from here, the marker stays for the agent,
        // which rolls forward.
        self.finishing = true;
        fail::fail_point!("migrate-before-takeover-record", |_| Err(self.abort_here(
            VirtError::Injected("migrate-before-takeover-record").to_string()
        )));
        if let Some(path) = &self.marker {
            let flight = InFlight {
                from: self.vm.host.clone(),
                to: self.to.clone(),
                destination: Some(dst_running.clone()),
                taken_over: true,
                destination_agent: self.dst.agent(),
                disk: self.copy.as_ref().map(|c| c.disk.clone()),
            };
            let _ = write_marker(path, &flight);
        }
        fail::fail_point!("migrate-after-takeover", |_| Err(
            self.abort_here(VirtError::Injected("migrate-after-takeover").to_string())
        ));
        self.resume_us = Some(resume_us);
        let info = self.src.execute("query-migrate", json!({})).map_err(&err)?;
        for ev in self.src.take_events() {
            self.note(&ev);
        }
        if let Some(k) = &self.keeper {
            if !self.switched {
                k.replay_from(self.stop_us.or(self.completed_us).unwrap_or(resume_us));
            }
        }
        let _ = self.src.execute("quit", json!({}));
        if let Some(old) = &self.vm.running {
            let deadline = Instant::now() + Duration::from_secs(5);
            while hv::alive(old.pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            hv::kill(old);
        }
        let disk = self.copy.as_ref().map(|c| self.drop_source_disk(c));
        let stop = self.stop_us.unwrap_or(resume_us);
        let t1 = Interval::new(self.started_us, stop);
        let t2 = Interval::new(stop, resume_us);
        let ram = &info["ram"];
        let record = VmMigration {
            vm: name.clone(),
            from: self.vm.host.clone(),
            to: self.to.clone(),
            t1,
            t2,
            t1_ms: t1.len_us() as f64 / 1e3,
            t2_ms: t2.len_us() as f64 / 1e3,
            qemu_total_ms: info["total-time"].as_u64().unwrap_or(0),
            qemu_downtime_ms: info["downtime"].as_u64().unwrap_or(0),
            qemu_setup_ms: info["setup-time"].as_u64().unwrap_or(0),
            bytes_sent: ram["transferred"].as_u64().unwrap_or(0),
            dirty_pages_rate: ram["dirty-pages-rate"].as_u64().unwrap_or(0),
            iterations: ram["dirty-sync-count"].as_u64().unwrap_or(0),
            held_ms: self.held_ms,
            postcopy_ms: match (self.switched, self.completed_us) {
                (true, Some(done)) => done.saturating_sub(stop) as f64 / 1e3,
                _ => 0.0,
            },
            postcopy_recoveries: self.recoveries,
            t2_send_ms: None,
            t2_load_resume_ms: None,
            keeper: None,
            keeper_error: self.keeper_error.take(),
            switch_reason: self.switch_reason,
            tls: self.tls,
            disk,
        };
        let record = with_t2_parts(record, self.sent_us, self.switched);
        let mut vm = self.vm.clone();
        vm.host = self.to.clone();
        vm.running = Some(dst_running);
        if let Some(c) = &self.copy {
            vm.spec.disk = Some(c.disk.clone());
        }
        self.platform.save_record(&vm)?;
        self.settle();
        Ok(record)
    }

    /// The VM runs at its destination on its disk's copy: the source's image goes (its
    /// QEMU has quit), and what the copy measured.
    fn drop_source_disk(&self, copy: &DiskCopy) -> DiskCopyReport {
        let mut report = DiskCopyReport {
            from_cluster: String::new(),
            to_cluster: copy.disk.cluster.clone(),
            image: copy.disk.image.clone(),
            mirrored_bytes: self.mirror.offset.max(self.mirror.len),
            copy_ms: self.mirror.ready_us.map_or(0.0, |r| {
                r.saturating_sub(self.mirror.started_us) as f64 / 1e3
            }),
            completion_ms: self.mirror.completion_ms,
            source_removed: false,
            source_remove_error: None,
        };
        if let Some(d) = &self.vm.spec.disk {
            report.from_cluster = d.cluster.clone();
            match self
                .platform
                .placement()
                .storage(&self.vm.host)
                .remove_image(&d.cluster, &d.pool, &d.image)
            {
                Ok(()) => report.source_removed = true,
                Err(e) => report.source_remove_error = Some(error_chain(&e)),
            }
        }
        report
    }

    /// Settled here: its marker goes.
    fn settle(&mut self) {
        self.settled = true;
        if let Some(path) = self.marker.take() {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Cancels; the source keeps (or resumes) running and the destination is killed.
    /// Never after a post-copy switch: the destination then holds the newer state.
    fn abort_here(&mut self, reason: String) -> VirtError {
        // Completed (pre-copy) before the batch gave up: its destination may already run
        // it, so it is rolled forward by the source host's agent, never rolled back here.
        if (self.finishing || self.done) && !self.switched {
            self.settled = true;
            return VirtError::Unsettled {
                vm: self.vm.spec.name.clone(),
                source_host: self.vm.host.clone(),
                destination: self.to.clone(),
                reason,
            };
        }
        if self.switched {
            // Not ours to settle: the marker stays for the source host's agent.
            self.settled = true;
            return VirtError::PostcopyUnfinished {
                vm: self.vm.spec.name.clone(),
                source_host: self.vm.host.clone(),
                destination: self.to.clone(),
                reason,
            };
        }
        if let Some(k) = self.keeper.take() {
            // The source resumes and reads the frames queued for it itself.
            k.discard();
        }
        let _ = self.src.execute("migrate_cancel", json!({}));
        if self.copy.is_some() {
            // The source keeps its own disk: the copy is dropped, never pivoted to. A job
            // that waits on a dead connection ends only when TCP gives up on it; its
            // target is then removed by the next attempt ([`start_mirror`]).
            let _ = self.src.execute(
                "block-job-cancel",
                json!({ "device": MIRROR_JOB, "force": true }),
            );
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline {
                let jobs = self.src.execute("query-block-jobs", json!({}));
                if jobs.is_ok_and(|j| j.as_array().is_none_or(|a| a.is_empty())) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self
                .src
                .execute("blockdev-del", json!({ "node-name": MIRROR_TARGET }));
        }
        // The destination goes first: the two must never run at once (a migration may have
        // completed since the last poll, and a destination started without -S then runs).
        self.dst.abort();
        let running = match self.src.execute("query-status", json!({})) {
            Ok(st) if st["running"] == false => self.src.execute("cont", json!({})).is_ok(),
            Ok(_) => true,
            Err(_) => false,
        };
        if running {
            self.settle();
        } else {
            // The source did not confirm it runs: the marker stays, and the source host's
            // agent settles it.
            self.settled = true;
        }
        VirtError::MigrationFailed {
            vm: self.vm.spec.name.clone(),
            source_host: self.vm.host.clone(),
            reason,
        }
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("vm", &self.vm.spec.name)
            .field("from", &self.vm.host)
            .field("to", &self.to)
            .field("settled", &self.settled)
            .finish_non_exhaustive()
    }
}

/// A session dropped unsettled (an early return, a panic unwinding) is aborted: the source
/// runs on, the destination is killed. One past the point of no return keeps its marker.
impl Drop for Session {
    fn drop(&mut self) {
        if !self.settled {
            let _ = self.abort_here("the migration's driver gave up on it".into());
        }
    }
}

/// What the coordinator of a batch sees of one VM's migration after each step: its leg
/// ([`Leg`]) runs on the VM's source host, the decisions are the coordinator's.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LegView {
    pub vm: String,
    /// Completed (the source sent everything; or after a post-copy switch, the destination
    /// has every page).
    pub done: bool,
    /// Switched to post-copy: the VM never runs at its source again.
    pub switched: bool,
    /// The source VM stopped (QEMU converged by itself, or the common stop).
    pub stopped: bool,
    pub first_pass: bool,
    pub first_pass_progress: f64,
    pub dirty_set: u64,
    /// How long ago its first pass ended, ms (`None` while in it).
    pub since_first_pass_ms: Option<u64>,
    /// Its disk is being copied; RAM pre-copy has not started.
    #[serde(default)]
    pub copying: bool,
    pub progress: Progress,
}

/// A leg's word on its migration after a [`Leg::check`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    Running,
    Done,
    /// The migration cannot go on (the reason); the coordinator gives up the batch.
    Failed(String),
}

/// The source half of one VM's migration, on the VM's source host: its QMP work, its
/// marker, its migration lock and its frame keeper. A [`Session`] here, or one held by the
/// source host's agent and driven over the network. The coordinator ([`migrate_plan`])
/// only decides: when to pace, hold, stop or switch, and when to give up.
///
/// A leg dropped unsettled aborts (the source runs on) unless it is past the point of no
/// return, when its marker stays for the source host's agent.
pub trait Leg: Send {
    fn view(&self) -> LegView;
    /// Starts the stream; `hold`: keep it from converging until the coordinator switches.
    fn start(&mut self, hold: bool, postcopy: bool, params: &Params) -> Result<(), VirtError>;
    /// Polls the source and the destination (resuming a broken post-copy stream first).
    fn check(&mut self, params: &Params) -> Result<Check, VirtError>;
    fn pace(&mut self, pace: crate::switchover::Pace, params: &Params) -> Result<(), VirtError>;
    /// Stops the source VM (the common stop of a coordinated batch).
    fn stop(&mut self) -> Result<(), VirtError>;
    /// After the common stop: what is left converges at full speed.
    fn complete_stopped(&mut self, params: &Params) -> Result<(), VirtError>;
    fn unthrottle(&mut self, params: &Params) -> Result<(), VirtError>;
    /// `migrate-start-postcopy`.
    fn switch(&mut self) -> Result<(), VirtError>;
    fn note_switch(&mut self, reason: crate::switchover::SwitchReason);
    /// After `completed`: the destination takes over, the source quits, the record moves.
    fn finish(&mut self) -> Result<VmMigration, VirtError>;
    /// After `finish`: waits for the frame keeper's replay and reports it.
    fn keeper_report(&mut self) -> Option<KeeperReport>;
    /// Gives up: the source keeps running (see [`Session`]'s rules).
    fn abort(&mut self, reason: String) -> VirtError;
}

impl Leg for Session {
    fn view(&self) -> LegView {
        LegView {
            vm: self.vm.spec.name.clone(),
            done: self.done,
            switched: self.switched,
            stopped: self.stop_us.is_some(),
            first_pass: self.first_pass(),
            first_pass_progress: self.first_pass_progress(),
            dirty_set: self.dirty_set,
            since_first_pass_ms: self
                .first_pass_ended
                .map(|t| t.elapsed().as_millis() as u64),
            copying: self.mirror.deferred,
            progress: self.progress(),
        }
    }

    fn start(&mut self, hold: bool, postcopy: bool, params: &Params) -> Result<(), VirtError> {
        Session::start(self, hold, postcopy, params)
    }

    fn check(&mut self, params: &Params) -> Result<Check, VirtError> {
        if self.done {
            // Completed, waiting for the batch: asking after the destination keeps it
            // (an agent kills a destination nobody asks after, INCOMING_KEEPALIVE).
            self.dst.alive();
            return Ok(Check::Done);
        }
        let status = self.poll();
        if self.switched
            && (self.progressed_at.elapsed() > POSTCOPY_STALL
                || status.as_deref().is_ok_and(|st| st == "postcopy-paused"))
        {
            // Post-copy cannot go back: the stream is resumed once the path is.
            self.recover(Instant::now() + params.timeout)?;
            return Ok(Check::Running);
        }
        let name = self.vm.spec.name.clone();
        let mut failure = None;
        match status {
            Ok(st) if st == "completed" => self.done = true,
            Ok(st) if st == "failed" || st == "cancelled" => {
                // After a post-copy switch the destination decides: a source that lost
                // its return path while completing has sent every page, and a destination
                // that received them all has completed.
                let dst = match self.switched {
                    true => self.dst.incoming_status().ok(),
                    false => None,
                };
                if dst.as_deref() == Some("completed") {
                    self.done = true;
                } else {
                    failure = Some(format!(
                        "{name} reported {st}{}{}",
                        self.last["error-desc"]
                            .as_str()
                            .map(|e| format!(": {e}"))
                            .unwrap_or_default(),
                        dst.map(|d| format!(" (its destination: {d})"))
                            .unwrap_or_default()
                    ));
                }
            }
            Ok(_) => {}
            Err(e) => failure = Some(e.to_string()),
        }
        // After a post-copy switch an unreachable destination (a cut path, its agent
        // across it) is waited for: the stall above resumes the stream once the path is back.
        if !self.done && !self.switched && !self.dst.alive() {
            failure = Some(format!(
                "the destination of {name} is gone or unreachable (its QEMU, its host agent or the path to it)"
            ));
        }
        if !self.done && self.progressed_at.elapsed() > STALL {
            failure = Some(format!(
                "the stream of {name} moved no data for {} s (link cut or peer host down?)",
                STALL.as_secs()
            ));
        }
        if !self.first_pass() {
            self.first_pass_ended.get_or_insert_with(Instant::now);
        }
        Ok(match failure {
            Some(reason) => Check::Failed(reason),
            None if self.done => Check::Done,
            None => Check::Running,
        })
    }

    fn pace(&mut self, pace: crate::switchover::Pace, params: &Params) -> Result<(), VirtError> {
        use crate::switchover::Pace;
        match pace {
            Pace::Full => Session::pace(self, false, params),
            Pace::Throttle => Session::pace(self, true, params),
            Pace::Drain => self.steer(params),
            Pace::Hold => self.hold(params),
            Pace::Done => Ok(()),
        }
    }

    fn stop(&mut self) -> Result<(), VirtError> {
        Session::stop(self)
    }

    fn complete_stopped(&mut self, params: &Params) -> Result<(), VirtError> {
        Session::complete_stopped(self, params)
    }

    fn unthrottle(&mut self, params: &Params) -> Result<(), VirtError> {
        Session::unthrottle(self, params)
    }

    fn switch(&mut self) -> Result<(), VirtError> {
        Session::switch(self)
    }

    fn note_switch(&mut self, reason: crate::switchover::SwitchReason) {
        self.switch_reason = Some(reason);
    }

    fn finish(&mut self) -> Result<VmMigration, VirtError> {
        self.finish_here()
    }

    fn keeper_report(&mut self) -> Option<KeeperReport> {
        self.keeper.take().map(FrameKeeper::wait)
    }

    fn abort(&mut self, reason: String) -> VirtError {
        if self.settled {
            return VirtError::MigrationFailed {
                vm: self.vm.spec.name.clone(),
                source_host: self.vm.host.clone(),
                reason: format!("{reason} (already settled)"),
            };
        }
        self.abort_here(reason)
    }
}

/// Opens the leg of `vm`'s migration to `to` on `port` (here, or through the VM's source
/// host's agent).
pub type OpenLeg<'a> = &'a dyn Fn(&VmRecord, &str, u16) -> Result<Box<dyn Leg>, VirtError>;

/// Which VM of a group goes where: VM i to the site's host i mod n (`hosts`: the site's
/// VM hosts, in the zone's order).
pub fn group_plan(
    group: &str,
    vms: Vec<VmRecord>,
    hosts: &[String],
) -> Result<Vec<(VmRecord, String)>, VirtError> {
    let vms: Vec<VmRecord> = vms
        .into_iter()
        .filter(|v| v.group.as_deref() == Some(group))
        .collect();
    if vms.is_empty() || hosts.is_empty() {
        return Err(VirtError::EmptyGroup(group.into()));
    }
    Ok(vms
        .into_iter()
        .enumerate()
        .map(|(i, v)| (v, hosts[i % hosts.len()].clone()))
        .collect())
}

/// The coordinator: migrates `plan` as `strategy` says, each VM through the leg `open`
/// gives it. Nothing here touches a host: the legs do.
pub fn migrate_plan(
    plan: Vec<(VmRecord, String)>,
    strategy: Strategy,
    params: &Params,
    progress: &dyn Fn(&[Progress]),
    open: OpenLeg<'_>,
) -> Result<GroupMigration, VirtError> {
    let mut done = Vec::new();
    match strategy {
        Strategy::Sequential => {
            for (i, (vm, to)) in plan.into_iter().enumerate() {
                done.extend(run_batch(
                    vec![(vm, to)],
                    i as u16,
                    Batch::Free,
                    params,
                    progress,
                    open,
                )?);
            }
        }
        Strategy::Parallel => done = run_batch(plan, 0, Batch::Free, params, progress, open)?,
        Strategy::Coordinated => done = run_batch(plan, 0, Batch::Held, params, progress, open)?,
        Strategy::Postcopy => done = run_batch(plan, 0, Batch::Postcopy, params, progress, open)?,
    }
    let t2: Vec<Interval> = done.iter().map(|m| m.t2).collect();
    let t1: Vec<Interval> = done.iter().map(|m| m.t1).collect();
    Ok(GroupMigration {
        strategy,
        svc_t2_ms: span_us(&t2) as f64 / 1e3,
        svc_t2_union_ms: union_us(&t2) as f64 / 1e3,
        svc_t1_ms: span_us(&t1) as f64 / 1e3,
        switch_reason: done.iter().find_map(|m| m.switch_reason),
        vms: done,
    })
}

/// Migrates a batch concurrently, as `batch` says.
fn run_batch(
    plan: Vec<(VmRecord, String)>,
    port_offset: u16,
    batch: Batch,
    params: &Params,
    progress: &dyn Fn(&[Progress]),
    open: OpenLeg<'_>,
) -> Result<Vec<VmMigration>, VirtError> {
    // Every way out of this function settles every leg: finished, aborted, or (an early
    // return) aborted when dropped; a leg that cannot be settled here (switched to
    // post-copy, or its destination asked to take over) keeps its marker for the source
    // host's agent.
    let mut legs: Vec<Box<dyn Leg>> = Vec::new();
    for (i, (vm, to)) in plan.iter().enumerate() {
        match open(vm, to, MIGRATION_PORT_BASE + port_offset + i as u16) {
            Ok(l) => legs.push(l),
            Err(e) => return Err(abort_all(legs, e)),
        }
    }
    fail::fail_point!("migrate-after-prepare", |_| Err(VirtError::Injected(
        "migrate-after-prepare"
    )));
    let hold = batch != Batch::Free;
    let mut begun = Ok(());
    for l in legs.iter_mut() {
        begun = l.start(hold, batch == Batch::Postcopy, params);
        if begun.is_err() {
            break;
        }
    }
    if let Err(e) = begun {
        return Err(abort_all(legs, e));
    }
    fail::fail_point!("migrate-after-start", |_| Err(VirtError::Injected(
        "migrate-after-start"
    )));
    let mut started = Instant::now();
    let mut released = false;
    let mut views: Vec<LegView> = legs.iter().map(|l| l.view()).collect();
    loop {
        let mut failure = None;
        let mut broken = None;
        for (l, v) in legs.iter_mut().zip(views.iter_mut()) {
            // A completed leg is checked too: it keeps its destination's keepalive.
            match l.check(params) {
                Ok(Check::Failed(reason)) => failure = Some(reason),
                Ok(_) => {}
                Err(e) => {
                    broken = Some(e);
                    break;
                }
            }
            *v = l.view();
        }
        if let Some(e) = broken {
            return Err(abort_all(legs, e));
        }
        // While a disk is copied (its progress checked by its leg's stall watch), no VM is
        // paced, held or switched, and the batch's clocks (timeout, hold, drain) start
        // once every copy is in sync and every RAM stream runs.
        let copying = views.iter().any(|v| v.copying);
        if copying {
            started = Instant::now();
        }
        if failure.is_none()
            && started.elapsed() > params.timeout
            && !views.iter().any(|v| v.switched)
        {
            failure = Some(format!("no completion within {:?}", params.timeout));
        }
        if let Some(reason) = failure {
            // Completed VMs stay migrated; the others keep running at their source. Every
            // leg at once: an abort that waits for an unreachable destination (seconds)
            // must not keep the next source stopped.
            let ended: Vec<Result<Option<Box<dyn Leg>>, VirtError>> = std::thread::scope(|s| {
                let reason = &reason;
                let ending: Vec<_> = legs
                    .into_iter()
                    .zip(views)
                    .map(|(mut l, v)| {
                        s.spawn(move || match v.done {
                            true => Ok(l.finish().is_ok().then_some(l)),
                            false => Err(l.abort(reason.clone())),
                        })
                    })
                    .collect();
                ending
                    .into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| {
                            Err(VirtError::MigrationFailed {
                                vm: "?".into(),
                                source_host: "?".into(),
                                reason: "a leg's abort panicked".into(),
                            })
                        })
                    })
                    .collect()
            });
            let mut first_err = None;
            let mut moved = Vec::new();
            for e in ended {
                match e {
                    Ok(l) => moved.extend(l),
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
            // The replays of the VMs that moved go on; wait for them last.
            for mut l in moved {
                l.keeper_report();
            }
            return Err(first_err.unwrap_or(VirtError::MigrationFailed {
                vm: "?".into(),
                source_host: "?".into(),
                reason,
            }));
        }
        progress(&views.iter().map(|v| v.progress.clone()).collect::<Vec<_>>());
        if hold && !released && !copying {
            released = match switch_step(&mut legs, &mut views, started.elapsed(), params, batch) {
                Ok(r) => r,
                Err(e) => return Err(abort_all(legs, e)),
            };
            if released && batch == Batch::Held {
                fail::fail_point!("migrate-after-common-stop", |_| Err(VirtError::Injected(
                    "migrate-after-common-stop"
                )));
            }
        }
        if views.iter().all(|v| v.done) {
            break;
        }
        std::thread::sleep(if hold && !released { HELD_POLL } else { POLL });
    }
    // Every leg is finished, whatever happens to the others: one that is dropped unfinished
    // would leave its source paused after `completed` and its destination waiting, the VM
    // running nowhere (seen here: one destination that did not take over left the next
    // VM's destination QEMU behind).
    let mut finished = Vec::new();
    let mut first_err = None;
    for mut l in legs {
        match l.finish() {
            Ok(m) => finished.push((m, l)),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    let done: Vec<VmMigration> = finished
        .into_iter()
        .map(|(mut m, mut l)| {
            m.keeper = l.keeper_report();
            m
        })
        .collect();
    match first_err {
        Some(e) => Err(e),
        None => Ok(done),
    }
}

/// Aborts every leg at once after `error` ended the batch early, and returns `error`: an
/// abort that waits for an unreachable destination (seconds) must not hold up the next
/// leg's, whose source may be stopped. A leg that cannot be settled here keeps its marker
/// for its source host's agent ([`Leg::abort`]).
fn abort_all(legs: Vec<Box<dyn Leg>>, error: VirtError) -> VirtError {
    let reason = dczone_lab::error_chain(&error);
    std::thread::scope(|s| {
        for mut l in legs {
            let reason = reason.clone();
            s.spawn(move || {
                l.abort(reason);
            });
        }
    });
    error
}

/// Phase 1 of a coordinated or post-copy batch ([`crate::switchover`]): pace, steer,
/// hold, or switch every VM at once: `migrate-start-postcopy` (post-copy), or a common
/// stop of every source VM after which each migration completes with its VM stopped
/// (coordinated pre-copy). Returns true once switched (or nothing is left to switch).
fn switch_step(
    legs: &mut [Box<dyn Leg>],
    views: &mut [LegView],
    elapsed: Duration,
    params: &Params,
    batch: Batch,
) -> Result<bool, VirtError> {
    use crate::switchover::{decide, Drain, Step, VmView};
    let seen: Vec<VmView> = views
        .iter()
        .map(|v| VmView {
            done: v.done,
            first_pass: v.first_pass,
            progress: v.first_pass_progress,
            dirty_set: v.dirty_set,
            stopped: v.stopped,
            since_first_pass: v.since_first_pass_ms.map(Duration::from_millis),
        })
        .collect();
    let drain = (batch == Batch::Held).then_some(Drain {
        target: DRAIN_TARGET_BYTES,
        max: params.max_drain,
    });
    match decide(&seen, elapsed, params.max_hold, drain) {
        Step::Finished => Ok(true),
        Step::Pace(paces) => {
            for (l, pace) in legs.iter_mut().zip(paces) {
                l.pace(pace, params)?;
            }
            Ok(false)
        }
        Step::Switch(reason) => {
            for l in legs.iter_mut() {
                l.note_switch(reason);
            }
            switch_all(legs, views, params, batch)
        }
    }
}

/// Switches every live VM of the batch at once.
fn switch_all(
    legs: &mut [Box<dyn Leg>],
    views: &mut [LegView],
    params: &Params,
    batch: Batch,
) -> Result<bool, VirtError> {
    let live: Vec<usize> = (0..legs.len())
        .filter(|&i| !views[i].done && !views[i].stopped)
        .collect();
    match batch {
        Batch::Postcopy => {
            // Bandwidth first, then the switches back to back: the stops fall within a few
            // round trips of each other.
            for &i in &live {
                legs[i].unthrottle(params)?;
            }
            for &i in &live {
                legs[i].switch()?;
                views[i] = legs[i].view();
            }
            Ok(true)
        }
        _ => {
            // The stops first, back to back; then each migration completes with what its
            // VM left, at full speed.
            for &i in &live {
                legs[i].stop()?;
            }
            for i in (0..legs.len()).filter(|&i| !views[i].done) {
                legs[i].complete_stopped(params)?;
            }
            Ok(true)
        }
    }
}

impl Platform {
    /// Migrates one VM.
    pub fn migrate(
        &self,
        vm: &str,
        to: &str,
        params: &Params,
        progress: &dyn Fn(&[Progress]),
    ) -> Result<VmMigration, VirtError> {
        self.migrate_via(vm, to, params, progress, &|vm, to, port, tls| {
            Ok(Box::new(self.launch_incoming(vm, to, port, false, tls)?))
        })
    }

    /// Migrates one VM with a destination prepared by `prepare` (e.g. through the
    /// destination host's agent).
    pub fn migrate_via(
        &self,
        vm: &str,
        to: &str,
        params: &Params,
        progress: &dyn Fn(&[Progress]),
        prepare: Prepare<'_>,
    ) -> Result<VmMigration, VirtError> {
        let record = self.get(vm)?;
        let g = migrate_plan(
            vec![(record, to.to_string())],
            Strategy::Parallel,
            params,
            progress,
            &|vm, to, port| Ok(Box::new(self.open_leg(vm, to, port, params, prepare)?)),
        )?;
        Ok(g.vms.into_iter().next().expect("one VM migrated"))
    }

    /// The source half of `vm`'s migration to `to`, here: takes the VM's migration lock,
    /// writes its in-flight marker, prepares the destination with `prepare`, connects to
    /// the source QEMU and starts its frame keeper.
    pub fn open_leg(
        &self,
        vm: &VmRecord,
        to: &str,
        port: u16,
        params: &Params,
        prepare: Prepare<'_>,
    ) -> Result<Session, VirtError> {
        let lock = self.migration_lock(&vm.spec.name)?;
        let tls = if self.migration_tls(&vm.host, to, params)? {
            Some(self.qemu_tls_dir(&vm.host)?)
        } else {
            None
        };
        // The marker goes down before the destination exists: a driver killed while the
        // destination starts leaves a marker, and the source host's agent kills what it
        // finds of that destination ([`Platform::unrecorded_destination`]).
        let path = self.in_flight_path(&vm.spec.name);
        let mut flight = InFlight {
            from: vm.host.clone(),
            to: to.to_string(),
            destination: None,
            taken_over: false,
            destination_agent: None,
            disk: None,
        };
        write_marker(&path, &flight).map_err(Self::io("record the migration in flight"))?;
        let mut s = match Session::prepare(self, vm, to, port, prepare, tls) {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
        };
        s._lock = Some(lock);
        s.marker = Some(path.clone());
        fail::fail_point!("migrate-after-destination", |_| Err(VirtError::Injected(
            "migrate-after-destination"
        )));
        flight.destination = s.dst.running();
        flight.destination_agent = s.dst.agent();
        flight.disk = s.copy.as_ref().map(|c| c.disk.clone());
        write_marker(&path, &flight).map_err(Self::io("record the migration in flight"))?;
        if params.keep_frames {
            match self.frame_keeper(&s.vm) {
                Ok(k) => s.keeper = Some(k),
                Err(e) => s.keeper_error = Some(error_chain(&e)),
            }
        }
        Ok(s)
    }

    /// Starts the frame keeper of `vm` on its source host (in the lab: in the host's
    /// namespace; the sockets stay there).
    fn frame_keeper(&self, vm: &VmRecord) -> Result<FrameKeeper, VirtError> {
        let ns = self.placement().namespace(&vm.host);
        FrameKeeper::start(
            &vm.spec.tap(),
            self.placement().uplink(),
            &vm.spec.mac,
            |open| match &ns {
                Some(ns) => dczone_lab::sys::in_namespace(ns, open)
                    .map_err(std::io::Error::other)?
                    .join()
                    .map_err(|_| std::io::Error::other("the namespace thread panicked"))?,
                None => open(),
            },
        )
        .map_err(Self::io("start the frame keeper"))
    }
}

/// Starts mirroring the source's disk into the destination's NBD export of its copy.
fn start_mirror(src: &mut Qmp, copy: &DiskCopy, tls: bool) -> Result<(), hv::QmpError> {
    // A target an earlier attempt could not remove would hold the name; its force-cancelled
    // job may still wait on the dead connection (until TCP gives up or the path is back):
    // waited for, a minute at most, so that the new job can take the disk.
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let jobs = src.execute("query-block-jobs", json!({}));
        let left = jobs.is_ok_and(|j| {
            j.as_array()
                .is_some_and(|a| a.iter().any(|job| job["device"] == MIRROR_JOB))
        });
        if !left {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = src.execute("blockdev-del", json!({ "node-name": MIRROR_TARGET }));
    // `discard: unmap`, as on the VM's own disk: the mirror's zeroing of the new image may
    // free objects rather than write zeroes (QEMU's mirror zeroes a target that can,
    // then copies only what the source has allocated).
    let mut target = json!({
        "driver": "nbd",
        "node-name": MIRROR_TARGET,
        "discard": "unmap",
        "server": {
            "type": "inet",
            "host": copy.host,
            "port": copy.port.to_string(),
        },
        "export": copy.export,
    });
    if tls {
        // The destination's certificate must name the address the export listens on.
        target["tls-creds"] = json!(crate::tls::CLIENT_CREDS);
        target["tls-hostname"] = json!(copy.host);
    }
    src.execute("blockdev-add", target)?;
    let mirror = src.execute(
        "blockdev-mirror",
        json!({
            "job-id": MIRROR_JOB,
            "device": hv::DISK_NODE,
            "target": MIRROR_TARGET,
            "sync": "full",
        }),
    );
    if let Err(e) = mirror {
        let _ = src.execute("blockdev-del", json!({ "node-name": MIRROR_TARGET }));
        return Err(e);
    }
    Ok(())
}

/// Pins QEMU's convergence threshold (`avail-switchover-bandwidth` x `downtime-limit`) at a
/// few bytes, or unpins it (0: QEMU's measured bandwidth). Pinned, a pre-copy migration
/// re-syncs its dirty bitmap only when a round has sent everything, and converges only if
/// the guest dirtied nothing meanwhile (QEMU 8.2 and later; false when not available).
fn pin_switchover_threshold(qmp: &mut Qmp, pin: bool) -> bool {
    let has = qmp
        .execute("query-migrate-parameters", json!({}))
        .is_ok_and(|p| p.get("avail-switchover-bandwidth").is_some());
    let bw = if pin {
        PINNED_SWITCHOVER_BYTES_PER_S
    } else {
        0
    };
    has && qmp
        .execute(
            "migrate-set-parameters",
            json!({ "avail-switchover-bandwidth": bw }),
        )
        .is_ok()
}

/// Splits T2 at the source's `completed` event when it falls inside it (pre-copy; after a
/// post-copy switch the source completes long after the resume).
fn with_t2_parts(mut m: VmMigration, sent: Option<u64>, postcopy: bool) -> VmMigration {
    let (stop, resume) = (m.t2.start_us, m.t2.end_us);
    if let (false, Some(sent)) = (postcopy, sent) {
        if stop <= sent && sent <= resume {
            let ms = |a: u64, b: u64| (b - a) as f64 / 1e3;
            m.t2_send_ms = Some(ms(stop, sent));
            m.t2_load_resume_ms = Some(ms(sent, resume));
        }
    }
    m
}

/// QEMU 8.0 and later: page requests of a post-copy destination take a channel of their
/// own instead of queueing behind the background push (`postcopy-preempt`, stable since
/// 8.0). Both ends run the same QEMU in a zone, so both decide alike.
fn has_postcopy_preempt(qmp: &mut Qmp) -> bool {
    qmp.execute("query-version", json!({}))
        .ok()
        .and_then(|v| v["qemu"]["major"].as_u64())
        .is_some_and(|major| major >= 8)
}

/// Writes an in-flight marker whole or not at all (a temporary file, then a rename): a
/// truncated marker would be read as garbage and dropped unsettled.
fn write_marker(path: &std::path::Path, flight: &InFlight) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec(flight).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(&tmp, path)
}

/// Does this QEMU run its guest (QMP `query-status`: `running`)? Unreachable counts as no.
fn runs(d: &Running) -> bool {
    Qmp::connect(&d.qmp, Duration::from_secs(2))
        .and_then(|mut q| q.execute("query-status", json!({})))
        .is_ok_and(|st| st["status"] == "running")
}

/// Is `pid` a live QEMU (not a recycled pid)?
fn is_qemu(pid: i32) -> bool {
    hv::alive(pid)
        && std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|c| c.starts_with("qemu-system"))
}

/// Where a broken post-copy stream resumes: the destination's address, another port.
fn recovery_uri(uri: &str) -> String {
    match uri
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
    {
        Some((host, port)) => format!("{host}:{}", port.wrapping_add(RECOVERY_PORT_OFFSET)),
        None => uri.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(stop: u64, resume: u64) -> VmMigration {
        VmMigration {
            vm: "v".into(),
            from: "a".into(),
            to: "b".into(),
            t1: Interval::new(0, stop),
            t2: Interval::new(stop, resume),
            t1_ms: 0.0,
            t2_ms: (resume - stop) as f64 / 1e3,
            qemu_total_ms: 0,
            qemu_downtime_ms: 0,
            qemu_setup_ms: 0,
            bytes_sent: 0,
            dirty_pages_rate: 0,
            iterations: 0,
            held_ms: 0.0,
            postcopy_ms: 0.0,
            postcopy_recoveries: 0,
            t2_send_ms: None,
            t2_load_resume_ms: None,
            keeper: None,
            keeper_error: None,
            switch_reason: None,
            tls: false,
            disk: None,
        }
    }

    #[test]
    fn t2_splits_at_the_source_s_completed_event_when_it_falls_inside_it() {
        let m = with_t2_parts(record(1_000, 101_000), Some(21_000), false);
        assert_eq!(
            (m.t2_send_ms, m.t2_load_resume_ms),
            (Some(20.0), Some(80.0))
        );
        // Outside T2, missing, or after a post-copy switch: no split.
        for (sent, postcopy) in [
            (Some(500), false),
            (Some(200_000), false),
            (None, false),
            (Some(21_000), true),
        ] {
            let m = with_t2_parts(record(1_000, 101_000), sent, postcopy);
            assert_eq!(m.t2_send_ms, None);
        }
    }

    #[test]
    fn a_recovered_post_copy_stream_resumes_on_another_port() {
        assert_eq!(recovery_uri("tcp:10.77.2.11:4601"), "tcp:10.77.2.11:4701");
    }
}
