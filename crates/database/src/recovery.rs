//! The operator's recovery commands, through the hosts' agents wherever the operator
//! stands: `db failover` (the guarded manual failover when consensus is lost), `db down`,
//! and the rejoin of etcd members after a rebuild. [`Hosts`] says how the agents are
//! reached: from a host of the lab ([`crate::AtHost`]) or with an access bundle
//! ([`crate::remote::Remote`]). Each step that needs a member's own host (fencing it and
//! reading its WAL, rebuilding etcd on a survivor) runs in that host's agent
//! (`dczone_agent::recovery`).

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde::Serialize;
use serde_json::Value;

use dczone_agent::recovery::{EtcdMemberView, Fenced};
use dczone_db::DirectView;
use dczone_ha::manual::{lsn_text, verdict, Verdict, WalEnd};

use crate::operator::{self, Reach};

/// How long one recovery call to an agent may take (a fence waits up to 10 s for a
/// postmaster to die; a rebuild or a rejoin waits up to 30 s for etcd).
const RECOVERY_CALL: Duration = Duration::from_secs(75);

/// How an operator's command reaches the hosts' agents and the members.
pub trait Hosts: Reach {
    /// Calls `host`'s agent from where this command runs (with the operator's
    /// certificate).
    fn call(
        &self,
        host: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
        timeout: Duration,
    ) -> anyhow::Result<Value>;
    /// Every member's site and host, in the zone's order.
    fn member_hosts(&self) -> Vec<(String, String)>;
    /// The hosts of the zone's etcd members (one each) and their sites, in the zone's order.
    fn consensus_hosts(&self) -> Vec<(String, String)>;
    /// What every member says about itself, read directly over PostgreSQL from here.
    fn direct_views(&self) -> anyhow::Result<Vec<DirectView>>;

    /// Whether `host`'s agent answers from here: its host is reachable.
    fn answers(&self, host: &str) -> bool {
        self.call(host, "GET", "/v1/health", None, Duration::from_secs(2))
            .is_ok()
    }
}

/// What `db failover` did.
#[derive(Debug, Serialize)]
pub struct FailoverReport {
    pub to: String,
    /// The target provably held every acknowledged commit.
    pub proven: bool,
    pub target_lsn: String,
    /// What may be lost (only with --accept-data-loss): from the target's WAL end to the
    /// furthest WAL end read elsewhere.
    pub lost_from_lsn: Option<String>,
    pub lost_to_lsn: Option<String>,
    pub transactions_at_most: Option<u64>,
    /// Members whose WAL could not be read: what they acknowledged past the target is unknown.
    pub unknown: Vec<String>,
    pub wal_ends: Vec<WalEnd>,
    /// Members whose HA agent (and PostgreSQL with it) was stopped.
    pub fenced: Vec<String>,
    /// The etcd member the consensus store was rebuilt on, and those that rejoined it.
    pub consensus_rebuilt_on: String,
    pub consensus_rejoined: Vec<String>,
    pub leader_ms: f64,
    pub first_commit_ms: f64,
}

