//! The operator's commands that work the same wherever the operator stands: a planned
//! switchover, the first commit on a member, the audit logs. [`Reach`] says how they
//! reach the platform: from inside the lab's hosts ([`crate::Database`]), or through the
//! host agents with an access bundle ([`crate::remote::Remote`]).

use std::future::Future;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};

use dczone_ha::decide::Switchover;
use dczone_ha::keys::Snapshot;
use dczone_ledger::LoadResult;

use crate::SwitchoverReport;

/// How an operator's command reaches the database platform.
pub trait Reach {
    /// The members' sites and PostgreSQL addresses, in the order a client here should try
    /// them (nearest first where that is known, else the zone's order).
    fn members(&self) -> Vec<(String, Ipv4Addr)>;
    /// The platform's state in etcd.
    fn snapshot(&self) -> anyhow::Result<Snapshot>;
    /// Files a planned switchover.
    fn request_switchover(&self, request: &Switchover) -> anyhow::Result<()>;
    /// Withdraws a switchover request.
    fn clear_switchover(&self) -> anyhow::Result<()>;
    /// Runs `f` where this command's database clients run, on its own single-threaded
    /// runtime.
    fn in_client<T, F, Fut>(&self, f: F) -> anyhow::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>;

    /// The members' addresses, in [`Reach::members`]' order.
    fn hosts(&self) -> Vec<Ipv4Addr> {
        self.members().into_iter().map(|(_, ip)| ip).collect()
    }
}

/// Runs `f` on a new thread of this process, on its own single-threaded runtime.
pub fn on_own_runtime<T, F, Fut>(f: F) -> anyhow::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
{
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
            .block_on(f())
    })
    .join()
    .map_err(|_| anyhow!("the database client thread panicked"))
}

