//! The guest as an application server (AP) of the zone's ledger database: each client
//! request becomes one database transaction, run over TLS and SCRAM as the application
//! role (issue 13's AP-DB benchmark, SPEC.md §3: TAT_dc-dc against TAT_pub-dc).
//!
//! A request is the transaction an application without stored procedures runs, one
//! statement per round trip: `BEGIN`, insert the transfer (its id makes a retry a no-op),
//! move the money, read the payer's balance, `COMMIT`. [`ROUND_TRIPS`] is that count: what
//! the AP pays in network round trips to its database per client request.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio_postgres::{Client, Statement};

/// Database round trips per client request: BEGIN, INSERT, UPDATE, SELECT, COMMIT.
pub const ROUND_TRIPS: u32 = 5;

const INSERT: &str = "INSERT INTO transfers (id, src, dst, amount) VALUES ($1, $2, $3, $4) \
                      ON CONFLICT (id) DO NOTHING";
const MOVE: &str = "UPDATE accounts SET balance = balance + \
                    CASE WHEN id = $2::int THEN $3::bigint ELSE -$3::bigint END WHERE id IN ($1::int, $2::int)";
const BALANCE: &str = "SELECT balance FROM accounts WHERE id = $1";

/// Where the AP's database is and how it signs in: set by the `D` request.
#[derive(Clone)]
pub struct Target {
    pub host: Ipv4Addr,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub dbname: String,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
}

impl Target {
    /// Parses `D <host> <port> <dbname> <user> <password> <zone CA PEM, hex>`.
    pub fn parse(args: &[&str]) -> Result<Target, String> {
        let [host, port, dbname, user, password, ca_hex] = args else {
            return Err("usage: D <host> <port> <dbname> <user> <password> <ca-pem-hex>".into());
        };
        let host = host
            .parse()
            .map_err(|_| format!("bad host address {host}"))?;
        let port = port.parse().map_err(|_| format!("bad port {port}"))?;
        let pem = hex(ca_hex).ok_or("the CA is not hex")?;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&pem) {
            let c = c.map_err(|e| format!("the CA's PEM: {e}"))?;
            roots.add(c).map_err(|e| format!("the CA: {e}"))?;
        }
        if roots.is_empty() {
            return Err("no certificate in the CA's PEM".into());
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Target {
            host,
            port,
            user: user.to_string(),
            password: password.to_string(),
            dbname: dbname.to_string(),
            tls: tokio_postgres_rustls::MakeRustlsConnect::new(config),
        })
    }
}

fn hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// One client connection's database session (a connection per client, as a thread-per-
/// connection application server keeps one).
pub struct Session {
    rt: tokio::runtime::Runtime,
    client: Client,
    insert: Statement,
    moved: Statement,
    balance: Statement,
}

/// What one request did at the database.
pub struct Applied {
    /// `false`: the id was applied before (nothing moved).
    pub new: bool,
    pub balance: i64,
    /// From `BEGIN` sent to `COMMIT` acknowledged: the application-to-DB turnaround.
    pub db_us: u64,
}

impl Session {
    pub fn open(t: &Target) -> Result<Session, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let mut cfg = tokio_postgres::Config::new();
        cfg.host(t.host.to_string())
            .port(t.port)
            .user(&t.user)
            .password(&t.password)
            .dbname(&t.dbname)
            .application_name("dczone-ap")
            // A statement that waits longer (a commit held by a lost synchronous standby)
            // fails instead of holding its client forever.
            .options("-c statement_timeout=10000")
            .ssl_mode(tokio_postgres::config::SslMode::Require)
            .connect_timeout(Duration::from_secs(5));
        let tls = t.tls.clone();
        let (client, insert, moved, balance) = rt
            .block_on(async move {
                let (client, conn) = cfg.connect(tls).await?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                let insert = client.prepare(INSERT).await?;
                let moved = client.prepare(MOVE).await?;
                let balance = client.prepare(BALANCE).await?;
                Ok::<_, tokio_postgres::Error>((client, insert, moved, balance))
            })
            .map_err(|e| db_error("connect", &e))?;
        Ok(Session {
            rt,
            client,
            insert,
            moved,
            balance,
        })
    }

    /// One transfer as one transaction of [`ROUND_TRIPS`] statements.
    pub fn transfer(
        &mut self,
        id: u64,
        from: i32,
        to: i32,
        amount: i64,
    ) -> Result<Applied, String> {
        let started = Instant::now();
        let (new, balance) = self
            .rt
            .block_on(async {
                let tx = self.client.transaction().await?;
                let new = tx
                    .execute(&self.insert, &[&id.to_string(), &from, &to, &amount])
                    .await?
                    == 1;
                if new {
                    tx.execute(&self.moved, &[&from, &to, &amount]).await?;
                }
                let balance: i64 = tx.query_one(&self.balance, &[&from]).await?.get(0);
                tx.commit().await?;
                Ok::<_, tokio_postgres::Error>((new, balance))
            })
            .map_err(|e| db_error("transfer", &e))?;
        Ok(Applied {
            new,
            balance,
            db_us: started.elapsed().as_micros() as u64,
        })
    }

    /// Whether the connection is gone (a failed statement leaves it usable).
    pub fn closed(&self) -> bool {
        self.client.is_closed()
    }

    /// One round trip to the database (`SELECT 1`, simple protocol), µs.
    pub fn ping(&mut self) -> Result<u64, String> {
        let started = Instant::now();
        self.rt
            .block_on(self.client.simple_query("SELECT 1"))
            .map_err(|e| db_error("ping", &e))?;
        Ok(started.elapsed().as_micros() as u64)
    }
}

fn db_error(what: &str, e: &tokio_postgres::Error) -> String {
    let detail = e
        .as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_else(|| e.to_string());
    format!("{what}: {detail}").replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_decodes_and_refuses_odd_or_foreign_text() {
        assert_eq!(hex("2d2d0a"), Some(b"--\n".to_vec()));
        assert_eq!(hex("2d2"), None);
        assert_eq!(hex("zz"), None);
    }

    #[test]
    fn a_target_needs_every_field_and_a_certificate() {
        assert!(Target::parse(&["10.77.2.11", "5432"]).is_err());
        let e = Target::parse(&["10.77.2.11", "5432", "ledger", "ap", "pw", "2d2d"])
            .err()
            .unwrap();
        assert!(e.contains("no certificate"), "{e}");
    }
}
