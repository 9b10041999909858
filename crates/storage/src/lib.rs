//! The zone's storage service: real Ceph (16.2, Debian 12), laid out from the zone
//! ([`plan`]), run by each host's agent ([`host`]) and brought up by the operator through
//! the agents ([`operator`]), in a lab and on real hosts alike.
//!
//! ```text
//! operator (storage up)                 first monitor's host        other hosts
//!   fsid, keys ──PUT /v1/storage/C──────▶ plan, keyrings, conf,
//!                ◀──────────────monmap── monmaptool
//!   ──PUT /v1/storage/C (with the monmap)─────────────────────────▶ plan, keyrings, conf
//!   ──POST …/start {mon}──────────────────▶ mkfs, ceph-mon -f ─────▶ (each monitor's host)
//!   ──GET …/status until every monitor is in the quorum
//!   ──POST …/start {mgr, osd}─────────────▶ osd new + mkfs, ceph-osd -f, ceph-mgr -f
//!   ──GET …/status until every OSD is up
//!   ──POST …/setup────────────────────────▶ CRUSH stretch rule, pool, stretch mode
//!   ──GET …/status until every PG is active
//! ```
//!
//! Invariants: a host keeps the plan it was sent (another fsid is refused: `storage down`
//! first); the admin key lives only on monitors' hosts; every file of a cluster is under
//! its host's cluster directory; daemons run detached from the agent, so that an agent's
//! restart leaves them running.

pub mod backup;
pub mod conf;
pub mod host;
pub mod keys;
pub mod operator;
pub mod plan;

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} failed (exit {status}): {stderr}")]
    Command {
        what: String,
        status: i32,
        stderr: String,
    },
    #[error("{what} is unreadable: {reason}")]
    Corrupt { what: String, reason: String },
    #[error("cluster {cluster} is not installed on {host}; `dczone storage up` installs it")]
    NotInstalled { cluster: String, host: String },
    #[error("no storage cluster on {host} stores site {site}'s disks; `dczone storage up` installs them (on the site's storage hosts)")]
    NoCluster { site: String, host: String },
    #[error("{host} holds no monitor of cluster {cluster}, so not its admin key")]
    NotAdmin { cluster: String, host: String },
    #[error("{0} is not installed; run scripts/deps (apt-get install ceph-mon ceph-mgr ceph-osd ceph-common)")]
    NotInstalledBinary(String),
    #[error("start {daemon}: {reason}")]
    Start { daemon: String, reason: String },
    #[error("backup {backup} is damaged at chunk {chunk}: {reason}")]
    Damaged {
        backup: String,
        chunk: u32,
        reason: String,
    },
    /// The request contradicts what the host holds.
    #[error("{0}")]
    Conflict(String),
}

/// A cluster as its monitors see it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub cluster: String,
    pub fsid: String,
    /// `HEALTH_OK`, `HEALTH_WARN`, `HEALTH_ERR`.
    pub health: String,
    /// Each health check's name and message.
    pub checks: Vec<String>,
    pub mons: u64,
    pub quorum: Vec<String>,
    pub osds: u64,
    pub osds_up: u64,
    pub osds_in: u64,
    pub mgr_available: bool,
    pub pgs: u64,
    /// PG states and counts (`active+clean`: 32).
    pub pg_states: Vec<(String, u64)>,
    pub stretch_mode: bool,
    pub bytes_used: u64,
    pub bytes_total: u64,
}

impl ClusterStatus {
    /// From `ceph status -f json` and `ceph mon dump -f json`.
    pub fn from_json(cluster: &str, s: &Value, mon: &Value) -> ClusterStatus {
        let u = |v: &Value| v.as_u64().unwrap_or(0);
        let mut checks: Vec<String> = s["health"]["checks"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| {
                        format!(
                            "{k}: {}",
                            v["summary"]["message"].as_str().unwrap_or_default()
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        checks.sort();
        ClusterStatus {
            cluster: cluster.into(),
            fsid: s["fsid"].as_str().unwrap_or_default().into(),
            health: s["health"]["status"].as_str().unwrap_or("unknown").into(),
            checks,
            mons: u(&s["monmap"]["num_mons"]),
            quorum: s["quorum_names"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
            osds: u(&s["osdmap"]["num_osds"]),
            osds_up: u(&s["osdmap"]["num_up_osds"]),
            osds_in: u(&s["osdmap"]["num_in_osds"]),
            mgr_available: s["mgrmap"]["available"].as_bool().unwrap_or(false),
            pgs: u(&s["pgmap"]["num_pgs"]),
            pg_states: s["pgmap"]["pgs_by_state"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|x| {
                            (
                                x["state_name"].as_str().unwrap_or_default().to_string(),
                                u(&x["count"]),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default(),
            stretch_mode: mon["stretch_mode"].as_bool().unwrap_or(false),
            bytes_used: u(&s["pgmap"]["bytes_used"]),
            bytes_total: u(&s["pgmap"]["bytes_total"]),
        }
    }

    /// Every PG is active (I/O is served).
    pub fn all_active(&self) -> bool {
        self.pgs > 0
            && self
                .pg_states
                .iter()
                .filter(|(s, _)| s.split('+').any(|x| x == "active"))
                .map(|(_, n)| n)
                .sum::<u64>()
                == self.pgs
    }
}
