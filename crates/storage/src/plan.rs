//! Where the zone's Ceph daemons run, derived from the zone alone (SPEC.md §6):
//!
//! - every region with data-center sites gets one cluster, named after the region;
//! - the first [`HOSTS_PER_SITE`] hosts of each data-center site are its storage hosts: one
//!   monitor and one OSD each, and a manager on the first;
//! - a region with two data-center sites and a witness site is **stretched** (Ceph's stretch
//!   mode): its data sits twice in each site, and a tiebreaker monitor at the witness's
//!   first host settles which site goes on when they lose each other. A DC1.x site loss
//!   then loses no acknowledged write;
//! - a region with one site (DC2.1) is a cluster of its own, a separate failure domain. An
//!   even number of monitors would add no failure tolerance, so it keeps an odd number
//!   (with two hosts, one monitor).
//!
//! The plan is the same on every host: the operator derives it and sends it to each host's
//! agent with the cluster's `fsid`, which the agent keeps.

use std::net::Ipv4Addr;

use dczone_zone::{SiteKind, Zone};
use serde::{Deserialize, Serialize};

/// How many hosts of each data-center site hold storage (the rest, e.g. `dc1.1-client`,
/// are clients).
pub const HOSTS_PER_SITE: usize = 2;

/// The RBD pool every cluster holds VM disks in.
pub const POOL: &str = "rbd";

/// One daemon's place: its id (`a` for `mon.a`), host, site and the host's address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Place {
    pub id: String,
    pub host: String,
    pub site: String,
    pub ip: Ipv4Addr,
}

/// Ceph's stretch mode over two sites.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stretch {
    /// The two data sites (CRUSH `datacenter` buckets).
    pub sites: [String; 2],
    /// The tiebreaker monitor's id (at the witness: no data).
    pub tiebreaker: String,
}

/// The replicated pool of VM disks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    pub name: String,
    /// Copies of each object (stretched: two in each site).
    pub size: u32,
    /// Copies a write needs before it is acknowledged.
    pub min_size: u32,
    pub pg_num: u32,
}

/// A site's pool of VM disks in a cluster (`ClusterPlan::site_pool`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SitePool {
    pub name: String,
    /// Its CRUSH rule (empty: the cluster's default, unstretched).
    pub rule: String,
    /// The stretch rule's sites in its order: the first holds the primaries.
    pub sites: [String; 2],
}

/// One Ceph cluster of the zone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterPlan {
    /// The region's id (`region-1`): the cluster's name in commands and on disk.
    pub name: String,
    /// Set when the cluster is created; empty in a plan derived from the zone.
    #[serde(default)]
    pub fsid: String,
    pub sites: Vec<String>,
    pub mons: Vec<Place>,
    pub mgrs: Vec<Place>,
    /// OSD ids are their index: `osd.0` is `osds[0]`.
    pub osds: Vec<Place>,
    pub stretch: Option<Stretch>,
    pub pool: Pool,
    /// Each OSD's file-backed bluestore device (sparse) in a lab; on a real host a disk.
    pub osd_gib: u32,
    /// S3 gateways (radosgw): only a public cloud's own cluster has them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rgw: Vec<Place>,
}

/// The port an S3 gateway serves on (radosgw's default).
pub const RGW_PORT: u16 = 7480;

/// Every daemon kind, in the order they start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Mon,
    Mgr,
    Osd,
    /// radosgw, the S3 gateway.
    Rgw,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Mon => "mon",
            Kind::Mgr => "mgr",
            Kind::Osd => "osd",
            Kind::Rgw => "rgw",
        }
    }
}

impl ClusterPlan {
    /// Every host of the cluster: its storage hosts and the tiebreaker's.
    pub fn hosts(&self) -> Vec<String> {
        let mut hosts: Vec<String> = Vec::new();
        for p in self.mons.iter().chain(&self.mgrs).chain(&self.osds) {
            if !hosts.contains(&p.host) {
                hosts.push(p.host.clone());
            }
        }
        hosts
    }

    /// The daemons of `kind` on `host`.
    pub fn on_host(&self, kind: Kind, host: &str) -> Vec<&Place> {
        let list = match kind {
            Kind::Mon => &self.mons,
            Kind::Mgr => &self.mgrs,
            Kind::Osd => &self.osds,
            Kind::Rgw => &self.rgw,
        };
        list.iter().filter(|p| p.host == host).collect()
    }

    /// The hosts that hold the cluster's admin key: the monitors' (the tiebreaker's last,
    /// as it holds no data and is the farthest).
    pub fn admin_hosts(&self) -> Vec<String> {
        let mut hosts: Vec<String> = Vec::new();
        let tiebreaker = self.stretch.as_ref().map(|s| s.tiebreaker.as_str());
        let (last, first): (Vec<&Place>, Vec<&Place>) = self
            .mons
            .iter()
            .partition(|m| Some(m.id.as_str()) == tiebreaker);
        for m in first.into_iter().chain(last) {
            if !hosts.contains(&m.host) {
                hosts.push(m.host.clone());
            }
        }
        hosts
    }

