//! The HA manager's keys in etcd, and a thin client with a deadline on every call (an agent
//! in a partitioned site must never block on its minority etcd member).

use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, PutOptions,
    TlsOptions, Txn, TxnOp,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::decide::{ManualFailover, MemberReport, Switchover, SyncState};

/// One call's deadline.
pub const CALL_TIMEOUT: Duration = Duration::from_millis(400);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("etcd: {0}")]
    Etcd(Box<etcd_client::Error>),
    #[error("etcd did not answer within {} ms", CALL_TIMEOUT.as_millis())]
    Timeout,
    #[error("bad JSON under {key}: {source}")]
    Json {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    /// A file of the client's etcd credentials cannot be read.
    #[error("cannot read the etcd credential {}: {source}", path.display())]
    Credential {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What a client shows etcd, which serves TLS only and requires a client certificate
/// signed by the zone CA (`--client-cert-auth`): the CA to check the member, and the
/// client's certificate and key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Credentials {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Credentials {
    fn tls(&self) -> Result<TlsOptions, StoreError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| StoreError::Credential {
                path: path.to_path_buf(),
                source,
            })
        };
        Ok(TlsOptions::new()
            .ca_certificate(Certificate::from_pem(read(&self.ca)?))
            .identity(Identity::from_pem(read(&self.cert)?, read(&self.key)?)))
    }

    fn options(&self) -> Result<ConnectOptions, StoreError> {
        Ok(ConnectOptions::new()
            .with_tls(self.tls()?)
            .with_connect_timeout(Duration::from_millis(500))
            .with_timeout(CALL_TIMEOUT))
    }
}

impl StoreError {
    /// Worth retrying at once: a deadline, or gRPC's UNAVAILABLE (etcd's "leader changed"
    /// while raft leadership moves), CANCELLED or DEADLINE_EXCEEDED.
    pub fn is_transient(&self) -> bool {
        // gRPC status codes (tonic::Code, which etcd-client does not re-export).
        const CANCELLED: i32 = 1;
        const DEADLINE_EXCEEDED: i32 = 4;
        const UNAVAILABLE: i32 = 14;
        match self {
            StoreError::Timeout => true,
            StoreError::Etcd(e) => match e.as_ref() {
                etcd_client::Error::GRpcStatus(s) => {
                    let code: i32 = s.code().into();
                    [CANCELLED, DEADLINE_EXCEEDED, UNAVAILABLE].contains(&code)
                }
                _ => false,
            },
            StoreError::Json { .. } | StoreError::Credential { .. } => false,
        }
    }
}

impl From<etcd_client::Error> for StoreError {
    fn from(e: etcd_client::Error) -> StoreError {
        StoreError::Etcd(Box::new(e))
    }
}

/// The leader key's value. The key lives on the leader agent's lease.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Leader {
    pub site: String,
    pub lease: i64,
    pub since_ms: u64,
}

/// One entry of the audit log: an unprotected window (async fallback) or a failover.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub kind: String,
    pub primary: String,
    pub start_ms: u64,
    pub end_ms: Option<u64>,
    pub reason: String,
    /// Failover: bytes of WAL the old primary had that the new one lacks (grey data at risk).
    #[serde(default)]
    pub grey_bytes: Option<u64>,
}

/// Everything under the platform's prefix, read at once.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Snapshot {
    pub leader: Option<Leader>,
    pub sync: Option<SyncState>,
    pub members: Vec<MemberReport>,
    pub primary_lsn: Option<u64>,
    pub audit: Vec<AuditEntry>,
    /// The policy set at run time (`dczone db policy`), overriding the zone file's tier.
    pub tier: Option<String>,
    /// A planned switchover in progress (`dczone db switchover`).
    pub switchover: Option<Switchover>,
    /// A manual failover ordered by `dczone db failover`, not yet carried out.
    pub failover: Option<ManualFailover>,
    /// The highest timeline a promotion has reserved.
    pub timeline: Option<u32>,
}

/// One etcd member's own answer to a status request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MemberStatus {
    pub member_id: u64,
    /// 0 if the member knows no leader.
    pub raft_leader: u64,
    pub raft_term: u64,
}

/// Key layout: `/dczone/<lab>/db/{leader,sync,tier,switchover,failover,primary_lsn,timeline,members/<site>,audit/<ms>}`.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(lab: &str) -> Keys {
        Keys {
            prefix: format!("/dczone/{lab}/db/"),
        }
    }
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    pub fn leader(&self) -> String {
        format!("{}leader", self.prefix)
    }
    pub fn sync(&self) -> String {
        format!("{}sync", self.prefix)
    }
    pub fn tier(&self) -> String {
        format!("{}tier", self.prefix)
    }
    pub fn switchover(&self) -> String {
        format!("{}switchover", self.prefix)
    }
    pub fn failover(&self) -> String {
        format!("{}failover", self.prefix)
    }
    pub fn primary_lsn(&self) -> String {
        format!("{}primary_lsn", self.prefix)
    }
    /// The highest timeline a promotion has reserved (see [`crate::decide::next_timeline`]).
    pub fn timeline(&self) -> String {
        format!("{}timeline", self.prefix)
    }
    pub fn member(&self, site: &str) -> String {
        format!("{}members/{site}", self.prefix)
    }
    pub fn audit(&self, start_ms: u64) -> String {
        format!("{}audit/{start_ms:015}", self.prefix)
    }
}

