//! The zone file format (TOML), version 1.
//!
//! ```toml
//! name = "reference"          # optional
//! lab_scale = 64              # optional, default 64: lab bandwidth = bandwidth / lab_scale
//!
//! [[sites]]
//! id = "dc1.1"                # [a-z0-9.-], unique
//! kind = "datacenter"         # or "public-cloud", or "witness" (a consensus member, no data)
//! region = "region-1"
//! hosts = ["dc1.1-h1"]        # unique across the zone
//!
//! [[links]]
//! a = "dc1.1"
//! b = "dc1.2"
//! distance_km = 100           # one-way delay = 5 us/km ...
//! # one_way_delay_ms = 0.5    # ... or give the delay explicitly (not both)
//! bandwidth = "25Gbit"        # bit, Kbit, Mbit, Gbit, Tbit
//! deterministic = true        # APN (default); false = conventional WAN
//! jitter_ms = 0.0             # conventional WAN only
//! loss_percent = 0.0          # conventional WAN only
//! ```
//!
//! An optional `[database]` section with `[policies.*]` and `[ha]` describes the database
//! platform; see [`crate::database`]. An optional `[consensus]` section places the
//! consensus store; see [`crate::consensus`].

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{units, Link, LinkParams, Site, SiteKind, Zone, FIBER_NS_PER_KM};

/// Default lab scale: a 16 GiB reference VM / a 256 MiB lab VM.
pub const DEFAULT_LAB_SCALE: f64 = 64.0;

/// Why a zone could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ZoneError {
    #[error("cannot read zone file {}", file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("zone file {} is not valid TOML for a zone: {message}", file.display())]
    Syntax { file: PathBuf, message: String },
    #[error("zone file {} is invalid:\n{}", file.display(), Problems(problems))]
    Invalid {
        file: PathBuf,
        problems: Vec<Problem>,
    },
}

/// One thing wrong in a zone file: the field and what to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// A path into the file, e.g. `links[2].bandwidth`.
    pub field: String,
    pub message: String,
}

struct Problems<'a>(&'a [Problem]);

