//! The zone model: which sites exist, which hosts live in each site, how sites are linked,
//! and the address plan the lab uses.
//!
//! A zone is read from a TOML file (see `default_zone.toml` for the reference topology and
//! [`file`] for the format). Reading validates everything at once and reports each problem
//! with the file and field it concerns, so a user can fix a zone file in one pass.
//!
//! This crate knows nothing about namespaces, packets, VMs or databases.

pub mod consensus;
pub mod database;
pub mod file;
mod units;
pub mod wan;

use std::fmt;
use std::net::Ipv4Addr;
use std::path::Path;

pub use file::ZoneError;
pub use units::{format_bandwidth, parse_bandwidth};
pub use wan::Wan;

/// Light in fiber: 5 microseconds per kilometre, one way.
pub const FIBER_NS_PER_KM: f64 = 5_000.0;

/// The text of the built-in reference zone.
pub const DEFAULT_ZONE_TOML: &str = include_str!("default_zone.toml");

/// A validated zone.
#[derive(Debug, Clone, PartialEq)]
pub struct Zone {
    pub name: String,
    /// Every bandwidth is divided by this factor in the lab (see README, "Lab scale").
    pub lab_scale: f64,
    pub sites: Vec<Site>,
    pub links: Vec<Link>,
    /// The database platform, if the zone declares one.
    pub database: Option<database::DatabasePlan>,
    /// Where the consensus store runs (defaults to the database sites' hosts).
    pub consensus: Option<consensus::ConsensusPlan>,
}

/// What kind of place a site is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SiteKind {
    Datacenter,
    PublicCloud,
    /// A small third location: a consensus member and no data.
    Witness,
}

impl fmt::Display for SiteKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SiteKind::Datacenter => "datacenter",
            SiteKind::PublicCloud => "public-cloud",
            SiteKind::Witness => "witness",
        })
    }
}

/// One site (data center or cloud region) of the zone.
#[derive(Debug, Clone, PartialEq)]
pub struct Site {
    pub id: String,
    pub kind: SiteKind,
    pub region: String,
    pub hosts: Vec<String>,
}

/// The physical characteristics of one link, the same in both directions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkParams {
    pub one_way_delay_ns: u64,
    pub bandwidth_bps: u64,
    pub jitter_ns: u64,
    /// Probability in [0, 1) that a frame is lost.
    pub loss: f64,
    /// `true` for an APN path (fixed latency, bulk transfers on paths of their own),
    /// `false` for a conventional WAN (jitter, loss, one shared pipe).
    pub deterministic: bool,
}

/// A link between two sites, by index into [`Zone::sites`].
#[derive(Debug, Clone, PartialEq)]
pub struct Link {
    pub a: usize,
    pub b: usize,
    pub distance_km: Option<f64>,
    pub params: LinkParams,
}

/// The end-to-end characteristics between two sites over their route.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PathSpec {
    pub one_way_delay_ns: u64,
    pub bandwidth_bps: u64,
    pub jitter_ns: u64,
    pub loss: f64,
    /// True if any link of the route is cut: frames vanish.
    pub blackholed: bool,
    /// True if every link of the route is an APN path.
    pub deterministic: bool,
}

/// A host of the zone, with its place in the address plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRef {
    pub id: String,
    pub site: usize,
    /// Position of the host within its site, from 0.
    pub index_in_site: usize,
    /// Position of the host in the whole zone, from 0.
    pub global_index: usize,
}

/// The lab's L2 segment: every site shares one stretched segment through the APN switch,
/// so a migrated VM keeps its address. Site `i` (from 0) owns `10.77.(i+1).0/24`.
pub const LAB_PREFIX_LEN: u8 = 16;

/// Site `i`'s network in the lab's address plan (hosts, guests and a cloud's instances).
pub fn lab_site_network(site: usize) -> String {
    format!("10.77.{}.0/24", site + 1)
}

