//! One PostgreSQL 15 member of the database platform: its files, its configuration, and the
//! operations the HA agent and `dczone db` perform on it (initdb, base backup, start,
//! promote, repoint, rewind, inspect).
//!
//! PostgreSQL refuses to run as root, so every server-side binary runs as the `postgres`
//! user. The agent talks to its own member over the member's unix socket; members and
//! clients talk to each other over the lab network (the APN emulator).
//!
//! Access: `pg_hba.conf` admits the members (replication and clients) and the hosts of the
//! database's sites as `postgres`, each by its own address; a guest's address never as
//! `postgres`. Application servers (guests) sign in as the application role [`APP_ROLE`],
//! from the zone's application networks, to the ledger database only.
//! Every network connection is TLS (`hostssl`: the member serves its host's zone
//! certificate, clients verify it against the zone CA and the member's address) and
//! authenticates with SCRAM-SHA-256 as `postgres`, whose password lives in a libpq password
//! file ([`ensure_passfile`]). Members name both files in their connection strings
//! (`sslrootcert=`, `passfile=`); clients find them as libpq does, through `PGSSLROOTCERT`
//! and `PGPASSFILE` ([`client_tls`], [`client_password`]). The unix socket (the member's
//! own agent) stays `trust`.

use std::ffi::CString;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

pub use dczone_zone::database::app_name;
use serde::Serialize;

/// Where Debian keeps the PostgreSQL 15 server binaries.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
pub const PORT: u16 = 5432;
/// The ledger's database.
pub const DATABASE: &str = "ledger";

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("PostgreSQL 15 is not installed ({PG_BIN}/postgres missing); run `apt-get install postgresql-15`")]
    NotInstalled,
    #[error("the `postgres` user does not exist; install PostgreSQL (it creates the user)")]
    NoPostgresUser,
    #[error("{what} failed: {detail}")]
    Step { what: String, detail: String },
    #[error("{what} failed")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("SQL on {member}: {detail}")]
    Sql { member: String, detail: String },
    #[error("{member} did not answer within {ms} ms")]
    Timeout { member: String, ms: u64 },
}

/// One member: a site's PostgreSQL server.
#[derive(Debug, Clone, Serialize)]
pub struct Member {
    pub site: String,
    /// Its `application_name` on the primary (site id without dots).
    pub app: String,
    pub host: String,
    pub namespace: String,
    pub ip: Ipv4Addr,
    /// `<lab dir>/db/<site>`: data, socket directory and log.
    pub dir: PathBuf,
    /// The libpq password file holding `postgres`'s password ([`ensure_passfile`]).
    pub passfile: PathBuf,
    /// The zone CA's certificate, readable by `postgres`: what the member's own client
    /// connections (walreceiver, pg_basebackup, pg_rewind) verify the others against.
    pub ca: PathBuf,
}

/// The application role: what an application server (a guest) signs in as. It may read and
/// write the ledger's tables and nothing else ([`Admitted::apps`]).
pub const APP_ROLE: &str = "ap";

/// An IPv4 network in CIDR form (`10.77.2.0/24`), as `pg_hba.conf` takes it; `None` for
/// anything else (a bare address, a name, `all`, a stray newline).
pub fn network(text: &str) -> Option<String> {
    let (ip, len) = text.split_once('/')?;
    let ip: Ipv4Addr = ip.parse().ok()?;
    let len: u8 = len.parse().ok().filter(|l| *l <= 32)?;
    Some(format!("{ip}/{len}"))
}

/// Who may connect over the network: the members (replication too) and the client hosts,
/// as `postgres`; and the application networks, as [`APP_ROLE`] to the ledger only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Admitted {
    pub members: Vec<Ipv4Addr>,
    pub clients: Vec<Ipv4Addr>,
    /// Networks (CIDR) whose application servers may use the ledger as [`APP_ROLE`].
    pub apps: Vec<String>,
}

impl Admitted {
    /// The `pg_hba.conf` lines: `postgres` by address (`/32`), the application role by
    /// network to the ledger only; TLS and SCRAM everywhere. Written at initdb: a platform
    /// made before the application networks existed gets them when it is made anew.
    pub fn hba(&self) -> String {
        let mut out = String::from(
            "\n# dczone: the members and the database sites' hosts, each by its address; \
             applications to the ledger only; TLS and SCRAM only\n",
        );
        for ip in &self.members {
            out.push_str(&format!(
                "hostssl replication postgres {ip}/32 scram-sha-256\n"
            ));
        }
        let mut all: Vec<Ipv4Addr> = self.members.clone();
        all.extend(self.clients.iter().filter(|c| !self.members.contains(c)));
        for ip in all {
            out.push_str(&format!("hostssl all postgres {ip}/32 scram-sha-256\n"));
        }
        for net in &self.apps {
            out.push_str(&format!(
                "hostssl {DATABASE} {APP_ROLE} {net} scram-sha-256\n"
            ));
        }
        out
    }
}