impl fmt::Display for Problems<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "  - {}: {}", p.field, p.message)?;
        }
        Ok(())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawZone {
    name: Option<String>,
    lab_scale: Option<f64>,
    #[serde(default)]
    sites: Vec<RawSite>,
    #[serde(default)]
    links: Vec<RawLink>,
    database: Option<crate::database::RawDatabase>,
    #[serde(default)]
    policies: std::collections::BTreeMap<String, crate::database::RawPolicy>,
    ha: Option<crate::database::RawHa>,
    consensus: Option<crate::consensus::RawConsensus>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSite {
    id: String,
    kind: String,
    region: Option<String>,
    #[serde(default)]
    hosts: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLink {
    a: String,
    b: String,
    distance_km: Option<f64>,
    one_way_delay_ms: Option<f64>,
    bandwidth: String,
    jitter_ms: Option<f64>,
    loss_percent: Option<f64>,
    deterministic: Option<bool>,
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 24
        && id.starts_with(|c: char| c.is_ascii_alphanumeric())
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
}

/// Parses and validates zone text; `file` is used only in messages.
pub fn parse(text: &str, file: &Path) -> Result<Zone, ZoneError> {
    let raw: RawZone = toml::from_str(text).map_err(|e| ZoneError::Syntax {
        file: file.to_path_buf(),
        message: e.to_string().trim_end().to_string(),
    })?;
    let mut problems = Vec::new();
    let mut problem = |field: String, message: String| problems.push(Problem { field, message });

    let lab_scale = raw.lab_scale.unwrap_or(DEFAULT_LAB_SCALE);
    if !crate::is_non_negative(lab_scale) || lab_scale == 0.0 {
        problem(
            "lab_scale".into(),
            format!("must be a positive number, got {lab_scale}"),
        );
    }
    if raw.sites.is_empty() {
        problem(
            "sites".into(),
            "a zone needs at least one [[sites]] entry".into(),
        );
    }

    let mut sites = Vec::new();
    let mut all_hosts: Vec<(String, String)> = Vec::new();
    for (i, s) in raw.sites.iter().enumerate() {
        if !valid_id(&s.id) {
            problem(
                format!("sites[{i}].id"),
                format!(
                    "'{}' is not a valid id: use 1-24 characters of a-z, 0-9, '.', '-'",
                    s.id
                ),
            );
        }
        if raw.sites[..i].iter().any(|o| o.id == s.id) {
            problem(
                format!("sites[{i}].id"),
                format!("duplicate site id '{}'", s.id),
            );
        }
        let kind = match s.kind.as_str() {
            "datacenter" => SiteKind::Datacenter,
            "public-cloud" => SiteKind::PublicCloud,
            "witness" => SiteKind::Witness,
            other => {
                problem(
                    format!("sites[{i}].kind"),
                    format!(
                        "unknown kind '{other}': use \"datacenter\", \"public-cloud\" or \"witness\""
                    ),
                );
                SiteKind::Datacenter
            }
        };
        if s.hosts.len() > 200 {
            problem(
                format!("sites[{i}].hosts"),
                "at most 200 hosts per site".into(),
            );
        }
        for (j, h) in s.hosts.iter().enumerate() {
            let field = format!("sites[{i}].hosts[{j}]");
            if !valid_id(h) {
                problem(
                    field.clone(),
                    format!(
                        "'{h}' is not a valid host id: use 1-24 characters of a-z, 0-9, '.', '-'"
                    ),
                );
            }
            if let Some((_, prev)) = all_hosts.iter().find(|(id, _)| id == h) {
                problem(
                    field.clone(),
                    format!("duplicate host id '{h}' (first at {prev})"),
                );
            }
            all_hosts.push((h.clone(), field));
        }
        sites.push(Site {
            id: s.id.clone(),
            kind,
            region: s.region.clone().unwrap_or_else(|| "default".into()),
            hosts: s.hosts.clone(),
        });
    }

    let mut links = Vec::new();
    for (i, l) in raw.links.iter().enumerate() {
        let f = |name: &str| format!("links[{i}].{name}");
        let lookup = |id: &str| sites.iter().position(|s| s.id == id);
        let a = lookup(&l.a);
        let b = lookup(&l.b);
        for (name, id, idx) in [("a", &l.a, a), ("b", &l.b, b)] {
            if idx.is_none() {
                let known: Vec<_> = sites.iter().map(|s| s.id.as_str()).collect();
                problem(
                    f(name),
                    format!("unknown site '{id}'; sites are {}", known.join(", ")),
                );
            }
        }
        if l.a == l.b {
            problem(f("b"), format!("a link cannot join '{}' to itself", l.a));
        }
        let same = |o: &RawLink| (o.a == l.a && o.b == l.b) || (o.a == l.b && o.b == l.a);
        if let Some(j) = raw.links[..i].iter().position(same) {
            problem(
                f("a"),
                format!("duplicate link {}-{} (also links[{j}])", l.a, l.b),
            );
        }
        let delay_ns = match (l.distance_km, l.one_way_delay_ms) {
            (Some(_), Some(_)) => {
                problem(
                    f("one_way_delay_ms"),
                    "give either distance_km or one_way_delay_ms, not both".into(),
                );
                0
            }
            (None, None) => {
                problem(
                    f("distance_km"),
                    "missing: give distance_km (5 us/km) or one_way_delay_ms".into(),
                );
                0
            }
            (Some(km), None) if !crate::is_non_negative(km) => {
                problem(
                    f("distance_km"),
                    format!("must be zero or positive, got {km}"),
                );
                0
            }
            (None, Some(ms)) if !crate::is_non_negative(ms) => {
                problem(
                    f("one_way_delay_ms"),
                    format!("must be zero or positive, got {ms}"),
                );
                0
            }
            (Some(km), None) => (km * FIBER_NS_PER_KM).round() as u64,
            (None, Some(ms)) => (ms * 1e6).round() as u64,
        };
        let bandwidth_bps = match units::parse_bandwidth(&l.bandwidth) {
            Ok(bps) => bps,
            Err(msg) => {
                let msg = if l.bandwidth.trim_start().starts_with('-') {
                    format!("must be positive, got '{}'", l.bandwidth)
                } else {
                    msg
                };
                problem(f("bandwidth"), msg);
                1
            }
        };
        let jitter_ms = l.jitter_ms.unwrap_or(0.0);
        if !crate::is_non_negative(jitter_ms) {
            problem(
                f("jitter_ms"),
                format!("must be zero or positive, got {jitter_ms}"),
            );
        }
        let loss_percent = l.loss_percent.unwrap_or(0.0);
        if !(0.0..100.0).contains(&loss_percent) {
            problem(
                f("loss_percent"),
                format!("must be in [0, 100), got {loss_percent}"),
            );
        }
        let deterministic = l.deterministic.unwrap_or(true);
        if deterministic && (jitter_ms > 0.0 || loss_percent > 0.0) {
            problem(
                f("deterministic"),
                "an APN link (deterministic = true) has no jitter or loss; set \
                 deterministic = false for a conventional WAN"
                    .into(),
            );
        }
        if let (Some(a), Some(b)) = (a, b) {
            links.push(Link {
                a,
                b,
                distance_km: l.distance_km,
                params: LinkParams {
                    deterministic,
                    one_way_delay_ns: delay_ns,
                    bandwidth_bps,
                    jitter_ns: (jitter_ms.max(0.0) * 1e6).round() as u64,
                    loss: (loss_percent / 100.0).clamp(0.0, 0.999_999),
                },
            });
        }
    }

    let database = crate::database::validate(
        raw.database,
        raw.policies,
        raw.ha,
        &sites,
        &mut |field, message| problems.push(Problem { field, message }),
    );
    let db_hosts: Vec<String> = database
        .as_ref()
        .map(|db| {
            db.members()
                .iter()
                .filter_map(|m| sites.iter().find(|s| &s.id == m))
                .filter_map(|s| s.hosts.get(db.host_index).cloned())
                .collect()
        })
        .unwrap_or_default();
    let spans_regions = database.as_ref().is_some_and(|db| {
        let mut regions: Vec<&str> = db
            .members()
            .iter()
            .filter_map(|m| sites.iter().find(|s| &s.id == m))
            .map(|s| s.region.as_str())
            .collect::<Vec<_>>();
        regions.sort_unstable();
        regions.dedup();
        regions.len() > 1
    });
    let consensus = crate::consensus::validate(
        raw.consensus,
        &sites,
        &db_hosts,
        spans_regions,
        &mut |field, message| problems.push(Problem { field, message }),
    );
    let zone = Zone {
        name: raw.name.unwrap_or_else(|| "zone".into()),
        lab_scale,
        sites,
        links,
        database,
        consensus,
    };
    if problems.is_empty() {
        for a in 0..zone.sites.len() {
            for b in a + 1..zone.sites.len() {
                if zone.route(a, b).is_none() {
                    problems.push(Problem {
                        field: "links".into(),
                        message: format!(
                            "sites '{}' and '{}' have no path between them; add a [[links]] \
                             entry joining them (directly or through another site)",
                            zone.sites[a].id, zone.sites[b].id
                        ),
                    });
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(zone)
    } else {
        Err(ZoneError::Invalid {
            file: file.to_path_buf(),
            problems,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_SITES: &str = r#"
        [[sites]]
        id = "a"
        kind = "datacenter"
        hosts = ["a-h1"]
        [[sites]]
        id = "b"
        kind = "public-cloud"
        hosts = ["b-h1"]
        [[links]]
        a = "a"
        b = "b"
        distance_km = 100
        bandwidth = "10Gbit"
    "#;

    fn problems(text: &str) -> Vec<Problem> {
        match parse(text, Path::new("zone.toml")) {
            Err(ZoneError::Invalid { problems, .. }) => problems,
            other => panic!("expected validation problems, got {other:?}"),
        }
    }

    fn has(problems: &[Problem], field: &str, needle: &str) -> bool {
        problems
            .iter()
            .any(|p| p.field == field && p.message.contains(needle))
    }

    #[test]
    fn valid_zone_parses_with_distance_delay() {
        let z = parse(TWO_SITES, Path::new("zone.toml")).unwrap();
        assert_eq!(z.links[0].params.one_way_delay_ns, 500_000);
        assert_eq!(z.links[0].params.bandwidth_bps, 10_000_000_000);
        assert_eq!(z.lab_scale, DEFAULT_LAB_SCALE);
        assert_eq!(z.sites[1].kind, SiteKind::PublicCloud);
    }

    #[test]
    fn explicit_delay_is_used() {
        let text = TWO_SITES.replace("distance_km = 100", "one_way_delay_ms = 1.25");
        let z = parse(&text, Path::new("zone.toml")).unwrap();
        assert_eq!(z.links[0].params.one_way_delay_ns, 1_250_000);
    }

    #[test]
    fn unknown_site_in_link_names_the_field() {
        let p = problems(&TWO_SITES.replace("b = \"b\"", "b = \"dc9\""));
        assert!(has(&p, "links[0].b", "unknown site 'dc9'"), "{p:?}");
    }

    #[test]
    fn duplicate_ids() {
        let p = problems(&TWO_SITES.replace("id = \"b\"", "id = \"a\""));
        assert!(has(&p, "sites[1].id", "duplicate site id 'a'"), "{p:?}");
        let p = problems(&TWO_SITES.replace("\"b-h1\"", "\"a-h1\""));
        assert!(has(&p, "sites[1].hosts[0]", "duplicate host id"), "{p:?}");
    }

    #[test]
    fn zero_or_negative_bandwidth() {
        let p = problems(&TWO_SITES.replace("\"10Gbit\"", "\"0Gbit\""));
        assert!(has(&p, "links[0].bandwidth", "positive"), "{p:?}");
        let p = problems(&TWO_SITES.replace("\"10Gbit\"", "\"-5Gbit\""));
        assert!(has(&p, "links[0].bandwidth", "positive"), "{p:?}");
    }

    #[test]
    fn unit_typo() {
        let p = problems(&TWO_SITES.replace("\"10Gbit\"", "\"10 gbps\""));
        assert!(
            has(&p, "links[0].bandwidth", "did you mean \"10Gbit\""),
            "{p:?}"
        );
    }

    #[test]
    fn sites_without_path() {
        let text = format!(
            "{TWO_SITES}\n[[sites]]\nid = \"c\"\nkind = \"datacenter\"\nhosts = [\"c-h1\"]\n"
        );
        let p = problems(&text);
        assert!(has(&p, "links", "'a' and 'c' have no path"), "{p:?}");
    }

    #[test]
    fn apn_link_with_jitter_is_refused() {
        let p = problems(&TWO_SITES.replace("bandwidth", "jitter_ms = 1.0\nbandwidth"));
        assert!(has(&p, "links[0].deterministic", "no jitter"), "{p:?}");
        let conventional = TWO_SITES.replace(
            "bandwidth",
            "deterministic = false\njitter_ms = 1.0\nloss_percent = 0.5\nbandwidth",
        );
        let z = parse(&conventional, Path::new("zone.toml")).unwrap();
        assert_eq!(z.links[0].params.jitter_ns, 1_000_000);
        assert!((z.links[0].params.loss - 0.005).abs() < 1e-12);
    }

    #[test]
    fn self_link_missing_delay_and_bad_kind() {
        let p = problems(
            &TWO_SITES
                .replace("b = \"b\"", "b = \"a\"")
                .replace("distance_km = 100", "")
                .replace("public-cloud", "cloudy"),
        );
        assert!(has(&p, "links[0].b", "itself"), "{p:?}");
        assert!(has(&p, "links[0].distance_km", "missing"), "{p:?}");
        assert!(has(&p, "sites[1].kind", "unknown kind 'cloudy'"), "{p:?}");
    }

    #[test]
    fn syntax_errors_and_unknown_fields_name_the_file() {
        let err = parse("sites = 3", Path::new("my.toml")).unwrap_err();
        assert!(err.to_string().contains("my.toml"), "{err}");
        let err = parse(
            &TWO_SITES.replace("distance_km", "distanc_km"),
            Path::new("z.toml"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("distanc_km"), "{err}");
    }

    const DB: &str = r#"
        [database]
        primary = "a"
        standbys = ["b"]
        [policies.tier1]
        replication = "sync"
        sync_standbys = ["b"]
        quorum = "ANY 1"
        standby_failure = "availability-first"
    "#;

    #[test]
    fn database_policy_parses() {
        let z = parse(&format!("{TWO_SITES}{DB}"), Path::new("zone.toml")).unwrap();
        let db = z.database.unwrap();
        assert_eq!(db.members(), vec!["a", "b"]);
        assert_eq!(
            db.policy().standby_failure,
            crate::database::StandbyFailure::AvailabilityFirst
        );
        assert!(Zone::reference().database.is_some());
    }

    #[test]
    fn a_database_whose_consensus_dies_with_one_region_is_refused() {
        // Two regions, consensus on the database hosts by default: region r1 holds 2 of 3.
        let text = format!(
            "{}\n[[sites]]\nid = \"c\"\nkind = \"datacenter\"\nregion = \"r2\"\n\
             hosts = [\"c-h1\"]\n[[links]]\na = \"b\"\nb = \"c\"\ndistance_km = 500\n\
             bandwidth = \"10Gbit\"\n{}",
            TWO_SITES
                .replace(
                    "kind = \"datacenter\"",
                    "kind = \"datacenter\"\nregion = \"r1\""
                )
                .replace(
                    "kind = \"public-cloud\"",
                    "kind = \"datacenter\"\nregion = \"r1\""
                ),
            DB.replace("standbys = [\"b\"]", "standbys = [\"b\", \"c\"]")
        );
        let p = problems(&text);
        assert!(
            has(&p, "consensus.hosts", "region 'r1' holds 2 of the 3"),
            "{p:?}"
        );
        let accepted = format!("{text}\n[consensus]\nallow_regional_majority = true\n");
        let z = parse(&accepted, Path::new("zone.toml")).unwrap();
        assert_eq!(z.consensus.unwrap().hosts, ["a-h1", "b-h1", "c-h1"]);
    }

    #[test]
    fn invalid_policies_name_the_field() {
        let bad = DB
            .replace(
                "standby_failure = \"availability-first\"",
                "standby_failure = \"yolo\"",
            )
            .replace("quorum = \"ANY 1\"", "quorum = \"ANY 2\"")
            .replace("sync_standbys = [\"b\"]", "sync_standbys = [\"b\", \"a\"]");
        let p = problems(&format!("{TWO_SITES}{bad}"));
        assert!(
            has(
                &p,
                "policies.tier1.standby_failure",
                "unknown policy 'yolo'"
            ),
            "{p:?}"
        );
        assert!(
            has(&p, "policies.tier1.sync_standbys[1]", "not a standby"),
            "{p:?}"
        );
        let p = problems(&format!("{TWO_SITES}{}", DB.replace("\"b\"]", "\"zz\"]")));
        assert!(
            has(&p, "database.standbys[0]", "unknown site 'zz'"),
            "{p:?}"
        );
        let p = problems(
            &format!("{TWO_SITES}{}", DB.replace("tier1", "gold"))
                .replace("[database]", "[database]\ntier = \"tier1\""),
        );
        assert!(has(&p, "database.tier", "no [policies.tier1]"), "{p:?}");
        let p = problems(&format!(
            "{TWO_SITES}{}",
            DB.replace("\"sync\"", "\"semi\"")
        ));
        assert!(
            has(&p, "policies.tier1.replication", "unknown replication"),
            "{p:?}"
        );
    }
}
