//! TLS with the zone's certificates (rustls, ring): every connection between dczone parts
//! is mutually authenticated, and the peer's role is read from its certificate.
//!
//! A server requires a client certificate signed by the zone CA ([`server_config`]); the
//! handshake fails without one, so an unauthenticated request never reaches a handler.
//! What the peer may do is then decided by its [`Peer::role`].

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::ring::default_provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
pub use rustls::{ClientConfig, ServerConfig};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::Role;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {}: {reason}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// A certificate and its key, as issued by [`crate::Pki::issue`], with the zone CA that
/// signed it.
#[derive(Debug, Clone)]
pub struct Identity {
    pub ca: PathBuf,
    pub certificate: PathBuf,
    pub key: PathBuf,
}

impl Identity {
    /// A host's identity in a PKI directory laid out as [`crate::Pki`] writes it, or as
    /// installed on a real host (`ca.crt`, `hosts/<host>.crt`, `hosts/<host>.key`).
    pub fn host(dir: &Path, host: &str) -> Identity {
        Identity {
            ca: dir.join("ca.crt"),
            certificate: dir.join("hosts").join(format!("{host}.crt")),
            key: dir.join("hosts").join(format!("{host}.key")),
        }
    }

    /// An operator's identity in an access bundle (`ca.crt`, `operator.crt`,
    /// `operator.key`).
    pub fn operator(dir: &Path) -> Identity {
        Identity {
            ca: dir.join("ca.crt"),
            certificate: dir.join("operator.crt"),
            key: dir.join("operator.key"),
        }
    }

    fn chain(&self) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let certs = CertificateDer::pem_file_iter(&self.certificate)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .map_err(|e| read_error("the certificate", &self.certificate, e))?;
        if certs.is_empty() {
            return Err(read_error(
                "the certificate",
                &self.certificate,
                "no certificate in it",
            ));
        }
        Ok(certs)
    }

    fn private_key(&self) -> Result<PrivateKeyDer<'static>, TlsError> {
        PrivateKeyDer::from_pem_file(&self.key).map_err(|e| read_error("the key", &self.key, e))
    }
}

fn read_error(what: &'static str, path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::Read {
        what,
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn roots(ca: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| read_error("the zone CA certificate", ca, e))?;
    for c in certs {
        store
            .add(c)
            .map_err(|e| read_error("the zone CA certificate", ca, e))?;
    }
    if store.is_empty() {
        return Err(read_error(
            "the zone CA certificate",
            ca,
            "no certificate in it",
        ));
    }
    Ok(Arc::new(store))
}

/// A server that accepts only clients holding a certificate of the zone CA.
pub fn server_config(id: &Identity) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(&id.ca)?, provider.clone())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain()?, id.private_key()?)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Arc::new(config))
}

/// A client that trusts only servers of the zone CA and presents `id`'s certificate;
/// without `id`, none (a server of the zone then refuses the handshake).
pub fn client_config(ca: &Path, id: Option<&Identity>) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(Arc::new(default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots(ca)?);
    let config = match id {
        Some(id) => builder
            .with_client_auth_cert(id.chain()?, id.private_key()?)
            .map_err(|e| TlsError::Config(e.to_string()))?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Who is on the other end of a verified connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The certificate's common name: a host ID or an operator's name.
    pub name: String,
    pub role: Role,
    /// The addresses the certificate names (a host's).
    pub addresses: Vec<IpAddr>,
}

impl Peer {
    /// Reads the peer from its (already verified) end-entity certificate. `None` if the
    /// certificate carries no role this zone knows.
    pub fn from_der(der: &[u8]) -> Option<Peer> {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let unit = cert.subject().iter_organizational_unit().next()?;
        let role = match unit.as_str().ok()? {
            "host" => Role::Host,
            "operator" => Role::Operator,
            "consensus" => Role::Consensus,
            _ => return None,
        };
        let name = cert
            .subject()
            .iter_common_name()
            .next()?
            .as_str()
            .ok()?
            .to_string();
        let addresses = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        x509_parser::extensions::GeneralName::IPAddress(b) => match b.len() {
                            4 => Some(IpAddr::from(<[u8; 4]>::try_from(*b).ok()?)),
                            16 => Some(IpAddr::from(<[u8; 16]>::try_from(*b).ok()?)),
                            _ => None,
                        },
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        Some(Peer {
            name,
            role,
            addresses,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Pki;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("dczone-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// One connection to a server holding `server`: the peer the server saw, or the error
    /// the client got.
    fn connect(server: &Identity, client: Arc<ClientConfig>) -> Result<Option<Peer>, String> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let config = server_config(server).unwrap();
        let served = std::thread::spawn(move || {
            let (tcp, _) = listener.accept().unwrap();
            let conn = rustls::ServerConnection::new(config).unwrap();
            let mut s = rustls::StreamOwned::new(conn, tcp);
            let mut byte = [0u8; 1];
            s.read_exact(&mut byte).ok()?;
            let peer = s
                .conn
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| Peer::from_der(c));
            s.write_all(b"k").ok()?;
            s.flush().ok()?;
            peer
        });
        let tcp = TcpStream::connect(addr).unwrap();
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        let conn = rustls::ClientConnection::new(client, name).unwrap();
        let mut s = rustls::StreamOwned::new(conn, tcp);
        let mut byte = [0u8; 1];
        let outcome = s
            .write_all(b"x")
            .and_then(|_| s.flush())
            .and_then(|_| s.read_exact(&mut byte))
            .map_err(|e| e.to_string());
        drop(s);
        let peer = served.join().unwrap();
        outcome.map(|_| peer)
    }

    #[test]
    fn only_a_certificate_of_the_zone_gets_through_and_its_role_is_read() {
        let dir = tmp("zone");
        let pki = Pki::init(&dir, "z").unwrap();
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        pki.issue(Role::Host, "h1", &[local], 1).unwrap();
        let op = pki.issue(Role::Operator, "alice", &[], 1).unwrap();
        let server = Identity::host(&dir, "h1");
        let alice = Identity {
            ca: pki.ca_cert(),
            certificate: op.certificate,
            key: op.key,
        };

        let peer = connect(
            &server,
            client_config(&pki.ca_cert(), Some(&alice)).unwrap(),
        );
        let peer = peer.unwrap().unwrap();
        assert_eq!((peer.name.as_str(), peer.role), ("alice", Role::Operator));
        let peer = connect(
            &server,
            client_config(&pki.ca_cert(), Some(&server)).unwrap(),
        );
        let peer = peer.unwrap().unwrap();
        assert_eq!((peer.role, peer.addresses), (Role::Host, vec![local]));

        // No certificate: the handshake fails.
        assert!(connect(&server, client_config(&pki.ca_cert(), None).unwrap()).is_err());

        // A certificate of another CA: refused, and that CA's server is not trusted either.
        let other_dir = tmp("other");
        let other = Pki::init(&other_dir, "other").unwrap();
        other.issue(Role::Host, "h1", &[local], 1).unwrap();
        let stranger = Identity::host(&other_dir, "h1");
        let to_zone = client_config(&other.ca_cert(), Some(&stranger)).unwrap();
        assert!(connect(&server, to_zone).is_err());
        let zone_client = client_config(&pki.ca_cert(), Some(&alice)).unwrap();
        assert!(connect(&stranger, zone_client).is_err());

        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_dir_all(&other_dir).unwrap();
    }
}