/// Creates the password file at `path` unless it exists: one line
/// `*:*:*:postgres:PASSWORD` (libpq's format), a fresh random password, mode 0600, owned by
/// `postgres` (libpq refuses a file others can read; the server's walreceiver and
/// `pg_basebackup` read it as `postgres`).
pub fn ensure_passfile(path: &Path) -> Result<(), DbError> {
    if path.exists() {
        return Ok(());
    }
    install_password(path, &random_password()?).map(|_| ())
}

/// A fresh random password (24 bytes from /dev/urandom, in hex).
pub fn random_password() -> Result<String, DbError> {
    let mut raw = [0u8; 24];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").map_err(|source| DbError::Io {
            what: "open /dev/urandom".into(),
            source,
        })?,
        &mut raw,
    )
    .map_err(|source| DbError::Io {
        what: "read /dev/urandom".into(),
        source,
    })?;
    Ok(raw.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes the password file at `path` with `password` (as [`ensure_passfile`] does) unless
/// one exists; whether it wrote it. An existing file is never replaced: if it holds another
/// password, that is an error (a member must not change the platform's password).
pub fn install_password(path: &Path, password: &str) -> Result<bool, DbError> {
    let io = |what: String| move |source| DbError::Io { what, source };
    if password.is_empty() || password.contains(['\n', ':']) {
        return Err(DbError::Step {
            what: format!("install the database password in {}", path.display()),
            detail: "a password must be non-empty, on one line, without ':'".into(),
        });
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
    }
    let existing = || match read_password(path) {
        Ok(p) if p == password => Ok(false),
        Ok(_) => Err(DbError::Step {
            what: format!("install the database password in {}", path.display()),
            detail: "it holds another password: the platform's, which is kept".into(),
        }),
        Err(e) => Err(e),
    };
    if path.exists() {
        return existing();
    }
    // Per process: members start at once.
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    write_private(&tmp, &format!("*:*:*:postgres:{password}\n"))
        .map_err(io(format!("write {}", tmp.display())))?;
    chown_postgres(&tmp)?;
    // Never replaces one a concurrent `db up` made first.
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => existing(),
        Err(e) => Err(io(format!("create {}", path.display()))(e)),
    }
}

/// `postgres`'s password from a libpq password file (the first line for user `postgres`).
pub fn read_password(path: &Path) -> Result<String, DbError> {
    let text = std::fs::read_to_string(path).map_err(|source| DbError::Io {
        what: format!("read the database password file {}", path.display()),
        source,
    })?;
    password_in(&text).ok_or_else(|| DbError::Step {
        what: format!("read the database password file {}", path.display()),
        detail: "no line for user postgres (expected *:*:*:postgres:PASSWORD)".into(),
    })
}

/// Writes `text` to a new file `path` readable by its owner only (mode 0600 from its
/// creation: a password never sits in a file others could open).
pub fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    std::io::Write::write_all(&mut f, text.as_bytes())
}

/// `postgres`'s password in the text of a libpq password file.
pub fn password_in(text: &str) -> Option<String> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let f: Vec<&str> = l.splitn(5, ':').collect();
        (f.len() == 5 && (f[3] == "postgres" || f[3] == "*")).then(|| f[4].to_string())
    })
}

/// A TLS connector that trusts only the zone CA in `ca` (rustls verifies the member's
/// certificate against the address connected to, as libpq's `verify-full` does).
pub fn tls_connector(ca: &Path) -> Result<tokio_postgres_rustls::MakeRustlsConnect, DbError> {
    let config = dczone_pki::tls::client_config(ca, None).map_err(|e| DbError::Step {
        what: format!("load the zone CA {}", ca.display()),
        detail: e.to_string(),
    })?;
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(
        (*config).clone(),
    ))
}

/// The TLS connector a client uses, its CA found as libpq finds it: in `PGSSLROOTCERT`.
pub fn client_tls() -> Result<tokio_postgres_rustls::MakeRustlsConnect, DbError> {
    let ca = std::env::var_os("PGSSLROOTCERT").ok_or_else(|| DbError::Step {
        what: "connect to the database".into(),
        detail: "PGSSLROOTCERT is not set; point it at the zone CA's certificate".into(),
    })?;
    tls_connector(Path::new(&ca))
}

/// The password a client uses, found as libpq finds it: in the file `PGPASSFILE` names.
/// `None` without one (the server then refuses the connection, naming the user).
pub fn client_password() -> Option<String> {
    let path = std::env::var_os("PGPASSFILE")?;
    read_password(Path::new(&path)).ok()
}

fn postgres_ids() -> Result<(u32, u32), DbError> {
    let name = CString::new("postgres").expect("no NUL");
    // SAFETY: getpwnam with a valid C string; we copy the ids out before any other call.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return Err(DbError::NoPostgresUser);
    }
    // SAFETY: pw is non-null and points to libc's static passwd record.
    Ok(unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
}

/// A command that runs as the `postgres` user.
pub fn as_postgres(program: &str) -> Result<Command, DbError> {
    let path = Path::new(PG_BIN).join(program);
    if !path.exists() {
        return Err(DbError::NotInstalled);
    }
    let (uid, gid) = postgres_ids()?;
    let mut cmd = Command::new(path);
    cmd.uid(uid).gid(gid).env("HOME", "/tmp").current_dir("/");
    Ok(cmd)
}

