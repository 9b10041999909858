//! Group migration across hosts: the source half of each VM's migration (its *leg*) runs
//! in the VM's source host's agent, and one coordinator ([`dczone_virt::migrate::migrate_plan`],
//! in the operator's `dczone`) takes the decisions: pace, hold, the common stop, the
//! post-copy switch, and giving up.
//!
//! ```text
//!  coordinator (dczone --access)     source agent (host A)           destination agent (B)
//!   POST /v1/vms/{vm}/leg ---------> lock, marker, prepare ------> POST /v1/incoming
//!        (answers the leg's id)      QMP connect, frame keeper
//!   POST /v1/vms/{vm}/leg/{id} ----> start | check | pace | stop | complete_stopped |
//!        (every 10 ms: check)          unthrottle | switch | finish | keeper | abort
//!                                    finish ---------------------> POST .../finish
//! ```
//!
//! Every step answers with the leg's [`LegView`], which is all the coordinator knows of it.
//! Steps name the leg's id, not only its VM: a coordinator whose leg was given up (it went
//! silent) cannot step, nor keep alive, a leg another coordinator opened since for the
//! same VM; it gets 404.
//! The source agent holds the VM's migration lock and its in-flight marker for the leg's
//! whole life. The coordinator's [`AgentLeg`] sends a keepalive every second from a thread
//! of its own, also while the coordinator is busy with another leg (a finish or an abort
//! may take seconds). A leg whose coordinator goes silent for [`LEG_KEEPALIVE`] is dropped:
//! it aborts (the source runs on, the destination is killed) unless it is past the point
//! of no return, and then its marker stays and the agent settles it as for any driver
//! that died.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use dczone_virt::keeper::KeeperReport;
use dczone_virt::migrate::{Check, Leg, LegView, Params, Session, VmMigration};
use dczone_virt::switchover::{Pace, SwitchReason};
use dczone_virt::VirtError;

use crate::{AgentClient, CallError};

/// A leg whose coordinator has not been heard of for this long is dropped (and so
/// aborted). The coordinator sends a keepalive every [`HEARTBEAT`].
pub const LEG_KEEPALIVE: Duration = Duration::from_secs(5);
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// Body of `POST /v1/vms/{name}/leg`: open the source half of the VM's migration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LegBody {
    /// The destination host.
    pub to: String,
    /// The destination agent's URL; by default the source agent's own knowledge of it.
    #[serde(default)]
    pub agent: Option<String>,
    /// The destination's migration port.
    pub port: u16,
    /// Prepare the destination for post-copy.
    #[serde(default)]
    pub postcopy: bool,
    pub params: Params,
}

/// Body of `POST /v1/vms/{name}/leg/{id}`: one step of the leg ([`Leg`]'s methods).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case", deny_unknown_fields)]
pub enum LegStep {
    /// The coordinator lives (no effect on the leg; it may be busy with another step).
    Keepalive,
    Start {
        hold: bool,
        postcopy: bool,
    },
    Check,
    Pace {
        pace: Pace,
    },
    Stop,
    CompleteStopped,
    Unthrottle,
    Switch,
    NoteSwitch {
        reason: SwitchReason,
    },
    Finish,
    /// After `finish`: waits for the frame keeper; the leg is closed.
    Keeper,
    /// Gives up; the leg is closed.
    Abort {
        reason: String,
    },
}

/// The answer to every step.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LegAnswer {
    /// The leg's id (in the answer to its opening): every step names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leg: Option<u64>,
    pub view: Option<LegView>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<Check>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<VmMigration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keeper: Option<KeeperReport>,
    /// `abort`'s account of how the VM was left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aborted: Option<String>,
}

/// One open leg in its source agent.
struct Open {
    id: u64,
    session: Arc<Mutex<Session>>,
    params: Params,
    seen: Instant,
    /// Set while the leg is open: its destination keepalive thread runs.
    open: Arc<AtomicBool>,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.open.store(false, Ordering::SeqCst);
    }
}