    /// The pool of VM disks made at `site`, and the CRUSH rule that places it. A stretched
    /// cluster has one per site, each taking its own site first: the site's OSDs are the
    /// primaries, which serve every read and order every write, so the site's VMs read
    /// without crossing the metro path and a write crosses it once (to the other site's
    /// copies), not twice. Both are stretch pools (two copies in each site). The first
    /// site's is the cluster's `pool` itself; any other site's is `<pool>-<site>`.
    pub fn site_pool(&self, site: &str) -> SitePool {
        match &self.stretch {
            Some(s) if site == s.sites[1] => SitePool {
                name: format!("{}-{site}", self.pool.name),
                rule: format!("stretch_rule-{site}"),
                sites: [s.sites[1].clone(), s.sites[0].clone()],
            },
            Some(s) => SitePool {
                name: self.pool.name.clone(),
                rule: "stretch_rule".into(),
                sites: s.sites.clone(),
            },
            None => SitePool {
                name: self.pool.name.clone(),
                rule: String::new(),
                sites: Default::default(),
            },
        }
    }

    /// Every site's pool of VM disks (one without a stretch).
    pub fn site_pools(&self) -> Vec<SitePool> {
        match &self.stretch {
            Some(s) => s.sites.iter().map(|site| self.site_pool(site)).collect(),
            None => vec![self.site_pool("")],
        }
    }

    /// `v2` and `v1` addresses of every monitor, as `mon_host` lists them.
    pub fn mon_host(&self) -> String {
        self.mons
            .iter()
            .map(|m| format!("[v2:{ip}:3300,v1:{ip}:6789]", ip = m.ip))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The zone's clusters (none if it has no data-center site).
pub fn clusters(zone: &Zone) -> Vec<ClusterPlan> {
    let mut regions: Vec<&str> = Vec::new();
    for s in &zone.sites {
        if s.kind == SiteKind::Datacenter && !regions.contains(&s.region.as_str()) {
            regions.push(&s.region);
        }
    }
    let witness = zone
        .sites
        .iter()
        .find(|s| s.kind == SiteKind::Witness && !s.hosts.is_empty());
    regions
        .into_iter()
        .map(|region| {
            let sites: Vec<_> = zone
                .sites
                .iter()
                .filter(|s| s.kind == SiteKind::Datacenter && s.region == region)
                .collect();
            let place = |id: String, host: &str, site: &str| Place {
                id,
                host: host.to_string(),
                site: site.to_string(),
                ip: zone.host(host).expect("a host of the zone").ip(),
            };
            let storage_hosts: Vec<(&str, &str)> = sites
                .iter()
                .flat_map(|s| {
                    s.hosts
                        .iter()
                        .take(HOSTS_PER_SITE)
                        .map(|h| (h.as_str(), s.id.as_str()))
                })
                .collect();
            let osds: Vec<Place> = storage_hosts
                .iter()
                .enumerate()
                .map(|(i, (h, s))| place(i.to_string(), h, s))
                .collect();
            let mgrs: Vec<Place> = sites
                .iter()
                .filter_map(|s| s.hosts.first().map(|h| (h, &s.id)))
                .enumerate()
                .map(|(i, (h, s))| place(mgr_id(i), h, s))
                .collect();
            let mut mons: Vec<Place> = storage_hosts
                .iter()
                .enumerate()
                .map(|(i, (h, s))| place(mon_id(i), h, s))
                .collect();
            let stretch = match (sites.len() >= 2, witness) {
                (true, Some(w)) => {
                    let id = mon_id(mons.len());
                    mons.push(place(id.clone(), &w.hosts[0], &w.id));
                    Some(Stretch {
                        sites: [sites[0].id.clone(), sites[1].id.clone()],
                        tiebreaker: id,
                    })
                }
                _ => None,
            };
            if mons.len().is_multiple_of(2) {
                mons.pop();
            }
            let pool = match (&stretch, osds.len()) {
                (Some(_), _) => Pool {
                    name: POOL.into(),
                    size: 4,
                    min_size: 2,
                    pg_num: 32,
                },
                (None, n) => Pool {
                    name: POOL.into(),
                    size: n.min(3) as u32,
                    min_size: if n >= 3 { 2 } else { 1 },
                    pg_num: 32,
                },
            };
            ClusterPlan {
                name: region.to_string(),
                fsid: String::new(),
                sites: sites.iter().map(|s| s.id.clone()).collect(),
                mons,
                mgrs,
                osds,
                stretch,
                pool,
                osd_gib: 6,
                rgw: Vec::new(),
            }
        })
        .collect()
}

/// A public cloud site's own cluster (the provider's, not the zone's): everything on the
/// site's first host, one monitor, manager and OSD, one copy of each object, and an S3
/// gateway. It is named after the site. `None` for a site that is not a public cloud or
/// has no host.
pub fn cloud_cluster(zone: &Zone, site: &str) -> Option<ClusterPlan> {
    let s = zone
        .sites
        .iter()
        .find(|s| s.id == site && s.kind == SiteKind::PublicCloud)?;
    let host = s.hosts.first()?;
    let place = |id: &str| Place {
        id: id.to_string(),
        host: host.clone(),
        site: s.id.clone(),
        ip: zone.host(host).expect("a host of the zone").ip(),
    };
    Some(ClusterPlan {
        name: s.id.clone(),
        fsid: String::new(),
        sites: vec![s.id.clone()],
        mons: vec![place("a")],
        mgrs: vec![place("x")],
        osds: vec![place("0")],
        stretch: None,
        pool: Pool {
            name: POOL.into(),
            size: 1,
            min_size: 1,
            pg_num: 8,
        },
        osd_gib: 8,
        rgw: vec![place("gw")],
    })
}

fn mon_id(i: usize) -> String {
    ((b'a' + i as u8) as char).to_string()
}

fn mgr_id(i: usize) -> String {
    ((b'x' + (i % 3) as u8) as char).to_string()
}

/// The cluster that stores the disks of `site`'s VMs.
pub fn cluster_of_site<'a>(clusters: &'a [ClusterPlan], site: &str) -> Option<&'a ClusterPlan> {
    clusters.iter().find(|c| c.sites.iter().any(|s| s == site))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_1_is_stretched_over_its_two_sites_with_the_witness_as_tiebreaker() {
        let zone = Zone::reference();
        let c = clusters(&zone);
        assert_eq!(c.len(), 2);
        let r1 = &c[0];
        assert_eq!(r1.name, "region-1");
        assert_eq!(r1.sites, vec!["dc1.1", "dc1.2"]);
        let hosts: Vec<&str> = r1.osds.iter().map(|o| o.host.as_str()).collect();
        assert_eq!(hosts, ["dc1.1-h1", "dc1.1-h2", "dc1.2-h1", "dc1.2-h2"]);
        assert_eq!(r1.mons.len(), 5, "four storage hosts and the tiebreaker");
        let s = r1.stretch.as_ref().expect("stretched");
        let tb = r1.mons.iter().find(|m| m.id == s.tiebreaker).unwrap();
        assert_eq!(tb.host, "witness-h1");
        assert_eq!((r1.pool.size, r1.pool.min_size), (4, 2));
        assert_eq!(r1.mgrs.len(), 2, "one per site: DC1.2's takes over");
        assert_eq!(r1.admin_hosts().last().unwrap(), "witness-h1");
        assert!(!r1.hosts().contains(&"dc1.1-client".to_string()));
    }