fn run(what: &str, cmd: &mut Command) -> Result<String, DbError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| DbError::Io {
            what: what.to_string(),
            source,
        })?;
    if out.status.success() {
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    } else {
        let mut detail = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if detail.is_empty() {
            detail = String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        Err(DbError::Step {
            what: what.to_string(),
            detail,
        })
    }
}

fn chown_postgres(path: &Path) -> Result<(), DbError> {
    let (uid, gid) = postgres_ids()?;
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(|source| DbError::Io {
        what: format!("chown {}", path.display()),
        source,
    })
}

impl Member {
    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn socket_dir(&self) -> PathBuf {
        self.dir.join("sock")
    }

    pub fn log(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    pub fn initialized(&self) -> bool {
        self.data().join("PG_VERSION").exists()
    }

    /// How other members reach this one (libpq: the walreceiver, pg_basebackup, pg_rewind).
    pub fn remote_conninfo(&self, app: &str) -> String {
        format!(
            "host={} port={PORT} user=postgres passfile={} sslmode=verify-full sslrootcert={} \
             application_name={app} connect_timeout=2",
            self.ip,
            self.passfile.display(),
            self.ca.display()
        )
    }

    /// How a client on another host reaches this member's `dbname`.
    pub fn remote_config(&self, dbname: &str, app: &str) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host(self.ip.to_string())
            .port(PORT)
            .user("postgres")
            .dbname(dbname)
            .application_name(app)
            .ssl_mode(tokio_postgres::config::SslMode::Require)
            .connect_timeout(Duration::from_secs(1));
        if let Ok(pw) = read_password(&self.passfile) {
            c.password(pw);
        }
        c
    }

    /// The member's TLS files: its host's zone certificate and key, owned by `postgres`.
    pub fn tls_dir(&self) -> PathBuf {
        self.dir.join("tls")
    }

    /// Installs the certificate and key the member serves (its host's zone certificate).
    pub fn install_tls(&self, cert: &Path, key: &Path) -> Result<(), DbError> {
        let dir = self.tls_dir();
        let io = |what: String| move |source| DbError::Io { what, source };
        std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
        chown_postgres(&dir)?;
        for (from, to) in [(cert, "server.crt"), (key, "server.key")] {
            let dest = dir.join(to);
            let tmp = dir.join(format!(".{to}.tmp"));
            // std::fs::copy keeps the key's mode (0600); PostgreSQL refuses a key others
            // can read.
            std::fs::copy(from, &tmp).map_err(io(format!("copy {}", from.display())))?;
            chown_postgres(&tmp)?;
            std::fs::rename(&tmp, &dest).map_err(io(format!("write {}", dest.display())))?;
        }
        Ok(())
    }

