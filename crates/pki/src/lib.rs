//! The zone's PKI: one certificate authority per zone, and the certificates it issues.
//!
//! ```text
//! <dir>/ca.crt, ca.key                    the zone CA (the key stays with the operator)
//! <dir>/hosts/<host>.crt, <host>.key      a host: server and client auth, its address as
//!                                         SAN, OU "host" (agents, peers in migrations)
//! <dir>/operators/<name>.crt, <name>.key  an operator: client auth only, OU "operator"
//! <dir>/consensus/<name>.crt, <name>.key  a party of the consensus store (an etcd member,
//!                                         an HA agent): server and client auth, OU
//!                                         "consensus", the SAN `consensus.dczone` that
//!                                         etcd requires
//! ```
//!
//! The organisational unit carries the role, so that an agent can accept operator commands
//! only from an operator's certificate and migration calls only from a host's. Keys are
//! ECDSA P-256, written with mode 0600; nothing is ever overwritten.

pub mod tls;

use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde::Serialize;

/// What a certificate lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A host of the zone: serves its agent's API, and calls peer agents.
    Host,
    /// A person or tool driving the zone.
    Operator,
    /// A party of the consensus store: an etcd member (for its clients and peers) or an
    /// HA agent (its client). etcd admits only certificates that name
    /// [`CONSENSUS_NAME`], which only this role's carry.
    Consensus,
}

/// The DNS name every [`Role::Consensus`] certificate carries beside its own, and the
/// only one etcd admits (`--client-cert-allowed-hostname`, `--peer-cert-allowed-hostname`):
/// a host's or an operator's certificate, valid at every agent, does not open etcd.
pub const CONSENSUS_NAME: &str = "consensus.dczone";

impl Role {
    /// The organisational unit that marks the role in the subject.
    pub fn unit(self) -> &'static str {
        match self {
            Role::Host => "host",
            Role::Operator => "operator",
            Role::Consensus => "consensus",
        }
    }

    fn folder(self) -> &'static str {
        match self {
            Role::Host => "hosts",
            Role::Operator => "operators",
            Role::Consensus => "consensus",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{} already holds a zone CA; remove it first or use another --dir", .0.display())]
    Exists(PathBuf),
    #[error("{} holds no zone CA; create one with `dczone pki init --dir {}`", .0.display(), .0.display())]
    NoCa(PathBuf),
    #[error("{} holds no CA key, so it cannot issue the certificate of '{name}': issue it with `dczone pki issue` where the CA key is, and install it here", .dir.display())]
    NoCaKey { dir: PathBuf, name: String },
    #[error("a certificate for {role:?} '{name}' already exists at {}", path.display())]
    Issued {
        role: Role,
        name: String,
        path: PathBuf,
    },
    #[error("name '{0}' must be 1-63 characters of a-z, 0-9, '.', '-'")]
    BadName(String),
    #[error("the name '{0}' is reserved: etcd admits every certificate that carries it")]
    Reserved(String),
    #[error("a host certificate needs at least one address (--ip)")]
    NoAddress,
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("certificate generation failed")]
    Rcgen(#[from] rcgen::Error),
    #[error("{} is not a readable PEM {what}: restore it from a copy (a new CA would orphan every certificate it signed)", path.display())]
    BadPem {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("{} is not a {role:?} certificate naming {wanted:?}, and {} holds no CA key to issue it again: issue it with `dczone pki issue` where the CA key is, and install it here", path.display(), dir.display())]
    Stale {
        role: Role,
        path: PathBuf,
        wanted: Vec<IpAddr>,
        dir: PathBuf,
    },
}

/// The files of one issued certificate.
#[derive(Debug, Clone, Serialize)]
pub struct Issued {
    pub role: Role,
    pub name: String,
    pub certificate: PathBuf,
    pub key: PathBuf,
    pub not_after: String,
}

/// A zone CA on disk.
#[derive(Debug)]
pub struct Pki {
    dir: PathBuf,
}

/// How long the CA is valid.
const CA_DAYS: i64 = 3650;