    #[test]
    fn each_site_of_a_stretch_has_a_pool_that_takes_it_first() {
        let c = clusters(&Zone::reference());
        let (r1, r2) = (&c[0], &c[1]);
        let dc11 = r1.site_pool("dc1.1");
        assert_eq!(
            (dc11.name.as_str(), dc11.rule.as_str()),
            ("rbd", "stretch_rule")
        );
        assert_eq!(dc11.sites, ["dc1.1", "dc1.2"]);
        let dc12 = r1.site_pool("dc1.2");
        assert_eq!(dc12.name, "rbd-dc1.2");
        assert_eq!(dc12.rule, "stretch_rule-dc1.2");
        assert_eq!(dc12.sites, ["dc1.2", "dc1.1"]);
        assert_eq!(r1.site_pools(), vec![dc11, dc12]);
        assert_eq!(r2.site_pool("dc2.1").name, "rbd");
        assert_eq!(r2.site_pools().len(), 1);
    }

    #[test]
    fn a_one_site_region_is_a_cluster_of_its_own_with_an_odd_monitor_count() {
        let c = clusters(&Zone::reference());
        let dc2 = &c[1];
        assert_eq!(dc2.name, "region-2");
        assert_eq!(dc2.sites, vec!["dc2.1"]);
        assert!(dc2.stretch.is_none());
        assert_eq!(dc2.osds.len(), 2);
        assert_eq!(dc2.mons.len(), 1);
        assert_eq!((dc2.pool.size, dc2.pool.min_size), (2, 1));
        assert_eq!(cluster_of_site(&c, "dc2.1").unwrap().name, "region-2");
        assert!(cluster_of_site(&c, "cloud").is_none());
    }
}