    /// How the member's own agent reaches it (unix socket).
    pub fn local_config(&self, dbname: &str) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host_path(self.socket_dir())
            .port(PORT)
            .user("postgres")
            .dbname(dbname)
            .application_name("dczone-ha")
            .connect_timeout(Duration::from_secs(2));
        c
    }

    fn prepare_dirs(&self) -> Result<(), DbError> {
        for d in [self.dir.clone(), self.socket_dir()] {
            std::fs::create_dir_all(&d).map_err(|source| DbError::Io {
                what: format!("create {}", d.display()),
                source,
            })?;
            chown_postgres(&d)?;
        }
        Ok(())
    }

    /// `initdb` plus our configuration (the primary of a new platform); `admitted` becomes
    /// `pg_hba.conf`, which the other members copy with the data.
    pub fn initdb(&self, admitted: &Admitted) -> Result<(), DbError> {
        self.prepare_dirs()?;
        let password = read_password(&self.passfile)?;
        let pwfile = self.dir.join("initdb.pw");
        std::fs::write(&pwfile, format!("{password}\n")).map_err(|source| DbError::Io {
            what: format!("write {}", pwfile.display()),
            source,
        })?;
        chown_postgres(&pwfile)?;
        let done = run(
            &format!("initdb for {}", self.site),
            as_postgres("initdb")?
                .arg("-D")
                .arg(self.data())
                .arg(format!("--pwfile={}", pwfile.display()))
                .args([
                    "-U",
                    "postgres",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                    // A standby that follows a new timeline restarts streaming at the start of
                    // the WAL segment holding the fork, so after every failover or switchover it
                    // fetches up to one segment again across the WAN before it can confirm a
                    // commit. 1 MiB segments instead of 16 keep that short (measured in
                    // BENCHMARKS.md, `bench switchover`).
                    "--wal-segsize=1",
                ]),
        );
        let _ = std::fs::remove_file(&pwfile);
        done?;
        self.configure(admitted)
    }

    /// Appends dczone's settings and access rules. Settings that differ per member
    /// (addresses, socket) are on the postmaster's command line instead, because pg_rewind
    /// and pg_basebackup copy these files from another member. Settings the HA agent changes at run
    /// time (synchronous_standby_names, primary_conninfo) live in postgresql.auto.conf.
    fn configure(&self, admitted: &Admitted) -> Result<(), DbError> {
        let conf = format!(
            "\n# dczone\n\
             port = {PORT}\n\
             max_connections = 200\n\
             shared_buffers = 128MB\n\
             wal_level = replica\n\
             max_wal_senders = 10\n\
             wal_keep_size = 512MB\n\
             # pg_rewind of a fenced old primary needs hint bits in WAL\n\
             wal_log_hints = on\n\
             hot_standby = on\n\
             # a silent standby is dropped by the HA agent, not by these timeouts\n\
             wal_sender_timeout = 5s\n\
             wal_receiver_timeout = 5s\n\
             wal_receiver_status_interval = 1s\n\
             wal_retrieve_retry_interval = 200ms\n\
             recovery_target_timeline = 'latest'\n\
             synchronous_commit = on\n\
             logging_collector = off\n\
             log_line_prefix = '%m [%p] '\n",
        );
        let hba = admitted.hba();
        for (file, text) in [("postgresql.conf", conf.as_str()), ("pg_hba.conf", &hba)] {
            let path = self.data().join(file);
            let mut old = std::fs::read_to_string(&path).map_err(|source| DbError::Io {
                what: format!("read {}", path.display()),
                source,
            })?;
            if !old.contains("# dczone") {
                old.push_str(text);
                std::fs::write(&path, old).map_err(|source| DbError::Io {
                    what: format!("write {}", path.display()),
                    source,
                })?;
            }
        }
        Ok(())
    }

    /// Copies `upstream` with pg_basebackup and makes this member its standby.
    pub fn basebackup(&self, upstream: &Member) -> Result<(), DbError> {
        self.prepare_dirs()?;
        let _ = std::fs::remove_dir_all(self.data());
        run(
            &format!("pg_basebackup of {} from {}", self.site, upstream.site),
            as_postgres("pg_basebackup")?
                .arg("-d")
                // Not the standby's own name: the copy's WAL stream must never count as
                // the synchronous standby.
                .arg(upstream.remote_conninfo(&format!("{}_copy", self.app)))
                .arg("-D")
                .arg(self.data())
                .args(["-X", "stream", "-c", "fast"]),
        )?;
        self.follow(upstream)
    }

    /// Offline: makes this member a standby of `upstream` on its next start.
    pub fn follow(&self, upstream: &Member) -> Result<(), DbError> {
        let signal = self.data().join("standby.signal");
        std::fs::write(&signal, "").map_err(|source| DbError::Io {
            what: format!("write {}", signal.display()),
            source,
        })?;
        chown_postgres(&signal)?;
        let auto = self.data().join("postgresql.auto.conf");
        let text = std::fs::read_to_string(&auto).unwrap_or_default();
        let mut kept: Vec<&str> = text
            .lines()
            .filter(|l| {
                !l.starts_with("primary_conninfo") && !l.starts_with("synchronous_standby_names")
            })
            .collect();
        let line = format!(
            "primary_conninfo = '{}'",
            upstream.remote_conninfo(&self.app)
        );
        kept.push(&line);
        std::fs::write(&auto, kept.join("\n") + "\n").map_err(|source| DbError::Io {
            what: format!("write {}", auto.display()),
            source,
        })?;
        chown_postgres(&auto)
    }

    /// The postmaster command; the agent spawns it (and ties its life to the agent's).
    pub fn postgres_command(&self) -> Result<Command, DbError> {
        let mut cmd = as_postgres("postgres")?;
        cmd.arg("-D")
            .arg(self.data())
            .arg("-c")
            .arg(format!("listen_addresses={}", self.ip))
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.socket_dir().display()
            ))
            .args(["-c", "ssl=on", "-c"])
            .arg(format!(
                "ssl_cert_file={}",
                self.tls_dir().join("server.crt").display()
            ))
            .arg("-c")
            .arg(format!(
                "ssl_key_file={}",
                self.tls_dir().join("server.key").display()
            ));
        Ok(cmd)
    }

    /// Rewinds a stopped member onto `source`'s timeline, then makes it follow; returns
    /// pg_rewind's report. pg_rewind first finishes crash recovery in single-user mode,
    /// which refuses standby mode, so the standby signal goes until the rewind is done.
    /// After a clean shutdown: where the shutdown checkpoint record starts (every commit
    /// lies before it). `None` if the cluster was not shut down cleanly.
    pub fn shutdown_checkpoint(&self) -> Result<Option<u64>, DbError> {
        let out = run(
            &format!("pg_controldata of {}", self.site),
            as_postgres("pg_controldata")?.arg("-D").arg(self.data()),
        )?;
        Ok(parse_shutdown_checkpoint(&out))
    }

    /// Reads a *stopped* member's WAL from `from_lsn` to its end with `pg_waldump`: where
    /// its last commit record ends, and how many commits lie at or after `from_lsn`. Nothing
    /// is written (a crash recovery would append a checkpoint). `from_lsn` older than the
    /// WAL the member kept is read from its latest checkpoint's REDO point instead
    /// (`complete` then says the count may be short).
    pub fn wal_tail(&self, from_lsn: u64) -> Result<WalTail, DbError> {
        wal_tail(&self.site, &self.data(), from_lsn)
    }

    /// The timelines whose history files are in this member's `pg_wal`.
    pub fn history_timelines(&self) -> Result<Vec<u32>, DbError> {
        let dir = self.data().join("pg_wal");
        let entries = std::fs::read_dir(&dir).map_err(|source| DbError::Io {
            what: format!("read {}", dir.display()),
            source,
        })?;
        Ok(entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                let tli = name.strip_suffix(".history")?;
                (tli.len() == 8).then(|| u32::from_str_radix(tli, 16).ok())?
            })
            .collect())
    }

    /// Writes a placeholder history file for a timeline another member created, so that
    /// this member's promotion skips its number. It holds only a comment, which PostgreSQL's
    /// history parser skips; the member never recovers along that timeline.
    pub fn reserve_timeline(&self, tli: u32, why: &str) -> Result<(), DbError> {
        let path = self
            .data()
            .join("pg_wal")
            .join(format!("{tli:08X}.history"));
        std::fs::write(
            &path,
            format!("# timeline {tli} skipped by dczone: {why}\n"),
        )
        .map_err(|source| DbError::Io {
            what: format!("write {}", path.display()),
            source,
        })?;
        chown_postgres(&path)
    }

    pub fn rewind(&self, source: &Member) -> Result<String, DbError> {
        let _ = std::fs::remove_file(self.data().join("standby.signal"));
        let out = run(
            &format!("pg_rewind of {} onto {}", self.site, source.site),
            as_postgres("pg_rewind")?
                .arg("-D")
                .arg(self.data())
                .arg("--source-server")
                .arg(source.remote_conninfo(&self.app)),
        )?;
        self.follow(source)?;
        Ok(out
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect::<Vec<_>>()
            .join(" | "))
    }
}