async fn timed<T>(
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(CALL_TIMEOUT, f)
        .await
        .map_err(|_| StoreError::Timeout)?
        .map_err(StoreError::from)
}

fn json<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Json {
        key: key.to_string(),
        source,
    })
}

/// An etcd client bound to one lab's keys.
#[derive(Clone)]
pub struct Store {
    pub client: Client,
    pub keys: Keys,
    credentials: Credentials,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("keys", &self.keys).finish()
    }
}

impl Store {
    pub async fn connect(
        lab: &str,
        endpoints: &[String],
        credentials: &Credentials,
    ) -> Result<Store, StoreError> {
        let opts = credentials
            .options()?
            .with_keep_alive(Duration::from_millis(500), Duration::from_millis(500));
        let client = tokio::time::timeout(
            Duration::from_secs(3),
            Client::connect(endpoints, Some(opts)),
        )
        .await
        .map_err(|_| StoreError::Timeout)??;
        Ok(Store {
            client,
            keys: Keys::new(lab),
            credentials: credentials.clone(),
        })
    }

    pub async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let mut c = self.client.clone();
        let resp = timed(c.get(self.keys.prefix(), Some(GetOptions::new().with_prefix()))).await?;
        let mut snap = Snapshot::default();
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key()).to_string();
            let rest = &key[self.keys.prefix().len()..];
            match rest {
                "leader" => snap.leader = Some(json(&key, kv.value())?),
                "sync" => snap.sync = Some(json(&key, kv.value())?),
                "primary_lsn" => snap.primary_lsn = Some(json(&key, kv.value())?),
                "tier" => snap.tier = Some(json(&key, kv.value())?),
                "switchover" => snap.switchover = Some(json(&key, kv.value())?),
                "failover" => snap.failover = Some(json(&key, kv.value())?),
                "timeline" => snap.timeline = Some(json(&key, kv.value())?),
                r if r.starts_with("members/") => snap.members.push(json(&key, kv.value())?),
                r if r.starts_with("audit/") => snap.audit.push(json(&key, kv.value())?),
                _ => {}
            }
        }
        Ok(snap)
    }

    pub async fn put_json<T: Serialize>(
        &self,
        key: &str,
        value: &T,
        lease: Option<i64>,
    ) -> Result<(), StoreError> {
        let mut c = self.client.clone();
        let opts = lease.map(|l| PutOptions::new().with_lease(l));
        let body = serde_json::to_vec(value).expect("serializable");
        timed(c.put(key, body, opts)).await.map(|_| ())
    }

    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let mut c = self.client.clone();
        timed(c.delete(key, None)).await.map(|_| ())
    }

    /// Creates the leader key if nobody holds it. Returns whether we won.
    pub async fn campaign(&self, leader: &Leader) -> Result<bool, StoreError> {
        let mut c = self.client.clone();
        let key = self.keys.leader();
        let body = serde_json::to_vec(leader).expect("serializable");
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                key.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![TxnOp::put(
                key,
                body,
                Some(PutOptions::new().with_lease(leader.lease)),
            )]);
        Ok(timed(c.txn(txn)).await?.succeeded())
    }

    /// Writes `key` only while `leader` still holds the leader key: a deposed primary's
    /// writes are refused by etcd itself.
    pub async fn put_as_leader<T: Serialize>(
        &self,
        leader: &Leader,
        key: &str,
        value: &T,
    ) -> Result<bool, StoreError> {
        let body = serde_json::to_vec(value).expect("serializable");
        self.as_leader(leader, vec![TxnOp::put(key, body, None)])
            .await
    }

    /// Writes every `(key, JSON)` at once (one transaction), only while `leader` still
    /// holds the leader key: a reader sees all of them or none.
    pub async fn put_all_as_leader(
        &self,
        leader: &Leader,
        writes: Vec<(String, Vec<u8>)>,
    ) -> Result<bool, StoreError> {
        let ops = writes
            .into_iter()
            .map(|(k, v)| TxnOp::put(k, v, None))
            .collect();
        self.as_leader(leader, ops).await
    }

    /// Deletes `key` only while `leader` still holds the leader key.
    pub async fn delete_as_leader(&self, leader: &Leader, key: &str) -> Result<bool, StoreError> {
        self.as_leader(leader, vec![TxnOp::delete(key, None)]).await
    }

    /// Runs `ops` in a transaction conditional on `leader` holding the leader key.
    async fn as_leader(&self, leader: &Leader, ops: Vec<TxnOp>) -> Result<bool, StoreError> {
        let mut c = self.client.clone();
        let me = serde_json::to_vec(leader).expect("serializable");
        let txn = Txn::new()
            .when(vec![Compare::value(
                self.keys.leader(),
                CompareOp::Equal,
                me,
            )])
            .and_then(ops);
        Ok(timed(c.txn(txn)).await?.succeeded())
    }

    /// Gives up the leader key (planned switchover): deletes it only if it is still ours.
    pub async fn resign(&self, leader: &Leader) -> Result<bool, StoreError> {
        self.delete_as_leader(leader, &self.keys.leader()).await
    }

    /// Moves etcd's raft leadership to a member whose client URL is in `home` (the first one
    /// listed that etcd knows), unless a member of `home` leads already. Returns whether it
    /// moved.
    ///
    /// Where raft leadership sits decides what a disaster costs: when the raft leader's
    /// site is lost, etcd elects another and refreshes every lease to a full TTL (etcd's
    /// lessor `Promote`), so the lost primary's leader key outlives it by an election plus
    /// a TTL. With leadership at the witness, no data site's loss costs an election.
    pub async fn move_etcd_leadership_to(&self, home: &[String]) -> Result<bool, StoreError> {
        let mut c = self.client.clone();
        let st = timed(c.status()).await?;
        let leader = st.leader();
        if leader == 0 {
            return Ok(false);
        }
        let list = timed(c.member_list()).await?;
        let in_home = |m: &&etcd_client::Member| m.client_urls().iter().any(|u| home.contains(u));
        let Some(target) = list.members().iter().find(in_home).map(|m| m.id()) else {
            return Ok(false);
        };
        if list
            .members()
            .iter()
            .filter(in_home)
            .any(|m| m.id() == leader)
        {
            return Ok(false);
        }
        let Some(l) = list.members().iter().find(|m| m.id() == leader) else {
            return Ok(false);
        };
        let urls = l.client_urls().to_vec();
        let opts = self.credentials.options()?;
        let mut lc = tokio::time::timeout(CALL_TIMEOUT, Client::connect(urls, Some(opts)))
            .await
            .map_err(|_| StoreError::Timeout)??;
        timed(lc.move_leader(target)).await?;
        Ok(true)
    }

    /// Asks one etcd member, alone, for its status: whether it answers and whom it follows.
    pub async fn member_status(
        endpoint: &str,
        credentials: &Credentials,
    ) -> Result<MemberStatus, StoreError> {
        let opts = credentials.options()?;
        let mut c = tokio::time::timeout(
            Duration::from_secs(1),
            Client::connect([endpoint], Some(opts)),
        )
        .await
        .map_err(|_| StoreError::Timeout)??;
        let st = timed(c.status()).await?;
        Ok(MemberStatus {
            member_id: st.header().map(|h| h.member_id()).unwrap_or(0),
            raft_leader: st.leader(),
            raft_term: st.raft_term(),
        })
    }

    /// Adds a member to the cluster (etcd's runtime reconfiguration: the new member must
    /// then start with an empty data directory and `--initial-cluster-state existing`).
    pub async fn member_add(&self, peer_url: &str) -> Result<(), StoreError> {
        let mut c = self.client.clone();
        timed(c.member_add([peer_url.to_string()], None))
            .await
            .map(|_| ())
    }

    /// The peer URLs of the cluster's members.
    pub async fn member_peer_urls(&self) -> Result<Vec<String>, StoreError> {
        let mut c = self.client.clone();
        let list = timed(c.member_list()).await?;
        Ok(list
            .members()
            .iter()
            .flat_map(|m| m.peer_urls().to_vec())
            .collect())
    }

    /// What the leader's consensus calls cost from here: `n` lease renewals (keep-alive
    /// round trips) and `n` writes shaped like a leader-conditional write (a transaction
    /// comparing a key's value, then putting), each timed in ms. Leaves nothing behind.
    pub async fn call_latency(&self, n: usize) -> Result<(Vec<f64>, Vec<f64>), StoreError> {
        let mut c = self.client.clone();
        let lease = timed(c.lease_grant(10, None)).await?.id();
        let (mut keeper, mut stream) = timed(c.lease_keep_alive(lease)).await?;
        let key = format!("{}probe", self.keys.prefix());
        timed(c.put(key.clone(), "0", None)).await?;
        let (mut renew, mut write) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for i in 0..n {
            let t = std::time::Instant::now();
            timed(keeper.keep_alive()).await?;
            timed(stream.message()).await?;
            renew.push(t.elapsed().as_secs_f64() * 1e3);
            let t = std::time::Instant::now();
            let txn = Txn::new()
                .when(vec![Compare::value(
                    key.clone(),
                    CompareOp::Equal,
                    i.to_string(),
                )])
                .and_then(vec![TxnOp::put(key.clone(), (i + 1).to_string(), None)]);
            timed(c.txn(txn)).await?;
            write.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let _ = timed(c.delete(key, None)).await;
        let _ = timed(c.lease_revoke(lease)).await;
        Ok((renew, write))
    }

    pub async fn delete_prefix(&self) -> Result<(), StoreError> {
        let mut c = self.client.clone();
        timed(c.delete(
            self.keys.prefix(),
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        ))
        .await
        .map(|_| ())
    }
}
