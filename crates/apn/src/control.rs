//! The emulator's start-up configuration and runtime control protocol, version 1.
//!
//! Start-up: a JSON [`EmulatorConfig`] file. Runtime: one request per connection on a unix
//! stream socket, each a single JSON line, answered by a single JSON line:
//!
//! ```text
//! client                                emulator
//!   | --- {"op":"set-path",...}\n --->     |  applied before the next frame is admitted
//!   | <-- {"status":"ok"}\n -----------     |
//! ```
//!
//! Ports and paths are named by opaque strings; the emulator does not know what a site is.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::path::{PathCounters, PathParams};

pub const PROTOCOL_VERSION: u32 = 1;

/// Start-up configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EmulatorConfig {
    pub version: u32,
    pub ports: Vec<PortConfig>,
    /// Directed paths; a pair of ports without a path drops its frames.
    pub paths: Vec<PathConfig>,
    pub control_socket: PathBuf,
    /// How long before a delivery time the emulator stops sleeping and polls.
    #[serde(default = "default_spin_ns")]
    pub spin_ns: u64,
    /// How long after the last frame arrived the emulator keeps polling instead of
    /// sleeping, so that the next frame of an exchange is read without a wake-up delay.
    #[serde(default = "default_idle_poll_ns")]
    pub idle_poll_ns: u64,
    #[serde(default)]
    pub seed: u64,
    /// TCP/UDP ports whose frames take the strict-priority class (control traffic): etcd's
    /// client and peer ports, and the host agents' API by default.
    #[serde(default = "default_priority_ports")]
    pub priority_ports: Vec<u16>,
    /// TCP/UDP ports of bulk transfers (backup, bulk replication). On a path whose
    /// parameters ask for a bulk lane (an APN allocates such transfers a path of their own)
    /// they travel apart from the other traffic; otherwise they share its serializer.
    #[serde(default = "default_bulk_ports")]
    pub bulk_ports: Vec<u16>,
}

/// The host agents' port (`dczone_agent::AGENT_PORT`): a migration's prepare, finish and
/// keepalives must not queue behind the migration streams they control (a 2 Mbit/s path
/// held seconds of stream data ahead of them, and the source took its destination for
/// gone).
pub const AGENT_PORT: u16 = 7070;

pub fn default_priority_ports() -> Vec<u16> {
    vec![2379, 2380, AGENT_PORT]
}

/// The port of the lab's cross-traffic flows (`dczone_lab::cross`), iperf3's port.
pub const BULK_PORT: u16 = 5201;

/// The host agents' bulk port (`dczone_agent::bulk_port(AGENT_PORT)`): backup chunks.
pub const AGENT_BULK_PORT: u16 = 7071;

/// An S3 object store's port (radosgw's 7480): disk images uploaded to a cloud, an
/// APN's bulk allocation as a backup's is.
pub const OBJECT_STORE_PORT: u16 = 7480;

pub fn default_bulk_ports() -> Vec<u16> {
    vec![BULK_PORT, AGENT_BULK_PORT, OBJECT_STORE_PORT]
}

/// Precise mode: keep polling 2 ms after the last frame.
pub const PRECISE_IDLE_POLL_NS: u64 = 2_000_000;

/// Precise mode: timer wake-ups overshoot by ~85 us at the median and up to ~1 ms at p99 on
/// a nested VM, so the emulator stops sleeping 3 ms before a delivery and polls.
pub const PRECISE_SPIN_NS: u64 = 3_000_000;

/// The default is efficient mode: sleep on the timer, never poll. Polling costs a whole
/// core, and on a 2-core machine that core is taken from the kernel's packet processing and
/// from the workloads: measured with pgbench (32 clients, `SELECT 1` across the 100 km
/// path), precise mode gave 1,120 tps with deliveries ~6 ms late on average, efficient mode
/// 19,570 tps with 0.15 ms. Precise mode is for measuring the emulator's own fidelity
/// (`bench wan`), where microseconds matter and nothing else runs.
pub fn default_idle_poll_ns() -> u64 {
    0
}

pub fn default_spin_ns() -> u64 {
    0
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PortConfig {
    pub name: String,
    /// The TAP device to attach to, in the emulator's network namespace.
    pub tap: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PathConfig {
    pub from: String,
    pub to: String,
    pub params: PathParams,
}

/// A control request. All are legal whenever the emulator runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Liveness check.
    Ping,
    /// Replaces the parameters of the listed directed paths, creating them if needed. A path
    /// that becomes blackholed also loses the frames already in it, as a cut fibre does.
    SetPaths { paths: Vec<PathConfig> },
    /// Counters of every port and path, plus the process's CPU time and memory.
    Stats,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum Response {
    Ok,
    Stats(Stats),
    Error { message: String },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Stats {
    pub uptime_ns: u64,
    pub cpu_ns: u64,
    pub rss_bytes: u64,
    pub in_flight_bytes: u64,
    pub mac_entries: usize,
    /// Deliveries and how late they were written compared to their schedule.
    pub delivered_frames: u64,
    pub late_ns_sum: u64,
    pub late_ns_max: u64,
    /// Deliveries by lateness: < 5, 20, 50, 100, 1000 us, and the rest.
    #[serde(default)]
    pub late_buckets: Vec<u64>,
    pub ports: Vec<PortStats>,
    pub paths: Vec<PathStats>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PortStats {
    pub name: String,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub tx_errors: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PathStats {
    pub from: String,
    pub to: String,
    /// The path's bulk lane rather than its main one (see [`EmulatorConfig::bulk_ports`]).
    #[serde(default)]
    pub bulk_lane: bool,
    pub params: PathParams,
    pub counters: PathCounters,
}

/// Why a control request failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach the APN emulator at {}", socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the APN emulator at {} did not answer", socket.display())]
    Exchange {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the APN emulator sent an unreadable answer")]
    Decode(#[source] serde_json::Error),
    #[error("the APN emulator refused the request: {0}")]
    Refused(String),
}

/// Sends one request and waits for its answer.
pub fn request(socket: &Path, req: &Request) -> Result<Response, ControlError> {
    let connect = |source| ControlError::Connect {
        socket: socket.to_path_buf(),
        source,
    };
    let exchange = |source| ControlError::Exchange {
        socket: socket.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(connect)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(exchange)?;
    let mut line = serde_json::to_vec(req).map_err(ControlError::Decode)?;
    line.push(b'\n');
    stream.write_all(&line).map_err(exchange)?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .map_err(exchange)?;
    match serde_json::from_str(&answer).map_err(ControlError::Decode)? {
        Response::Error { message } => Err(ControlError::Refused(message)),
        ok => Ok(ok),
    }
}

/// Fetches the emulator's statistics.
pub fn stats(socket: &Path) -> Result<Stats, ControlError> {
    match request(socket, &Request::Stats)? {
        Response::Stats(s) => Ok(s),
        other => Err(ControlError::Refused(format!(
            "expected stats, got {other:?}"
        ))),
    }
}