/// Refuses a manual failover while consensus answers: the platform's state reads through
/// the agents, or a majority of the etcd members, each asked alone through its host's
/// agent, follows a raft leader (the HA agents decide then, under the RPO rule). Returns
/// the consensus hosts whose agents answered and can rebuild etcd on their member.
fn require_consensus_lost(reach: &impl Hosts, to: &str) -> anyhow::Result<Vec<(String, String)>> {
    match reach.snapshot() {
        Ok(snap) => bail!(
            "consensus answers (primary: {}): the HA agents fail over by themselves when a \
             primary is lost, under the RPO rule; for a planned move use `dczone db \
             switchover --to {to}`",
            snap.leader.map_or("none".into(), |l| l.site)
        ),
        // Our own credentials failing says nothing about consensus: never fence on it.
        Err(e)
            if e.chain().any(|c| {
                matches!(
                    c.downcast_ref::<dczone_ha::keys::StoreError>(),
                    Some(dczone_ha::keys::StoreError::Credential { .. })
                )
            }) =>
        {
            return Err(e.context(
                "cannot tell whether consensus is lost: this command's etcd credentials \
                 are unreadable; nothing was fenced",
            ));
        }
        Err(_) => {}
    }
    let hosts = reach.consensus_hosts();
    if hosts.is_empty() {
        bail!(
            "the zone names no etcd hosts (the access bundle's [database] consensus); take a \
             fresh bundle from `dczone lab up`"
        );
    }
    let mut answering = Vec::new();
    let mut following = Vec::new();
    for (host, site) in &hosts {
        if !reach.answers(host) {
            continue;
        }
        let Ok(v) = reach.call(host, "GET", "/v1/etcd", None, Duration::from_secs(5)) else {
            continue;
        };
        if v["rebuild"] == true {
            answering.push((host.clone(), site.clone()));
        }
        let members: Vec<EtcdMemberView> =
            serde_json::from_value(v["members"].clone()).unwrap_or_default();
        following.extend(members.into_iter().filter(|m| m.has_leader).map(|m| m.name));
    }
    if following.len() > hosts.len() / 2 {
        bail!(
            "consensus answers: {} of the {} etcd members follow a raft leader ({}); the HA \
             agents fail over by themselves once theirs run (`dczone db up`)",
            following.len(),
            hosts.len(),
            following.join(", ")
        );
    }
    Ok(answering)
}

