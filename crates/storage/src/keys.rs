//! The cluster's cephx keys, made once by the operator when a cluster is created and sent to
//! each host's agent with the plan: each host gets only the keys its daemons and clients
//! use ([`Keys::for_host`]).
//!
//! A key is what `ceph-authtool --gen-print-key` prints: the base64 of Ceph's `CryptoKey`
//! encoding (type `1` = AES as u16, creation time as u32 seconds and u32 nanoseconds, the
//! secret's length as u16, then 16 random bytes), all little-endian.

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::plan::ClusterPlan;
use crate::StorageError;

/// A new cephx secret (from /dev/urandom).
pub fn generate() -> Result<String, StorageError> {
    let mut secret = [0u8; 16];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").map_err(|source| StorageError::Io {
            what: "open /dev/urandom".into(),
            source,
        })?,
        &mut secret,
    )
    .map_err(|source| StorageError::Io {
        what: "read /dev/urandom".into(),
        source,
    })?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Ok(encode(&secret, now.as_secs() as u32, now.subsec_nanos()))
}

fn encode(secret: &[u8; 16], secs: u32, nanos: u32) -> String {
    let mut raw = Vec::with_capacity(28);
    raw.extend_from_slice(&1u16.to_le_bytes());
    raw.extend_from_slice(&secs.to_le_bytes());
    raw.extend_from_slice(&nanos.to_le_bytes());
    raw.extend_from_slice(&16u16.to_le_bytes());
    raw.extend_from_slice(secret);
    base64::engine::general_purpose::STANDARD.encode(raw)
}

/// One entity's key and capabilities.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entity {
    /// `client.admin`, `mgr.x`, `mon.`.
    pub name: String,
    pub key: String,
    /// (service, capability), e.g. (`mon`, `allow *`).
    pub caps: Vec<(String, String)>,
}

impl Entity {
    fn new(name: &str, caps: &[(&str, &str)]) -> Result<Entity, StorageError> {
        Ok(Entity {
            name: name.into(),
            key: generate()?,
            caps: caps
                .iter()
                .map(|(s, c)| (s.to_string(), c.to_string()))
                .collect(),
        })
    }
}

/// The client the hypervisors open VM disks with.
pub const VM_CLIENT: &str = "client.vm";
pub const ADMIN: &str = "client.admin";
pub const BOOTSTRAP_OSD: &str = "client.bootstrap-osd";

/// Every key of a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Keys {
    pub entities: Vec<Entity>,
}

impl Keys {
    /// New keys for `plan`'s daemons and clients.
    pub fn generate(plan: &ClusterPlan) -> Result<Keys, StorageError> {
        let mut entities = vec![
            Entity::new("mon.", &[("mon", "allow *")])?,
            Entity::new(
                ADMIN,
                &[
                    ("mon", "allow *"),
                    ("osd", "allow *"),
                    ("mds", "allow *"),
                    ("mgr", "allow *"),
                ],
            )?,
            Entity::new(BOOTSTRAP_OSD, &[("mon", "allow profile bootstrap-osd")])?,
            Entity::new(
                VM_CLIENT,
                &[
                    ("mon", "profile rbd"),
                    ("osd", "profile rbd"),
                    ("mgr", "profile rbd"),
                ],
            )?,
        ];
        for g in &plan.rgw {
            entities.push(Entity::new(
                &format!("client.rgw.{}", g.id),
                &[
                    ("mon", "allow rw"),
                    ("osd", "allow rwx"),
                    ("mgr", "allow rw"),
                ],
            )?);
        }
        for m in &plan.mgrs {
            entities.push(Entity::new(
                &format!("mgr.{}", m.id),
                &[
                    ("mon", "allow profile mgr"),
                    ("osd", "allow *"),
                    ("mds", "allow *"),
                ],
            )?);
        }
        Ok(Keys { entities })
    }

    /// The keys `host` needs: a monitor's host holds them all (the monitors' store does,
    /// and its agent administers the cluster); a manager's its own; an OSD's host the
    /// bootstrap key that registers OSDs; every storage host the hypervisors' client key.
    pub fn for_host(&self, plan: &ClusterPlan, host: &str) -> Keys {
        if plan.mons.iter().any(|m| m.host == host) {
            return self.clone();
        }
        let mgrs: Vec<String> = plan
            .mgrs
            .iter()
            .filter(|m| m.host == host)
            .map(|m| format!("mgr.{}", m.id))
            .collect();
        let osd = plan.osds.iter().any(|o| o.host == host);
        let mgrs: Vec<String> = mgrs
            .into_iter()
            .chain(
                plan.rgw
                    .iter()
                    .filter(|g| g.host == host)
                    .map(|g| format!("client.rgw.{}", g.id)),
            )
            .collect();
        Keys {
            entities: self
                .entities
                .iter()
                .filter(|e| {
                    mgrs.contains(&e.name)
                        || e.name == VM_CLIENT
                        || (osd && e.name == BOOTSTRAP_OSD)
                })
                .cloned()
                .collect(),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Entity> {
        self.entities.iter().find(|e| e.name == name)
    }

    /// A keyring file's text holding `names` (all of them with `None`).
    pub fn keyring(&self, names: Option<&[&str]>) -> String {
        let mut out = String::new();
        for e in &self.entities {
            if names.is_some_and(|n| !n.contains(&e.name.as_str())) {
                continue;
            }
            out.push_str(&format!("[{}]\n\tkey = {}\n", e.name, e.key));
            for (service, cap) in &e.caps {
                out.push_str(&format!("\tcaps {service} = \"{cap}\"\n"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_cephx_aes_with_a_16_byte_secret() {
        let k = encode(&[7u8; 16], 0x01020304, 5);
        let raw = base64::engine::general_purpose::STANDARD
            .decode(&k)
            .unwrap();
        assert_eq!(raw.len(), 28);
        assert_eq!(&raw[..2], &[1, 0], "type AES");
        assert_eq!(&raw[2..6], &[4, 3, 2, 1], "seconds, little-endian");
        assert_eq!(&raw[10..12], &[16, 0], "secret length");
        assert_ne!(generate().unwrap(), generate().unwrap());
    }

    #[test]
    fn a_host_gets_only_the_keys_its_daemons_use() {
        let plan = &crate::plan::clusters(&dczone_zone::Zone::reference())[0];
        let keys = Keys::generate(plan).unwrap();
        let names = |k: &Keys| {
            k.entities
                .iter()
                .map(|e| e.name.clone())
                .collect::<Vec<_>>()
        };
        assert!(names(&keys.for_host(plan, "witness-h1")).contains(&ADMIN.to_string()));
        // Every storage host holds a monitor in the reference zone; a plan whose OSD host
        // has no monitor gets no admin key.
        let mut p = plan.clone();
        p.mons.retain(|m| m.host != "dc1.1-h2");
        let got = names(&keys.for_host(&p, "dc1.1-h2"));
        assert_eq!(got, [BOOTSTRAP_OSD, VM_CLIENT]);
        let text = keys.keyring(Some(&[ADMIN]));
        assert!(text.starts_with("[client.admin]\n\tkey = "));
        assert!(text.contains("\tcaps mon = \"allow *\"\n"));
        assert!(!text.contains("[mon.]"));
    }
}
