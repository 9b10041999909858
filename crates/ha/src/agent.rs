//! One HA agent: it supervises its site's PostgreSQL, publishes the member's state to etcd
//! on its own lease, and acts on the platform's state every `loop_ms`:
//!
//! - **leader** (holds the leader key): renews the lease, applies the standby-failure
//!   policy (recording every switch in etcd *before* PostgreSQL acts on it), keeps the
//!   synchronous set in force, publishes its WAL position for the grey-data estimate;
//! - **follower**: streams from the leader; repoints when the leader changes; a former
//!   primary is rewound first;
//! - **no leader**: the standby that provably holds every acknowledged commit campaigns
//!   (an etcd transaction), then is promoted.
//!
//! Fencing: a watchdog thread stops PostgreSQL (SIGQUIT: immediate shutdown, then SIGKILL)
//! when the leader's lease could expire, measured from when the last successful renewal was
//! *sent*, minus a margin. It runs on its own thread so that a stuck etcd call cannot delay
//! it. PostgreSQL is the agent's child with PR_SET_PDEATHSIG, so killing the agent stops its
//! PostgreSQL as well (Patroni relies on a hardware watchdog for the same guarantee).

use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dczone_db::{Member, MemberState};
use dczone_zone::database::{DatabasePlan, Replication};
use tokio_postgres::Client as PgClient;

use crate::decide::{
    self, FailureTracker, MemberReport, ModeAction, StandbySeen, Switchover, SwitchoverRole,
    SyncState,
};
use crate::keys::{AuditEntry, Leader, Snapshot, Store, StoreError};

