//! The ledger database's workload and its RPO audit.
//!
//! Every transfer carries a client-generated unique id and is one autocommit statement that
//! inserts the transfer (ignoring an id it already has) and moves the money only if the insert
//! happened, so a retried transfer is applied at most once. The client records every
//! acknowledged id and, separately, every id whose outcome it could not learn (timeout, lost
//! connection): those are retried with the same id against whichever member is primary, and
//! stay indeterminate only if no retry is acknowledged. The audit then checks the current
//! primary: every acknowledged id present, balances conserved, indeterminate ids listed.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dczone_measure::{gaps, Interval};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio_postgres::{Client, Config};
use tokio_postgres_rustls::MakeRustlsConnect;

pub const ACCOUNTS: i32 = 1000;
pub const INITIAL_BALANCE: i64 = 1000;
pub const TOTAL: i64 = ACCOUNTS as i64 * INITIAL_BALANCE;

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("no member accepts writes (tried {tried}; refused: {refused})")]
    NoPrimary { tried: String, refused: String },
    #[error("ledger SQL: {0}")]
    Sql(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Db(#[from] dczone_db::DbError),
}

pub fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The zone CA's TLS connector ([`dczone_db::client_tls`]), loaded once per process.
fn tls() -> Result<MakeRustlsConnect, dczone_db::DbError> {
    static TLS: std::sync::OnceLock<MakeRustlsConnect> = std::sync::OnceLock::new();
    if let Some(t) = TLS.get() {
        return Ok(t.clone());
    }
    let t = dczone_db::client_tls()?;
    Ok(TLS.get_or_init(|| t).clone())
}

fn config(ip: Ipv4Addr, app: &str, dbname: &str) -> Config {
    let mut c = Config::new();
    c.host(ip.to_string())
        .port(dczone_db::PORT)
        .user("postgres")
        .dbname(dbname)
        .application_name(app)
        .ssl_mode(tokio_postgres::config::SslMode::Require)
        .connect_timeout(Duration::from_millis(500));
    if let Some(pw) = dczone_db::client_password() {
        c.password(pw);
    }
    c
}

/// Connects to one member, or says why it could not (for the error a client prints).
async fn try_connect(
    ip: Ipv4Addr,
    app: &str,
    dbname: &str,
    timeout: Duration,
) -> Result<Client, String> {
    let cfg = config(ip, app, dbname);
    let fut = cfg.connect(tls().map_err(|e| e.to_string())?);
    let (client, conn) = tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| format!("{ip}: no answer within {} ms", timeout.as_millis()))?
        .map_err(|e| match e.as_db_error() {
            Some(db) => format!("{ip}: {}", db.message()),
            None => format!("{ip}: {e}"),
        })?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Connects to the member that accepts writes. Each attempt has its own deadline: a silently
/// dead member must not hold the client (NOTES.md: libpq does not move on by itself).
pub async fn connect_primary(
    hosts: &[Ipv4Addr],
    app: &str,
) -> Result<(Client, Ipv4Addr), LedgerError> {
    connect_primary_db(hosts, app, dczone_db::DATABASE).await
}

/// [`connect_primary`] to another database (e.g. `postgres`, before the ledger exists).
pub async fn connect_primary_db(
    hosts: &[Ipv4Addr],
    app: &str,
    dbname: &str,
) -> Result<(Client, Ipv4Addr), LedgerError> {
    let mut refused = Vec::new();
    for &ip in hosts {
        let c = match try_connect(ip, app, dbname, Duration::from_millis(500)).await {
            Ok(c) => c,
            Err(e) => {
                refused.push(e);
                continue;
            }
        };
        let rw = tokio::time::timeout(
            Duration::from_millis(500),
            c.query_one("SELECT NOT pg_is_in_recovery() AND NOT current_setting('transaction_read_only')::bool", &[]),
        )
        .await;
        if let Ok(Ok(row)) = rw {
            if row.get::<_, bool>(0) {
                return Ok((c, ip));
            }
        }
    }
    Err(LedgerError::NoPrimary {
        tried: hosts
            .iter()
            .map(|h| h.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        refused: if refused.is_empty() {
            "none: every member that answered is a standby".into()
        } else {
            refused.join("; ")
        },
    })
}

/// Creates the ledger database and its accounts (on the primary, through its address).
pub async fn create_schema(primary: Ipv4Addr) -> Result<(), LedgerError> {
    let mut admin = Config::new();
    admin
        .host(primary.to_string())
        .port(dczone_db::PORT)
        .user("postgres")
        .dbname("postgres")
        .ssl_mode(tokio_postgres::config::SslMode::Require)
        .connect_timeout(Duration::from_secs(3));
    if let Some(pw) = dczone_db::client_password() {
        admin.password(pw);
    }
    let (c, conn) = admin.connect(tls()?).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let exists = c
        .query_opt(
            "SELECT 1 FROM pg_database WHERE datname = $1",
            &[&dczone_db::DATABASE],
        )
        .await?
        .is_some();
    if !exists {
        c.batch_execute(&format!("CREATE DATABASE {}", dczone_db::DATABASE))
            .await?;
    }
    let (c, conn) = config(primary, "dczone-setup", dczone_db::DATABASE)
        .connect(tls()?)
        .await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    c.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS accounts (id int PRIMARY KEY, balance bigint NOT NULL);
         CREATE TABLE IF NOT EXISTS transfers (id text PRIMARY KEY, src int NOT NULL,
             dst int NOT NULL, amount bigint NOT NULL, at timestamptz NOT NULL DEFAULT now());
         INSERT INTO accounts SELECT g, {INITIAL_BALANCE} FROM generate_series(1, {ACCOUNTS}) g
             ON CONFLICT DO NOTHING;"
    ))
    .await?;
    Ok(())
}

