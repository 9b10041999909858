//! The HA manager's decisions, as pure functions of a member view and a clock, so that they
//! can be tested without etcd or PostgreSQL.
//!
//! Compared with Patroni (loop_wait 10 s, ttl 30 s): our agents look every `loop_ms` (100 ms),
//! a silent synchronous standby is dropped after `failure_detect_ms` (300 ms) of waiting
//! commits rather than after a loop, and the leader lease is 3 s rather than 30 s.

use dczone_zone::database::{Policy, QuorumMethod, Replication, StandbyFailure};
use serde::{Deserialize, Serialize};

/// What each agent publishes about its member (etcd `members/<site>`, on the agent's lease).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberReport {
    pub site: String,
    /// PostgreSQL answers its agent.
    pub pg_up: bool,
    pub in_recovery: bool,
    /// Primary: current WAL end. Standby: WAL received and flushed.
    pub lsn: u64,
    /// The agent fenced its member (it lost the leader lease while primary).
    pub fenced: bool,
    /// When the agent wrote this (unix ms).
    pub at_ms: u64,
}

/// The replication state the leader records in etcd (`sync`) before it acts on it, so
/// that a failover knows which standbys hold every acknowledged commit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncState {
    pub primary: String,
    /// The policy (tier) this state applies.
    pub tier: String,
    pub mode: Replication,
    /// The synchronous set in force (empty when async).
    pub set: Vec<String>,
    pub quorum: usize,
    pub since_ms: u64,
    pub reason: String,
    /// The primary has promoted and checkpointed: its control file names its timeline, so a
    /// former primary may rewind onto it. False only in a state recorded before promotion
    /// (a new primary that starts async records that first).
    #[serde(default = "yes")]
    pub rewind_ready: bool,
}

fn yes() -> bool {
    true
}

/// Why no standby may be promoted yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoCandidate {
    /// Under sync, fewer than |set| - k + 1 members of the synchronous set are visible, so
    /// none of those we see can be proven to hold every acknowledged commit.
    CannotProveRpo { visible: usize, needed: usize },
    /// No standby is visible at all.
    NoStandby,
}

/// Reports newer than `now - freshness_ms`, of standbys that answer their agents.
pub fn fresh_standbys(
    reports: &[MemberReport],
    now_ms: u64,
    freshness_ms: u64,
) -> Vec<&MemberReport> {
    reports
        .iter()
        .filter(|r| r.pg_up && r.in_recovery && !r.fenced)
        .filter(|r| r.at_ms + freshness_ms >= now_ms)
        .collect()
}

/// Which standby to promote once the leader is gone.
///
/// Under sync with quorum k over set S, every acknowledged commit is on at least k members of
/// S. Seeing |S| - k + 1 of them guarantees that one we see has it, and WAL is a prefix, so
/// the most advanced standby we see holds every acknowledged commit. Under async the most
/// advanced standby is the best there is; what it lacks is the grey data.
/// Ties go to the earlier site in `order` (the zone's member order).
pub fn choose_candidate(
    sync: Option<&SyncState>,
    reports: &[MemberReport],
    order: &[String],
    now_ms: u64,
    freshness_ms: u64,
) -> Result<String, NoCandidate> {
    let fresh = fresh_standbys(reports, now_ms, freshness_ms);
    if let Some(s) = sync.filter(|s| s.mode == Replication::Sync) {
        let visible = s
            .set
            .iter()
            .filter(|site| fresh.iter().any(|r| &r.site == *site))
            .count();
        let needed = s.set.len().saturating_sub(s.quorum) + 1;
        if visible < needed {
            return Err(NoCandidate::CannotProveRpo { visible, needed });
        }
    }
    let rank = |site: &str| order.iter().position(|o| o == site).unwrap_or(usize::MAX);
    fresh
        .iter()
        .max_by(|a, b| a.lsn.cmp(&b.lsn).then(rank(&b.site).cmp(&rank(&a.site))))
        .map(|r| r.site.clone())
        .ok_or(NoCandidate::NoStandby)
}

