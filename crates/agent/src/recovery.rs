//! The database platform's recovery steps that only a member's or an etcd member's own host
//! can take, for an operator who drives them from anywhere
//! (`dczone_database::recovery::failover` and `down`):
//! - a manual failover's fence: stop a member's HA agent and PostgreSQL, then read how far
//!   its WAL reaches from its data directory;
//! - the consensus store's rebuild on a surviving member (`--force-new-cluster`) with the
//!   failover order written into it, and the rejoin of the other members;
//! - each etcd member asked alone whether it follows a raft leader, so that no failover is
//!   ordered while consensus answers;
//! - a platform's removal: its members' directories and its keys.
//!
//! The etcd calls use this host's consensus certificate, the one its HA agents hold.

use std::future::Future;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use dczone_ha::decide::ManualFailover;
use dczone_ha::keys::{Credentials, Store, StoreError};
use dczone_lab::etcd::{EtcdCluster, EtcdMember, Placement};
use dczone_virt::VirtError;

use crate::{Agent, AgentError};

/// Body of `POST /v1/db/{site}/fence`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FenceBody {
    /// Count the commits the member's WAL holds from here (the failover target's WAL end).
    pub after_lsn: u64,
}

/// Answer of `POST /v1/db/{site}/fence`: the member is stopped, and this is how far its
/// WAL reaches.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Fenced {
    pub site: String,
    /// Whether its HA agent was running (and was stopped).
    pub stopped: bool,
    /// It was a standby (`standby.signal`): it holds nothing its primary did not write.
    pub standby: bool,
    /// Its WAL from `after_lsn` (none for a standby, or a member never initialised).
    pub tail: Option<dczone_db::WalTail>,
}

/// Body of `POST /v1/etcd/rebuild`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RebuildBody {
    /// Written into the rebuilt store before any other member rejoins it.
    pub order: ManualFailover,
}

/// One etcd member asked alone (`GET /v1/etcd` answers with this host's).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct EtcdMemberView {
    pub name: String,
    pub site: String,
    pub url: String,
    pub reachable: bool,
    /// It answers and follows a raft leader.
    pub has_leader: bool,
    pub error: Option<String>,
}

/// Runs `f` on a thread of its own with a single-threaded runtime (agent handlers run on
/// the server's blocking pool).
fn on_own_runtime<T, F, Fut>(f: F) -> Result<T, AgentError>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
{
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map(|rt| rt.block_on(f()))
    })
    .join()
    .map_err(|_| VirtError::Io {
        what: "etcd client thread".into(),
        source: std::io::Error::other("panicked"),
    })?
    .map_err(|source| {
        VirtError::Io {
            what: "start a tokio runtime".into(),
            source,
        }
        .into()
    })
}

impl Agent {
    fn etcd_error(&self, reason: impl Into<String>) -> AgentError {
        AgentError::Etcd {
            host: self.host.clone(),
            reason: reason.into(),
        }
    }

    /// The zone's etcd cluster as this host manages its members: a lab's (its zone, its
    /// PKI), or, on a real host, the zone file's `[database] consensus` hosts with the
    /// consensus certificate installed here (`<pki>/consensus/<host>.crt`), files in
    /// `<data dir>/etcd`.
    pub(crate) fn etcd_cluster(&self) -> Result<EtcdCluster, AgentError> {
        if let Some(l) = &self.ha_launcher {
            let zone = l
                .lab
                .state()
                .and_then(|s| s.zone())
                .map_err(|e| self.etcd_error(dczone_lab::error_chain(&e)))?;
            return Ok(l.lab.etcd(&zone));
        }
        let Some(h) = &self.host_zone else {
            return Err(self.etcd_error("this agent knows no zone"));
        };
        let members = h
            .etcd_members()
            .map_err(|e| AgentError::Virt(VirtError::BadSpec(e.to_string())))?;
        let creds = h.consensus_credentials(&self.host);
        Ok(EtcdCluster {
            dir: h.data_dir.join("etcd"),
            token: h.bundle.zone.clone(),
            members,
            place: Placement::Host {
                identity: dczone_pki::tls::Identity {
                    ca: creds.ca,
                    certificate: creds.cert,
                    key: creds.key,
                },
            },
        })
    }

