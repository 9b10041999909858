//! Where the zone's consensus store (etcd) runs, and the rule that keeps it alive through a
//! regional disaster (SPEC.md section 8).
//!
//! ```toml
//! [consensus]
//! # One member per listed host. Default: the database host of every database site.
//! hosts = ["dc1.1-h1", "dc1.2-h1", "dc2.1-h1", "dc2.1-h2", "witness-h1"]
//! # allow_regional_majority = true   # accept a placement that dies with one region
//! ```
//!
//! A majority-based store survives the loss of a set of members only if more than half of
//! them remain. When the database spans several regions, the zone must therefore keep a
//! majority after the loss of any one site and of any one region; otherwise the disaster
//! the reference is written for (region 1 lost, service moves to DC2.1) leaves no quorum to
//! elect DC2.1 and the RTO is unbounded. The usual answer is a witness site outside both
//! regions (Oracle's fast-start failover observer, SQL Server's cloud witness).
//!
//! The reference zone places five members: one in each DC1.x site, two in DC2.1 and one in
//! the witness. Any one site or region lost leaves three. The placement cannot also keep a
//! majority when DC2.1 and the witness are lost together: those two and region 1 are
//! complementary, and no majority rule lets both halves write. Region 1 then keeps the
//! primary's role but cannot commit until one of them returns (see ARCHITECTURE.md).

use serde::{Deserialize, Serialize};

use crate::Site;

/// The consensus store's placement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsensusPlan {
    /// One member per host, in the zone file's order.
    pub hosts: Vec<String>,
    /// The operator accepted a placement that one site or region can take down.
    pub allow_regional_majority: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConsensus {
    hosts: Option<Vec<String>>,
    #[serde(default)]
    allow_regional_majority: bool,
}

/// How many members may be lost with the store still holding a majority.
pub fn tolerated_losses(members: usize) -> usize {
    members.saturating_sub(1) / 2
}

/// A failure domain (a site or a region) whose loss takes the store's majority with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FatalDomain {
    /// "site" or "region".
    pub kind: &'static str,
    pub id: String,
    pub members: usize,
    pub total: usize,
}

/// The sites and regions whose loss alone leaves no majority (`sites` gives each member
/// host's site and region).
pub fn fatal_domains(plan: &ConsensusPlan, sites: &[Site]) -> Vec<FatalDomain> {
    let total = plan.hosts.len();
    let site_of = |host: &str| sites.iter().find(|s| s.hosts.iter().any(|h| h == host));
    let mut out = Vec::new();
    let mut check = |kind: &'static str, id: &str, members: usize| {
        if members > tolerated_losses(total) {
            out.push(FatalDomain {
                kind,
                id: id.to_string(),
                members,
                total,
            });
        }
    };
    for s in sites {
        let n = plan
            .hosts
            .iter()
            .filter(|h| site_of(h).is_some_and(|x| x.id == s.id))
            .count();
        check("site", &s.id, n);
    }
    let mut regions: Vec<&str> = sites.iter().map(|s| s.region.as_str()).collect();
    regions.sort_unstable();
    regions.dedup();
    for r in regions {
        let n = plan
            .hosts
            .iter()
            .filter(|h| site_of(h).is_some_and(|x| x.region == r))
            .count();
        check("region", r, n);
    }
    out
}