/// Waits until a member accepts writes and every site of `standbys` streams from it;
/// returns the primary's site, or what was still missing at the deadline.
pub fn wait_streaming(
    reach: &impl Reach,
    standbys: &[String],
    timeout: Duration,
) -> anyhow::Result<Result<String, String>> {
    let members = reach.members();
    let hosts: Vec<Ipv4Addr> = members.iter().map(|(_, ip)| *ip).collect();
    let apps: Vec<String> = standbys.iter().map(|s| dczone_db::app_name(s)).collect();
    reach.in_client(move || async move {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no member accepts writes");
        while Instant::now() < deadline {
            if let Ok((c, ip)) =
                dczone_ledger::connect_primary_db(&hosts, "dczone-wait", "postgres").await
            {
                let rows = c
                    .query(
                        "SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'",
                        &[],
                    )
                    .await
                    .map(|rows| rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>())
                    .unwrap_or_default();
                let site = members
                    .iter()
                    .find(|(_, i)| *i == ip)
                    .map(|(s, _)| s.clone())
                    .unwrap_or_default();
                let own = dczone_db::app_name(&site);
                let missing: Vec<&String> = apps
                    .iter()
                    .filter(|a| !rows.contains(a) && **a != own)
                    .collect();
                if missing.is_empty() {
                    return Ok(site);
                }
                last = format!(
                    "standby {} is not streaming from {site}",
                    missing.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(last)
    })
}

/// Creates the ledger's schema on the primary (idempotent). A primary that just took the
/// lead may miss one connect's 500 ms under load (seen once in CI): retried until
/// `timeout`.
pub fn create_ledger(reach: &impl Reach, timeout: Duration) -> anyhow::Result<()> {
    let hosts = reach.hosts();
    let deadline = Instant::now() + timeout;
    reach
        .in_client(move || async move {
            loop {
                let created = async {
                    let (_, ip) =
                        dczone_ledger::connect_primary_db(&hosts, "dczone-setup", "postgres")
                            .await?;
                    dczone_ledger::create_schema(ip).await
                };
                match created.await {
                    Err(_) if Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(250)).await
                    }
                    r => return r,
                }
            }
        })?
        .map_err(|e| anyhow!("create the ledger: {e}"))
}

/// Waits until the leader records `mode` (e.g. back to sync once the standbys caught up).
pub fn wait_mode(
    reach: &impl Reach,
    mode: dczone_zone::database::Replication,
    timeout: Duration,
) -> anyhow::Result<Snapshot> {
    let t = Instant::now();
    loop {
        // etcd may answer "leader changed" for a moment while the primary settles.
        let snap = reach.snapshot();
        if let Ok(snap) = &snap {
            if snap.sync.as_ref().is_some_and(|s| s.mode == mode) {
                return Ok(snap.clone());
            }
        }
        if t.elapsed() > timeout {
            let now = snap?.sync.map(|s| (s.mode, s.reason));
            bail!(
                "replication did not reach {mode:?} within {} s (now: {now:?})",
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Planned switchover to the standby of `to`; returns once the old primary streams from
/// the new one.
pub fn switchover(
    reach: &impl Reach,
    to: &str,
    timeout: Duration,
) -> anyhow::Result<SwitchoverReport> {
    let snap = reach.snapshot()?;
    let Some(leader) = snap.leader.as_ref().map(|l| l.site.clone()) else {
        bail!("no primary holds the leader key; see `dczone db status`");
    };
    let sites: Vec<String> = reach.members().into_iter().map(|(s, _)| s).collect();
    if !sites.iter().any(|s| s == to) {
        bail!(
            "unknown database site '{to}'; the members are {}",
            sites.join(", ")
        );
    }
    if to == leader {
        bail!("{to} is already the primary");
    }
    let now = dczone_ha::agent::unix_ms();
    let fresh = dczone_ha::decide::fresh_standbys(&snap.members, now, 2_000);
    if !fresh.iter().any(|r| r.site == to) {
        bail!("{to} is not a running standby now; see `dczone db status` (it must stream from {leader})");
    }
    if snap
        .switchover
        .as_ref()
        .is_some_and(|r| r.handing_over(now))
    {
        bail!("a switchover is already in progress");
    }
    let t0 = Instant::now();
    let req = Switchover {
        from: leader.clone(),
        to: to.to_string(),
        requested_ms: now,
        final_lsn: None,
        handed_over_ms: None,
        refused: None,
    };
    reach.request_switchover(&req)?;
    let deadline = t0 + timeout;
    let leader_ms = loop {
        if Instant::now() > deadline {
            bail!("{to} did not take over within {timeout:?}; see `dczone db status`");
        }
        // etcd answers "leader changed" while the new primary pulls its raft leadership
        // over; only the deadline ends the wait.
        let Ok(s) = reach.snapshot() else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        if let Some(why) = s.switchover.as_ref().and_then(|r| r.refused.clone()) {
            reach.clear_switchover()?;
            bail!("{leader} refused the switchover: {why}");
        }
        match s.leader.as_ref().map(|l| l.site.as_str()) {
            Some(l) if l == to => break t0.elapsed().as_secs_f64() * 1e3,
            Some(l) if l != leader => {
                bail!("the handover did not complete; the ordinary election made {l} the primary")
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let first_commit_ms = first_commit(reach, to, t0, deadline)?.ok_or_else(|| {
        anyhow!("{to} holds the leader key but accepted no commit within {timeout:?}")
    })?;
    let rejoined_ms = loop {
        if Instant::now() > deadline {
            bail!("{to} is the primary, but {leader} did not rejoin as its standby within {timeout:?}; `dczone db up` brings it back");
        }
        let back = reach.snapshot().is_ok_and(|s| {
            s.members
                .iter()
                .any(|m| m.site == leader && m.pg_up && m.in_recovery && !m.fenced)
        });
        if back {
            break t0.elapsed().as_secs_f64() * 1e3;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(SwitchoverReport {
        from: leader,
        to: to.to_string(),
        leader_ms,
        first_commit_ms,
        rejoined_ms,
    })
}

/// Milliseconds from `t0` until `site` acknowledges a commit to this command's client
/// (None if not before `deadline`).
pub fn first_commit(
    reach: &impl Reach,
    site: &str,
    t0: Instant,
    deadline: Instant,
) -> anyhow::Result<Option<f64>> {
    let members = reach.members();
    let ip = members
        .iter()
        .find(|(s, _)| s == site)
        .map(|(_, ip)| *ip)
        .ok_or_else(|| anyhow!("'{site}' is not a database site"))?;
    let hosts: Vec<Ipv4Addr> = members.iter().map(|(_, ip)| *ip).collect();
    reach.in_client(move || async move {
        while Instant::now() < deadline {
            if let Ok((c, at)) = dczone_ledger::connect_primary(&hosts, "dczone-probe").await {
                let wrote = tokio::time::timeout(
                    Duration::from_secs(2),
                    c.batch_execute("SELECT txid_current()"),
                )
                .await;
                if at == ip && matches!(wrote, Ok(Ok(()))) {
                    return Some(t0.elapsed().as_secs_f64() * 1e3);
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    })
}

/// How long `audit` waits for a member that accepts writes.
const AUDIT_PRIMARY_WAIT: Duration = Duration::from_secs(30);

/// Checks the current primary against the acknowledged and indeterminate transfers.
pub fn audit(
    reach: &impl Reach,
    acked: Vec<String>,
    indeterminate: Vec<String>,
) -> anyhow::Result<dczone_ledger::Audit> {
    let hosts = reach.hosts();
    reach
        .in_client(move || async move {
            // The primary may be moving (an election, or the return to the preferred site
            // after a restore): the auditor waits for one, as the ledger's clients do.
            let deadline = Instant::now() + AUDIT_PRIMARY_WAIT;
            loop {
                match dczone_ledger::audit(&hosts, &acked, &indeterminate).await {
                    Err(dczone_ledger::LedgerError::NoPrimary { .. })
                        if Instant::now() < deadline =>
                    {
                        tokio::time::sleep(Duration::from_millis(500)).await
                    }
                    r => return r,
                }
            }
        })?
        .map_err(|e| anyhow!("audit: {e}"))
}

/// The operator's record of what the ledger's clients were told: every acknowledged and
/// every indeterminate transfer id, one per line, in `<dir>/acknowledged.log` and
/// `<dir>/indeterminate.log`. `db audit` checks the primary against them.
#[derive(Debug, Clone)]
pub struct AuditLog {
    pub dir: PathBuf,
}

impl AuditLog {
    pub fn new(dir: &Path) -> AuditLog {
        AuditLog {
            dir: dir.to_path_buf(),
        }
    }

    fn path(&self, which: &str) -> PathBuf {
        self.dir.join(format!("{which}.log"))
    }

    /// Appends a run's ids.
    pub fn record(&self, result: &LoadResult) -> anyhow::Result<()> {
        use std::io::Write;
        std::fs::create_dir_all(&self.dir)?;
        for (which, ids) in [
            ("acknowledged", &result.acknowledged),
            ("indeterminate", &result.indeterminate),
        ] {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.path(which))?;
            for id in ids {
                writeln!(f, "{id}")?;
            }
        }
        Ok(())
    }

    /// The acknowledged ids, and the indeterminate ones never acknowledged since.
    pub fn recorded(&self) -> (Vec<String>, Vec<String>) {
        let read = |w: &str| -> Vec<String> {
            std::fs::read_to_string(self.path(w))
                .unwrap_or_default()
                .lines()
                .map(str::to_string)
                .collect()
        };
        let acked = read("acknowledged");
        let acked_set: std::collections::HashSet<&String> = acked.iter().collect();
        // An id retried to success is acknowledged, not indeterminate.
        let ind = read("indeterminate")
            .into_iter()
            .filter(|i| !acked_set.contains(i))
            .collect();
        (acked, ind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_retried_to_success_is_acknowledged_not_indeterminate() {
        let dir = std::env::temp_dir().join(format!("dczone-auditlog-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let log = AuditLog::new(&dir);
        log.record(&LoadResult {
            acknowledged: vec!["a".into()],
            indeterminate: vec!["b".into(), "c".into()],
            ..Default::default()
        })
        .unwrap();
        log.record(&LoadResult {
            acknowledged: vec!["b".into()],
            ..Default::default()
        })
        .unwrap();
        let (acked, ind) = log.recorded();
        assert_eq!(acked, vec!["a", "b"]);
        assert_eq!(ind, vec!["c"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