/// Connects over the member's unix socket with a timeout and drives the connection on the
/// current runtime.
pub async fn connect(
    member: &str,
    config: &tokio_postgres::Config,
    timeout: Duration,
) -> Result<tokio_postgres::Client, DbError> {
    connect_with(member, config, tokio_postgres::NoTls, timeout).await
}

/// [`connect`] over the network, with TLS verified against the zone CA in `ca`.
pub async fn connect_tls(
    member: &str,
    config: &tokio_postgres::Config,
    ca: &Path,
    timeout: Duration,
) -> Result<tokio_postgres::Client, DbError> {
    connect_with(member, config, tls_connector(ca)?, timeout).await
}

async fn connect_with<T>(
    member: &str,
    config: &tokio_postgres::Config,
    tls: T,
    timeout: Duration,
) -> Result<tokio_postgres::Client, DbError>
where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>,
    T::Stream: Send + 'static,
{
    let fut = config.connect(tls);
    let (client, conn) = tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| DbError::Timeout {
            member: member.to_string(),
            ms: timeout.as_millis() as u64,
        })?
        .map_err(sql_err(member))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// What a member reports about itself.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct MemberState {
    pub in_recovery: bool,
    /// Primary: current WAL position. Standby: received-and-flushed position.
    pub lsn: u64,
    pub replay_lsn: u64,
    /// The upstream a standby is streaming from (its walreceiver's sender host).
    pub upstream_ip: Option<String>,
    pub streaming: bool,
}

/// A member as a client reads it directly, without the consensus store: what `db status`
/// shows when etcd has no quorum, and what a manual failover decides on.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct DirectView {
    pub site: String,
    pub ip: String,
    /// "primary", "standby" or "unreachable".
    pub role: String,
    pub timeline: Option<u32>,
    /// Primary: current WAL end. Standby: WAL received (or replayed, if not streaming).
    pub lsn: Option<u64>,
    pub replay_lsn: Option<u64>,
    /// The next transaction id as this member knows it (a standby: as of its replay).
    pub next_xid: Option<u64>,
    pub streaming: Option<bool>,
    pub error: Option<String>,
}

impl DirectView {
    pub fn reachable(&self) -> bool {
        self.role != "unreachable"
    }
}