/// `db failover --to SITE [--accept-data-loss]`: the guarded manual failover when
/// consensus is lost; refused while it answers.
///
/// Every member that answers is fenced through its host's agent before its WAL counts: a
/// running standby is read online; a stopped member's WAL is read from its data directory
/// by its host's agent; the rest are unknown, and only `accept_data_loss` lets the
/// failover go on without them. Then etcd is rebuilt on a surviving member (in the target's
/// site if one answers) with the failover order in it, and the other survivors rejoin.
pub fn failover(
    reach: &impl Hosts,
    to: &str,
    accept_data_loss: bool,
    timeout: Duration,
) -> anyhow::Result<FailoverReport> {
    let members = reach.member_hosts();
    let host_of = |site: &str| {
        members
            .iter()
            .find(|(s, _)| s == site)
            .map(|(_, h)| h.clone())
            .ok_or_else(|| {
                anyhow!(
                    "'{site}' is not a database site; they are {}",
                    members
                        .iter()
                        .map(|(s, _)| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
    };
    let target_host = host_of(to)?;
    let mut survivors = require_consensus_lost(reach, to)?;
    // Where consensus is rebuilt, chosen before anything is fenced: a surviving member in
    // the target's site if one answers (the target's HA agent talks to its own site's).
    survivors.sort_by_key(|(_, site)| site != to);
    let (keep, keep_site) = survivors
        .first()
        .ok_or_else(|| {
            anyhow!(
                "no etcd member's host answers with a member it can rebuild the store on \
                 (on real hosts that step is not built yet); nothing was fenced"
            )
        })?
        .clone();
    if keep_site != to {
        bail!(
            "no etcd member of {to} answers: its HA agent talks to its own site's members \
             only, so it could not take the leader key; nothing was fenced"
        );
    }
    let t0 = Instant::now();
    let views = reach.direct_views()?;
    let view = |site: &str| views.iter().find(|v| v.site == site);
    let tv = view(to).ok_or_else(|| anyhow!("no direct view of {to}"))?;
    if tv.role != "standby" {
        bail!(
            "{to} is not a running standby ({}{}); a failover needs one as its target",
            tv.role,
            tv.error
                .as_ref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
    }
    let target_lsn = tv.lsn.unwrap_or(0);
    let target_end = WalEnd {
        site: to.to_string(),
        lsn: tv.lsn,
        next_xid: tv.next_xid,
        commits_after_target: None,
        source: "online".into(),
    };
    // Every other member's WAL end: a running standby answers; a stopped member whose
    // host answers is fenced and read from its data directory (a stopped standby was not
    // primary and holds nothing its primary did not write); the rest are unknown.
    let mut ends = Vec::new();
    let mut reachable = Vec::new();
    for (site, host) in members.iter().filter(|(s, _)| s != to) {
        let v = view(site);
        let online = v.is_some_and(|v| v.reachable());
        let answers = online || reach.answers(host);
        if answers {
            reachable.push((site.clone(), host.clone()));
        }
        let end = match v.map(|v| v.role.as_str()) {
            Some("standby") => v.map(|v| WalEnd {
                site: site.clone(),
                lsn: v.lsn,
                next_xid: v.next_xid,
                commits_after_target: None,
                source: "online".into(),
            }),
            _ if answers => {
                let body = serde_json::json!({ "after_lsn": target_lsn });
                let fenced: Fenced = serde_json::from_value(
                    reach
                        .call(
                            host,
                            "POST",
                            &format!("/v1/db/{site}/fence"),
                            Some(body),
                            RECOVERY_CALL,
                        )
                        .with_context(|| format!("fence {site} and read its WAL"))?,
                )
                .with_context(|| format!("fence {site}: unreadable answer"))?;
                fenced.tail.map(|tail| {
                    if tail.complete {
                        WalEnd {
                            site: site.clone(),
                            lsn: Some(
                                tail.last_commit_end
                                    .unwrap_or(target_lsn)
                                    // Commits before the target's end are on the target.
                                    .max(target_lsn.min(tail.end_lsn)),
                            ),
                            next_xid: None,
                            commits_after_target: Some(tail.commits_after),
                            source: "offline".into(),
                        }
                    } else {
                        // Its WAL from the target's end is gone (recycled after a later
                        // checkpoint): it reaches past the target, with commits uncounted.
                        WalEnd {
                            site: site.clone(),
                            lsn: Some(tail.end_lsn.max(target_lsn + 1)),
                            next_xid: None,
                            commits_after_target: None,
                            source: "offline".into(),
                        }
                    }
                })
            }
            _ => Some(WalEnd {
                site: site.clone(),
                lsn: None,
                next_xid: None,
                commits_after_target: None,
                source: "unreachable".into(),
            }),
        };
        ends.extend(end);
    }
    let exposure = match verdict(&target_end, &ends, accept_data_loss) {
        Verdict::Refused(why) => bail!("{why}"),
        Verdict::Proven => None,
        Verdict::DataLossAccepted(e) => Some(e),
    };
    // Fence everything reachable but the target.
    let mut fenced = Vec::new();
    for (site, host) in &reachable {
        stop_member(reach, site, host)?;
        fenced.push(site.clone());
    }
    let reason = match &exposure {
        None => format!(
            "manual failover: {to} holds every acknowledged commit (WAL {} reaches every \
             other member's)",
            lsn_text(target_lsn)
        ),
        Some(e) => format!(
            "manual failover with accepted data loss: WAL after {} may be lost{}{}{}",
            lsn_text(e.from_lsn),
            e.to_lsn
                .map(|l| format!(" (up to {})", lsn_text(l)))
                .unwrap_or_default(),
            e.transactions_at_most
                .map(|n| format!(", at most {n} transactions"))
                .unwrap_or_default(),
            if e.unknown.is_empty() {
                String::new()
            } else {
                format!("; unknown: {}", e.unknown.join(", "))
            }
        ),
    };
    let order = dczone_ha::decide::ManualFailover {
        to: to.to_string(),
        requested_ms: dczone_ha::agent::unix_ms(),
        reason,
    };
    // Rebuild consensus on a surviving member, in the target's site if one answers, with
    // the order in it before any other member rejoins: the old leader key cannot expire
    // on the rebuilt store first (whose replication record may be stale: the survivor
    // need not have applied the last writes its old majority committed).
    let rebuilt = reach
        .call(
            &keep,
            "POST",
            "/v1/etcd/rebuild",
            Some(serde_json::json!({ "order": order })),
            RECOVERY_CALL,
        )
        .with_context(|| format!("rebuild consensus on {keep}"))?;
    let rebuilt_on = rebuilt["rebuilt_on"].as_str().unwrap_or(&keep).to_string();
    let mut rejoined = Vec::new();
    for (host, _) in survivors.iter().skip(1) {
        rejoined.extend(rejoin_host(reach, host)?);
    }
    let deadline = t0 + timeout;
    let leader_ms = loop {
        if Instant::now() > deadline {
            bail!(
                "{to} did not take the leader key within {timeout:?}; see `dczone db status` \
                 and its HA agent's log on {target_host} (<db dir>/{to}/agent.log)"
            );
        }
        // The target's own HA agent reads the rebuilt store first.
        let state = reach.call(
            &target_host,
            "GET",
            &format!("/v1/db/{to}/state"),
            None,
            Duration::from_secs(12),
        );
        if state.is_ok_and(|s| s["leader"]["site"] == to) {
            break t0.elapsed().as_secs_f64() * 1e3;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let first_commit_ms = operator::first_commit(reach, to, t0, deadline)?
        .ok_or_else(|| anyhow!("{to} leads but accepted no commit within {timeout:?}"))?;
    Ok(FailoverReport {
        to: to.to_string(),
        proven: exposure.is_none(),
        target_lsn: lsn_text(target_lsn),
        lost_from_lsn: exposure.as_ref().map(|e| lsn_text(e.from_lsn)),
        lost_to_lsn: exposure.as_ref().and_then(|e| e.to_lsn).map(lsn_text),
        transactions_at_most: exposure.as_ref().and_then(|e| e.transactions_at_most),
        unknown: exposure.map(|e| e.unknown).unwrap_or_default(),
        wal_ends: ends,
        fenced,
        consensus_rebuilt_on: rebuilt_on,
        consensus_rejoined: rejoined,
        leader_ms,
        first_commit_ms,
    })
}

/// Stops `site`'s HA agent (and its PostgreSQL) through its host's agent; whether one ran.
fn stop_member(reach: &impl Hosts, site: &str, host: &str) -> anyhow::Result<bool> {
    let v = reach
        .call(
            host,
            "DELETE",
            &format!("/v1/db/{site}/ha-agent"),
            None,
            RECOVERY_CALL,
        )
        .with_context(|| format!("stop the HA agent of {site}"))?;
    Ok(v["stopped"].as_bool().unwrap_or(false))
}

/// Re-adds `host`'s etcd members that are out of the cluster after a rebuild, through its
/// agent; their names.
fn rejoin_host(reach: &impl Hosts, host: &str) -> anyhow::Result<Vec<String>> {
    let v = reach
        .call(host, "POST", "/v1/etcd/rejoin", None, RECOVERY_CALL)
        .with_context(|| format!("rejoin the etcd members of {host}"))?;
    Ok(serde_json::from_value(v["rejoined"].clone()).unwrap_or_default())
}

/// Starts the zone's etcd members through their hosts' agents (those not running; a
/// member left out by a rebuild waits for [`rejoin_consensus`]) and waits until a majority
/// follows a raft leader. Returns the names of those started.
pub fn consensus_up(reach: &impl Hosts, timeout: Duration) -> anyhow::Result<Vec<String>> {
    let hosts = reach.consensus_hosts();
    let mut started = Vec::new();
    // A host cut off must not keep the others down: a majority is enough.
    let mut failures = Vec::new();
    for (host, _) in &hosts {
        match reach.call(host, "POST", "/v1/etcd", None, Duration::from_secs(30)) {
            Ok(v) => started.extend(
                serde_json::from_value::<Vec<String>>(v["started"].clone()).unwrap_or_default(),
            ),
            Err(e) => failures.push(format!("{host}: {e:#}")),
        }
    }
    let deadline = Instant::now() + timeout;
    loop {
        let mut following = 0;
        for (host, _) in &hosts {
            if let Ok(v) = reach.call(host, "GET", "/v1/etcd", None, Duration::from_secs(5)) {
                let views: Vec<EtcdMemberView> =
                    serde_json::from_value(v["members"].clone()).unwrap_or_default();
                following += views.iter().filter(|m| m.has_leader).count();
            }
        }
        if following > hosts.len() / 2 {
            return Ok(started);
        }
        if Instant::now() > deadline {
            bail!(
                "etcd has no quorum after {} s: {following} of {} members follow a leader{}; \
                 their logs are in <data dir>/etcd/ on their hosts",
                timeout.as_secs(),
                hosts.len(),
                if failures.is_empty() {
                    String::new()
                } else {
                    format!(" (not started: {})", failures.join("; "))
                }
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Re-adds the etcd members that are out of the cluster (after a manual failover rebuilt
/// it) and whose hosts' agents answer, one host at a time; returns their names.
pub fn rejoin_consensus(reach: &impl Hosts) -> anyhow::Result<Vec<String>> {
    let mut done = Vec::new();
    for (host, _) in reach.consensus_hosts() {
        if reach.answers(&host) {
            done.extend(rejoin_host(reach, &host)?);
        }
    }
    Ok(done)
}

/// What `db down` did.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Down {
    /// HA agents that ran and were stopped.
    pub stopped: usize,
    /// Whether an etcd member took the deletion of the platform's keys (if none did, the
    /// next `db up` finds them).
    pub keys_cleared: bool,
}

/// `db down`: stops every member (its HA agent and PostgreSQL), deletes the platform's
/// keys, then removes the members' directories, each through its host's agent. A member
/// whose agent does not answer fails the command.
pub fn down(reach: &impl Hosts) -> anyhow::Result<Down> {
    let members = reach.member_hosts();
    let mut stopped = 0;
    for (site, host) in &members {
        if stop_member(reach, site, host)? {
            stopped += 1;
        }
    }
    // Through the first etcd member that takes it (a platform without keys is fine).
    let cleared = reach.consensus_hosts().iter().any(|(host, _)| {
        reach
            .call(
                host,
                "DELETE",
                "/v1/etcd/keys",
                None,
                Duration::from_secs(30),
            )
            .is_ok()
    });
    for (site, host) in &members {
        reach
            .call(
                host,
                "DELETE",
                &format!("/v1/db/{site}"),
                None,
                RECOVERY_CALL,
            )
            .with_context(|| format!("remove the member of {site}"))?;
    }
    Ok(Down {
        stopped,
        keys_cleared: cleared,
    })
}

/// `db status` when the consensus store cannot be read: which etcd members do not answer,
/// and what every PostgreSQL member says about itself.
#[derive(Debug, Clone, Serialize)]
pub struct DegradedStatus {
    pub error: String,
    pub consensus_quorum: bool,
    pub consensus: Vec<EtcdMemberView>,
    pub unreachable_consensus_members: Vec<String>,
    pub members: Vec<DirectView>,
}

/// Every etcd member asked alone through its host's agent (one whose agent does not answer
/// from here counts as unreachable), and every PostgreSQL member read directly.
pub fn degraded_status(reach: &impl Hosts, error: String) -> anyhow::Result<DegradedStatus> {
    let mut consensus = Vec::new();
    for (host, site) in reach.consensus_hosts() {
        let views = reach
            .answers(&host)
            .then(|| reach.call(&host, "GET", "/v1/etcd", None, Duration::from_secs(5)))
            .and_then(|r| r.ok())
            .and_then(|v| serde_json::from_value::<Vec<EtcdMemberView>>(v["members"].clone()).ok());
        match views {
            Some(v) => consensus.extend(v),
            None => consensus.push(EtcdMemberView {
                name: dczone_db::app_name(&host),
                site,
                url: String::new(),
                reachable: false,
                has_leader: false,
                error: Some(format!("the agent of {host} does not answer from here")),
            }),
        }
    }
    let members = reach.direct_views()?;
    let with_leader = consensus.iter().filter(|c| c.has_leader).count();
    Ok(DegradedStatus {
        error,
        consensus_quorum: with_leader > consensus.len() / 2,
        unreachable_consensus_members: consensus
            .iter()
            .filter(|c| !c.reachable)
            .map(|c| format!("{} ({})", c.name, c.site))
            .collect(),
        consensus,
        members,
    })
}
