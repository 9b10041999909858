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
pub mod diff;
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
    #[error("{}", no_space(.what, *.need, .space))]
    NoSpace {
        what: String,
        /// The bytes asked for (`None`: any at all).
        need: Option<u64>,
        space: Box<PoolSpace>,
    },
}

fn no_space(what: &str, need: Option<u64>, s: &PoolSpace) -> String {
    let room = match need {
        Some(n) => format!(
            "{what} needs {}, and pool {} of cluster {} can take {} more ({})",
            size(n),
            s.pool,
            s.cluster,
            size(s.free()),
            s.limit()
        ),
        None => format!(
            "{what}: pool {} of cluster {} is full ({})",
            s.pool,
            s.cluster,
            s.limit()
        ),
    };
    let free = if s.pool == backup::POOL {
        "delete backups it no longer needs (`dczone backup delete ID --at SITE`)"
    } else {
        "remove images it no longer needs (`dczone vm destroy NAME`)"
    };
    let raise = match s.limiting() {
        Limit::Bytes => format!(
            "raise its quota (`ceph osd pool set-quota {} max_bytes BYTES`, with the \
             cluster's admin key on a monitor's host)",
            s.pool
        ),
        Limit::Objects => format!(
            "raise its quota (`ceph osd pool set-quota {} max_objects N`, with the \
             cluster's admin key on a monitor's host)",
            s.pool
        ),
        Limit::Osds | Limit::Flagged => format!("add OSDs to cluster {}", s.cluster),
    };
    format!("{room}; {free}, or {raise}")
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

/// What a pool can still take. Ceph does not fail a write to a full pool: it holds it
/// (until the client's operation timeout), so room is checked before a transfer starts.
/// The figures are those the monitors act on: the pool's bytes and objects as its quotas
/// count them (`ceph pg dump pools`: `stat_sum`), the OSDs' room for it after replication
/// (`ceph df`'s MAX AVAIL), its quotas, and whether it is marked full already (`ceph osd
/// dump`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolSpace {
    pub cluster: String,
    pub pool: String,
    pub bytes: u64,
    pub objects: u64,
    pub max_avail: u64,
    /// 0: no quota.
    pub quota_bytes: u64,
    pub quota_objects: u64,
    /// The pool (or the whole cluster) is marked full: writes are held now.
    pub full: bool,
}

/// What limits a pool's room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Bytes,
    Objects,
    Osds,
    /// Marked full, while the figures read still show room (they lag the monitors').
    Flagged,
}

impl PoolSpace {
    /// Pool `pool` from `ceph osd dump`, `ceph df detail` and `ceph pg dump pools` (`-f
    /// json` each); `None` while a figure of it is missing (a new pool has no statistics
    /// for a few seconds).
    pub fn from_json(
        cluster: &str,
        pool: &str,
        osd_dump: &Value,
        df: &Value,
        pg_pools: &Value,
    ) -> Option<PoolSpace> {
        let find = |list: &Value, key: &str| {
            list.as_array()
                .and_then(|a| a.iter().find(|p| p[key].as_str() == Some(pool)))
                .cloned()
        };
        let o = find(&osd_dump["pools"], "pool_name")?;
        let d = find(&df["pools"], "name")?;
        let id = o["pool"].as_u64()?;
        let r = pg_pools["pool_stats"]
            .as_array()?
            .iter()
            .find(|p| p["poolid"].as_u64() == Some(id))?["stat_sum"]
            .clone();
        let flagged = |flags: &Value| {
            flags
                .as_str()
                .is_some_and(|f| f.split(',').any(|x| x == "full" || x == "full_quota"))
        };
        Some(PoolSpace {
            cluster: cluster.into(),
            pool: pool.into(),
            bytes: r["num_bytes"].as_u64()?,
            objects: r["num_objects"].as_u64()?,
            max_avail: d["stats"]["max_avail"].as_u64()?,
            quota_bytes: o["quota_max_bytes"].as_u64().unwrap_or(0),
            quota_objects: o["quota_max_objects"].as_u64().unwrap_or(0),
            full: flagged(&o["flags_names"]) || flagged(&osd_dump["flags"]),
        })
    }

    fn quota_left(&self) -> u64 {
        match self.quota_bytes {
            0 => u64::MAX,
            q => q.saturating_sub(self.bytes),
        }
    }

    fn objects_left(&self) -> bool {
        self.quota_objects == 0 || self.objects < self.quota_objects
    }

    /// The bytes the pool can still take (0 once marked full or out of objects).
    pub fn free(&self) -> u64 {
        if self.full || !self.objects_left() {
            return 0;
        }
        self.max_avail.min(self.quota_left())
    }

    pub fn limiting(&self) -> Limit {
        if !self.objects_left() {
            Limit::Objects
        } else if self.quota_left() <= self.max_avail {
            Limit::Bytes
        } else if self.full && self.max_avail > 0 {
            Limit::Flagged
        } else {
            Limit::Osds
        }
    }

