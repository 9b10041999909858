//! Where a [`crate::Platform`] runs.
//!
//! - [`Placement::Lab`]: the embedded lab. Every host is a network namespace of this
//!   machine, and the lab's state directory (one VM registry) is shared by all of them.
//! - [`Placement::Host`]: one real host, this machine. It keeps the records and runtime
//!   files of its own VMs in its own directory, runs QEMU in the network namespace it runs
//!   in (the host's), and
//!   knows the zone's other hosts (their sites and addresses) from its zone file: nothing
//!   is shared with another host but the network.
//!
//! On a real host a VM that migrated away leaves its record behind, naming the host it
//! went to; the agent lists and serves only the VMs whose record names it, so that record
//! is a forwarding note, and it keeps the VM's address from being given to another VM.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use dczone_lab::{Lab, HOST_BRIDGE, HOST_UPLINK};

use crate::VirtError;

#[derive(Debug, Clone)]
pub enum Placement {
    Lab(Lab),
    Host(HostPlacement),
}

/// One real host and the zone around it.
#[derive(Debug, Clone)]
pub struct HostPlacement {
    /// This host's id.
    pub id: String,
    /// The zone's name.
    pub zone: String,
    /// Where this host keeps its VMs' records and runtime files.
    pub dir: PathBuf,
    /// Every host of the zone, this one included.
    pub hosts: Vec<ZoneHost>,
    /// The bridge the VMs' TAPs join, and the uplink it carries them out on (the frame
    /// keeper watches it for a migrated VM's announce).
    pub bridge: String,
    pub uplink: String,
}

/// A host of the zone as a platform sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneHost {
    pub id: String,
    pub site: String,
    /// The site's position in the zone, from 0 (the lab's address plan: 10.77.(site+1).x).
    pub site_index: usize,
    /// The host's position within its site, from 0.
    pub index_in_site: usize,
    pub ip: Ipv4Addr,
}

/// VM addresses a real host gives out: a block of its own within its site's 101-199, so
/// that no two agents hand out one address without talking to each other.
const HOST_BLOCK: u8 = 16;

impl ZoneHost {
    /// The last octets of the addresses a VM created on this host may take.
    pub(crate) fn vm_octets(&self, shared_registry: bool) -> std::ops::RangeInclusive<u8> {
        if shared_registry {
            return 101..=199;
        }
        let first = 101u16 + self.index_in_site as u16 * u16::from(HOST_BLOCK);
        let last = (first + u16::from(HOST_BLOCK) - 1).min(199);
        // The seventh host of a site gets what is left, from the eighth on none.
        (first.min(200) as u8)..=(last as u8)
    }
}

impl HostPlacement {
    /// Numbers sites and hosts in the order the zone file lists them.
    pub fn new(
        id: &str,
        zone: &str,
        dir: &Path,
        hosts: &[(String, String, Ipv4Addr)],
    ) -> Result<HostPlacement, VirtError> {
        let mut sites: Vec<&str> = Vec::new();
        let mut out = Vec::new();
        for (host, site, ip) in hosts {
            let site_index = match sites.iter().position(|s| s == site) {
                Some(i) => i,
                None => {
                    sites.push(site);
                    sites.len() - 1
                }
            };
            let index_in_site = out
                .iter()
                .filter(|h: &&ZoneHost| h.site_index == site_index)
                .count();
            out.push(ZoneHost {
                id: host.clone(),
                site: site.clone(),
                site_index,
                index_in_site,
                ip: *ip,
            });
        }
        let placement = HostPlacement {
            id: id.to_string(),
            zone: zone.to_string(),
            dir: dir.to_path_buf(),
            hosts: out,
            bridge: HOST_BRIDGE.to_string(),
            uplink: HOST_UPLINK.to_string(),
        };
        placement.host(id)?;
        Ok(placement)
    }