/// Validates the consensus section. `db_hosts` are the database members' hosts with their
/// sites (the default placement); `spans_regions` says whether the database has members in
/// more than one region, which is when the regional rule applies.
pub(crate) fn validate(
    raw: Option<RawConsensus>,
    sites: &[Site],
    db_hosts: &[String],
    spans_regions: bool,
    problem: &mut dyn FnMut(String, String),
) -> Option<ConsensusPlan> {
    let (hosts, allow) = match raw {
        Some(r) => (
            r.hosts.unwrap_or_else(|| db_hosts.to_vec()),
            r.allow_regional_majority,
        ),
        None if db_hosts.is_empty() => return None,
        None => (db_hosts.to_vec(), false),
    };
    let known = |h: &str| sites.iter().any(|s| s.hosts.iter().any(|x| x == h));
    let mut ok = true;
    for (i, h) in hosts.iter().enumerate() {
        let field = format!("consensus.hosts[{i}]");
        if !known(h) {
            problem(field, format!("unknown host '{h}'"));
            ok = false;
        } else if hosts[..i].contains(h) {
            problem(field, format!("'{h}' is listed twice: one member per host"));
            ok = false;
        }
    }
    if hosts.is_empty() {
        problem(
            "consensus.hosts".into(),
            "the consensus store needs at least one member".into(),
        );
        ok = false;
    }
    let plan = ConsensusPlan {
        hosts,
        allow_regional_majority: allow,
    };
    if ok && spans_regions && !allow {
        for d in fatal_domains(&plan, sites) {
            problem(
                "consensus.hosts".into(),
                format!(
                    "{} '{}' holds {} of the {} consensus members: losing it leaves no \
                     majority, so no surviving site can be made primary and a {} disaster \
                     has no RTO. Add a witness site outside the database's regions with one \
                     member (and enough members elsewhere that no {} holds more than {}), or \
                     set consensus.allow_regional_majority = true to accept the risk",
                    d.kind,
                    d.id,
                    d.members,
                    d.total,
                    d.kind,
                    d.kind,
                    tolerated_losses(d.total)
                ),
            );
        }
    }
    ok.then_some(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SiteKind;

    fn site(id: &str, region: &str, hosts: &[&str]) -> Site {
        Site {
            id: id.into(),
            kind: SiteKind::Datacenter,
            region: region.into(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
        }
    }

    fn sites() -> Vec<Site> {
        vec![
            site("dc1.1", "r1", &["a1"]),
            site("dc1.2", "r1", &["b1"]),
            site("dc2.1", "r2", &["c1", "c2"]),
            site("w", "rw", &["w1"]),
        ]
    }

    fn plan(hosts: &[&str]) -> ConsensusPlan {
        ConsensusPlan {
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            allow_regional_majority: false,
        }
    }

    #[test]
    fn three_members_over_two_regions_die_with_region_one() {
        let d = fatal_domains(&plan(&["a1", "b1", "c1"]), &sites());
        assert_eq!(
            d,
            vec![FatalDomain {
                kind: "region",
                id: "r1".into(),
                members: 2,
                total: 3
            }]
        );
    }

    #[test]
    fn a_witness_and_two_members_in_dc2_survive_any_site_or_region() {
        assert!(fatal_domains(&plan(&["a1", "b1", "c1", "c2", "w1"]), &sites()).is_empty());
    }

    #[test]
    fn four_members_with_half_in_one_region_are_refused() {
        // 2 of 4 lost leaves 2: not a majority.
        let d = fatal_domains(&plan(&["a1", "b1", "c1", "w1"]), &sites());
        assert!(
            d.iter().any(|d| d.kind == "region" && d.id == "r1"),
            "{d:?}"
        );
    }

    #[test]
    fn validation_explains_the_risk_and_the_override_accepts_it() {
        let mut problems = Vec::new();
        let raw = RawConsensus {
            hosts: None,
            allow_regional_majority: false,
        };
        let db = vec!["a1".to_string(), "b1".into(), "c1".into()];
        let got = validate(Some(raw), &sites(), &db, true, &mut |f, m| {
            problems.push((f, m))
        });
        assert!(got.is_some());
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].1.contains("region 'r1' holds 2 of the 3"),
            "{problems:?}"
        );
        assert!(problems[0].1.contains("allow_regional_majority"));

        let mut problems = Vec::new();
        let raw = RawConsensus {
            hosts: None,
            allow_regional_majority: true,
        };
        validate(Some(raw), &sites(), &db, true, &mut |f, m| {
            problems.push((f, m))
        });
        assert!(problems.is_empty(), "{problems:?}");
    }

    #[test]
    fn unknown_and_repeated_hosts_name_the_entry() {
        let mut problems = Vec::new();
        let raw = RawConsensus {
            hosts: Some(vec!["a1".into(), "zz".into(), "a1".into()]),
            allow_regional_majority: false,
        };
        assert!(
            validate(Some(raw), &sites(), &[], true, &mut |f, m| problems
                .push((f, m)))
            .is_none()
        );
        assert!(problems
            .iter()
            .any(|(f, m)| f == "consensus.hosts[1]" && m.contains("unknown host 'zz'")));
        assert!(problems
            .iter()
            .any(|(f, m)| f == "consensus.hosts[2]" && m.contains("twice")));
    }
}