impl HostRef {
    /// Hosts take `10.77.(site+1).(11+index_in_site)`.
    pub fn ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(
            10,
            77,
            (self.site + 1) as u8,
            (11 + self.index_in_site) as u8,
        )
    }

    /// A locally administered MAC derived from the address plan.
    pub fn mac(&self) -> String {
        format!(
            "02:dc:00:{:02x}:{:02x}:01",
            self.site + 1,
            self.index_in_site + 1
        )
    }
}

/// A finite number that is zero or more (NaN is not).
pub fn is_non_negative(x: f64) -> bool {
    x.is_finite() && x >= 0.0
}

impl Zone {
    /// The built-in reference topology.
    pub fn reference() -> Zone {
        file::parse(DEFAULT_ZONE_TOML, Path::new("<built-in reference zone>"))
            .expect("the built-in zone is valid")
    }

    /// Reads and validates a zone file.
    pub fn load(path: &Path) -> Result<Zone, ZoneError> {
        let text = std::fs::read_to_string(path).map_err(|source| ZoneError::Read {
            file: path.to_path_buf(),
            source,
        })?;
        file::parse(&text, path)
    }

    pub fn site_index(&self, id: &str) -> Option<usize> {
        self.sites.iter().position(|s| s.id == id)
    }

    /// Index of the link joining `a` and `b` directly, if any.
    pub fn link_index(&self, a: usize, b: usize) -> Option<usize> {
        self.links
            .iter()
            .position(|l| (l.a == a && l.b == b) || (l.a == b && l.b == a))
    }

    /// Every host in zone order.
    pub fn hosts(&self) -> Vec<HostRef> {
        let mut out = Vec::new();
        for (site, s) in self.sites.iter().enumerate() {
            for (index_in_site, id) in s.hosts.iter().enumerate() {
                out.push(HostRef {
                    id: id.clone(),
                    site,
                    index_in_site,
                    global_index: out.len(),
                });
            }
        }
        out
    }

    pub fn host(&self, id: &str) -> Option<HostRef> {
        self.hosts().into_iter().find(|h| h.id == id)
    }

    /// The links on the lowest-delay route between two sites (empty for `a == b`), or
    /// `None` if there is no route. Ties go to the route with fewer hops, then lower
    /// link indices, so routes are stable.
    pub fn route(&self, a: usize, b: usize) -> Option<Vec<usize>> {
        let n = self.sites.len();
        let mut best: Vec<Option<(u64, usize, Vec<usize>)>> = vec![None; n];
        best[a] = Some((0, 0, Vec::new()));
        let mut done = vec![false; n];
        loop {
            let next = (0..n)
                .filter(|&i| !done[i])
                .filter_map(|i| best[i].as_ref().map(|(d, h, _)| (*d, *h, i)))
                .min();
            let Some((dist, hops, u)) = next else { break };
            done[u] = true;
            let path_u = best[u].as_ref().map(|b| b.2.clone()).unwrap_or_default();
            for (li, link) in self.links.iter().enumerate() {
                let v = if link.a == u {
                    link.b
                } else if link.b == u {
                    link.a
                } else {
                    continue;
                };
                let cand = (dist + link.params.one_way_delay_ns, hops + 1);
                let better = match &best[v] {
                    None => true,
                    Some((d, h, _)) => cand < (*d, *h),
                };
                if !done[v] && better {
                    let mut p = path_u.clone();
                    p.push(li);
                    best[v] = Some((cand.0, cand.1, p));
                }
            }
        }
        best[b].take().map(|(_, _, p)| p)
    }