/// Why a step of the HA agent did not complete (the loop logs it and tries again next
/// tick), or why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum HaError {
    #[error("cannot start: a file of the etcd credentials cannot be read")]
    Credentials(#[source] StoreError),
    #[error("the lease keeper stopped")]
    KeeperStopped,
    #[error("cannot open the control socket {}", path.display())]
    Control {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("etcd: {what}")]
    Etcd {
        what: String,
        #[source]
        source: StoreError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Member(#[from] dczone_db::DbError),
    #[error("PostgreSQL")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("PostgreSQL: {0}")]
    Sql(String),
    #[error("no connection to this member's PostgreSQL")]
    NoConnection,
    #[error("a blocking task failed")]
    Task(#[from] tokio::task::JoinError),
    #[error("{what} failed")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("no failover yet: {0}")]
    NoFailover(String),
    #[error("no longer the leader; write refused")]
    NotLeader,
    #[error("leader {0} is not a member")]
    UnknownLeader(String),
}

impl HaError {
    fn etcd(what: impl Into<String>) -> impl FnOnce(StoreError) -> HaError {
        let what = what.into();
        move |source| HaError::Etcd { what, source }
    }
}

/// A standby within this many bytes of the primary counts as caught up.
pub const CATCHUP_BYTES: u64 = 1 << 20;
/// Fence this long before the lease could expire.
pub const FENCE_MARGIN_MS: u64 = 500;

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What one agent needs to know.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub lab: String,
    pub site: String,
    pub plan: DatabasePlan,
    /// Every member, in the zone's order (primary first).
    pub members: Vec<Member>,
    /// Who may connect to PostgreSQL over the network (`pg_hba.conf`, written at initdb).
    pub admitted: dczone_db::Admitted,
    pub etcd_endpoints: Vec<String>,
    /// This host's certificate, which etcd requires of every client.
    pub etcd_credentials: crate::keys::Credentials,
    /// Where the primary keeps etcd's raft leadership (client URLs): the witness's members
    /// if the zone has a witness, else this site's own (see `Store::move_etcd_leadership_to`).
    pub etcd_leader_home: Vec<String>,
}

impl AgentConfig {
    fn me(&self) -> &Member {
        self.members
            .iter()
            .find(|m| m.site == self.site)
            .expect("the agent's site is a member")
    }
    fn member(&self, site: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.site == site)
    }
    fn site_of_app(&self, app: &str) -> Option<String> {
        self.members
            .iter()
            .find(|m| m.app == app)
            .map(|m| m.site.clone())
    }
    fn order(&self) -> Vec<String> {
        self.members.iter().map(|m| m.site.clone()).collect()
    }
}

/// PostgreSQL as a child of a thread that lives as long as the agent (PR_SET_PDEATHSIG
/// fires when the *thread* that forked the child exits).
struct Supervisor {
    tx: mpsc::Sender<std::process::Command>,
    pid: Arc<AtomicI32>,
}

impl Supervisor {
    fn new() -> Supervisor {
        let (tx, rx) = mpsc::channel::<std::process::Command>();
        let pid = Arc::new(AtomicI32::new(0));
        let shared = pid.clone();
        std::thread::Builder::new()
            .name("pg-supervisor".into())
            .spawn(move || {
                let mut child: Option<Child> = None;
                loop {
                    match rx.recv_timeout(Duration::from_millis(20)) {
                        Ok(mut cmd) => {
                            // SAFETY: prctl and getppid are async-signal-safe. This runs after
                            // the uid change, which would otherwise clear the death signal.
                            unsafe {
                                std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                                    Ok(())
                                });
                            }
                            match cmd.spawn() {
                                Ok(c) => {
                                    shared.store(c.id() as i32, Ordering::SeqCst);
                                    child = Some(c);
                                }
                                Err(e) => eprintln!("cannot start postgres: {e}"),
                            }
                        }
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                    if let Some(c) = child.as_mut() {
                        if let Ok(Some(status)) = c.try_wait() {
                            eprintln!("postgres exited: {status}");
                            shared.store(0, Ordering::SeqCst);
                            child = None;
                        }
                    }
                }
            })
            .expect("spawn the supervisor thread");
        Supervisor { tx, pid }
    }

    fn running(&self) -> bool {
        self.pid.load(Ordering::SeqCst) != 0
    }

    fn start(&self, cmd: std::process::Command) {
        let _ = self.tx.send(cmd);
    }

    /// Asks the postmaster for a fast shutdown (SIGINT) without waiting.
    fn interrupt(&self) {
        let p = self.pid.load(Ordering::SeqCst);
        if p != 0 {
            // SAFETY: signalling our own child by pid.
            unsafe { libc::kill(p, libc::SIGINT) };
        }
    }

    /// Fast (clean) shutdown, falling back to [`Supervisor::stop`] after 10 s.
    fn stop_clean(&self) {
        if !self.running() {
            return;
        }
        self.interrupt();
        let t = Instant::now();
        while self.running() && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.stop();
    }

    /// Immediate shutdown, then SIGKILL; waits until the postmaster is gone.
    fn stop(&self) {
        stop_postmaster(&self.pid);
        while self.running() {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn stop_postmaster(pid: &AtomicI32) {
    let p = pid.load(Ordering::SeqCst);
    if p == 0 {
        return;
    }
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(p, libc::SIGQUIT) };
    let t = Instant::now();
    while pid.load(Ordering::SeqCst) == p && t.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(5));
    }
    if pid.load(Ordering::SeqCst) == p {
        // SAFETY: as above.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
}

/// Shared between the loop, the lease keeper and the watchdog.
struct Shared {
    started: Instant,
    /// Monotonic ms (since `started`) of the send time of the last successful renewal.
    renewed_at: AtomicU64,
    /// Set while we hold the leader key: the watchdog then enforces the deadline.
    leading: AtomicBool,
    fenced: AtomicBool,
    lease_lost: AtomicBool,
    ttl_ms: u64,
    /// The current etcd client: the loop replaces it when calls keep failing, and the lease
    /// keeper and the watchers pick the new one up.
    store: std::sync::Mutex<Store>,
}

impl Shared {
    fn mono_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn store(&self) -> Store {
        self.store.lock().expect("store lock").clone()
    }
}

/// After this many etcd calls in a row failed, the agent builds a new etcd client.
///
/// gRPC's balanced channel can stay on dead connections after its endpoints restarted
/// (a consensus rebuild stops and restarts every surviving member): seen here, an agent's
/// every call timed out for 17 s, until the test's deadline, after both of its members
/// answered the CLI's new clients again. Patroni likewise drops its etcd connection and
/// picks an endpoint afresh after a failed request.
const RECONNECT_AFTER_FAILURES: u32 = 5;
/// The lease keeper's own count: two renewals in a row without an answer.
const LEASE_RECONNECT_AFTER_FAILURES: u32 = 2;

fn log(site: &str, msg: &str) {
    eprintln!("{} [{site}] {msg}", unix_ms());
}

struct Agent {
    cfg: AgentConfig,
    store: Store,
    lease: i64,
    shared: Arc<Shared>,
    pg: Supervisor,
    client: Option<PgClient>,
    tracker: FailureTracker,
    leader: Option<Leader>,
    /// The open audit entry of the current unprotected window, if any.
    window_start: Option<u64>,
    /// When the leader last checked where etcd's raft leader is.
    etcd_leader_checked: Option<Instant>,
    /// This standby's WAL position, and since when it has not moved while the leader's is
    /// ahead of it.
    stuck: Option<(u64, Instant)>,
    /// Consecutive starts of PostgreSQL that did not come up (as a follower).
    failed_starts: u32,
    /// etcd calls failed in a row (see [`RECONNECT_AFTER_FAILURES`]).
    etcd_failures: u32,
}

/// A follower whose PostgreSQL fails to start this many times in a row is cloned afresh.
const MAX_FAILED_STARTS: u32 = 20;

/// A standby whose WAL position stays behind the leader's without moving for this long has
/// diverged from it (its WAL went past the new leader's timeline fork) and is rewound.
const DIVERGED_AFTER: Duration = Duration::from_secs(8);

/// Runs the agent until killed.
pub async fn run(cfg: AgentConfig) -> Result<(), HaError> {
    let site = cfg.site.clone();
    let store = loop {
        match Store::connect(&cfg.lab, &cfg.etcd_endpoints, &cfg.etcd_credentials).await {
            Ok(s) => break s,
            // Missing or unreadable credential files are a configuration fault, not an
            // outage: say so and stop, rather than wait for etcd forever.
            Err(e @ StoreError::Credential { .. }) => return Err(HaError::Credentials(e)),
            Err(e) => {
                log(&site, &format!("waiting for etcd: {e}"));
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    // The host's agent reads the state and files switchovers through this agent.
    let socket = crate::control::socket_path(&cfg.me().dir);
    let listener = crate::control::bind(&socket).map_err(|source| HaError::Control {
        path: socket.clone(),
        source,
    })?;
    let ttl_ms = cfg.plan.ha.lease_ttl_ms;
    let shared = Arc::new(Shared {
        started: Instant::now(),
        renewed_at: AtomicU64::new(0),
        leading: AtomicBool::new(false),
        fenced: AtomicBool::new(false),
        lease_lost: AtomicBool::new(false),
        ttl_ms,
        store: std::sync::Mutex::new(store.clone()),
    });
    let current = shared.clone();
    tokio::spawn(crate::control::serve(
        listener,
        Arc::new(move || current.store()),
        cfg.plan.policies.keys().cloned().collect(),
    ));
    let pg = Supervisor::new();
    spawn_watchdog(shared.clone(), pg.pid.clone(), site.clone());
    let mut agent = Agent {
        cfg,
        store,
        lease: 0,
        shared,
        pg,
        client: None,
        tracker: FailureTracker::default(),
        leader: None,
        window_start: None,
        etcd_leader_checked: None,
        stuck: None,
        failed_starts: 0,
        etcd_failures: 0,
    };
    agent.new_lease().await;
    let keeper = tokio::spawn(keep_lease(
        agent.shared.clone(),
        agent.lease_cell(),
        (
            agent.cfg.lab.clone(),
            agent.cfg.etcd_endpoints.clone(),
            agent.cfg.etcd_credentials.clone(),
        ),
    ));
    let tick = Duration::from_millis(agent.cfg.plan.ha.loop_ms);
    let wake = Arc::new(tokio::sync::Notify::new());
    for key in [agent.store.keys.leader(), agent.store.keys.switchover()] {
        tokio::spawn(wake_on_change(agent.shared.clone(), key, wake.clone()));
    }
    loop {
        let t = Instant::now();
        if agent.shared.lease_lost.swap(false, Ordering::SeqCst) {
            if agent.shared.leading.swap(false, Ordering::SeqCst) {
                agent.fence("the leader lease expired");
            }
            agent.new_lease().await;
        }
        if let Err(e) = agent.step().await {
            log(&site, &dczone_zone::error_chain(&e));
        }
        let spent = t.elapsed();
        if spent < tick {
            tokio::select! {
                _ = tokio::time::sleep(tick - spent) => {}
                _ = wake.notified() => {}
            }
        }
        if keeper.is_finished() {
            return Err(HaError::KeeperStopped);
        }
    }
}

/// Wakes the loop as soon as `key` changes (the leader key deleted by a lease expiry or a
/// resignation, a switchover requested), instead of at the next tick. Polling stays the
/// mechanism; a watch that breaks is re-established after a pause.
async fn wake_on_change(shared: Arc<Shared>, key: String, wake: Arc<tokio::sync::Notify>) {
    loop {
        let mut c = shared.store().client;
        if let Ok(Ok((_watcher, mut stream))) =
            tokio::time::timeout(Duration::from_millis(400), c.watch(key.clone(), None)).await
        {
            while let Ok(Some(resp)) = stream.message().await {
                if !resp.events().is_empty() {
                    wake.notify_one();
                }
                if resp.canceled() {
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

static LEASE: AtomicU64 = AtomicU64::new(0);

/// Renews the current lease every ttl/6; records the send time of each success.
async fn keep_lease(
    shared: Arc<Shared>,
    lease: &'static AtomicU64,
    etcd: (String, Vec<String>, crate::keys::Credentials),
) {
    let mut failures = 0u32;
    let every = Duration::from_millis((shared.ttl_ms / 6).max(100));
    let mut current = 0i64;
    let mut keeper: Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)> = None;
    loop {
        tokio::time::sleep(every).await;
        let id = lease.load(Ordering::SeqCst) as i64;
        if id == 0 {
            continue;
        }
        if id != current {
            keeper = None;
            current = id;
        }
        let sent = shared.mono_ms();
        if keeper.is_none() {
            let mut c = shared.store().client;
            keeper = tokio::time::timeout(Duration::from_millis(400), c.lease_keep_alive(id))
                .await
                .ok()
                .and_then(Result::ok);
        }
        let Some((k, stream)) = keeper.as_mut() else {
            continue;
        };
        let renewed = async {
            k.keep_alive().await?;
            stream.message().await
        };
        match tokio::time::timeout(Duration::from_millis(400), renewed).await {
            Ok(Ok(Some(resp))) if resp.ttl() > 0 => {
                shared.renewed_at.store(sent, Ordering::SeqCst);
                failures = 0;
            }
            Ok(Ok(Some(_))) => {
                // ttl 0: etcd no longer knows the lease.
                shared.lease_lost.store(true, Ordering::SeqCst);
                keeper = None;
            }
            Ok(Err(e)) if lease_gone(&e.to_string()) => {
                shared.lease_lost.store(true, Ordering::SeqCst);
                keeper = None;
            }
            _ => {
                keeper = None;
                // A leader is fenced ttl - margin after its last renewal: it cannot wait
                // for the loop's five failures to get a working client.
                failures += 1;
                if failures >= LEASE_RECONNECT_AFTER_FAILURES {
                    match Store::connect(&etcd.0, &etcd.1, &etcd.2).await {
                        Ok(store) => *shared.store.lock().expect("store lock") = store,
                        Err(e) => log("lease keeper", &format!("cannot reconnect to etcd: {e}")),
                    }
                    failures = 0;
                }
            }
        }
    }
}

fn lease_gone(error: &str) -> bool {
    error.contains("lease not found")
}

/// Stops PostgreSQL when a leader's lease could have expired, whatever the loop is doing.
fn spawn_watchdog(shared: Arc<Shared>, pid: Arc<AtomicI32>, site: String) {
    std::thread::Builder::new()
        .name("fence-watchdog".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_millis(10));
            if !shared.leading.load(Ordering::SeqCst) {
                continue;
            }
            let deadline = decide::fence_deadline_ms(
                shared.renewed_at.load(Ordering::SeqCst),
                shared.ttl_ms,
                FENCE_MARGIN_MS,
            );
            if decide::must_fence(shared.mono_ms(), deadline) {
                shared.leading.store(false, Ordering::SeqCst);
                shared.fenced.store(true, Ordering::SeqCst);
                log(
                    &site,
                    "fencing: the leader lease could not be renewed in time",
                );
                stop_postmaster(&pid);
            }
        })
        .expect("spawn the watchdog thread");
}

impl Agent {
    fn lease_cell(&self) -> &'static AtomicU64 {
        &LEASE
    }

    async fn new_lease(&mut self) {
        let ttl_s = self.cfg.plan.ha.lease_ttl_ms.div_ceil(1000) as i64;
        loop {
            let mut c = self.store.client.clone();
            let sent = self.shared.mono_ms();
            match tokio::time::timeout(Duration::from_millis(400), c.lease_grant(ttl_s, None)).await
            {
                Ok(Ok(resp)) => {
                    self.lease = resp.id();
                    self.shared.renewed_at.store(sent, Ordering::SeqCst);
                    LEASE.store(resp.id() as u64, Ordering::SeqCst);
                    return;
                }
                _ => {
                    self.etcd_failed().await;
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
            }
        }
    }

    /// Counts a failed etcd call; after [`RECONNECT_AFTER_FAILURES`] in a row, replaces the
    /// client with a new one.
    async fn etcd_failed(&mut self) {
        self.etcd_failures += 1;
        if self.etcd_failures < RECONNECT_AFTER_FAILURES {
            return;
        }
        let connected = Store::connect(
            &self.cfg.lab,
            &self.cfg.etcd_endpoints,
            &self.cfg.etcd_credentials,
        )
        .await;
        if let Err(e) = &connected {
            log(
                &self.cfg.site,
                &format!(
                    "cannot replace the etcd client after {} failed calls: {e}",
                    self.etcd_failures
                ),
            );
        }
        if let Ok(store) = connected {
            log(
                &self.cfg.site,
                &format!(
                    "new etcd client after {} failed calls in a row",
                    self.etcd_failures
                ),
            );
            *self.shared.store.lock().expect("store lock") = store.clone();
            self.store = store;
        }
        self.etcd_failures = 0;
    }

    fn fence(&mut self, why: &str) {
        log(&self.cfg.site, &format!("fencing: {why}"));
        self.shared.leading.store(false, Ordering::SeqCst);
        self.shared.fenced.store(true, Ordering::SeqCst);
        self.leader = None;
        self.client = None;
        self.pg.stop();
    }

    async fn local(&mut self) -> Option<MemberState> {
        if !self.pg.running() {
            self.client = None;
            return None;
        }
        if self.client.is_none() {
            let cfg = self.cfg.me().local_config("postgres");
            self.client = dczone_db::connect(&self.cfg.site, &cfg, Duration::from_millis(500))
                .await
                .ok();
        }
        let c = self.client.as_ref()?;
        match tokio::time::timeout(
            Duration::from_millis(500),
            dczone_db::member_state(&self.cfg.site, c),
        )
        .await
        {
            Ok(Ok(s)) => Some(s),
            _ => {
                self.client = None;
                None
            }
        }
    }

    fn is_standby_dir(&self) -> bool {
        self.cfg.me().data().join("standby.signal").exists()
    }

    fn start_pg(&self) -> Result<(), HaError> {
        if self.pg.running() || !self.cfg.me().initialized() {
            return Ok(());
        }
        let cmd = self.cfg.me().postgres_command().map_err(HaError::from)?;
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.cfg.me().log())
            .map_err(|source| HaError::Io {
                what: "open the postgres log",
                source,
            })?;
        let mut cmd = cmd;
        let out = log_file.try_clone().map_err(|source| HaError::Io {
            what: "open the postgres log",
            source,
        })?;
        cmd.stdout(out)
            .stderr(log_file)
            .stdin(std::process::Stdio::null());
        log(&self.cfg.site, "starting postgres");
        self.pg.start(cmd);
        Ok(())
    }

    async fn step(&mut self) -> Result<(), HaError> {
        let local = self.local().await;
        let report = MemberReport {
            site: self.cfg.site.clone(),
            pg_up: local.is_some(),
            in_recovery: local.as_ref().is_some_and(|l| l.in_recovery),
            lsn: local.as_ref().map_or(0, |l| l.lsn),
            fenced: self.shared.fenced.load(Ordering::SeqCst),
            at_ms: unix_ms(),
        };
        // The lease keeper may have replaced the client.
        self.store = self.shared.store();
        let key = self.store.keys.member(&self.cfg.site);
        if let Err(e) = self.store.put_json(&key, &report, Some(self.lease)).await {
            if lease_gone(&e.to_string()) {
                self.shared.lease_lost.store(true, Ordering::SeqCst);
            }
            self.etcd_failed().await;
            return Err(HaError::etcd("publish the member report")(e));
        }
        let snap = match self.store.snapshot().await {
            Ok(snap) => snap,
            Err(e) => {
                self.etcd_failed().await;
                return Err(HaError::etcd("read the cluster state")(e));
            }
        };
        self.etcd_failures = 0;
        match snap.leader.clone() {
            Some(l) if l.site == self.cfg.site && l.lease == self.lease => {
                let deadline = decide::fence_deadline_ms(
                    self.shared.renewed_at.load(Ordering::SeqCst),
                    self.shared.ttl_ms,
                    FENCE_MARGIN_MS,
                );
                if !self.shared.leading.load(Ordering::SeqCst)
                    && decide::must_fence(self.shared.mono_ms(), deadline)
                {
                    // Fenced while consensus was lost, and the key survived (etcd refreshes
                    // every lease when it elects a leader): lead again only once the lease
                    // has been renewed, or the watchdog fences the restart at once.
                    return Ok(());
                }
                self.leader = Some(l.clone());
                self.shared.leading.store(true, Ordering::SeqCst);
                self.shared.fenced.store(false, Ordering::SeqCst);
                self.lead(&l, local, &snap).await
            }
            Some(l) if l.site == self.cfg.site => {
                // Our own key from a previous lease (the agent restarted): wait until it
                // expires; our PostgreSQL died with the previous agent.
                self.shared.leading.store(false, Ordering::SeqCst);
                Ok(())
            }
            Some(l) => {
                if self.shared.leading.swap(false, Ordering::SeqCst) {
                    self.fence("another member holds the leader key");
                }
                // The leader records its replication state only after its promotion and
                // checkpoint; until then its control file still names the old timeline, and
                // pg_rewind against it would go back to a checkpoint before the fork.
                let promoted = snap
                    .sync
                    .as_ref()
                    .is_some_and(|s| s.primary == l.site && s.rewind_ready);
                self.follow(&l, local, snap.primary_lsn, promoted).await
            }
            None => {
                if self.shared.leading.swap(false, Ordering::SeqCst) {
                    self.fence("the leader key is gone");
                }
                self.elect(local, &snap).await
            }
        }
    }

    /// No leader: bootstrap, or fail over to the standby that provably has every commit.
    async fn elect(&mut self, local: Option<MemberState>, snap: &Snapshot) -> Result<(), HaError> {
        let me = self.cfg.site.clone();
        let bootstrap = snap.sync.is_none();
        let mut planned = SwitchoverRole::None;
        if bootstrap {
            if me != self.cfg.plan.primary {
                return Ok(());
            }
            if !self.cfg.me().initialized() {
                self.cfg
                    .me()
                    .initdb(&self.cfg.admitted)
                    .map_err(HaError::from)?;
            }
        } else {
            if self.shared.fenced.load(Ordering::SeqCst) || !self.is_standby_dir() {
                // A fenced or former primary waits for a new leader and rewinds onto it.
                return Ok(());
            }
            if local.is_none() {
                return self.start_pg();
            }
            let freshness = 3 * self.cfg.plan.ha.loop_ms + 300;
            let my_lsn = local.as_ref().map_or(0, |l| l.lsn);
            planned = decide::switchover_role(snap.switchover.as_ref(), &me, my_lsn, unix_ms());
            if let Some(f) = snap.failover.as_ref().filter(|f| f.fresh(unix_ms())) {
                // The operator ordered a failover: only its target campaigns.
                if f.to != me {
                    return Ok(());
                }
                planned = SwitchoverRole::Campaign;
            }
            match planned {
                SwitchoverRole::Wait => {
                    // Another member takes over: stream from it already (cascading until it
                    // is promoted), so that it has its synchronous standby at once.
                    let target = snap
                        .switchover
                        .as_ref()
                        .filter(|r| r.to != me)
                        .and_then(|r| self.cfg.member(&r.to).cloned());
                    if let (Some(target), Some(local)) = (target, local.as_ref()) {
                        return self.repoint(local, &target).await;
                    }
                    return Ok(());
                }
                SwitchoverRole::Campaign => {}
                SwitchoverRole::None => match decide::choose_candidate(
                    snap.sync.as_ref(),
                    &snap.members,
                    &self.cfg.order(),
                    unix_ms(),
                    freshness,
                ) {
                    Ok(c) if c == me => {}
                    Ok(_) => return Ok(()),
                    Err(why) => return Err(HaError::NoFailover(format!("{why:?}"))),
                },
            }
        }
        let leader = Leader {
            site: me.clone(),
            lease: self.lease,
            since_ms: unix_ms(),
        };
        if !self.store.campaign(&leader).await.map_err(HaError::from)? {
            return Ok(());
        }
        log(&me, "won the leader key");
        self.shared.leading.store(true, Ordering::SeqCst);
        self.shared.fenced.store(false, Ordering::SeqCst);
        self.leader = Some(leader.clone());
        if !bootstrap {
            let grey = snap
                .primary_lsn
                .zip(local.as_ref().map(|l| l.lsn))
                .map(|(p, mine)| p.saturating_sub(mine));
            let old = snap
                .sync
                .as_ref()
                .map(|s| s.primary.clone())
                .unwrap_or_default();
            let entry = match (snap.failover.as_ref(), snap.switchover.as_ref()) {
                (Some(f), _) if f.to == me && f.fresh(unix_ms()) => AuditEntry {
                    kind: "manual-failover".into(),
                    primary: me.clone(),
                    start_ms: f.requested_ms,
                    end_ms: Some(leader.since_ms),
                    reason: f.reason.clone(),
                    grey_bytes: grey,
                },
                (_, Some(r)) if planned == SwitchoverRole::Campaign => AuditEntry {
                    kind: "switchover".into(),
                    primary: me.clone(),
                    start_ms: r.requested_ms,
                    end_ms: Some(leader.since_ms),
                    reason: format!(
                        "planned: {} shut down cleanly; {me} holds all of its WAL",
                        r.from
                    ),
                    grey_bytes: Some(0),
                },
                (_, _) => AuditEntry {
                    kind: "failover".into(),
                    primary: me.clone(),
                    start_ms: leader.since_ms,
                    end_ms: Some(leader.since_ms),
                    reason: format!(
                        "{old} lost its lease; {me} holds every acknowledged commit ({})",
                        match snap.sync.as_ref().map(|s| s.mode) {
                            Some(Replication::Sync) => "synchronous",
                            _ => "asynchronous: most advanced standby",
                        }
                    ),
                    grey_bytes: grey,
                },
            };
            // Every failover goes to the audit log: retried, since one of this site's etcd
            // members may be briefly unreachable (a member rejoining after a rebuild).
            let key = self.store.keys.audit(leader.since_ms);
            for _ in 0..5 {
                match self.store.put_as_leader(&leader, &key, &entry).await {
                    Ok(_) => break,
                    Err(e) => {
                        log(&me, &format!("audit entry not written yet: {e}"));
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
        // Promote now rather than at the next tick: until then no commit is possible.
        self.lead(&leader, local, snap).await
    }

    /// The primary's duties.
    async fn lead(
        &mut self,
        me: &Leader,
        local: Option<MemberState>,
        snap: &Snapshot,
    ) -> Result<(), HaError> {
        let site = self.cfg.site.clone();
        if let Some(r) = snap.switchover.as_ref() {
            if r.from == site && r.handing_over(unix_ms()) {
                // We handed over but the key is still ours (the resignation did not reach
                // etcd): resign again rather than restart as primary.
                return self.resign(me).await;
            }
        }
        let Some(local) = local else {
            return self.start_pg();
        };
        let policy = match snap
            .tier
            .as_ref()
            .and_then(|t| self.cfg.plan.policies.get(t))
        {
            Some(p) => p.clone(),
            None => self.cfg.plan.policy().clone(),
        };
        let order = self.cfg.order();
        let set = policy.sync_set(&site, &order);
        let k = decide::quorum_of(&policy, &set);
        let names = policy.standby_names(&set);
        let recorded = snap
            .sync
            .clone()
            .filter(|s| s.primary == site && s.tier == policy.name);
        let fresh_state = recorded.is_none();
        let mut state = match recorded {
            Some(s) => s,
            None => {
                // A new primary or a new policy. Under sync, PostgreSQL enforces the set
                // before etcd says so; under async, etcd says so before PostgreSQL relaxes.
                let now = unix_ms();
                let freshness = 3 * self.cfg.plan.ha.loop_ms + 300;
                // After a planned switchover the old primary rejoins at once as a standby:
                // its commits wait for it as the policy says, as they did before.
                let planned = snap
                    .switchover
                    .as_ref()
                    .is_some_and(|r| r.to == site && r.handed_over_ms.is_some());
                let (mode, unprotected) = if planned {
                    (policy.replication, None)
                } else {
                    decide::initial_mode(&policy, &set, k, &snap.members, now, freshness)
                };
                let s = SyncState {
                    primary: site.clone(),
                    tier: policy.name.clone(),
                    mode,
                    set: if mode == Replication::Sync {
                        set.clone()
                    } else {
                        vec![]
                    },
                    quorum: k,
                    since_ms: now,
                    reason: match &unprotected {
                        Some(why) => why.clone(),
                        None => format!(
                            "{} under policy {}",
                            if local.in_recovery {
                                "promoted"
                            } else {
                                "leading"
                            },
                            policy.name
                        ),
                    },
                    rewind_ready: !local.in_recovery,
                };
                let c = self.client.as_ref().ok_or(HaError::NoConnection)?;
                if mode == Replication::Sync {
                    dczone_db::set_and_reload(&site, c, "synchronous_standby_names", &names)
                        .await
                        .map_err(HaError::from)?;
                } else {
                    let mut writes = vec![(self.store.keys.sync(), json_bytes(&s))];
                    let opens_window = unprotected.is_some();
                    if let Some(reason) = unprotected {
                        writes.push(self.window_opening(now, reason));
                    }
                    self.write_all_as_leader(me, writes).await?;
                    if opens_window {
                        self.window_start = Some(now);
                    }
                    dczone_db::set_and_reload(&site, c, "synchronous_standby_names", "")
                        .await
                        .map_err(HaError::from)?;
                }
                self.tracker = FailureTracker::default();
                s
            }
        };
        if local.in_recovery {
            // The synchronous set (or, recorded in etcd first, its absence) is in force
            // before promotion: the first commits are protected as the state says.
            let c = self.client.as_ref().ok_or(HaError::NoConnection)?;
            // Stop the WAL receiver first: while it retries the old primary, the startup
            // process takes ~170 ms to act on the promotion (measured in the PostgreSQL log:
            // "received promote request" to "redo done").
            dczone_db::set_and_reload(&site, c, "primary_conninfo", "")
                .await
                .map_err(HaError::from)?;
            let tli = self.reserve_timeline(me, snap).await?;
            let c = self.client.as_ref().ok_or(HaError::NoConnection)?;
            log(&site, &format!("promoting onto timeline {tli}"));
            dczone_db::promote(&site, c).await.map_err(HaError::from)?;
            // pg_rewind reads the new timeline from the control file, which only a
            // checkpoint updates (PostgreSQL's pg_rewind docs say the same).
            c.batch_execute("CHECKPOINT")
                .await
                .map_err(|e| HaError::Sql(dczone_db::pg_message(&e)))?;
            match dczone_db::checkpoint_timeline(&site, c).await {
                Ok(t) if t == tli => log(&site, "promoted"),
                Ok(t) => log(
                    &site,
                    &format!("promoted onto timeline {t}, not the reserved {tli}"),
                ),
                Err(e) => log(&site, &format!("promoted; timeline unknown: {e}")),
            }
        }
        // Recorded only now under sync, and again once promoted under async: followers
        // rewind only onto a primary whose state says it is ready.
        if (fresh_state && state.mode == Replication::Sync) || !state.rewind_ready {
            state.rewind_ready = true;
            self.write_as_leader(me, &self.store.keys.sync(), &state)
                .await?;
        }
        let c = self.client.as_ref().ok_or(HaError::NoConnection)?;
        let replicas = dczone_db::replicas(&site, c).await.map_err(HaError::from)?;
        let seen: Vec<StandbySeen> = replicas
            .iter()
            .filter_map(|r| {
                let site = self.cfg.site_of_app(&r.app)?;
                let heartbeat = snap.members.iter().any(|m| {
                    m.site == site
                        && m.pg_up
                        && m.at_ms + decide::HEARTBEAT_LOOPS * self.cfg.plan.ha.loop_ms >= unix_ms()
                });
                Some(StandbySeen {
                    site,
                    streaming: r.state == "streaming",
                    flush_lsn: r.flush_lsn,
                    reply_age_ms: r.reply_age_ms.unwrap_or(f64::MAX),
                    heartbeat,
                })
            })
            .collect();
        if snap.failover.is_some() && !local.in_recovery {
            // The ordered failover is done (or was for another member and is void now).
            let _ = self
                .store
                .delete_as_leader(me, &self.store.keys.failover())
                .await;
        }
        if let Some(r) = snap.switchover.as_ref() {
            if r.handed_over_ms.is_some() {
                // A handover finished (to us, or the ordinary election decided): done.
                if !local.in_recovery {
                    let _ = self
                        .store
                        .delete_as_leader(me, &self.store.keys.switchover())
                        .await;
                }
            } else if r.refused.is_none() {
                let freshness = 3 * self.cfg.plan.ha.loop_ms + 300;
                match decide::switchover_refusal(
                    r,
                    &site,
                    &snap.members,
                    &seen,
                    unix_ms(),
                    freshness,
                ) {
                    Some(why) => {
                        log(&site, &format!("switchover to {} refused: {why}", r.to));
                        let refused = Switchover {
                            refused: Some(why),
                            ..r.clone()
                        };
                        self.write_as_leader(me, &self.store.keys.switchover(), &refused)
                            .await?;
                    }
                    None => return self.hand_over(me, r.clone()).await,
                }
            }
        }
        let c = self.client.as_ref().ok_or(HaError::NoConnection)?;
        let wait = dczone_db::oldest_sync_wait_ms(&site, c)
            .await
            .map_err(HaError::from)?;
        let action = decide::replication_mode(
            &policy,
            state.mode,
            &set,
            k,
            &seen,
            local.lsn,
            wait,
            CATCHUP_BYTES,
            unix_ms(),
            &mut self.tracker,
        );
        let want_names = match action {
            ModeAction::ToAsync { reason } => {
                let now = unix_ms();
                let s = SyncState {
                    mode: Replication::Async,
                    set: vec![],
                    since_ms: now,
                    reason: reason.clone(),
                    ..state.clone()
                };
                // etcd first: a failover must know these commits are unprotected.
                let window = self.window_opening(now, reason);
                self.write_all_as_leader(
                    me,
                    vec![(self.store.keys.sync(), json_bytes(&s)), window],
                )
                .await?;
                self.window_start = Some(now);
                log(&site, &format!("switched to async: {}", s.reason));
                String::new()
            }
            ModeAction::ToSync => {
                let c = self.client.as_ref().ok_or(HaError::NoConnection)?;
                // PostgreSQL first: etcd may say async while commits are protected, never
                // the reverse.
                dczone_db::set_and_reload(&site, c, "synchronous_standby_names", &names)
                    .await
                    .map_err(HaError::from)?;
                let now = unix_ms();
                let s = SyncState {
                    mode: Replication::Sync,
                    set: set.clone(),
                    quorum: k,
                    since_ms: now,
                    reason: "standbys caught up".into(),
                    ..state.clone()
                };
                let start = self.window_start.take().unwrap_or(state.since_ms);
                let mut writes = vec![(self.store.keys.sync(), json_bytes(&s))];
                // The window closes in the same transaction as the mode returns.
                if let Some(mut e) = snap
                    .audit
                    .iter()
                    .find(|e| e.start_ms == start && e.end_ms.is_none())
                    .cloned()
                {
                    e.end_ms = Some(now);
                    writes.push((self.store.keys.audit(start), json_bytes(&e)));
                }
                self.write_all_as_leader(me, writes).await?;
                log(&site, "back to sync");
                names.clone()
            }
            ModeAction::Stalled { reason } => {
                log(&site, &format!("commits wait (data-first): {reason}"));
                names.clone()
            }
            ModeAction::Slow { reason } => {
                if self.tracker.slow_since_ms.is_none() {
                    log(&site, &format!("commits wait: {reason}"));
                }
                self.tracker.slow_since_ms.get_or_insert(unix_ms());
                names.clone()
            }
            ModeAction::Keep => match state.mode {
                Replication::Sync => names.clone(),
                Replication::Async => String::new(),
            },
        };
        let c = self.client.as_ref().ok_or(HaError::NoConnection)?;
        let current = dczone_db::show(&site, c, "synchronous_standby_names")
            .await
            .map_err(HaError::from)?;
        if current != want_names {
            dczone_db::set_and_reload(&site, c, "synchronous_standby_names", &want_names)
                .await
                .map_err(HaError::from)?;
        }
        let commit = dczone_db::show(&site, c, "synchronous_commit")
            .await
            .map_err(HaError::from)?;
        if commit != policy.synchronous_commit {
            dczone_db::set_and_reload(&site, c, "synchronous_commit", &policy.synchronous_commit)
                .await
                .map_err(HaError::from)?;
        }
        if self
            .etcd_leader_checked
            .is_none_or(|t| t.elapsed() > Duration::from_secs(2))
        {
            self.etcd_leader_checked = Some(Instant::now());
            if let Ok(true) = self
                .store
                .move_etcd_leadership_to(&self.cfg.etcd_leader_home)
                .await
            {
                log(&site, "moved etcd's raft leadership home");
            }
        }
        self.store
            .put_json(&self.store.keys.primary_lsn(), &local.lsn, None)
            .await
            .map_err(HaError::from)
    }

    /// Reserves in etcd the timeline this standby's promotion creates, above every timeline
    /// reserved before, and makes PostgreSQL skip the numbers it does not know are taken
    /// (see [`decide::next_timeline`]). No promotion without the reservation.
    async fn reserve_timeline(&mut self, me: &Leader, snap: &Snapshot) -> Result<u32, HaError> {
        let site = self.cfg.site.clone();
        let c = self.client.as_ref().ok_or(HaError::NoConnection)?;
        let control = dczone_db::checkpoint_timeline(&site, c)
            .await
            .map_err(HaError::from)?;
        let member = self.cfg.me().clone();
        let history = member.history_timelines().map_err(HaError::from)?;
        let (tli, skipped) = decide::next_timeline(control, &history, snap.timeline);
        for t in &skipped {
            member
                .reserve_timeline(*t, "reserved in etcd by another member's promotion")
                .map_err(HaError::from)?;
        }
        if !skipped.is_empty() {
            log(
                &site,
                &format!("timelines {skipped:?} are taken; skipping them"),
            );
        }
        self.write_as_leader(me, &self.store.keys.timeline(), &tli)
            .await?;
        Ok(tli)
    }

    /// Planned switchover, the old primary's half: shut down cleanly (PostgreSQL's fast
    /// shutdown sends every WAL record, the shutdown checkpoint included, to the connected
    /// standbys before it exits), record where the WAL ends, and give up the leader key.
    /// The target takes the key once it has received that much WAL; this member then
    /// rejoins as its standby through the ordinary follower path.
    async fn hand_over(&mut self, me: &Leader, req: Switchover) -> Result<(), HaError> {
        let site = self.cfg.site.clone();
        log(&site, &format!("switchover to {}: clean shutdown", req.to));
        self.client = None;
        self.pg.interrupt();
        let t = Instant::now();
        while self.pg.running() && t.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.pg.stop();
        let me_member = self.cfg.me().clone();
        let final_lsn = tokio::task::spawn_blocking(move || me_member.shutdown_checkpoint())
            .await
            .map_err(HaError::from)?
            .map_err(HaError::from)?;
        let done = Switchover {
            final_lsn,
            handed_over_ms: Some(unix_ms()),
            ..req
        };
        let target = self.cfg.member(&done.to).cloned();
        self.write_as_leader(me, &self.store.keys.switchover(), &done)
            .await?;
        log(
            &site,
            &match final_lsn {
                Some(l) => format!("WAL ends at {l:X}; resigning the leader key"),
                None => "no clean shutdown; resigning, the ordinary election decides".into(),
            },
        );
        self.resign(me).await?;
        // After a clean shutdown the target's new timeline forks exactly where our WAL
        // ends, so no rewind is needed: start at once as its standby (cascading until it is
        // promoted), ready to be the new primary's synchronous standby.
        if let (Some(_), Some(target)) = (final_lsn, target) {
            let m = self.cfg.me().clone();
            tokio::task::spawn_blocking(move || m.follow(&target))
                .await
                .map_err(HaError::from)?
                .map_err(HaError::from)?;
            log(
                &site,
                &format!("standby of {} from the end of its WAL", done.to),
            );
            self.start_pg()?;
        }
        Ok(())
    }

    async fn resign(&mut self, me: &Leader) -> Result<(), HaError> {
        self.shared.leading.store(false, Ordering::SeqCst);
        self.leader = None;
        self.client = None;
        if self.pg.running() {
            self.pg.stop();
        }
        match self.store.resign(me).await {
            Ok(_) => Ok(()),
            Err(e) => Err(HaError::etcd("resign")(e)),
        }
    }

    /// The audit entry that opens an unprotected window at `now`, as a write to go in the
    /// same transaction as the mode that opens it: no reader sees one without the other.
    fn window_opening(&self, now: u64, reason: String) -> (String, Vec<u8>) {
        let entry = AuditEntry {
            kind: "unprotected".into(),
            primary: self.cfg.site.clone(),
            start_ms: now,
            end_ms: None,
            reason,
            grey_bytes: None,
        };
        (self.store.keys.audit(now), json_bytes(&entry))
    }

    async fn write_all_as_leader(
        &self,
        me: &Leader,
        writes: Vec<(String, Vec<u8>)>,
    ) -> Result<(), HaError> {
        match self.store.put_all_as_leader(me, writes).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(HaError::NotLeader),
            Err(e) => Err(HaError::etcd(
                "write the replication mode and its audit entry",
            )(e)),
        }
    }

    async fn write_as_leader<T: serde::Serialize>(
        &self,
        me: &Leader,
        key: &str,
        value: &T,
    ) -> Result<(), HaError> {
        match self.store.put_as_leader(me, key, value).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(HaError::NotLeader),
            Err(e) => Err(HaError::etcd(format!("write {key}"))(e)),
        }
    }

    /// A follower streams from the leader.
    async fn follow(
        &mut self,
        leader: &Leader,
        local: Option<MemberState>,
        primary_lsn: Option<u64>,
        leader_promoted: bool,
    ) -> Result<(), HaError> {
        let Some(upstream) = self.cfg.member(&leader.site).cloned() else {
            return Err(HaError::UnknownLeader(leader.site.clone()));
        };
        let me = self.cfg.me().clone();
        if !me.initialized() {
            log(&me.site, &format!("base backup from {}", upstream.site));
            let (m, u) = (me.clone(), upstream.clone());
            return tokio::task::spawn_blocking(move || m.basebackup(&u))
                .await
                .map_err(HaError::from)?
                .map_err(HaError::from);
        }
        let former_primary =
            !self.is_standby_dir() || local.as_ref().is_some_and(|l| !l.in_recovery);
        let diverged = self
            .stuck
            .is_some_and(|(_, t)| t.elapsed() > DIVERGED_AFTER);
        if local.is_none() && !self.pg.running() && self.failed_starts >= MAX_FAILED_STARTS {
            log(
                &me.site,
                &format!("postgres does not start; cloning {} afresh", upstream.site),
            );
            self.failed_starts = 0;
            let (m, u) = (me.clone(), upstream.clone());
            tokio::task::spawn_blocking(move || m.basebackup(&u))
                .await
                .map_err(HaError::from)?
                .map_err(HaError::from)?;
            return self.start_pg();
        }
        if (former_primary || diverged) && !leader_promoted {
            return Ok(());
        }
        if former_primary || diverged {
            let why = if former_primary {
                "former primary"
            } else {
                "cannot stream"
            };
            log(
                &me.site,
                &format!("{why}: rewinding onto {}", upstream.site),
            );
            if former_primary {
                self.pg.stop();
            } else {
                self.pg.stop_clean();
            }
            self.client = None;
            self.stuck = None;
            let site = me.site.clone();
            let (m, u) = (me.clone(), upstream.clone());
            let rewound = tokio::task::spawn_blocking(move || m.rewind(&u))
                .await
                .map_err(HaError::from)?;
            match rewound {
                // pg_rewind compares timeline numbers only. A former primary, or a standby
                // that cannot stream, on the leader's very timeline number has WAL of its
                // own on it (two promotions chose one number before reservations existed,
                // or etcd lost them): rewinding cannot help, cloning does.
                Ok(report) if report.contains("same timeline") => {
                    log(
                        &site,
                        &format!(
                            "pg_rewind: {report}; {why} on {}'s timeline number: cloning it afresh",
                            upstream.site
                        ),
                    );
                    let (m, u) = (me.clone(), upstream.clone());
                    tokio::task::spawn_blocking(move || m.basebackup(&u))
                        .await
                        .map_err(HaError::from)?
                        .map_err(HaError::from)?;
                }
                Ok(report) => log(&site, &format!("pg_rewind: {report}")),
                Err(e) => {
                    // Patroni's fallback too: a member that cannot be rewound is re-cloned.
                    log(&site, &format!("{e}; cloning {} afresh", upstream.site));
                    let (m, u) = (me.clone(), upstream.clone());
                    tokio::task::spawn_blocking(move || m.basebackup(&u))
                        .await
                        .map_err(HaError::from)?
                        .map_err(HaError::from)?;
                }
            }
            self.shared.fenced.store(false, Ordering::SeqCst);
            return self.start_pg();
        }
        let Some(local) = local else {
            if !self.pg.running() {
                self.failed_starts += 1;
            }
            return self.start_pg();
        };
        self.failed_starts = 0;
        let behind = primary_lsn.is_some_and(|p| p > local.lsn);
        match self.stuck {
            Some((lsn, _)) if behind && lsn == local.lsn => {}
            _ if behind => self.stuck = Some((local.lsn, Instant::now())),
            _ => self.stuck = None,
        }
        self.repoint(&local, &upstream).await?;
        self.shared.fenced.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Streams from `upstream` unless this standby already does.
    async fn repoint(
        &mut self,
        local: &MemberState,
        upstream: &dczone_db::Member,
    ) -> Result<(), HaError> {
        let me = self.cfg.me().clone();
        let want = upstream.ip.to_string();
        if local.upstream_ip.as_deref() != Some(want.as_str()) {
            let c = self.client.as_ref().ok_or(HaError::NoConnection)?;
            let conninfo = upstream.remote_conninfo(&me.app);
            let current = dczone_db::show(&me.site, c, "primary_conninfo")
                .await
                .map_err(HaError::from)?;
            if current != conninfo {
                log(&me.site, &format!("repointing to {}", upstream.site));
                dczone_db::set_and_reload(&me.site, c, "primary_conninfo", &conninfo)
                    .await
                    .map_err(HaError::from)?;
            }
        }
        Ok(())
    }
}

fn json_bytes<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("serializable")
}