/// Reads a member's role, timeline and WAL position over the network.
pub async fn direct_view(m: &Member, timeout: Duration) -> DirectView {
    let mut v = DirectView {
        site: m.site.clone(),
        ip: m.ip.to_string(),
        role: "unreachable".into(),
        timeline: None,
        lsn: None,
        replay_lsn: None,
        next_xid: None,
        streaming: None,
        error: None,
    };
    let read = async {
        let c = connect_tls(
            &m.site,
            &m.remote_config("postgres", "dczone-status"),
            &m.ca,
            timeout,
        )
        .await?;
        c.query_one(
            "SELECT pg_is_in_recovery(), \
               CASE WHEN pg_is_in_recovery() \
                    THEN coalesce(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())::text \
                    ELSE pg_current_wal_lsn()::text END, \
               coalesce(pg_last_wal_replay_lsn()::text, '0/0'), \
               CASE WHEN pg_is_in_recovery() \
                    THEN coalesce((SELECT received_tli FROM pg_stat_wal_receiver LIMIT 1), \
                                  (SELECT timeline_id FROM pg_control_checkpoint())) \
                    ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int \
               END, \
               txid_snapshot_xmax(txid_current_snapshot())::text, \
               coalesce((SELECT status = 'streaming' FROM pg_stat_wal_receiver LIMIT 1), false)",
            &[],
        )
        .await
        .map_err(sql_err(&m.site))
    };
    match tokio::time::timeout(timeout * 2, read).await {
        Ok(Ok(row)) => {
            let standby: bool = row.get(0);
            v.role = if standby { "standby" } else { "primary" }.into();
            v.lsn = row.get::<_, Option<&str>>(1).map(parse_lsn);
            v.replay_lsn = Some(parse_lsn(row.get(2)));
            v.timeline = row.get::<_, Option<i32>>(3).map(|t| t as u32);
            v.next_xid = row.get::<_, Option<&str>>(4).and_then(|x| x.parse().ok());
            v.streaming = Some(row.get(5));
        }
        Ok(Err(e)) => v.error = Some(e.to_string()),
        Err(_) => v.error = Some(format!("no answer within {} ms", (timeout * 2).as_millis())),
    }
    v
}

/// One row of pg_stat_replication, as the primary sees a standby.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct ReplicaState {
    pub app: String,
    pub state: String,
    pub sync_state: String,
    pub flush_lsn: u64,
    pub flush_lag_ms: Option<f64>,
    pub replay_lag_ms: Option<f64>,
    /// How long ago the standby last replied (it replies at least every
    /// wal_receiver_status_interval, 1 s): a silent standby keeps its TCP connection.
    pub reply_age_ms: Option<f64>,
}

/// Reads the *stopped* member's WAL in `data` (its data directory) from `from_lsn` to its
/// end with `pg_waldump` (see [`Member::wal_tail`]); `site` names it in errors.
pub fn wal_tail(site: &str, data: &Path, from_lsn: u64) -> Result<WalTail, DbError> {
    let control = run(
        &format!("pg_controldata of {}", site),
        as_postgres("pg_controldata")?.arg("-D").arg(data),
    )?;
    let field = |name: &str| {
        control
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split(':').nth(1).map(|v| v.trim().to_string()))
    };
    let timeline = field("Latest checkpoint's TimeLineID").unwrap_or_else(|| "1".into());
    let redo = field("Latest checkpoint's REDO location")
        .map(|v| parse_lsn(&v))
        .unwrap_or(0);
    let dump = |start: u64| -> Result<String, DbError> {
        let out = as_postgres("pg_waldump")?
            .arg("-p")
            .arg(data.join("pg_wal"))
            .args(["-t", &timeline, "-s", &lsn_text(start)])
            .stdin(Stdio::null())
            .output()
            .map_err(|source| DbError::Io {
                what: format!("pg_waldump of {}", site),
                source,
            })?;
        // pg_waldump always ends with an error at the end of the WAL; no record at all
        // means the start was not readable.
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if text.trim().is_empty() {
            return Err(DbError::Step {
                what: format!("pg_waldump of {} from {}", site, lsn_text(start)),
                detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(text)
    };
    let (text, complete) = match dump(from_lsn) {
        Ok(t) => (t, true),
        Err(_) => (dump(redo.max(from_lsn.min(redo)))?, from_lsn >= redo),
    };
    Ok(parse_waldump(&text, from_lsn, complete))
}

/// What a stopped member's WAL holds past a point (see [`Member::wal_tail`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct WalTail {
    /// Where the last record ends.
    pub end_lsn: u64,
    /// Where the last commit record ends: every commit the member acknowledged lies before.
    pub last_commit_end: Option<u64>,
    /// Commit records at or after the point asked for.
    pub commits_after: u64,
    /// False if the WAL from the point asked for was no longer there.
    pub complete: bool,
}

/// `X/Y` text of an LSN.
pub fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// Parses `pg_waldump` output lines such as
/// `rmgr: Transaction len (rec/tot): 34/ 34, tx: 735, lsn: 0/01534A28, prev 0/015349F0, desc: COMMIT ...`.
pub fn parse_waldump(text: &str, from_lsn: u64, complete: bool) -> WalTail {
    let mut tail = WalTail {
        end_lsn: from_lsn,
        last_commit_end: None,
        commits_after: 0,
        complete,
    };
    for line in text.lines() {
        let Some(lsn) = line
            .split("lsn: ")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .map(parse_lsn)
        else {
            continue;
        };
        let total = line
            .split("rec/tot):")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .and_then(|r| r.split('/').nth(1))
            .and_then(|t| t.trim().parse::<u64>().ok())
            .unwrap_or(0);
        let end = lsn + total;
        tail.end_lsn = tail.end_lsn.max(end);
        if line.contains("desc: COMMIT") {
            tail.last_commit_end = Some(end);
            if lsn >= from_lsn {
                tail.commits_after += 1;
            }
        }
    }
    tail
}

/// Parses PostgreSQL's `X/Y` LSN text.
pub fn parse_lsn(text: &str) -> u64 {
    let mut it = text.split('/');
    let hi = it.next().and_then(|h| u64::from_str_radix(h, 16).ok());
    let lo = it.next().and_then(|l| u64::from_str_radix(l, 16).ok());
    match (hi, lo) {
        (Some(h), Some(l)) => (h << 32) | l,
        _ => 0,
    }
}

/// The server's own message when there is one (tokio-postgres displays only "db error").
/// From `pg_controldata` output: the latest checkpoint's location, if the cluster state is
/// "shut down" (a primary's clean shutdown; a standby's is "shut down in recovery").
pub fn parse_shutdown_checkpoint(controldata: &str) -> Option<u64> {
    let field = |name: &str| {
        controldata
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim_start_matches(':').trim().to_string())
    };
    if field("Database cluster state")?.as_str() != "shut down" {
        return None;
    }
    Some(parse_lsn(&field("Latest checkpoint location")?))
}

