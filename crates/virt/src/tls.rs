//! Encrypted migration streams between sites: QEMU's `tls-creds-x509` with the zone's host
//! certificates (`dczone_pki`), mutual (the destination verifies the source's certificate,
//! the source the destination's against its address).
//!
//! QEMU reads fixed file names from one directory per endpoint, so each host gets
//! `<lab>/qemu-tls/<host>/` with `ca-cert.pem`, `server-cert.pem`/`server-key.pem` and
//! `client-cert.pem`/`client-key.pem`, all from the host's one certificate (server and
//! client auth). A migration within a site stays in the clear: it never leaves the site.

use std::path::{Path, PathBuf};

use serde_json::json;

use dczone_hypervisor::{Qmp, QmpError};
use dczone_pki::{Pki, Role};

use crate::migrate::Params;
use crate::{Placement, Platform, VirtError};

/// The credentials object of a destination QEMU.
pub(crate) const SERVER_CREDS: &str = "dczone-tls-server";
/// The credentials object of a source QEMU.
pub(crate) const CLIENT_CREDS: &str = "dczone-tls-client";

/// How long a lab-issued host certificate is valid, days.
const LAB_CERT_DAYS: u32 = 825;

impl Platform {
    /// The PKI directory migration credentials come from (default `<lab>/pki`; an agent
    /// on a real host passes its `--pki`).
    pub fn with_pki(mut self, dir: PathBuf) -> Platform {
        self.pki = dir;
        self
    }

    /// Whether a migration from host `from` to host `to` is encrypted: when they are in
    /// different sites, unless `params.tls` is off.
    pub fn migration_tls(&self, from: &str, to: &str, params: &Params) -> Result<bool, VirtError> {
        let a = self.placement().host(from)?;
        let b = self.placement().host(to)?;
        Ok(params.tls && a.site != b.site)
    }

    /// QEMU's credentials directory for `host`, written from its certificate in the PKI.
    /// In a lab (the CA's key at hand) the certificate is issued first if missing; on a
    /// real host it must have been installed.
    pub(crate) fn qemu_tls_dir(&self, host: &str) -> Result<PathBuf, VirtError> {
        let h = self.placement().host(host)?;
        let pki = match self.placement() {
            Placement::Lab(_) => Pki::open_or_init(&self.pki, self.placement().zone_name())?,
            Placement::Host(_) => Pki::open(&self.pki)?,
        };
        let (cert, key) = pki.ensure(Role::Host, host, &[h.ip.into()], LAB_CERT_DAYS)?;
        let dir = self.placement().dir().join("qemu-tls").join(host);
        let io = |what: &str| {
            let what = format!("{what} QEMU's TLS credentials in {}", dir.display());
            move |source| VirtError::Io { what, source }
        };
        let files = [
            (pki.ca_cert(), "ca-cert.pem"),
            (cert.clone(), "server-cert.pem"),
            (key.clone(), "server-key.pem"),
            (cert, "client-cert.pem"),
            (key, "client-key.pem"),
        ];
        // Left alone when current: another migration's QEMU may be reading it right now.
        let current = files.iter().all(|(from, to)| {
            matches!(
                (std::fs::read(from), std::fs::read(dir.join(to))),
                (Ok(a), Ok(b)) if a == b
            )
        });
        if current {
            return Ok(dir);
        }
        // Written whole under a private name, then renamed into place: a QEMU reading the
        // directory while another migration writes it sees one version or the other.
        let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io("create"))?;
        for (from, to) in files {
            std::fs::copy(&from, tmp.join(to)).map_err(io("write"))?;
        }
        let _ = std::fs::remove_dir_all(&dir);
        if std::fs::rename(&tmp, &dir).is_err() {
            // Another migration put its (identical) copy there first.
            let _ = std::fs::remove_dir_all(&tmp);
        }
        Ok(dir)
    }
}

/// Which side of the stream a QEMU is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// The destination: listens, verifies the source's certificate.
    Server,
    /// The source: connects, verifies the destination's certificate against `hostname`.
    Client,
}

/// Points `qmp`'s migration at TLS credentials from `dir` (the object is added once per
/// QEMU). `hostname`: the address the destination's certificate must name (source only).
pub(crate) fn enable(
    qmp: &mut Qmp,
    endpoint: Endpoint,
    dir: &Path,
    hostname: Option<&str>,
) -> Result<(), QmpError> {
    let (id, side) = match endpoint {
        Endpoint::Server => (SERVER_CREDS, "server"),
        Endpoint::Client => (CLIENT_CREDS, "client"),
    };
    let objects = qmp.execute("qom-list", json!({ "path": "/objects" }))?;
    let present = objects
        .as_array()
        .is_some_and(|a| a.iter().any(|o| o["name"] == id));
    if !present {
        qmp.execute(
            "object-add",
            json!({
                "qom-type": "tls-creds-x509",
                "id": id,
                "dir": dir.display().to_string(),
                "endpoint": side,
                "verify-peer": true,
            }),
        )?;
    }
    let mut p = json!({ "tls-creds": id });
    if let Some(h) = hostname {
        p["tls-hostname"] = json!(h);
    }
    qmp.execute("migrate-set-parameters", p)?;
    Ok(())
}

/// Migration in the clear (a QEMU that was a TLS destination keeps its setting otherwise).
pub(crate) fn disable(qmp: &mut Qmp) -> Result<(), QmpError> {
    qmp.execute(
        "migrate-set-parameters",
        json!({ "tls-creds": "", "tls-hostname": "" }),
    )?;
    Ok(())
}