/// Makes the application role ([`dczone_db::APP_ROLE`]) sign in with `password`, with
/// the rights an application server needs on the ledger and no more: read and update the
/// accounts, insert transfers and read their ids (`ON CONFLICT (id)` needs it; no DDL, no
/// deletes, no other database). Idempotent; run on
/// the primary. Only the password's SCRAM verifier leaves this process, so no server log
/// can show the password.
pub async fn ensure_app_role(primary: Ipv4Addr, password: &str) -> Result<(), LedgerError> {
    if password.len() < 16 {
        return Err(LedgerError::Db(dczone_db::DbError::Step {
            what: "set the application role's password".into(),
            detail: "it needs at least 16 characters".into(),
        }));
    }
    let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
    let (c, conn) = config(primary, "dczone-setup", dczone_db::DATABASE)
        .connect(tls()?)
        .await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let role = dczone_db::APP_ROLE;
    c.batch_execute(&format!(
        "DO $$ BEGIN
             IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN
                 CREATE ROLE {role} LOGIN;
             END IF;
         END $$;
         ALTER ROLE {role} PASSWORD '{verifier}';
         GRANT SELECT, UPDATE ON accounts TO {role};
         GRANT INSERT, SELECT (id) ON transfers TO {role};"
    ))
    .await?;
    Ok(())
}

/// One transfer, applied at most once whatever the retries: the insert of its id gates the
/// balance update, in one statement; both rows are locked in id order (no deadlocks).
pub const TRANSFER_SQL: &str = "WITH t AS (INSERT INTO transfers (id, src, dst, amount) \
     VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING RETURNING src, dst, amount) \
     UPDATE accounts a SET balance = a.balance + CASE WHEN a.id = t.dst THEN t.amount ELSE -t.amount END \
     FROM t WHERE a.id IN (t.src, t.dst)";

/// What a run of the workload asks for.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub hosts: Vec<Ipv4Addr>,
    pub clients: usize,
    pub duration: Duration,
    /// Per-transfer deadline; past it the outcome is indeterminate and the transfer is retried.
    pub request_timeout: Duration,
    /// Prefix of every transfer id (unique per run).
    pub run_id: String,
}

/// What a run of the workload saw.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoadResult {
    pub acknowledged: Vec<String>,
    /// Ids whose outcome is unknown: never acknowledged, despite retries.
    pub indeterminate: Vec<String>,
    /// Acknowledgement times (unix us), for availability gaps.
    #[serde(skip)]
    pub ack_times_us: Vec<u64>,
    /// Each acknowledged transaction's TATrxn (us), in no particular order, so that runs
    /// can be merged ([`LoadResult::merge`]).
    #[serde(skip)]
    pub latencies_us: Vec<u64>,
    pub errors: u64,
    pub retries: u64,
    pub seconds: f64,
    pub ptrx: f64,
    pub tatrxn_p50_ms: f64,
    pub tatrxn_p99_ms: f64,
    pub tatrxn_mean_ms: f64,
    pub started_us: u64,
}