pub fn pg_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => e.to_string(),
    }
}

fn sql_err(member: &str) -> impl FnOnce(tokio_postgres::Error) -> DbError + '_ {
    move |e| DbError::Sql {
        member: member.to_string(),
        detail: pg_message(&e),
    }
}

pub async fn member_state(
    member: &str,
    c: &tokio_postgres::Client,
) -> Result<MemberState, DbError> {
    let row = c
        .query_one(
            "SELECT pg_is_in_recovery(), \
               CASE WHEN pg_is_in_recovery() THEN coalesce(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())::text \
                    ELSE pg_current_wal_lsn()::text END, \
               coalesce(pg_last_wal_replay_lsn()::text, '0/0'), \
               (SELECT sender_host FROM pg_stat_wal_receiver LIMIT 1), \
               coalesce((SELECT status = 'streaming' FROM pg_stat_wal_receiver LIMIT 1), false)",
            &[],
        )
        .await
        .map_err(sql_err(member))?;
    Ok(MemberState {
        in_recovery: row.get(0),
        lsn: parse_lsn(row.get::<_, Option<&str>>(1).unwrap_or("0/0")),
        replay_lsn: parse_lsn(row.get(2)),
        upstream_ip: row.get(3),
        streaming: row.get(4),
    })
}

/// The primary's view of its standbys.
pub async fn replicas(
    member: &str,
    c: &tokio_postgres::Client,
) -> Result<Vec<ReplicaState>, DbError> {
    let rows = c
        .query(
            "SELECT application_name, state, sync_state, coalesce(flush_lsn::text, '0/0'), \
               extract(epoch from flush_lag)::float8 * 1000, \
               extract(epoch from replay_lag)::float8 * 1000, \
               extract(epoch from clock_timestamp() - reply_time)::float8 * 1000 \
             FROM pg_stat_replication",
            &[],
        )
        .await
        .map_err(sql_err(member))?;
    Ok(rows
        .iter()
        .map(|r| ReplicaState {
            app: r.get(0),
            state: r.get::<_, Option<String>>(1).unwrap_or_default(),
            sync_state: r.get::<_, Option<String>>(2).unwrap_or_default(),
            flush_lsn: parse_lsn(r.get(3)),
            flush_lag_ms: r.get(4),
            replay_lag_ms: r.get(5),
            reply_age_ms: r.get(6),
        })
        .collect())
}

/// How long the oldest commit has been waiting for synchronous standbys (0 if none waits).
pub async fn oldest_sync_wait_ms(member: &str, c: &tokio_postgres::Client) -> Result<f64, DbError> {
    let row = c
        .query_one(
            "SELECT coalesce(max(extract(epoch from clock_timestamp() - state_change)), 0)::float8 * 1000 \
             FROM pg_stat_activity WHERE wait_event = 'SyncRep'",
            &[],
        )
        .await
        .map_err(sql_err(member))?;
    Ok(row.get(0))
}

/// Sets a run-time setting through ALTER SYSTEM and reloads.
pub async fn set_and_reload(
    member: &str,
    c: &tokio_postgres::Client,
    name: &str,
    value: &str,
) -> Result<(), DbError> {
    let quoted = value.replace('\'', "''");
    // ALTER SYSTEM cannot run inside a transaction block: two round trips.
    c.batch_execute(&format!("ALTER SYSTEM SET {name} = '{quoted}'"))
        .await
        .map_err(sql_err(member))?;
    c.batch_execute("SELECT pg_reload_conf()")
        .await
        .map_err(sql_err(member))
}

/// The setting's value as the server currently applies it.
pub async fn show(member: &str, c: &tokio_postgres::Client, name: &str) -> Result<String, DbError> {
    let row = c
        .query_one(&format!("SHOW {name}"), &[])
        .await
        .map_err(sql_err(member))?;
    Ok(row.get(0))
}

/// The timeline of the member's latest checkpoint (restartpoint on a standby).
pub async fn checkpoint_timeline(member: &str, c: &tokio_postgres::Client) -> Result<u32, DbError> {
    let row = c
        .query_one("SELECT timeline_id FROM pg_control_checkpoint()", &[])
        .await
        .map_err(sql_err(member))?;
    Ok(row.get::<_, i32>(0).max(1) as u32)
}