/// How the primary sees one synchronous standby (from pg_stat_replication).
#[derive(Debug, Clone, PartialEq)]
pub struct StandbySeen {
    pub site: String,
    pub streaming: bool,
    pub flush_lsn: u64,
    /// Since the standby's last reply.
    pub reply_age_ms: f64,
    /// The standby's agent published a report recently (its heartbeat, through etcd: HA
    /// control traffic, which the APN carries ahead of bulk traffic). A standby that is
    /// slow, because bulk WAL fills the path, still beats; a dead or cut-off one does not.
    pub heartbeat: bool,
}

/// A standby that has not replied for this long is silent (it replies every second).
pub const SILENT_AFTER_MS: f64 = 1200.0;
/// A returning standby must stay caught up this long before commits wait for it again.
pub const RETURN_AFTER_MS: u64 = 2000;

/// A standby's heartbeat older than this many HA loops means it is not alive.
pub const HEARTBEAT_LOOPS: u64 = 4;

impl StandbySeen {
    fn alive(&self) -> bool {
        self.heartbeat && self.streaming && self.reply_age_ms < SILENT_AFTER_MS
    }
}

/// The primary's standby-failure state machine (availability-first).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FailureTracker {
    /// Since when the synchronous set has been short of its quorum, or commits waiting.
    pub unhealthy_since_ms: Option<u64>,
    /// Since when enough standbys have been alive and caught up (while async).
    pub caught_up_since_ms: Option<u64>,
    /// Since when commits have waited for standbys that are alive (logged once per episode).
    pub slow_since_ms: Option<u64>,
}

/// What the primary should do about its replication mode.
#[derive(Debug, Clone, PartialEq)]
pub enum ModeAction {
    Keep,
    /// Drop to async: commits have waited or the quorum has been missing for the detection
    /// time. The reason goes to the audit log.
    ToAsync {
        reason: String,
    },
    /// The standbys are back and caught up: restore the synchronous set.
    ToSync,
    /// Data-first: commits wait; nothing to do but report it.
    Stalled {
        reason: String,
    },
    /// Commits waited the detection time, but every standby they wait for is alive: slow
    /// (bulk load, a long path), not dead. Sync stays: a load spike must not cost Tier 1
    /// its RPO = 0 protection. Commits wait as long as the standby takes.
    Slow {
        reason: String,
    },
}

/// Healthy members of `set` as the primary sees them.
fn healthy_in_set(set: &[String], seen: &[StandbySeen]) -> usize {
    set.iter()
        .filter(|s| seen.iter().any(|x| &x.site == *s && x.alive()))
        .count()
}