    /// The cluster, this host's member of it, and the credentials of this host's
    /// consensus parties.
    fn own_etcd_member(&self) -> Result<(EtcdCluster, EtcdMember, Credentials), AgentError> {
        let cluster = self.etcd_cluster()?;
        let m = cluster
            .members
            .iter()
            .find(|m| m.host == self.host)
            .cloned()
            .ok_or_else(|| self.etcd_error("no etcd member of the zone runs on this host"))?;
        let creds = self.credentials(&cluster, &m)?;
        Ok((cluster, m, creds))
    }

    fn credentials(
        &self,
        cluster: &EtcdCluster,
        m: &EtcdMember,
    ) -> Result<Credentials, AgentError> {
        let id = cluster
            .identity(m)
            .map_err(|e| self.etcd_error(dczone_lab::error_chain(&e)))?;
        Ok(Credentials {
            ca: id.ca,
            cert: id.certificate,
            key: id.key,
        })
    }

    /// Starts this host's etcd members that are not running.
    pub(crate) fn etcd_start(&self) -> Result<Value, AgentError> {
        let cluster = self.etcd_cluster()?;
        let _one_at_a_time = self.etcd_starting.lock().unwrap_or_else(|e| e.into_inner());
        let started = cluster
            .start_host(&self.host)
            .map_err(|e| self.etcd_error(dczone_lab::error_chain(&e)))?;
        Ok(json!({ "host": self.host, "started": started }))
    }

    /// Fences `site`'s member (its HA agent and PostgreSQL stop: [`Agent::ha_stop`]), then
    /// reads how far its WAL reaches from `after_lsn`.
    pub(crate) fn db_fence(&self, site: &str, after_lsn: u64) -> Result<Value, AgentError> {
        let stopped = self.ha_stop(site)?["stopped"].as_bool().unwrap_or(false);
        let data = self.db_dir.join(site).join("data");
        let standby = data.join("standby.signal").exists();
        let tail = if standby || !data.join("PG_VERSION").exists() {
            None
        } else {
            Some(
                dczone_db::wal_tail(site, &data, after_lsn).map_err(|e| AgentError::Ha {
                    site: site.into(),
                    reason: format!("read its WAL: {}", dczone_lab::error_chain(&e)),
                })?,
            )
        };
        let fenced = Fenced {
            site: site.into(),
            stopped,
            standby,
            tail,
        };
        Ok(serde_json::to_value(fenced).unwrap_or(Value::Null))
    }