/// Promotes a standby and waits until it accepts writes.
pub async fn promote(member: &str, c: &tokio_postgres::Client) -> Result<(), DbError> {
    // pg_promote(wait => true) checks for the end of recovery every 100 ms; we look every
    // 5 ms, so the first commit is not held back by the poll.
    let row = c
        .query_one("SELECT pg_promote(false)", &[])
        .await
        .map_err(sql_err(member))?;
    if !row.get::<_, bool>(0) {
        return Err(DbError::Step {
            what: format!("promotion of {member}"),
            detail: "pg_promote refused to signal the postmaster".into(),
        });
    }
    let t = std::time::Instant::now();
    while t.elapsed() < Duration::from_secs(30) {
        let row = c
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .map_err(sql_err(member))?;
        if !row.get::<_, bool>(0) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Err(DbError::Step {
        what: format!("promotion of {member}"),
        detail: "still in recovery 30 s after pg_promote".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waldump_lines_give_the_last_commit_and_the_commits_after_a_point() {
        let text = "rmgr: Heap        len (rec/tot):     54/    54, tx:        735, lsn: 0/01534990, prev 0/01534958, desc: INSERT off 3\n\
rmgr: Transaction len (rec/tot):     34/    34, tx:        735, lsn: 0/015349F0, prev 0/01534990, desc: COMMIT 2026-12-01 23:00:00.1 UTC\n\
rmgr: Transaction len (rec/tot):     34/    34, tx:        736, lsn: 0/01534A28, prev 0/015349F0, desc: COMMIT 2026-12-01 23:00:00.2 UTC\n\
rmgr: Standby     len (rec/tot):     50/    50, tx:          0, lsn: 0/01534A50, prev 0/01534A28, desc: RUNNING_XACTS\n";
        let t = parse_waldump(text, 0x0153_4A00, true);
        assert_eq!(t.last_commit_end, Some(0x0153_4A28 + 34));
        assert_eq!(t.commits_after, 1);
        assert_eq!(t.end_lsn, 0x0153_4A50 + 50);
    }

    #[test]
    fn shutdown_checkpoint_only_after_a_clean_shutdown() {
        let clean = "pg_control version number:            1300\n\
                     Database cluster state:               shut down\n\
                     Latest checkpoint location:           0/5000028\n\
                     Latest checkpoint's REDO location:    0/5000028\n";
        assert_eq!(parse_shutdown_checkpoint(clean), Some(0x5000028));
        let crashed = clean.replace("shut down", "in production");
        assert_eq!(parse_shutdown_checkpoint(&crashed), None);
        let standby = clean.replace("shut down", "shut down in recovery");
        assert_eq!(parse_shutdown_checkpoint(&standby), None);
    }

    #[test]
    fn only_a_cidr_network_is_a_network() {
        assert_eq!(network("10.77.2.0/24").as_deref(), Some("10.77.2.0/24"));
        for bad in [
            "10.77.2.0",
            "all",
            "0.0.0.0/33",
            "10.77.2.0/24\nhost all all",
            "x/8",
        ] {
            assert_eq!(network(bad), None, "{bad}");
        }
    }

    #[test]
    fn lsn_text() {
        assert_eq!(parse_lsn("0/3000148"), 0x3000148);
        assert_eq!(parse_lsn("1/0"), 1 << 32);
        assert_eq!(parse_lsn("garbage"), 0);
    }

    #[test]
    fn hba_admits_postgres_by_address_only_and_applications_to_the_ledger_only() {
        let a = Admitted {
            members: vec![Ipv4Addr::new(10, 77, 1, 11), Ipv4Addr::new(10, 77, 3, 11)],
            clients: vec![Ipv4Addr::new(10, 77, 1, 11), Ipv4Addr::new(10, 77, 1, 13)],
            apps: vec!["10.77.2.0/24".into()],
        };
        let hba = a.hba();
        let rules: Vec<&str> = hba.lines().filter(|l| l.starts_with("host")).collect();
        assert_eq!(
            rules,
            [
                "hostssl replication postgres 10.77.1.11/32 scram-sha-256",
                "hostssl replication postgres 10.77.3.11/32 scram-sha-256",
                "hostssl all postgres 10.77.1.11/32 scram-sha-256",
                "hostssl all postgres 10.77.3.11/32 scram-sha-256",
                "hostssl all postgres 10.77.1.13/32 scram-sha-256",
                "hostssl ledger ap 10.77.2.0/24 scram-sha-256",
            ]
        );
        assert!(!hba.contains("trust") && !hba.contains("/16"), "{hba}");
    }

    #[test]
    fn the_password_is_read_as_libpq_writes_it() {
        let dir = std::env::temp_dir().join(format!("dczone-pgpass-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("pgpass");
        std::fs::write(&f, "# zone\n*:*:*:other:x\n*:5432:*:postgres:s3:cret\n").unwrap();
        assert_eq!(read_password(&f).unwrap(), "s3:cret");
        std::fs::write(&f, "*:*:*:other:x\n").unwrap();
        assert!(read_password(&f)
            .unwrap_err()
            .to_string()
            .contains("postgres"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