    fn host(&self, id: &str) -> Result<ZoneHost, VirtError> {
        self.hosts
            .iter()
            .find(|h| h.id == id)
            .cloned()
            .ok_or_else(|| VirtError::UnknownHost {
                host: id.to_string(),
                known: self
                    .hosts
                    .iter()
                    .map(|h| h.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

impl Placement {
    /// The directory the platform's files live in.
    pub fn dir(&self) -> &Path {
        match self {
            Placement::Lab(lab) => lab.dir(),
            Placement::Host(h) => &h.dir,
        }
    }

    /// The zone's name.
    pub fn zone_name(&self) -> &str {
        match self {
            Placement::Lab(lab) => lab.name(),
            Placement::Host(h) => &h.zone,
        }
    }

    /// A host of the zone.
    pub fn host(&self, id: &str) -> Result<ZoneHost, VirtError> {
        match self {
            Placement::Lab(lab) => {
                let (h, _) = lab.host(id)?;
                let zone = lab.state()?.zone()?;
                Ok(ZoneHost {
                    id: h.id.clone(),
                    site: zone.sites[h.site].id.clone(),
                    site_index: h.site,
                    index_in_site: h.index_in_site,
                    ip: h.ip(),
                })
            }
            Placement::Host(p) => p.host(id),
        }
    }

    /// The network namespace QEMU runs in for `host`: the lab's namespace of that host, or
    /// `None` on a real host (its own, where the agent runs).
    pub fn namespace(&self, host: &str) -> Option<String> {
        match self {
            Placement::Lab(lab) => Some(lab.host_namespace(host)),
            Placement::Host(_) => None,
        }
    }

    /// `host`'s storage directory, where the storage clusters it takes part in are
    /// installed ([`dczone_storage::host`]); the agent runs them there.
    pub fn storage(&self, host: &str) -> dczone_storage::host::HostStorage {
        let root = match self {
            Placement::Lab(lab) => dczone_storage::host::lab_root(lab.dir(), host),
            Placement::Host(h) => dczone_storage::host::host_root(&h.dir),
        };
        dczone_storage::host::HostStorage::new(root, host)
    }

    /// The bridge VMs' TAPs join (the lab's `br0` in every host namespace).
    pub fn bridge(&self) -> &str {
        match self {
            Placement::Lab(_) => HOST_BRIDGE,
            Placement::Host(h) => &h.bridge,
        }
    }

    /// The host's uplink, which carries the bridge's traffic out (the lab's `eth0`).
    pub fn uplink(&self) -> &str {
        match self {
            Placement::Lab(_) => HOST_UPLINK,
            Placement::Host(h) => &h.uplink,
        }
    }

    /// One registry for every host (the lab), or each host its own.
    pub fn shared_registry(&self) -> bool {
        matches!(self, Placement::Lab(_))
    }

    /// The lab, for what only a lab can do yet.
    pub fn lab(&self, what: &'static str) -> Result<&Lab, VirtError> {
        match self {
            Placement::Lab(lab) => Ok(lab),
            Placement::Host(_) => Err(VirtError::LabOnly(what)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone() -> Vec<(String, String, Ipv4Addr)> {
        [
            ("dc1.1-h1", "dc1.1", [10, 77, 1, 11]),
            ("dc1.1-h2", "dc1.1", [10, 77, 1, 12]),
            ("dc1.2-h1", "dc1.2", [10, 77, 2, 11]),
        ]
        .into_iter()
        .map(|(h, s, ip)| (h.to_string(), s.to_string(), Ipv4Addr::from(ip)))
        .collect()
    }

    #[test]
    fn a_real_host_numbers_the_zone_as_its_file_lists_it() {
        let p = HostPlacement::new("dc1.1-h2", "z", Path::new("/x"), &zone()).unwrap();
        let h = p.host("dc1.2-h1").unwrap();
        assert_eq!((h.site_index, h.index_in_site), (1, 0));
        let me = p.host("dc1.1-h2").unwrap();
        assert_eq!((me.site_index, me.index_in_site), (0, 1));
        let e = HostPlacement::new("dc9-h1", "z", Path::new("/x"), &zone()).unwrap_err();
        assert!(
            e.to_string().contains("dc1.1-h1, dc1.1-h2, dc1.2-h1"),
            "{e}"
        );
    }

    #[test]
    fn hosts_of_a_site_give_out_disjoint_address_blocks() {
        let p = HostPlacement::new("dc1.1-h1", "z", Path::new("/x"), &zone()).unwrap();
        let a = p.host("dc1.1-h1").unwrap().vm_octets(false);
        let b = p.host("dc1.1-h2").unwrap().vm_octets(false);
        assert_eq!((a.clone(), b.clone()), (101..=116, 117..=132));
        assert_eq!(p.host("dc1.1-h1").unwrap().vm_octets(true), 101..=199);
        let seventh = ZoneHost {
            index_in_site: 6,
            ..p.host("dc1.1-h1").unwrap()
        };
        assert_eq!(seventh.vm_octets(false), 197..=199);
        let eighth = ZoneHost {
            index_in_site: 7,
            ..seventh
        };
        assert!(eighth.vm_octets(false).is_empty());
    }
}