/// The legs a source agent holds, by VM name.
#[derive(Default)]
pub struct Legs {
    open: Mutex<HashMap<String, Open>>,
    opened: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Legs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self
            .open
            .lock()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        f.debug_struct("Legs").field("open", &names).finish()
    }
}

impl Legs {
    /// Holds a newly opened leg. `destination` is its destination's agent: this agent
    /// asks it after the destination every [`HEARTBEAT`] while the leg is open, whatever
    /// its coordinator does (that is the destination's keepalive, as between libvirt's
    /// daemons; a leg's own checks ask too).
    /// Returns the leg's id (unique across this agent's restarts: the clock's nanoseconds
    /// at its first leg, then counted) and view.
    pub fn insert(
        &self,
        name: &str,
        session: Session,
        params: Params,
        destination: AgentClient,
    ) -> (u64, LegView) {
        let view = session.view();
        let _ = self.opened.compare_exchange(
            0,
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64),
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        let id = self.opened.fetch_add(1, Ordering::SeqCst);
        let open = Arc::new(AtomicBool::new(true));
        let path = format!("/v1/incoming/{name}");
        let running = open.clone();
        let _ = std::thread::Builder::new()
            .name(format!("dst-keepalive-{name}"))
            .spawn(move || {
                while running.load(Ordering::SeqCst) {
                    let _ = destination.call("GET", &path, None, HEARTBEAT);
                    std::thread::sleep(HEARTBEAT);
                }
            });
        let old = self.open.lock().expect("not poisoned").insert(
            name.to_string(),
            Open {
                id,
                session: Arc::new(Mutex::new(session)),
                params,
                seen: Instant::now(),
                open,
            },
        );
        drop(old);
        (id, view)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.open.lock().expect("not poisoned").contains_key(name)
    }

    /// Takes one step of `name`'s leg `id` (`None`: no such leg open). Steps of one leg
    /// run one at a time; those of different legs at once.
    pub fn step(&self, name: &str, id: u64, step: LegStep) -> Result<Option<LegAnswer>, VirtError> {
        let (session, params) = {
            let mut open = self.open.lock().expect("not poisoned");
            let Some(o) = open.get_mut(name).filter(|o| o.id == id) else {
                return Ok(None);
            };
            o.seen = Instant::now();
            if matches!(step, LegStep::Keepalive) {
                return Ok(Some(LegAnswer::default()));
            }
            (o.session.clone(), o.params)
        };
        let closes = matches!(step, LegStep::Keeper | LegStep::Abort { .. });
        let answer = {
            // A step that panicked leaves the session as it was; it can still be aborted.
            let mut s = session.lock().unwrap_or_else(|e| e.into_inner());
            let mut a = LegAnswer::default();
            match step {
                LegStep::Keepalive => {}
                LegStep::Start { hold, postcopy } => s.start(hold, postcopy, &params)?,
                LegStep::Check => a.check = Some(s.check(&params)?),
                LegStep::Pace { pace } => s.pace(pace, &params)?,
                LegStep::Stop => Leg::stop(&mut *s)?,
                LegStep::CompleteStopped => Leg::complete_stopped(&mut *s, &params)?,
                LegStep::Unthrottle => Leg::unthrottle(&mut *s, &params)?,
                LegStep::Switch => Leg::switch(&mut *s)?,
                LegStep::NoteSwitch { reason } => s.note_switch(reason),
                LegStep::Finish => a.migration = Some(s.finish()?),
                LegStep::Keeper => a.keeper = s.keeper_report(),
                LegStep::Abort { reason } => {
                    a.aborted = Some(dczone_lab::error_chain(&s.abort(reason)))
                }
            }
            a.view = Some(s.view());
            a
        };
        let mut open = self.open.lock().expect("not poisoned");
        if closes {
            if open.get(name).is_some_and(|o| o.id == id) {
                open.remove(name);
            }
        } else if let Some(o) = open.get_mut(name).filter(|o| o.id == id) {
            o.seen = Instant::now();
        }
        Ok(Some(answer))
    }