impl LoadResult {
    /// Several runs of the same workload as one: every transaction counted once, Ptrx over
    /// the runs' summed time, percentiles over every transaction. `started_us` is the
    /// first run's.
    pub fn merge(runs: &[LoadResult]) -> LoadResult {
        let mut out = LoadResult {
            started_us: runs.first().map_or(0, |r| r.started_us),
            ..Default::default()
        };
        for r in runs {
            out.acknowledged.extend(r.acknowledged.iter().cloned());
            out.indeterminate.extend(r.indeterminate.iter().cloned());
            out.ack_times_us.extend(&r.ack_times_us);
            out.latencies_us.extend(&r.latencies_us);
            out.errors += r.errors;
            out.retries += r.retries;
            out.seconds += r.seconds;
        }
        out.summarise();
        out
    }

    /// Ptrx and the TATrxn percentiles from `acknowledged`, `seconds` and `latencies_us`.
    fn summarise(&mut self) {
        let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
        for &us in &self.latencies_us {
            let _ = hist.record(us.clamp(1, 60_000_000));
        }
        self.ptrx = self.acknowledged.len() as f64 / self.seconds.max(1e-9);
        self.tatrxn_p50_ms = hist.value_at_quantile(0.5) as f64 / 1000.0;
        self.tatrxn_p99_ms = hist.value_at_quantile(0.99) as f64 / 1000.0;
        self.tatrxn_mean_ms = hist.mean() / 1000.0;
    }

    /// Intervals with no acknowledged commit longer than `threshold`.
    pub fn write_gaps(&self, threshold: Duration) -> Vec<Interval> {
        gaps(&self.ack_times_us, threshold.as_micros() as u64)
    }
}