impl Pki {
    /// Creates the zone CA in `dir` (created if missing). Refuses to replace one.
    pub fn init(dir: &Path, zone: &str) -> Result<Pki, PkiError> {
        check_name(zone)?;
        let pki = Pki {
            dir: dir.to_path_buf(),
        };
        if pki.ca_cert().exists() || pki.ca_key().exists() {
            return Err(PkiError::Exists(dir.to_path_buf()));
        }
        std::fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("dczone zone CA {zone}"));
        params
            .distinguished_name
            .push(DnType::OrganizationName, format!("dczone zone {zone}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(CA_DAYS);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        write_new(&pki.ca_key(), key.serialize_pem().as_bytes(), 0o600)?;
        write_new(&pki.ca_cert(), cert.pem().as_bytes(), 0o644)?;
        Ok(pki)
    }

    /// Opens the zone CA in `dir`.
    pub fn open(dir: &Path) -> Result<Pki, PkiError> {
        let pki = Pki {
            dir: dir.to_path_buf(),
        };
        if !pki.ca_cert().exists() {
            return Err(PkiError::NoCa(dir.to_path_buf()));
        }
        Ok(pki)
    }

    /// Opens the CA in `dir`, creating it first if there is none: a lab, where one machine
    /// plays the operator and every host. Concurrent callers share one CA.
    pub fn open_or_init(dir: &Path, zone: &str) -> Result<Pki, PkiError> {
        let _lock = Pki::lock(dir)?;
        match Pki::open(dir) {
            Err(PkiError::NoCa(_)) => Pki::init(dir, zone),
            other => other,
        }
    }

    /// The certificate of `name` in `role`, issued first if there is none (which needs the
    /// CA's key, so on a real host only what the operator installed is found).
    pub fn ensure(
        &self,
        role: Role,
        name: &str,
        ips: &[IpAddr],
        days: u32,
    ) -> Result<(PathBuf, PathBuf), PkiError> {
        let folder = self.dir.join(role.folder());
        let (cert, key) = (
            folder.join(format!("{name}.crt")),
            folder.join(format!("{name}.key")),
        );
        let _lock = Pki::lock(&self.dir)?;
        if cert.exists() && key.exists() {
            // Reused only if it still says what is asked: the role, and every address (a
            // host whose address changed would otherwise serve a certificate its peers
            // refuse).
            let fits = CertificateDer::from_pem_file(&cert)
                .ok()
                .and_then(|der| crate::tls::Peer::from_der(&der))
                .is_some_and(|p| p.role == role && ips.iter().all(|ip| p.addresses.contains(ip)));
            if fits {
                return Ok((cert, key));
            }
            if !self.ca_key().exists() {
                return Err(PkiError::Stale {
                    role,
                    path: cert,
                    wanted: ips.to_vec(),
                    dir: self.dir.clone(),
                });
            }
            std::fs::remove_file(&cert).map_err(io("cannot remove", &cert))?;
            std::fs::remove_file(&key).map_err(io("cannot remove", &key))?;
        }
        self.issue(role, name, ips, days)?;
        Ok((cert, key))
    }

    /// An exclusive lock on the PKI directory while the file lives.
    fn lock(dir: &Path) -> Result<std::fs::File, PkiError> {
        std::fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
        let path = dir.join(".lock");
        let f = std::fs::File::create(&path).map_err(io("cannot create", &path))?;
        f.lock().map_err(io("cannot lock", &path))?;
        Ok(f)
    }

    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }

