//! The database platform of a zone: which site holds the primary, which hold standbys, and the
//! replication policy of each tier (SPEC.md section 2).
//!
//! ```toml
//! [database]
//! host_index = 0              # which host of each site runs PostgreSQL (default: the first)
//! primary = "dc1.1"
//! standbys = ["dc1.2", "dc2.1"]
//! tier = "tier1"              # the policy the ledger database runs under
//!
//! [policies.tier1]
//! replication = "sync"        # or "async"
//! sync_standbys = ["dc2.1"]   # sync only; default: every standby
//! quorum = "ANY 1"            # "ANY n" or "FIRST n"
//! synchronous_commit = "on"   # remote_write | on | remote_apply
//! standby_failure = "availability-first"  # or "data-first"
//! failure_detect_ms = 300     # availability-first: how long commits may wait before async
//!
//! [policies.tier2]
//! replication = "async"
//!
//! [ha]
//! lease_ttl_ms = 3000         # the leader lease; a primary that cannot renew it fences itself
//! loop_ms = 100               # how often each HA agent looks at its member
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Site;

/// How commits of a tier reach the standbys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Replication {
    Sync,
    Async,
}

/// What the primary does when a synchronous standby stops answering (SPEC.md section 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StandbyFailure {
    /// Commits wait until the standby is back: never an unprotected commit.
    DataFirst,
    /// After `failure_detect_ms`, switch to asynchronous replication and keep committing;
    /// switch back once the standby has caught up.
    AvailabilityFirst,
}

/// PostgreSQL's two quorum methods for `synchronous_standby_names`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QuorumMethod {
    First,
    Any,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quorum {
    pub method: QuorumMethod,
    pub count: usize,
}

/// The replication policy of one tier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub name: String,
    pub replication: Replication,
    /// Site ids of the synchronous standbys (empty under async).
    pub sync_standbys: Vec<String>,
    pub quorum: Quorum,
    pub synchronous_commit: String,
    pub standby_failure: StandbyFailure,
    pub failure_detect_ms: u64,
}

/// The HA manager's timings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaTimings {
    pub lease_ttl_ms: u64,
    pub loop_ms: u64,
}

/// The database platform of the zone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatabasePlan {
    pub host_index: usize,
    pub primary: String,
    pub standbys: Vec<String>,
    /// The policy in force (one of `policies`).
    pub tier: String,
    pub policies: BTreeMap<String, Policy>,
    pub ha: HaTimings,
}

impl DatabasePlan {
    /// Every member site, primary first.
    pub fn members(&self) -> Vec<String> {
        std::iter::once(self.primary.clone())
            .chain(self.standbys.iter().cloned())
            .collect()
    }

    pub fn policy(&self) -> &Policy {
        &self.policies[&self.tier]
    }
}

impl Policy {
    /// The synchronous set when `primary` leads: the declared standbys minus the primary;
    /// if that leaves none, every other member (a promoted sync standby protects its commits
    /// on the sites that remain).
    pub fn sync_set(&self, primary: &str, members: &[String]) -> Vec<String> {
        let declared: Vec<String> = self
            .sync_standbys
            .iter()
            .filter(|s| s.as_str() != primary)
            .cloned()
            .collect();
        if !declared.is_empty() {
            return declared;
        }
        members
            .iter()
            .filter(|s| s.as_str() != primary)
            .cloned()
            .collect()
    }

    /// The quorum count, capped by the size of the set it applies to.
    pub fn quorum_count(&self, set_len: usize) -> usize {
        self.quorum.count.min(set_len).max(1)
    }

    /// PostgreSQL's `synchronous_standby_names` for `set` (empty under async).
    pub fn standby_names(&self, set: &[String]) -> String {
        if self.replication == Replication::Async || set.is_empty() {
            return String::new();
        }
        let names: Vec<String> = set.iter().map(|s| format!("\"{}\"", app_name(s))).collect();
        let method = match self.quorum.method {
            QuorumMethod::First => "FIRST",
            QuorumMethod::Any => "ANY",
        };
        format!(
            "{method} {} ({})",
            self.quorum_count(set.len()),
            names.join(", ")
        )
    }
}