    /// End-to-end characteristics between two sites, given the current state of each link
    /// (`params[i]` and `cut[i]` for link `i`). Delay and jitter add up along the route,
    /// bandwidth is the narrowest link's, losses compound. Bandwidth is the real-world
    /// figure; divide by `lab_scale` for the lab.
    pub fn path(&self, a: usize, b: usize, params: &[LinkParams], cut: &[bool]) -> PathSpec {
        let route = self.route(a, b).unwrap_or_default();
        let mut spec = PathSpec {
            one_way_delay_ns: 0,
            bandwidth_bps: u64::MAX,
            jitter_ns: 0,
            loss: 0.0,
            blackholed: false,
            deterministic: true,
        };
        let mut keep = 1.0;
        for li in route {
            let p = params[li];
            spec.one_way_delay_ns += p.one_way_delay_ns;
            spec.bandwidth_bps = spec.bandwidth_bps.min(p.bandwidth_bps);
            spec.jitter_ns += p.jitter_ns;
            keep *= 1.0 - p.loss;
            spec.blackholed |= cut[li];
            spec.deterministic &= p.deterministic;
        }
        spec.loss = 1.0 - keep;
        spec
    }

    /// The bandwidth the lab emulates for a real-world bandwidth.
    pub fn lab_rate_bps(&self, real_bps: u64) -> u64 {
        ((real_bps as f64) / self.lab_scale).round().max(1.0) as u64
    }
}

/// An error with its causes (`a: b: c`), for a log line, a record or an answer that keeps
/// only text. (Here because every crate of the workspace depends on this one.)
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_zone_matches_the_spec() {
        let z = Zone::reference();
        let ids: Vec<_> = z.sites.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["dc1.1", "dc1.2", "dc2.1", "cloud", "witness"]);
        let (d11, d12, d21, cloud, witness) = (0, 1, 2, 3, 4);
        let params: Vec<_> = z.links.iter().map(|l| l.params).collect();
        let cut = vec![false; z.links.len()];
        assert_eq!(z.path(d11, d12, &params, &cut).one_way_delay_ns, 500_000);
        assert_eq!(z.path(d11, cloud, &params, &cut).one_way_delay_ns, 250_000);
        assert_eq!(z.path(d12, d21, &params, &cut).one_way_delay_ns, 2_500_000);
        // No direct link: cloud reaches DC2.1 through a DC1.x (250 us + 2.5 ms).
        assert_eq!(
            z.path(cloud, d21, &params, &cut).one_way_delay_ns,
            2_750_000
        );
        assert_eq!(z.route(cloud, d21).unwrap().len(), 2);
        // The witness is at least 250 km from every DC (SPEC.md section 8, issue 9), and
        // its five-member placement survives any one site or region.
        for dc in [d11, d12, d21] {
            assert!(z.path(witness, dc, &params, &cut).one_way_delay_ns >= 1_250_000);
        }
        let c = z.consensus.as_ref().unwrap();
        assert_eq!(c.hosts.len(), 5);
        assert!(consensus::fatal_domains(c, &z.sites).is_empty());
    }

    #[test]
    fn cut_link_blackholes_every_route_over_it() {
        let z = Zone::reference();
        let params: Vec<_> = z.links.iter().map(|l| l.params).collect();
        let mut cut = vec![false; z.links.len()];
        let l = z.link_index(0, 2).unwrap();
        cut[l] = true;
        assert!(z.path(0, 2, &params, &cut).blackholed);
        assert!(!z.path(1, 2, &params, &cut).blackholed);
    }

    #[test]
    fn address_plan_is_unique() {
        let z = Zone::reference();
        let hosts = z.hosts();
        let mut ips: Vec<_> = hosts.iter().map(|h| h.ip()).collect();
        ips.sort();
        ips.dedup();
        assert_eq!(ips.len(), hosts.len());
        assert_eq!(
            z.host("dc1.2-h1").unwrap().ip(),
            Ipv4Addr::new(10, 77, 2, 11)
        );
    }

    #[test]
    fn lab_scale_divides_bandwidth() {
        let z = Zone::reference();
        assert_eq!(z.lab_scale, 64.0);
        assert_eq!(z.lab_rate_bps(25_000_000_000), 390_625_000);
    }
}