    /// What limits the pool, for people.
    pub fn limit(&self) -> String {
        match self.limiting() {
            Limit::Bytes => format!(
                "quota {}, {} stored",
                size(self.quota_bytes),
                size(self.bytes)
            ),
            Limit::Objects => format!(
                "quota {} objects, {} stored",
                self.quota_objects, self.objects
            ),
            Limit::Osds => "the OSDs' free space".into(),
            Limit::Flagged => "marked full by the monitors".into(),
        }
    }

    /// `Err(NoSpace)` unless `need` bytes fit; `what` names what needs them.
    pub fn check(&self, need: u64, what: &str) -> Result<(), StorageError> {
        if need > self.free() {
            return Err(StorageError::NoSpace {
                what: what.into(),
                need: Some(need),
                space: Box::new(self.clone()),
            });
        }
        Ok(())
    }

    /// `Err(NoSpace)` if the pool can take nothing more.
    pub fn check_not_full(&self, what: &str) -> Result<(), StorageError> {
        if self.free() == 0 {
            return Err(StorageError::NoSpace {
                what: what.into(),
                need: None,
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

    /// Pool `backups` with `bytes` and 10 objects, `max_avail`, quotas and flags.
    fn space(bytes: u64, max_avail: u64, quota: u64, quota_objects: u64, flags: &str) -> PoolSpace {
        let dump = serde_json::json!({ "flags": "sortbitwise", "pools": [
            { "pool": 2, "pool_name": "rbd", "quota_max_bytes": 0, "flags_names": "hashpspool" },
            { "pool": 3, "pool_name": "backups", "quota_max_bytes": quota,
              "quota_max_objects": quota_objects, "flags_names": flags } ] });
        let df = serde_json::json!({ "pools": [
            { "name": "rbd", "stats": { "max_avail": 1 } },
            { "name": "backups", "stats": { "max_avail": max_avail } } ] });
        let pg = serde_json::json!({ "pool_stats": [
            { "poolid": 2, "stat_sum": { "num_bytes": 1, "num_objects": 1 } },
            { "poolid": 3, "stat_sum": { "num_bytes": bytes, "num_objects": 10 } } ] });
        PoolSpace::from_json("region-2", "backups", &dump, &df, &pg).unwrap()
    }

    #[test]
    fn a_pool_takes_the_least_of_the_osds_room_and_its_quotas() {
        assert_eq!(space(10, 100, 0, 0, "hashpspool").free(), 100);
        assert_eq!(space(10, 100, 50, 0, "hashpspool").free(), 40);
        assert_eq!(space(10, 30, 50, 0, "hashpspool").free(), 30);
        // Over its quota (the figures lag): nothing, not an underflow.
        assert_eq!(space(60, 100, 50, 0, "hashpspool").free(), 0);
        // Out of objects, or marked full by the monitors: nothing.
        assert_eq!(space(10, 100, 0, 10, "hashpspool").free(), 0);
        assert_eq!(space(10, 100, 0, 11, "hashpspool").free(), 100);
        assert_eq!(space(10, 100, 0, 0, "hashpspool,full,full_quota").free(), 0);
        assert_eq!(space(10, 100, 50, 0, "hashpspool").limiting(), Limit::Bytes);
        assert_eq!(space(10, 30, 50, 0, "hashpspool").limiting(), Limit::Osds);
        assert_eq!(
            space(10, 100, 0, 10, "hashpspool").limiting(),
            Limit::Objects
        );
        assert_eq!(
            space(10, 100, 0, 0, "full_quota").limiting(),
            Limit::Flagged
        );
        // A new pool without statistics yet.
        let none = serde_json::json!({ "pools": [] });
        assert!(PoolSpace::from_json("r", "backups", &none, &none, &none).is_none());
    }

    #[test]
    fn a_need_beyond_the_room_is_refused_saying_what_to_do() {
        let s = space(16 << 20, 1 << 30, 17 << 20, 0, "hashpspool");
        assert!(s.check(1 << 20, "x").is_ok());
        let m = s
            .check(2 << 20, "the backup of VM ledger")
            .unwrap_err()
            .to_string();
        assert!(
            m.starts_with("the backup of VM ledger needs 2.0 MiB"),
            "{m}"
        );
        assert!(
            m.contains("pool backups of cluster region-2 can take 1.0 MiB more"),
            "{m}"
        );
        assert!(m.contains("quota 17.0 MiB, 16.0 MiB stored"), "{m}");
        assert!(m.contains("dczone backup delete ID"), "{m}");
        assert!(
            m.contains("ceph osd pool set-quota backups max_bytes"),
            "{m}"
        );
        assert!(!m.contains("add OSDs"), "{m}");
        let m = space(10, 0, 0, 0, "hashpspool")
            .check_not_full("a backup of VM ledger")
            .unwrap_err()
            .to_string();
        assert!(m.starts_with("a backup of VM ledger: pool backups of cluster region-2 is full (the OSDs' free space)"), "{m}");
        assert!(
            m.contains("add OSDs to cluster region-2") && !m.contains("set-quota"),
            "{m}"
        );
        assert_eq!(size(1), "1 B");
        assert_eq!(size(1536), "1.5 KiB");
    }
}