/// The primary's decision about sync/async, called every loop.
///
/// `set` and `k` are the synchronous set and quorum the policy wants for this primary;
/// `current` is the mode recorded in etcd; `oldest_wait_ms` is how long the oldest commit has
/// waited for standbys; `catchup_bytes` is how close a standby must be to count as caught up.
#[allow(clippy::too_many_arguments)]
pub fn replication_mode(
    policy: &Policy,
    current: Replication,
    set: &[String],
    k: usize,
    seen: &[StandbySeen],
    primary_lsn: u64,
    oldest_wait_ms: f64,
    catchup_bytes: u64,
    now_ms: u64,
    tracker: &mut FailureTracker,
) -> ModeAction {
    if policy.replication == Replication::Async {
        return ModeAction::Keep;
    }
    match current {
        Replication::Sync => {
            let healthy = healthy_in_set(set, seen);
            let waiting = oldest_wait_ms >= policy.failure_detect_ms as f64;
            let short = healthy < k;
            if !short {
                tracker.unhealthy_since_ms = None;
                return if waiting {
                    ModeAction::Slow {
                        reason: format!(
                            "commits waited {oldest_wait_ms:.0} ms for synchronous standbys \
                             that are alive (heartbeat and replies): slow, not dead"
                        ),
                    }
                } else {
                    tracker.slow_since_ms = None;
                    ModeAction::Keep
                };
            }
            let since = *tracker.unhealthy_since_ms.get_or_insert(now_ms);
            // Only `short` gets here: a standby is dead or cut off, not merely slow.
            let reason = format!(
                "{healthy} of {} synchronous standbys alive (streaming, replying, heartbeat), \
                 quorum {k}{}",
                set.len(),
                if waiting {
                    format!("; commits waited {oldest_wait_ms:.0} ms")
                } else {
                    String::new()
                }
            );
            let overdue = waiting || now_ms.saturating_sub(since) >= policy.failure_detect_ms;
            match policy.standby_failure {
                _ if !overdue => ModeAction::Keep,
                StandbyFailure::DataFirst => ModeAction::Stalled { reason },
                StandbyFailure::AvailabilityFirst => ModeAction::ToAsync { reason },
            }
        }
        Replication::Async => {
            tracker.unhealthy_since_ms = None;
            let caught_up = set
                .iter()
                .filter(|s| {
                    seen.iter().any(|x| {
                        &x.site == *s && x.alive() && x.flush_lsn + catchup_bytes >= primary_lsn
                    })
                })
                .count();
            if caught_up < k {
                tracker.caught_up_since_ms = None;
                return ModeAction::Keep;
            }
            // Hysteresis: a standby that just went silent still looks caught up for a
            // second; it must stay caught up for RETURN_AFTER_MS.
            let since = *tracker.caught_up_since_ms.get_or_insert(now_ms);
            if now_ms.saturating_sub(since) >= RETURN_AFTER_MS {
                tracker.caught_up_since_ms = None;
                ModeAction::ToSync
            } else {
                ModeAction::Keep
            }
        }
    }
}

/// The mode a new primary starts in. Under sync with availability-first, if fewer than `k`
/// members of its synchronous set are visible (fresh reports of running standbys), the
/// first commits would only wait `failure_detect_ms` and then go async anyway: a primary
/// promoted after a regional disaster, whose set is the lost region, starts async at once
/// and says why (the reason opens an unprotected window in the audit log). Data-first
/// always starts sync: its commits wait.
pub fn initial_mode(
    policy: &Policy,
    set: &[String],
    k: usize,
    reports: &[MemberReport],
    now_ms: u64,
    freshness_ms: u64,
) -> (Replication, Option<String>) {
    if policy.replication == Replication::Async {
        return (Replication::Async, None);
    }
    if policy.standby_failure == StandbyFailure::DataFirst {
        return (Replication::Sync, None);
    }
    let fresh = fresh_standbys(reports, now_ms, freshness_ms);
    let visible = set
        .iter()
        .filter(|s| fresh.iter().any(|r| &r.site == *s))
        .count();
    if visible >= k {
        (Replication::Sync, None)
    } else {
        (
            Replication::Async,
            Some(format!(
                "promoted with {visible} of {} synchronous standbys visible, quorum {k}",
                set.len()
            )),
        )
    }
}

/// When the primary must fence itself: the lease it last renewed at `renewed_at_ms` (the
/// moment it *sent* the renewal, which is before etcd extended the lease) expires at
/// `renewed_at_ms + ttl`; fence `margin_ms` before that, so that the primary is down before
/// any other member can win the leader key.
pub fn fence_deadline_ms(renewed_at_ms: u64, ttl_ms: u64, margin_ms: u64) -> u64 {
    renewed_at_ms + ttl_ms.saturating_sub(margin_ms)
}

pub fn must_fence(now_ms: u64, deadline_ms: u64) -> bool {
    now_ms >= deadline_ms
}

/// The quorum count PostgreSQL applies for `set`: FIRST k and ANY k both need k answers.
pub fn quorum_of(policy: &Policy, set: &[String]) -> usize {
    match policy.quorum.method {
        QuorumMethod::First | QuorumMethod::Any => policy.quorum_count(set.len()),
    }
}

