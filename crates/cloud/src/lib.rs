//! The public cloud as a separate party (issue 13). Nothing of the bank's side reaches
//! into the cloud except through its API, and the cloud's API takes only requests signed
//! with an account's key, as a real cloud's does: [`sigv4`] is AWS Signature Version 4,
//! used by both ends, so that pointing dczone at a real cloud is a configuration change.

pub mod client;
pub mod ec2;
pub mod provider;
pub mod s3;
pub mod sigv4;
pub mod stream;
pub mod vmdk;

use serde::{Deserialize, Serialize};

/// What a user of the cloud gets from its console: the object storage's endpoint and the
/// compute API's, the account's key pair, its bucket and region. This is all dczone needs
/// to know of a cloud; a real cloud's values make dczone use it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub region: String,
    pub s3_endpoint: String,
    pub compute_endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    pub bucket: String,
    /// When the key pair expires (RFC 3339), for a key the cloud issued for a while.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
}

impl Account {
    /// Whether its key has expired (by this host's clock); a key without an expiry never
    /// does, one whose expiry is unreadable is taken as expired.
    pub fn expired(&self) -> bool {
        use time::format_description::well_known::Rfc3339;
        self.expires.as_ref().is_some_and(|at| {
            time::OffsetDateTime::parse(at, &Rfc3339)
                .ok()
                .is_none_or(|t| t <= time::OffsetDateTime::now_utc())
        })
    }

    pub fn credentials(&self) -> sigv4::Credentials {
        sigv4::Credentials {
            access_key: self.access_key.clone(),
            secret_key: self.secret_key.clone(),
        }
    }
}

/// `n` random characters of `alphabet` (from /dev/urandom).
pub fn random_string(alphabet: &[u8], n: usize) -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = vec![0u8; n];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes
        .iter()
        .map(|b| alphabet[usize::from(*b) % alphabet.len()] as char)
        .collect())
}

/// A new key pair in AWS's shapes: a 20-character access key id, `AKIA` and 16 of A-Z
/// and 2-7, and a 40-character secret.
pub fn new_key_pair() -> std::io::Result<sigv4::Credentials> {
    Ok(sigv4::Credentials {
        access_key: format!(
            "AKIA{}",
            random_string(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", 16)?
        ),
        secret_key: random_string(
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/",
            40,
        )?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_expires_at_its_time_and_an_unreadable_expiry_counts_as_past() {
        let mut a = Account {
            region: "r".into(),
            s3_endpoint: "http://s3".into(),
            compute_endpoint: "http://ec2".into(),
            access_key: "AKIA".into(),
            secret_key: "s".into(),
            bucket: "b".into(),
            expires: None,
        };
        assert!(!a.expired());
        a.expires = Some("2000-01-01T00:00:00Z".into());
        assert!(a.expired());
        a.expires = Some("2999-01-01T00:00:00Z".into());
        assert!(!a.expired());
        a.expires = Some("tomorrow".into());
        assert!(a.expired());
    }
}