    /// Stops `site`'s member and removes its directory (data, log, certificates): `db down`.
    pub(crate) fn db_purge(&self, site: &str) -> Result<Value, AgentError> {
        let stopped = self.ha_stop(site)?["stopped"].as_bool().unwrap_or(false);
        let dir = self.db_dir.join(site);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(VirtError::Io {
                    what: format!("remove {}", dir.display()),
                    source,
                }
                .into())
            }
        }
        Ok(json!({ "site": site, "stopped": stopped, "removed": true }))
    }

    /// This host's etcd members, each asked alone for its status.
    pub(crate) fn etcd_status(&self) -> Result<Value, AgentError> {
        let cluster = self.etcd_cluster()?;
        let mut asks = Vec::new();
        for m in cluster.members.iter().filter(|m| m.host == self.host) {
            asks.push((m.clone(), self.credentials(&cluster, m)?));
        }
        let views = on_own_runtime(move || async move {
            let mut views = Vec::new();
            for (m, creds) in asks {
                let url = m.client_url();
                let r = Store::member_status(&url, &creds).await;
                views.push(EtcdMemberView {
                    name: m.name,
                    site: m.site,
                    url,
                    reachable: r.is_ok(),
                    has_leader: r.as_ref().is_ok_and(|s| s.raft_leader != 0),
                    error: r.err().map(|e| e.to_string()),
                });
            }
            views
        })?;
        // Whether this agent can rebuild etcd on its member (a manual failover's step).
        let rebuild = matches!(cluster.place, Placement::Lab(_));
        Ok(json!({ "host": self.host, "members": views, "rebuild": rebuild }))
    }

    /// Disaster recovery of the consensus store on this host (etcd's documented procedure):
    /// its member restarts alone with `--force-new-cluster` (keeping its data), then the
    /// failover order is written and the stale leader key deleted, before any other member
    /// can rejoin.
    pub(crate) fn etcd_rebuild(&self, order: ManualFailover) -> Result<Value, AgentError> {
        let (cluster, keep, creds) = self.own_etcd_member()?;
        let _one_at_a_time = self.etcd_starting.lock().unwrap_or_else(|e| e.into_inner());
        // Never fork a cluster that works: a member that follows a raft leader is refused.
        let (url, asking) = (keep.client_url(), creds.clone());
        let status =
            on_own_runtime(move || async move { Store::member_status(&url, &asking).await })?;
        if let Ok(st) = status {
            if st.raft_leader != 0 {
                return Err(AgentError::Conflict(format!(
                    "etcd member {} follows a raft leader: consensus answers, and a rebuild \
                     would fork it",
                    keep.name
                )));
            }
        }
        if matches!(cluster.place, Placement::Host { .. }) {
            return Err(VirtError::BadSpec(
                "rebuilding etcd on a real host is not built yet: the members' list after a \
                 rebuild lives on each host (issue 11); follow etcd's disaster recovery \
                 (`--force-new-cluster`) by hand"
                    .into(),
            )
            .into());
        }
        cluster
            .force_new_cluster(&keep.name)
            .map_err(|e| self.etcd_error(dczone_lab::error_chain(&e)))?;
        let (prefix, url) = (cluster.token.clone(), keep.client_url());
        on_own_runtime(move || async move {
            let store = Store::connect(&prefix, &[url], &creds).await?;
            store.put_json(&store.keys.failover(), &order, None).await?;
            store.delete(&store.keys.leader()).await
        })?
        .map_err(|e| {
            self.etcd_error(format!(
                "write the failover order to the rebuilt store: {}",
                dczone_lab::error_chain(&e)
            ))
        })?;
        Ok(json!({ "host": self.host, "rebuilt_on": keep.name }))
    }

    /// Re-adds this host's etcd members that are out of the cluster (after a rebuild):
    /// etcd's `member add` through the members in it, then a fresh start. Nothing if none
    /// is out.
    pub(crate) fn etcd_rejoin(&self) -> Result<Value, AgentError> {
        let cluster = self.etcd_cluster()?;
        let _one_at_a_time = self.etcd_starting.lock().unwrap_or_else(|e| e.into_inner());
        let fail = |e: dczone_lab::LabError| self.etcd_error(dczone_lab::error_chain(&e));
        let mut rejoined = Vec::new();
        for m in cluster.missing() {
            if m.host != self.host {
                continue;
            }
            let creds = self.credentials(&cluster, &m)?;
            let names = cluster.membership().unwrap_or_default();
            let current: Vec<String> = cluster
                .members
                .iter()
                .filter(|x| names.contains(&x.name))
                .map(|x| x.client_url())
                .collect();
            let (prefix, peer) = (cluster.token.clone(), m.peer_url());
            on_own_runtime(move || async move {
                let store = Store::connect(&prefix, &current, &creds).await?;
                // etcd refuses a reconfiguration ("unhealthy cluster") until every member
                // has been connected for 5 s: a member that just rejoined delays the next.
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    let added = async {
                        if !store.member_peer_urls().await?.contains(&peer) {
                            store.member_add(&peer).await?;
                        }
                        Ok::<_, StoreError>(())
                    };
                    match added.await {
                        Err(_) if Instant::now() < deadline => {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                        r => return r,
                    }
                }
            })?
            .map_err(|e| {
                self.etcd_error(format!(
                    "add member {} back to the cluster: {}",
                    m.name,
                    dczone_lab::error_chain(&e)
                ))
            })?;
            cluster.rejoin(&m.name).map_err(fail)?;
            rejoined.push(m.name);
        }
        Ok(json!({ "host": self.host, "rejoined": rejoined }))
    }

    /// Deletes the platform's keys (`db down`), through this host's etcd member.
    pub(crate) fn etcd_clear(&self) -> Result<Value, AgentError> {
        let (cluster, m, creds) = self.own_etcd_member()?;
        let (prefix, url) = (cluster.token.clone(), m.client_url());
        on_own_runtime(move || async move {
            let store = Store::connect(&prefix, &[url], &creds).await?;
            store.delete_prefix().await
        })?
        .map_err(|e| {
            self.etcd_error(format!(
                "delete the platform's keys: {}",
                dczone_lab::error_chain(&e)
            ))
        })?;
        Ok(json!({ "host": self.host, "cleared": true }))
    }
}