/// A planned switchover (etcd `switchover`): the operator asks the primary `from` to hand
/// over to the standby `to`. Patroni's `switchover` is the model; the difference is that
/// the handover is proven by WAL position, not by a sync flag.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Switchover {
    pub from: String,
    pub to: String,
    pub requested_ms: u64,
    /// Set by the old primary after its clean shutdown: where its shutdown checkpoint record
    /// starts. Every commit it acknowledged lies before it.
    #[serde(default)]
    pub final_lsn: Option<u64>,
    /// When the old primary released the leader key.
    #[serde(default)]
    pub handed_over_ms: Option<u64>,
    /// Why the primary refused the request (it then keeps leading).
    #[serde(default)]
    pub refused: Option<String>,
}

impl Switchover {
    /// The old primary has handed over, was not refused, and the target still has time to
    /// take over.
    pub fn handing_over(&self, now_ms: u64) -> bool {
        self.refused.is_none()
            && self.final_lsn.is_some()
            && self
                .handed_over_ms
                .is_some_and(|at| now_ms.saturating_sub(at) <= SWITCHOVER_TIMEOUT_MS)
    }
}

/// A request the primary has not acted on within this time is stale; a handover whose
/// target has not taken over within it falls back to the ordinary election.
pub const SWITCHOVER_TIMEOUT_MS: u64 = 10_000;

/// The primary's check before it hands over: `None` if it may, else why not.
pub fn switchover_refusal(
    req: &Switchover,
    me: &str,
    reports: &[MemberReport],
    seen: &[StandbySeen],
    now_ms: u64,
    freshness_ms: u64,
) -> Option<String> {
    if req.from != me {
        return Some(format!(
            "requested of {}, but {me} is the primary",
            req.from
        ));
    }
    if req.to == me {
        return Some(format!("{me} is already the primary"));
    }
    if now_ms.saturating_sub(req.requested_ms) > SWITCHOVER_TIMEOUT_MS {
        return Some("the request is older than 10 s".into());
    }
    if !fresh_standbys(reports, now_ms, freshness_ms)
        .iter()
        .any(|r| r.site == req.to)
    {
        return Some(format!("{} is not a running, unfenced standby", req.to));
    }
    if !seen.iter().any(|s| s.site == req.to && s.alive()) {
        return Some(format!("{} does not stream from {me}", req.to));
    }
    None
}

/// A manual failover the operator ordered (etcd `failover`, written by `dczone db failover`
/// after it proved, or the operator accepted, what the target holds). While it is fresh,
/// only the target may take the leader key, whatever the RPO rule says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManualFailover {
    pub to: String,
    pub requested_ms: u64,
    /// For the audit log: proven, or the accepted exposure.
    pub reason: String,
}

/// A manual failover order is acted on within this time, or ignored.
pub const MANUAL_FAILOVER_TIMEOUT_MS: u64 = 60_000;

impl ManualFailover {
    pub fn fresh(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.requested_ms) <= MANUAL_FAILOVER_TIMEOUT_MS
    }
}

/// The timeline a standby's promotion will create, and the placeholder history files that
/// make PostgreSQL skip numbers already taken.
///
/// PostgreSQL names a promotion's timeline after the first history file missing above its
/// recovery timeline; only a shared WAL archive tells it about a timeline another member
/// created. Without one, two members promoted from the same point (one during a switchover
/// that a region cut then interrupted, one after it) both create timeline N+1 with
/// different WAL, and pg_rewind, which compares timeline numbers, then calls the loser
/// "on the same timeline, no rewind required" while it cannot stream. So every promotion
/// reserves its timeline in etcd first (`timeline`), and a later one goes above it.
/// `control_tli` is the member's checkpoint timeline, `history` the history files in its
/// `pg_wal`, `reserved` the highest timeline etcd has recorded.
pub fn next_timeline(control_tli: u32, history: &[u32], reserved: Option<u32>) -> (u32, Vec<u32>) {
    let mut own = control_tli.max(1);
    while history.contains(&(own + 1)) {
        own += 1;
    }
    let next = (own + 1).max(reserved.map_or(0, |r| r + 1));
    let placeholders = (own + 1..next).filter(|t| !history.contains(t)).collect();
    (next, placeholders)
}