    /// Drops every leg whose coordinator went silent for [`LEG_KEEPALIVE`] and that no
    /// step is using: dropped, a leg aborts, or leaves its marker to the agent's settling.
    pub fn reap(&self) {
        let stale: Vec<(String, Open)> = {
            let mut open = self.open.lock().expect("not poisoned");
            let names: Vec<String> = open
                .iter()
                .filter(|(_, o)| {
                    o.seen.elapsed() > LEG_KEEPALIVE
                        && !matches!(
                            o.session.try_lock(),
                            Err(std::sync::TryLockError::WouldBlock)
                        )
                })
                .map(|(n, _)| n.clone())
                .collect();
            names
                .into_iter()
                .filter_map(|n| open.remove(&n).map(|o| (n, o)))
                .collect()
        };
        for (name, o) in stale {
            eprintln!("dczoned: the coordinator of {name}'s migration went silent; giving it up");
            drop(o);
        }
    }
}

/// A leg driven through its source host's agent: what the coordinator holds.
#[derive(Debug)]
pub struct AgentLeg {
    client: AgentClient,
    vm: String,
    /// The leg's id in its source agent.
    id: u64,
    view: LegView,
    /// Finished or aborted: nothing is left for `Drop` to do.
    settled: bool,
    /// Stops the keepalive thread.
    alive: Arc<AtomicBool>,
    /// The last pace sent: `Full` and `Throttle` are states, sent once.
    paced: Option<Pace>,
}

impl AgentLeg {
    /// Opens the leg of `vm` in its source host's agent (`client`).
    pub fn open(
        client: AgentClient,
        vm: &str,
        source_host: &str,
        body: &LegBody,
    ) -> Result<AgentLeg, VirtError> {
        let v = client
            .call(
                "POST",
                &format!("/v1/vms/{vm}/leg"),
                Some(serde_json::to_value(body).unwrap_or(Value::Null)),
                Duration::from_secs(60),
            )
            .map_err(|e| VirtError::MigrationFailed {
                vm: vm.into(),
                source_host: source_host.into(),
                reason: format!("its source agent could not open the migration: {e}"),
            })?;
        let a: LegAnswer = serde_json::from_value(v).map_err(|e| unreadable(vm, e))?;
        let id = a.leg.ok_or_else(|| unreadable(vm, "no leg id"))?;
        let alive = Arc::new(AtomicBool::new(true));
        let leg = AgentLeg {
            client: client.clone(),
            vm: vm.into(),
            id,
            view: a.view.ok_or_else(|| unreadable(vm, "no view"))?,
            settled: false,
            alive: alive.clone(),
            paced: None,
        };
        // The thread is born in this thread's network namespace (the lab's client host).
        let path = format!("/v1/vms/{vm}/leg/{id}");
        let body = serde_json::to_value(LegStep::Keepalive).unwrap_or(Value::Null);
        let _ = std::thread::Builder::new()
            .name(format!("keepalive-{vm}"))
            .spawn(move || {
                while alive.load(Ordering::SeqCst) {
                    std::thread::sleep(HEARTBEAT);
                    if let Err(CallError::Refused { code: 404, .. }) =
                        client.call("POST", &path, Some(body.clone()), HEARTBEAT)
                    {
                        break;
                    }
                }
            });
        Ok(leg)
    }

    fn step(&mut self, step: LegStep, timeout: Duration) -> Result<LegAnswer, VirtError> {
        let path = format!("/v1/vms/{}/leg/{}", self.vm, self.id);
        let body = serde_json::to_value(&step).unwrap_or(Value::Null);
        let v = self
            .client
            .call("POST", &path, Some(body), timeout)
            .map_err(|e| VirtError::Remote {
                vm: self.vm.clone(),
                agent: self.client.url().into(),
                reason: match e {
                    CallError::Refused { message, .. } => message,
                    e => e.to_string(),
                },
            })?;
        let a: LegAnswer = serde_json::from_value(v).map_err(|e| unreadable(&self.vm, e))?;
        if let Some(view) = &a.view {
            self.view = view.clone();
        }
        Ok(a)
    }
}

fn unreadable(vm: &str, e: impl std::fmt::Display) -> VirtError {
    VirtError::Io {
        what: format!("read the source agent's answer on {vm}'s migration"),
        source: std::io::Error::other(e.to_string()),
    }
}