    /// Issues a certificate for `name` in `role`, valid `days` days, with `ips` (and the
    /// name) as subject alternative names. A host needs at least one address.
    pub fn issue(
        &self,
        role: Role,
        name: &str,
        ips: &[IpAddr],
        days: u32,
    ) -> Result<Issued, PkiError> {
        check_name(name)?;
        // The name etcd admits: no certificate may be *called* it, or its own-name SAN
        // would open etcd whatever its role.
        if name == CONSENSUS_NAME {
            return Err(PkiError::Reserved(name.to_string()));
        }
        if role == Role::Host && ips.is_empty() {
            return Err(PkiError::NoAddress);
        }
        let folder = self.dir.join(role.folder());
        let certificate = folder.join(format!("{name}.crt"));
        let key_path = folder.join(format!("{name}.key"));
        if certificate.exists() || key_path.exists() {
            return Err(PkiError::Issued {
                role,
                name: name.to_string(),
                path: certificate,
            });
        }
        if !self.ca_key().exists() {
            return Err(PkiError::NoCaKey {
                dir: self.dir.clone(),
                name: name.to_string(),
            });
        }
        let ca_key = read(&self.ca_key())?;
        let ca_cert = read(&self.ca_cert())?;
        let bad = |what, path: PathBuf| move |source| PkiError::BadPem { what, path, source };
        let ca_key = KeyPair::from_pem(&ca_key).map_err(bad("CA key", self.ca_key()))?;
        let issuer = Issuer::from_ca_cert_pem(&ca_cert, ca_key)
            .map_err(bad("CA certificate", self.ca_cert()))?;

        let mut params = CertificateParams::new(vec![name.to_string()])?;
        if role == Role::Consensus {
            params
                .subject_alt_names
                .push(SanType::DnsName(CONSENSUS_NAME.try_into()?));
        }
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, role.unit());
        params.use_authority_key_identifier_extension = true;
        // QEMU's TLS credentials refuse a host certificate whose (critical) key usage
        // lacks key encipherment, whatever the key type.
        params.key_usages = match role {
            Role::Host | Role::Consensus => vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ],
            Role::Operator => vec![KeyUsagePurpose::DigitalSignature],
        };
        params.extended_key_usages = match role {
            Role::Host | Role::Consensus => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            Role::Operator => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(i64::from(days));
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        std::fs::create_dir_all(&folder).map_err(io("cannot create", &folder))?;
        write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_new(&certificate, cert.pem().as_bytes(), 0o644)?;
        Ok(Issued {
            role,
            name: name.to_string(),
            certificate,
            key: key_path,
            not_after: params
                .not_after
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
        })
    }
}

fn check_name(name: &str) -> Result<(), PkiError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(PkiError::BadName(name.to_string()))
    }
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl Fn(std::io::Error) -> PkiError + 'a {
    move |source| PkiError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(io("cannot read", path))
}

