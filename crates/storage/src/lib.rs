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
    #[error(
        "{what} needs {}, and pool {} of cluster {} can take {} more ({}); \
         delete what it no longer needs (`dczone backup delete ID --at SITE`), raise its \
         quota (`ceph osd pool set-quota {} max_bytes BYTES`) or add OSDs",
        size(*.need), .space.pool, .space.cluster, size(.space.free()), .space.limit(), .space.pool
    )]
    NoSpace {
        what: String,
        need: u64,
        space: Box<PoolSpace>,
    },
}

/// `bytes` for people: `512 B`, `3.5 KiB`, `16.0 MiB`, `1.5 GiB`.
pub fn size(bytes: u64) -> String {
    let b = bytes as f64;
    match bytes {
        0..1024 => format!("{bytes} B"),
        1024..1_048_576 => format!("{:.1} KiB", b / 1024.0),
        1_048_576..1_073_741_824 => format!("{:.1} MiB", b / 1_048_576.0),
        _ => format!("{:.1} GiB", b / 1_073_741_824.0),
    }
}

/// What a pool can still take, from `ceph df detail`: the OSDs' room for it (after
/// replication) and its quota. Ceph does not fail a write to a full pool, it holds it
/// (until the client's operation timeout): room is checked before a transfer starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolSpace {
    pub cluster: String,
    pub pool: String,
    /// The pool's data, as its quota counts it.
    pub stored: u64,
    /// What the OSDs can still take for the pool (Ceph's MAX AVAIL).
    pub max_avail: u64,
    /// The pool's quota in bytes (0: none).
    pub quota_bytes: u64,
}

impl PoolSpace {
    /// Pool `pool` of `ceph df detail -f json`.
    pub fn from_df(cluster: &str, pool: &str, df: &Value) -> Option<PoolSpace> {
        let p = df["pools"]
            .as_array()?
            .iter()
            .find(|p| p["name"].as_str() == Some(pool))?;
        let u = |k: &str| p["stats"][k].as_u64();
        Some(PoolSpace {
            cluster: cluster.into(),
            pool: pool.into(),
            stored: u("stored")?,
            max_avail: u("max_avail")?,
            quota_bytes: u("quota_bytes").unwrap_or(0),
        })
    }

    /// The bytes the pool can still take.
    pub fn free(&self) -> u64 {
        let quota_left = match self.quota_bytes {
            0 => u64::MAX,
            q => q.saturating_sub(self.stored),
        };
        self.max_avail.min(quota_left)
    }

    /// What limits the pool: its quota, or the OSDs.
    pub fn limit(&self) -> String {
        if self.quota_bytes != 0 && self.quota_bytes.saturating_sub(self.stored) <= self.max_avail {
            format!(
                "quota {}, {} stored",
                size(self.quota_bytes),
                size(self.stored)
            )
        } else {
            "the OSDs' free space".into()
        }
    }

    /// `Err(NoSpace)` unless `need` bytes fit; `what` names what needs them.
    pub fn check(&self, need: u64, what: &str) -> Result<(), StorageError> {
        if need > self.free() {
            return Err(StorageError::NoSpace {
                what: what.into(),
                need,
                space: Box::new(self.clone()),
            });
        }
        Ok(())
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn df(stored: u64, max_avail: u64, quota: u64) -> Value {
        serde_json::json!({ "pools": [
            { "name": "rbd", "stats": { "stored": 1, "max_avail": 1, "quota_bytes": 0 } },
            { "name": "backups", "stats": {
                "stored": stored, "max_avail": max_avail, "quota_bytes": quota } }
        ] })
    }

    #[test]
    fn a_pool_takes_the_least_of_the_osds_room_and_its_quota() {
        let space = |s, m, q| PoolSpace::from_df("r2", "backups", &df(s, m, q)).unwrap();
        assert_eq!(space(10, 100, 0).free(), 100);
        assert_eq!(space(10, 100, 50).free(), 40);
        assert_eq!(space(10, 30, 50).free(), 30);
        // Over its quota (Ceph counts stats late): nothing, not an underflow.
        assert_eq!(space(60, 100, 50).free(), 0);
        assert!(space(10, 100, 50).limit().starts_with("quota"));
        assert_eq!(space(10, 30, 50).limit(), "the OSDs' free space");
        assert!(PoolSpace::from_df("r2", "images", &df(0, 0, 0)).is_none());
    }

    #[test]
    fn a_need_beyond_the_room_is_refused_saying_what_to_do() {
        let s =
            PoolSpace::from_df("region-2", "backups", &df(16 << 20, 1 << 30, 17 << 20)).unwrap();
        assert!(s.check(1 << 20, "x").is_ok());
        let e = s.check(2 << 20, "the backup of VM ledger").unwrap_err();
        let m = e.to_string();
        assert!(
            m.starts_with("the backup of VM ledger needs 2.0 MiB"),
            "{m}"
        );
        assert_eq!(size(1), "1 B");
        assert_eq!(size(1536), "1.5 KiB");
        assert!(
            m.contains("pool backups of cluster region-2 can take 1.0 MiB more"),
            "{m}"
        );
        assert!(m.contains("quota 17.0 MiB, 16.0 MiB stored"), "{m}");
        assert!(
            m.contains("ceph osd pool set-quota backups max_bytes"),
            "{m}"
        );
    }
}