/// A step that does one QMP command or two.
const SHORT: Duration = Duration::from_secs(30);

/// An abort: up to three QMP commands (10 s each while a blocked stream holds QEMU's lock)
/// and the destination agent's (5 s), after the step in progress on the same leg (seen:
/// an abort after a cut path took more than 30 s, and the command then reported the
/// source agent unreachable instead of the VM running on at its source).
const ABORT: Duration = Duration::from_secs(90);

impl Leg for AgentLeg {
    fn view(&self) -> LegView {
        self.view.clone()
    }

    fn start(&mut self, hold: bool, postcopy: bool, _params: &Params) -> Result<(), VirtError> {
        self.step(LegStep::Start { hold, postcopy }, SHORT)
            .map(drop)
    }

    fn check(&mut self, params: &Params) -> Result<Check, VirtError> {
        // After a post-copy switch a check may resume a broken stream, for up to the
        // migration's timeout; before, it is two QMP commands (10 s each at most, a QEMU
        // whose lock a blocked stream holds) and a call to the destination's agent, and a
        // source agent that does not answer within 30 s is as good as gone.
        let timeout = match self.view.switched {
            true => params.timeout + SHORT,
            false => SHORT,
        };
        // A leg that cannot be asked fails the batch as any failed leg does: every leg is
        // then aborted (this one too, as far as its agent can be reached).
        Ok(match self.step(LegStep::Check, timeout) {
            Ok(a) => a.check.unwrap_or(Check::Running),
            Err(e) => Check::Failed(dczone_lab::error_chain(&e)),
        })
    }

    fn pace(&mut self, pace: Pace, _params: &Params) -> Result<(), VirtError> {
        // Drain and Hold follow the leg's dirty rate: sent every time.
        let state = matches!(pace, Pace::Full | Pace::Throttle | Pace::Done);
        if pace == Pace::Done || (state && self.paced == Some(pace)) {
            return Ok(());
        }
        self.step(LegStep::Pace { pace }, SHORT)?;
        self.paced = Some(pace);
        Ok(())
    }

    fn stop(&mut self) -> Result<(), VirtError> {
        self.step(LegStep::Stop, SHORT).map(drop)
    }

    fn complete_stopped(&mut self, _params: &Params) -> Result<(), VirtError> {
        self.step(LegStep::CompleteStopped, SHORT).map(drop)
    }

    fn unthrottle(&mut self, _params: &Params) -> Result<(), VirtError> {
        self.step(LegStep::Unthrottle, SHORT).map(drop)
    }

    fn switch(&mut self) -> Result<(), VirtError> {
        self.step(LegStep::Switch, SHORT).map(drop)
    }

    fn note_switch(&mut self, reason: SwitchReason) {
        let _ = self.step(LegStep::NoteSwitch { reason }, SHORT);
    }

    fn finish(&mut self) -> Result<VmMigration, VirtError> {
        // Longer than the destination's finish may take (see RemoteDestination::finish).
        let a = self.step(LegStep::Finish, Duration::from_secs(120));
        // Whatever the answer, the source agent settled it or holds its marker.
        self.settled = a.is_ok();
        a?.migration
            .ok_or_else(|| unreadable(&self.vm, "no migration record"))
    }

    fn keeper_report(&mut self) -> Option<KeeperReport> {
        self.step(LegStep::Keeper, SHORT)
            .ok()
            .and_then(|a| a.keeper)
    }

    fn abort(&mut self, reason: String) -> VirtError {
        self.settled = true;
        match self.step(
            LegStep::Abort {
                reason: reason.clone(),
            },
            ABORT,
        ) {
            Ok(a) => VirtError::Remote {
                vm: self.vm.clone(),
                agent: self.client.url().into(),
                reason: a.aborted.unwrap_or(reason),
            },
            Err(e) => e,
        }
    }
}

impl Drop for AgentLeg {
    fn drop(&mut self) {
        self.alive.store(false, Ordering::SeqCst);
        if !self.settled {
            let _ = self.abort("the migration's coordinator gave up on it".into());
        }
    }
}