/// Writes a file that must not exist yet, with `mode` from the start (a key is never
/// readable by others, not even for an instant).
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io("cannot create", path))?;
    f.write_all(bytes).map_err(io("cannot write", path))?;
    // The process umask may have narrowed a public certificate; set what was asked.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io("cannot set the mode of", path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("dczone-pki-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn parse(path: &Path) -> Vec<u8> {
        let text = std::fs::read(path).unwrap();
        let (_, pem) = parse_x509_pem(&text).unwrap();
        pem.contents
    }

    #[test]
    fn a_host_certificate_is_signed_by_the_zone_ca_for_its_addresses_and_both_auths() {
        let dir = tmp("host");
        let pki = Pki::init(&dir, "reference").unwrap();
        let ip: IpAddr = "10.77.1.11".parse().unwrap();
        let issued = pki.issue(Role::Host, "dc1.1-h1", &[ip], 825).unwrap();

        let ca_der = parse(&pki.ca_cert());
        let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();
        let der = parse(&issued.certificate);
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        assert!(ca.is_ca());
        assert_eq!(cert.issuer(), ca.subject());
        cert.verify_signature(Some(ca.public_key())).unwrap();
        let unit = cert
            .subject()
            .iter_organizational_unit()
            .next()
            .unwrap()
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(unit, "host");
        let san = cert.subject_alternative_name().unwrap().unwrap().value;
        assert!(san
            .general_names
            .iter()
            .any(|n| matches!(n, GeneralName::IPAddress(b) if *b == [10, 77, 1, 11])));
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let mode = std::fs::metadata(&issued.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_operator_certificate_is_for_client_auth_only() {
        let dir = tmp("op");
        let pki = Pki::init(&dir, "reference").unwrap();
        let issued = pki.issue(Role::Operator, "alice", &[], 30).unwrap();
        let der = parse(&issued.certificate);
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        let unit = cert.subject().iter_organizational_unit().next().unwrap();
        assert_eq!(unit.as_str().unwrap(), "operator");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_a_consensus_certificate_names_the_consensus_store() {
        let dir = tmp("consensus");
        let pki = Pki::init(&dir, "reference").unwrap();
        let ip: IpAddr = "10.77.1.11".parse().unwrap();
        let dns = |issued: &Issued| -> Vec<String> {
            let der = parse(&issued.certificate);
            let (_, cert) = X509Certificate::from_der(&der).unwrap();
            let san = cert.subject_alternative_name().unwrap().unwrap().value;
            san.general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
                .collect()
        };
        let c = pki.issue(Role::Consensus, "dc1.1-h1", &[ip], 30).unwrap();
        assert_eq!(dns(&c), ["dc1.1-h1", CONSENSUS_NAME]);
        assert_eq!(c.certificate, dir.join("consensus/dc1.1-h1.crt"));
        let h = pki.issue(Role::Host, "dc1.1-h1", &[ip], 30).unwrap();
        assert_eq!(dns(&h), ["dc1.1-h1"]);
        let o = pki.issue(Role::Operator, "alice", &[], 30).unwrap();
        assert!(!dns(&o).contains(&CONSENSUS_NAME.to_string()));
        // Nor can a certificate be named after it, whatever its role.
        for role in [Role::Host, Role::Operator, Role::Consensus] {
            let r = pki.issue(role, CONSENSUS_NAME, &[ip], 30);
            assert!(matches!(r, Err(PkiError::Reserved(_))), "{role:?}: {r:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn nothing_is_overwritten_and_bad_input_says_what_to_fix() {
        let dir = tmp("refuse");
        let pki = Pki::init(&dir, "z").unwrap();
        assert!(matches!(Pki::init(&dir, "z"), Err(PkiError::Exists(_))));
        let ip: IpAddr = "10.77.1.11".parse().unwrap();
        pki.issue(Role::Host, "h1", &[ip], 1).unwrap();
        assert!(matches!(
            pki.issue(Role::Host, "h1", &[ip], 1),
            Err(PkiError::Issued { .. })
        ));
        assert!(matches!(
            pki.issue(Role::Host, "h2", &[], 1),
            Err(PkiError::NoAddress)
        ));
        for bad in ["../x", "H1", "", "-h"] {
            let e = pki.issue(Role::Operator, bad, &[], 1).unwrap_err();
            assert!(e.to_string().contains("a-z, 0-9"), "{bad}: {e}");
        }
        let missing = tmp("missing");
        let e = Pki::open(&missing).unwrap_err();
        assert!(e.to_string().contains("dczone pki init"), "{e}");
        // A corrupt CA key is named.
        std::fs::write(dir.join("ca.key"), "not a key").unwrap();
        let e = pki.issue(Role::Operator, "bob", &[], 1).unwrap_err();
        assert!(
            e.to_string()
                .contains(&dir.join("ca.key").display().to_string()),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ensure_reuses_a_certificate_only_while_it_names_the_host_addresses() {
        let dir = tmp("ensure");
        let pki = Pki::init(&dir, "z").unwrap();
        let (a, b): (IpAddr, IpAddr) =
            ("10.77.1.11".parse().unwrap(), "10.77.1.12".parse().unwrap());
        let (cert, _) = pki.ensure(Role::Host, "h1", &[a], 1).unwrap();
        let first = std::fs::read(&cert).unwrap();
        pki.ensure(Role::Host, "h1", &[a], 1).unwrap();
        assert_eq!(std::fs::read(&cert).unwrap(), first, "reissued for nothing");
        // The host moved: its certificate is issued again, for the new address.
        pki.ensure(Role::Host, "h1", &[b], 1).unwrap();
        let peer = crate::tls::Peer::from_der(&parse(&cert)).unwrap();
        assert_eq!(peer.addresses, [b]);
        // Without the CA key (a real host), a stale one is an error that says what to do.
        std::fs::remove_file(dir.join("ca.key")).unwrap();
        let e = pki.ensure(Role::Host, "h1", &[a], 1).unwrap_err();
        assert!(matches!(e, PkiError::Stale { .. }), "{e}");
        assert!(e.to_string().contains("dczone pki issue"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