/// What a standby does about a switchover while nobody holds the leader key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchoverRole {
    /// No handover in progress (none, refused, not yet handed over, or timed out): the
    /// ordinary election decides.
    None,
    /// This member is the target and holds all of the old primary's WAL: take the key.
    Campaign,
    /// Another member is the target, or this one still lacks WAL: stay out.
    Wait,
}

pub fn switchover_role(
    req: Option<&Switchover>,
    me: &str,
    my_lsn: u64,
    now_ms: u64,
) -> SwitchoverRole {
    let Some(r) = req.filter(|r| r.handing_over(now_ms)) else {
        return SwitchoverRole::None;
    };
    if r.to == me && r.final_lsn.is_some_and(|f| my_lsn >= f) {
        SwitchoverRole::Campaign
    } else {
        SwitchoverRole::Wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dczone_zone::database::Quorum;

    fn report(site: &str, lsn: u64, at: u64) -> MemberReport {
        MemberReport {
            site: site.into(),
            pg_up: true,
            in_recovery: true,
            lsn,
            fenced: false,
            at_ms: at,
        }
    }

    fn sync(set: &[&str], k: usize) -> SyncState {
        SyncState {
            primary: "dc1.1".into(),
            tier: "tier1".into(),
            mode: Replication::Sync,
            set: set.iter().map(|s| s.to_string()).collect(),
            quorum: k,
            since_ms: 0,
            reason: String::new(),
            rewind_ready: true,
        }
    }

    fn order() -> Vec<String> {
        vec!["dc1.1".into(), "dc1.2".into(), "dc2.1".into()]
    }

    fn policy(failure: StandbyFailure) -> Policy {
        Policy {
            name: "tier1".into(),
            replication: Replication::Sync,
            sync_standbys: vec!["dc2.1".into()],
            quorum: Quorum {
                method: QuorumMethod::Any,
                count: 1,
            },
            synchronous_commit: "on".into(),
            standby_failure: failure,
            failure_detect_ms: 300,
        }
    }

    #[test]
    fn a_primary_promoted_without_visible_sync_standbys_starts_async_only_if_availability_first() {
        let set = vec!["dc1.1".to_string(), "dc1.2".to_string()];
        // Region 1 lost: no report of dc1.1 or dc1.2 is fresh.
        let reports = [report("dc1.1", 5, 100), report("dc2.1", 9, 1000)];
        let (mode, why) = initial_mode(
            &policy(StandbyFailure::AvailabilityFirst),
            &set,
            1,
            &reports,
            1000,
            400,
        );
        assert_eq!(mode, Replication::Async);
        assert!(why.unwrap().contains("0 of 2"));
        let (mode, why) = initial_mode(
            &policy(StandbyFailure::DataFirst),
            &set,
            1,
            &reports,
            1000,
            400,
        );
        assert_eq!((mode, why), (Replication::Sync, None));
        // One member of the set is alive: sync.
        let reports = [report("dc1.2", 5, 990)];
        let (mode, _) = initial_mode(
            &policy(StandbyFailure::AvailabilityFirst),
            &set,
            1,
            &reports,
            1000,
            400,
        );
        assert_eq!(mode, Replication::Sync);
    }

    #[test]
    fn promotes_the_most_advanced_when_the_sync_standby_is_visible() {
        // dc1.2 (async) received more than dc2.1 (sync): it holds every acknowledged commit too.
        let r = [report("dc1.2", 900, 1000), report("dc2.1", 800, 1000)];
        let s = sync(&["dc2.1"], 1);
        assert_eq!(
            choose_candidate(Some(&s), &r, &order(), 1000, 500).unwrap(),
            "dc1.2"
        );
    }

    #[test]
    fn refuses_when_no_sync_standby_can_prove_rpo() {
        let r = [report("dc1.2", 900, 1000)];
        let s = sync(&["dc2.1"], 1);
        assert_eq!(
            choose_candidate(Some(&s), &r, &order(), 1000, 500),
            Err(NoCandidate::CannotProveRpo {
                visible: 0,
                needed: 1
            })
        );
        // A stale report does not count either.
        let r = [report("dc1.2", 900, 1000), report("dc2.1", 950, 100)];
        assert!(choose_candidate(Some(&s), &r, &order(), 1000, 500).is_err());
    }

    #[test]
    fn quorum_any_2_of_3_needs_two_visible() {
        let s = sync(&["a", "b", "c"], 2);
        let r = [report("a", 5, 10), report("b", 7, 10)];
        assert_eq!(choose_candidate(Some(&s), &r, &[], 10, 5).unwrap(), "b");
        let r = [report("a", 5, 10)];
        assert!(choose_candidate(Some(&s), &r, &[], 10, 5).is_err());
    }

    #[test]
    fn async_promotes_the_most_advanced_and_ties_follow_the_zone_order() {
        let mut s = sync(&[], 1);
        s.mode = Replication::Async;
        let r = [report("dc2.1", 500, 10), report("dc1.2", 500, 10)];
        assert_eq!(
            choose_candidate(Some(&s), &r, &order(), 10, 5).unwrap(),
            "dc1.2"
        );
        assert_eq!(
            choose_candidate(Some(&s), &[], &order(), 10, 5),
            Err(NoCandidate::NoStandby)
        );
    }

    #[test]
    fn fenced_or_down_members_are_never_candidates() {
        let mut down = report("dc1.2", 999, 10);
        down.pg_up = false;
        let mut fenced = report("dc1.1", 999, 10);
        fenced.fenced = true;
        let r = [down, fenced, report("dc2.1", 1, 10)];
        assert_eq!(
            choose_candidate(None, &r, &order(), 10, 5).unwrap(),
            "dc2.1"
        );
    }

    fn seen(site: &str, streaming: bool, lsn: u64) -> StandbySeen {
        StandbySeen {
            site: site.into(),
            streaming,
            flush_lsn: lsn,
            reply_age_ms: 100.0,
            heartbeat: true,
        }
    }

    #[test]
    fn availability_first_drops_sync_after_the_detection_time() {
        let p = policy(StandbyFailure::AvailabilityFirst);
        let set = vec!["dc2.1".to_string()];
        let mut t = FailureTracker::default();
        let gone = [seen("dc1.2", true, 10)];
        let step = |now, wait, t: &mut FailureTracker| {
            replication_mode(&p, Replication::Sync, &set, 1, &gone, 10, wait, 0, now, t)
        };
        assert_eq!(step(1000, 0.0, &mut t), ModeAction::Keep);
        assert_eq!(step(1299, 0.0, &mut t), ModeAction::Keep);
        assert!(matches!(
            step(1300, 0.0, &mut t),
            ModeAction::ToAsync { .. }
        ));
        // Commits that have waited long enough trip it at once if the standby's heartbeat
        // stopped, even if it still looks connected (a silent standby keeps its TCP
        // connection and its last reply is not yet old).
        let mut t = FailureTracker::default();
        let present = [StandbySeen {
            heartbeat: false,
            ..seen("dc2.1", true, 10)
        }];
        let a = replication_mode(
            &p,
            Replication::Sync,
            &set,
            1,
            &present,
            10,
            350.0,
            0,
            5,
            &mut t,
        );
        assert!(matches!(a, ModeAction::ToAsync { ref reason } if reason.contains("waited")));
    }

    #[test]
    fn a_slow_standby_that_still_beats_keeps_sync_however_long_commits_wait() {
        let p = policy(StandbyFailure::AvailabilityFirst);
        let set = vec!["dc2.1".to_string()];
        let mut t = FailureTracker::default();
        let slow = [seen("dc2.1", true, 10)];
        for (now, wait) in [(0, 350.0), (1000, 1500.0), (5000, 5000.0)] {
            let a = replication_mode(
                &p,
                Replication::Sync,
                &set,
                1,
                &slow,
                10,
                wait,
                0,
                now,
                &mut t,
            );
            assert!(
                matches!(a, ModeAction::Slow { ref reason } if reason.contains("slow, not dead")),
                "{a:?}"
            );
        }
        // Its heartbeat stops: dead, dropped at once (commits have waited already).
        let dead = [StandbySeen {
            heartbeat: false,
            ..seen("dc2.1", true, 10)
        }];
        let a = replication_mode(
            &p,
            Replication::Sync,
            &set,
            1,
            &dead,
            10,
            350.0,
            0,
            6000,
            &mut t,
        );
        assert!(matches!(a, ModeAction::ToAsync { .. }), "{a:?}");
    }

    #[test]
    fn data_first_never_drops_sync() {
        let p = policy(StandbyFailure::DataFirst);
        let set = vec!["dc2.1".to_string()];
        let mut t = FailureTracker::default();
        let a = replication_mode(
            &p,
            Replication::Sync,
            &set,
            1,
            &[],
            0,
            5000.0,
            0,
            10_000,
            &mut t,
        );
        assert!(matches!(a, ModeAction::Stalled { .. }));
    }

    #[test]
    fn returns_to_sync_only_once_caught_up() {
        let p = policy(StandbyFailure::AvailabilityFirst);
        let set = vec!["dc2.1".to_string()];
        let mut t = FailureTracker::default();
        let behind = [seen("dc2.1", true, 1_000)];
        let a = replication_mode(
            &p,
            Replication::Async,
            &set,
            1,
            &behind,
            5_000_000,
            0.0,
            1 << 20,
            0,
            &mut t,
        );
        assert_eq!(a, ModeAction::Keep);
        let close = [seen("dc2.1", true, 4_500_000)];
        let a = replication_mode(
            &p,
            Replication::Async,
            &set,
            1,
            &close,
            5_000_000,
            0.0,
            1 << 20,
            0,
            &mut t,
        );
        assert_eq!(
            a,
            ModeAction::Keep,
            "caught up, but not yet for long enough"
        );
        let a = replication_mode(
            &p,
            Replication::Async,
            &set,
            1,
            &close,
            5_000_000,
            0.0,
            1 << 20,
            RETURN_AFTER_MS,
            &mut t,
        );
        assert_eq!(a, ModeAction::ToSync);
        // A standby that went silent a moment ago still looks caught up: no return.
        let mut t = FailureTracker::default();
        let mut silent = seen("dc2.1", true, 5_000_000);
        silent.reply_age_ms = SILENT_AFTER_MS + 1.0;
        for now in [0, RETURN_AFTER_MS, 2 * RETURN_AFTER_MS] {
            let a = replication_mode(
                &p,
                Replication::Async,
                &set,
                1,
                &[silent.clone()],
                5_000_000,
                0.0,
                1 << 20,
                now,
                &mut t,
            );
            assert_eq!(a, ModeAction::Keep);
        }
        let not_streaming = [seen("dc2.1", false, 5_000_000)];
        let a = replication_mode(
            &p,
            Replication::Async,
            &set,
            1,
            &not_streaming,
            5_000_000,
            0.0,
            1 << 20,
            0,
            &mut t,
        );
        assert_eq!(a, ModeAction::Keep);
    }

    #[test]
    fn fencing_happens_before_the_lease_can_expire() {
        let d = fence_deadline_ms(10_000, 3_000, 500);
        assert_eq!(d, 12_500);
        assert!(!must_fence(12_499, d));
        assert!(must_fence(12_500, d));
        // etcd expires the lease no earlier than renewal-received + ttl >= sent + ttl.
        assert!(d < 10_000 + 3_000);
    }

    #[test]
    fn a_promotion_goes_above_every_timeline_reserved_in_etcd() {
        // Nothing reserved: PostgreSQL's own choice, the first history file missing.
        assert_eq!(next_timeline(1, &[], None), (2, vec![]));
        assert_eq!(next_timeline(2, &[2, 3], None), (4, vec![]));
        assert_eq!(next_timeline(2, &[2, 3], Some(3)), (4, vec![]));
        // Another member promoted to 4 from the same point: 4 is skipped.
        assert_eq!(next_timeline(3, &[2, 3], Some(4)), (5, vec![4]));
        assert_eq!(next_timeline(1, &[], Some(5)), (6, vec![2, 3, 4, 5]));
        // A history file already there is not overwritten.
        assert_eq!(next_timeline(1, &[2, 4], Some(4)), (5, vec![3]));
    }

    fn request(to: &str) -> Switchover {
        Switchover {
            from: "dc1.1".into(),
            to: to.into(),
            requested_ms: 1_000,
            final_lsn: None,
            handed_over_ms: None,
            refused: None,
        }
    }

    #[test]
    fn switchover_needs_a_streaming_fresh_standby_as_target() {
        let reports = vec![report("dc1.2", 90, 1_000), report("dc2.1", 100, 1_000)];
        let seen_ok = vec![seen("dc1.2", true, 90), seen("dc2.1", true, 100)];
        let refuse = |r: &Switchover, seen: &[StandbySeen]| {
            switchover_refusal(r, "dc1.1", &reports, seen, 1_100, 600)
        };
        assert_eq!(refuse(&request("dc2.1"), &seen_ok), None);
        assert!(refuse(&request("dc1.1"), &seen_ok)
            .unwrap()
            .contains("already"));
        assert!(refuse(&request("cloud"), &seen_ok)
            .unwrap()
            .contains("not a running"));
        let not_streaming = vec![seen("dc1.2", true, 90), seen("dc2.1", false, 100)];
        assert!(refuse(&request("dc2.1"), &not_streaming)
            .unwrap()
            .contains("does not stream"));
        let mut other = request("dc2.1");
        other.from = "dc1.2".into();
        assert!(refuse(&other, &seen_ok)
            .unwrap()
            .contains("requested of dc1.2"));
        let stale = switchover_refusal(&request("dc2.1"), "dc1.1", &reports, &seen_ok, 20_000, 600);
        assert!(
            stale.is_some(),
            "a request older than the timeout is refused"
        );
    }

    #[test]
    fn only_the_target_campaigns_and_only_with_all_the_old_primarys_wal() {
        let mut r = request("dc1.2");
        // Not handed over yet (the old primary may have died mid-way): ordinary election.
        assert_eq!(
            switchover_role(Some(&r), "dc1.2", 500, 2_000),
            SwitchoverRole::None
        );
        r.final_lsn = Some(400);
        r.handed_over_ms = Some(2_000);
        assert_eq!(
            switchover_role(Some(&r), "dc1.2", 399, 2_100),
            SwitchoverRole::Wait
        );
        assert_eq!(
            switchover_role(Some(&r), "dc1.2", 400, 2_100),
            SwitchoverRole::Campaign
        );
        assert_eq!(
            switchover_role(Some(&r), "dc2.1", 900, 2_100),
            SwitchoverRole::Wait
        );
        // The target never got there: after the timeout the ordinary election decides.
        assert_eq!(
            switchover_role(Some(&r), "dc2.1", 900, 2_000 + SWITCHOVER_TIMEOUT_MS + 1),
            SwitchoverRole::None
        );
        r.refused = Some("no".into());
        assert_eq!(
            switchover_role(Some(&r), "dc1.2", 400, 2_100),
            SwitchoverRole::None
        );
        assert_eq!(
            switchover_role(None, "dc1.2", 400, 2_100),
            SwitchoverRole::None
        );
    }
}