struct ClientLog {
    acked: Vec<String>,
    ack_times: Vec<u64>,
    indeterminate: Vec<String>,
    latencies_us: Vec<u64>,
    errors: u64,
    retries: u64,
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

async fn client_loop(opts: LoadOptions, n: usize, stop: Instant) -> ClientLog {
    let mut log = ClientLog {
        acked: Vec::new(),
        ack_times: Vec::new(),
        indeterminate: Vec::new(),
        latencies_us: Vec::new(),
        errors: 0,
        retries: 0,
    };
    let app = format!("ledger-{n}");
    let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ ((n as u64 + 1) * 0x1000_0001);
    let mut client: Option<Client> = None;
    let mut pending: Option<(String, i32, i32, i64)> = None;
    let mut seq = 0u64;
    while Instant::now() < stop {
        if client.is_none() {
            match connect_primary(&opts.hosts, &app).await {
                Ok((c, _)) => client = Some(c),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        }
        let (id, src, dst, amount) = match pending.take() {
            Some(p) => {
                log.retries += 1;
                p
            }
            None => {
                seq += 1;
                let src = (xorshift(&mut seed) % ACCOUNTS as u64) as i32 + 1;
                let mut dst = (xorshift(&mut seed) % ACCOUNTS as u64) as i32 + 1;
                if dst == src {
                    dst = dst % ACCOUNTS + 1;
                }
                let amount = (xorshift(&mut seed) % 50) as i64 + 1;
                (format!("{}-{n}-{seq}", opts.run_id), src, dst, amount)
            }
        };
        let c = client.as_ref().expect("connected");
        let t0 = Instant::now();
        let r = tokio::time::timeout(
            opts.request_timeout,
            c.execute(TRANSFER_SQL, &[&id, &src, &dst, &amount]),
        )
        .await;
        match r {
            Ok(Ok(_)) => {
                let us = t0.elapsed().as_micros() as u64;
                log.latencies_us.push(us);
                log.ack_times.push(unix_us());
                log.acked.push(id);
            }
            _ => {
                // Timeout, lost connection, or refused: we cannot know whether it committed.
                log.errors += 1;
                client = None;
                pending = Some((id, src, dst, amount));
            }
        }
    }
    if let Some((id, ..)) = pending {
        log.indeterminate.push(id);
    }
    log
}

/// Runs `clients` closed-loop clients for `duration` on the current (single-threaded) runtime.
pub async fn run(opts: LoadOptions) -> LoadResult {
    let started_us = unix_us();
    let t0 = Instant::now();
    let stop = t0 + opts.duration;
    let handles: Vec<_> = (0..opts.clients)
        .map(|n| tokio::spawn(client_loop(opts.clone(), n, stop)))
        .collect();
    let mut result = LoadResult {
        started_us,
        ..Default::default()
    };
    for h in handles {
        if let Ok(log) = h.await {
            result.acknowledged.extend(log.acked);
            result.ack_times_us.extend(log.ack_times);
            result.indeterminate.extend(log.indeterminate);
            result.latencies_us.extend(log.latencies_us);
            result.errors += log.errors;
            result.retries += log.retries;
        }
    }
    result.seconds = t0.elapsed().as_secs_f64();
    result.summarise();
    result
}

/// The RPO audit's verdict.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Audit {
    pub primary: String,
    pub acknowledged: usize,
    pub present: usize,
    /// Acknowledged transfers missing from the primary: the exact loss.
    pub lost: Vec<String>,
    pub indeterminate: usize,
    /// Indeterminate transfers the primary has (the rest were never applied).
    pub indeterminate_applied: usize,
    pub balance_sum: i64,
    pub balances_conserved: bool,
    /// Every account's balance equals its initial balance plus its transfers.
    pub balances_match_transfers: bool,
    pub rpo_zero: bool,
}

/// Checks the current primary against the acknowledged and indeterminate ids.
pub async fn audit(
    hosts: &[Ipv4Addr],
    acknowledged: &[String],
    indeterminate: &[String],
) -> Result<Audit, LedgerError> {
    let (c, ip) = connect_primary(hosts, "dczone-audit").await?;
    let rows = c.query("SELECT id FROM transfers", &[]).await?;
    let present: HashSet<String> = rows.iter().map(|r| r.get(0)).collect();
    let lost: Vec<String> = acknowledged
        .iter()
        .filter(|id| !present.contains(*id))
        .cloned()
        .collect();
    let indeterminate_applied = indeterminate
        .iter()
        .filter(|id| present.contains(*id))
        .count();
    let sum: i64 = c
        .query_one(
            "SELECT coalesce(sum(balance), 0)::bigint FROM accounts",
            &[],
        )
        .await?
        .get(0);
    let mismatched: i64 = c
        .query_one(
            &format!(
                "SELECT count(*) FROM accounts a LEFT JOIN (
                   SELECT id, sum(delta) AS d FROM (
                     SELECT src AS id, -amount AS delta FROM transfers
                     UNION ALL SELECT dst, amount FROM transfers) x GROUP BY id) m ON m.id = a.id
                 WHERE a.balance <> {INITIAL_BALANCE} + coalesce(m.d, 0)"
            ),
            &[],
        )
        .await?
        .get(0);
    Ok(Audit {
        primary: ip.to_string(),
        acknowledged: acknowledged.len(),
        present: acknowledged.len() - lost.len(),
        rpo_zero: lost.is_empty(),
        lost,
        indeterminate: indeterminate.len(),
        indeterminate_applied,
        balance_sum: sum,
        balances_conserved: sum == TOTAL,
        balances_match_transfers: mismatched == 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_come_from_acknowledgement_times() {
        let r = LoadResult {
            ack_times_us: vec![0, 10_000, 20_000, 900_000, 910_000],
            ..Default::default()
        };
        let g = r.write_gaps(Duration::from_millis(100));
        assert_eq!(g, vec![Interval::new(20_000, 900_000)]);
    }

    #[test]
    fn merged_runs_count_every_transaction_over_the_summed_time() {
        let run = |ids: &[&str], lat: &[u64], seconds: f64, started_us: u64| {
            let mut r = LoadResult {
                acknowledged: ids.iter().map(|s| s.to_string()).collect(),
                latencies_us: lat.to_vec(),
                seconds,
                started_us,
                errors: 1,
                ..Default::default()
            };
            r.summarise();
            r
        };
        let a = run(&["a1", "a2", "a3"], &[1_000, 1_000, 1_000], 1.0, 7);
        let b = run(&["b1"], &[9_000], 3.0, 99);
        assert_eq!(a.ptrx, 3.0);
        let m = LoadResult::merge(&[a, b]);
        assert_eq!(m.acknowledged.len(), 4);
        assert_eq!(m.ptrx, 1.0, "4 transactions in 4 s");
        assert_eq!(m.errors, 2);
        assert_eq!(m.started_us, 7);
        assert!((m.tatrxn_p50_ms - 1.0).abs() < 0.01, "{}", m.tatrxn_p50_ms);
        assert!((m.tatrxn_p99_ms - 9.0).abs() < 0.01, "{}", m.tatrxn_p99_ms);
    }
}