/// The `application_name` a site's standby connects with (PostgreSQL identifiers: no dots).
pub fn app_name(site: &str) -> String {
    site.replace(['.', '-'], "_")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDatabase {
    host_index: Option<usize>,
    primary: String,
    #[serde(default)]
    standbys: Vec<String>,
    tier: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPolicy {
    replication: String,
    sync_standbys: Option<Vec<String>>,
    quorum: Option<String>,
    synchronous_commit: Option<String>,
    standby_failure: Option<String>,
    failure_detect_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHa {
    lease_ttl_ms: Option<u64>,
    loop_ms: Option<u64>,
}

fn parse_quorum(text: &str) -> Result<Quorum, String> {
    let mut words = text.split_whitespace();
    let method = match words.next().map(str::to_ascii_uppercase).as_deref() {
        Some("ANY") => QuorumMethod::Any,
        Some("FIRST") => QuorumMethod::First,
        _ => {
            return Err(format!(
                "'{text}' is not a quorum: write \"ANY n\" or \"FIRST n\""
            ))
        }
    };
    let count = words
        .next()
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|n| *n >= 1)
        .ok_or_else(|| format!("'{text}': the count must be a whole number >= 1"))?;
    if words.next().is_some() {
        return Err(format!("'{text}': write \"ANY n\" or \"FIRST n\" only"));
    }
    Ok(Quorum { method, count })
}

/// Validates the database section against the sites; pushes (field, message) problems.
pub(crate) fn validate(
    raw: Option<RawDatabase>,
    raw_policies: BTreeMap<String, RawPolicy>,
    raw_ha: Option<RawHa>,
    sites: &[Site],
    problem: &mut dyn FnMut(String, String),
) -> Option<DatabasePlan> {
    if raw.is_none() && !raw_policies.is_empty() {
        problem(
            "policies".into(),
            "policies need a [database] section that uses them".into(),
        );
    }
    let raw = raw?;
    let known: Vec<&str> = sites.iter().map(|s| s.id.as_str()).collect();
    let site_ok = |field: String, id: &str, problem: &mut dyn FnMut(String, String)| {
        if !known.contains(&id) {
            problem(
                field,
                format!("unknown site '{id}'; sites are {}", known.join(", ")),
            );
            return false;
        }
        true
    };
    site_ok("database.primary".into(), &raw.primary, problem);
    for (i, s) in raw.standbys.iter().enumerate() {
        let field = format!("database.standbys[{i}]");
        if site_ok(field.clone(), s, problem)
            && (*s == raw.primary || raw.standbys[..i].contains(s))
        {
            problem(field, format!("'{s}' is listed twice as a database member"));
        }
    }
    let host_index = raw.host_index.unwrap_or(0);
    for id in std::iter::once(&raw.primary).chain(&raw.standbys) {
        if let Some(site) = sites.iter().find(|s| &s.id == id) {
            if site.hosts.len() <= host_index {
                problem(
                    "database.host_index".into(),
                    format!(
                        "site '{id}' has {} host(s); host_index {host_index} does not exist",
                        site.hosts.len()
                    ),
                );
            }
        }
    }
    let mut policies = BTreeMap::new();
    for (name, p) in raw_policies {
        let f = |k: &str| format!("policies.{name}.{k}");
        let replication = match p.replication.as_str() {
            "sync" => Replication::Sync,
            "async" => Replication::Async,
            other => {
                problem(
                    f("replication"),
                    format!("unknown replication '{other}': use \"sync\" or \"async\""),
                );
                Replication::Async
            }
        };
        let quorum = match p.quorum.as_deref().map(parse_quorum) {
            None => Quorum {
                method: QuorumMethod::Any,
                count: 1,
            },
            Some(Ok(q)) => q,
            Some(Err(m)) => {
                problem(f("quorum"), m);
                Quorum {
                    method: QuorumMethod::Any,
                    count: 1,
                }
            }
        };
        let sync_standbys = match (&p.sync_standbys, replication) {
            (Some(list), Replication::Async) if !list.is_empty() => {
                problem(
                    f("sync_standbys"),
                    "an async policy has no synchronous standbys; remove sync_standbys or set \
                     replication = \"sync\""
                        .into(),
                );
                Vec::new()
            }
            (_, Replication::Async) => Vec::new(),
            (None, Replication::Sync) => raw.standbys.clone(),
            (Some(list), Replication::Sync) => list.clone(),
        };
        for (i, s) in sync_standbys.iter().enumerate() {
            if !raw.standbys.contains(s) {
                problem(
                    format!("policies.{name}.sync_standbys[{i}]"),
                    format!(
                        "'{s}' is not a standby; the standbys are {}",
                        raw.standbys.join(", ")
                    ),
                );
            }
        }
        if replication == Replication::Sync {
            if sync_standbys.is_empty() {
                problem(
                    f("sync_standbys"),
                    "a sync policy needs at least one standby".into(),
                );
            } else if quorum.count > sync_standbys.len() {
                problem(
                    f("quorum"),
                    format!(
                        "asks for {} of {} synchronous standbys: commits could never complete",
                        quorum.count,
                        sync_standbys.len()
                    ),
                );
            }
        }
        let synchronous_commit = p.synchronous_commit.unwrap_or_else(|| "on".into());
        if !["remote_write", "on", "remote_apply"].contains(&synchronous_commit.as_str()) {
            problem(
                f("synchronous_commit"),
                format!(
                    "'{synchronous_commit}' is not a synchronous level: use remote_write, on or \
                     remote_apply"
                ),
            );
        }
        let standby_failure = match p.standby_failure.as_deref() {
            None | Some("data-first") => StandbyFailure::DataFirst,
            Some("availability-first") => StandbyFailure::AvailabilityFirst,
            Some(other) => {
                problem(
                    f("standby_failure"),
                    format!(
                        "unknown policy '{other}': use \"data-first\" or \"availability-first\""
                    ),
                );
                StandbyFailure::DataFirst
            }
        };
        let failure_detect_ms = p.failure_detect_ms.unwrap_or(300);
        if !(50..=60_000).contains(&failure_detect_ms) {
            problem(
                f("failure_detect_ms"),
                format!("must be within 50..=60000 ms, got {failure_detect_ms}"),
            );
        }
        policies.insert(
            name.clone(),
            Policy {
                name,
                replication,
                sync_standbys,
                quorum,
                synchronous_commit,
                standby_failure,
                failure_detect_ms,
            },
        );
    }
    let tier = raw.tier.unwrap_or_else(|| "tier1".into());
    if !policies.contains_key(&tier) {
        let names: Vec<&str> = policies.keys().map(String::as_str).collect();
        problem(
            "database.tier".into(),
            format!(
                "no [policies.{tier}] section; defined policies: {}",
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            ),
        );
    }
    let raw_ha = raw_ha.unwrap_or(RawHa {
        lease_ttl_ms: None,
        loop_ms: None,
    });
    let ha = HaTimings {
        lease_ttl_ms: raw_ha.lease_ttl_ms.unwrap_or(3000),
        loop_ms: raw_ha.loop_ms.unwrap_or(100),
    };
    if !(2000..=60_000).contains(&ha.lease_ttl_ms) {
        problem(
            "ha.lease_ttl_ms".into(),
            format!(
                "must be within 2000..=60000 ms (etcd's minimum lease is 1.5 s), got {}",
                ha.lease_ttl_ms
            ),
        );
    }
    if ha.loop_ms < 10 || ha.loop_ms * 4 > ha.lease_ttl_ms {
        problem(
            "ha.loop_ms".into(),
            format!(
                "must be at least 10 ms and at most a quarter of lease_ttl_ms, got {}",
                ha.loop_ms
            ),
        );
    }
    Some(DatabasePlan {
        host_index,
        primary: raw.primary,
        standbys: raw.standbys,
        tier,
        policies,
        ha,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(q: &str, sync: &[&str]) -> Policy {
        Policy {
            name: "t".into(),
            replication: Replication::Sync,
            sync_standbys: sync.iter().map(|s| s.to_string()).collect(),
            quorum: parse_quorum(q).unwrap(),
            synchronous_commit: "on".into(),
            standby_failure: StandbyFailure::DataFirst,
            failure_detect_ms: 300,
        }
    }

    #[test]
    fn standby_names_follow_postgres_syntax() {
        let p = policy("FIRST 1", &["dc2.1", "dc1.2"]);
        let members = vec!["dc1.1".into(), "dc1.2".into(), "dc2.1".into()];
        let set = p.sync_set("dc1.1", &members);
        assert_eq!(p.standby_names(&set), "FIRST 1 (\"dc2_1\", \"dc1_2\")");
    }

    #[test]
    fn promoted_sync_standby_protects_on_the_remaining_members() {
        let p = policy("ANY 1", &["dc2.1"]);
        let members = vec!["dc1.1".into(), "dc1.2".into(), "dc2.1".into()];
        assert_eq!(p.sync_set("dc2.1", &members), vec!["dc1.1", "dc1.2"]);
        assert_eq!(p.sync_set("dc1.1", &members), vec!["dc2.1"]);
    }

    #[test]
    fn quorum_text() {
        assert!(parse_quorum("ANY 2").is_ok());
        assert!(parse_quorum("first 1").is_ok());
        assert!(parse_quorum("MOST 1").unwrap_err().contains("ANY n"));
        assert!(parse_quorum("ANY 0").unwrap_err().contains(">= 1"));
    }
}
