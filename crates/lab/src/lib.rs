//! The embedded lab: builds a whole zone on one machine.
//!
//! ```text
//!   ns <lab>-<host>           ns <lab>-apn                               ns <lab>-<host>
//!   eth0 10.77.1.11 ==veth== vh-0 -- br-0 -- apn-0 (TAP) \          / apn-1 -- br-1 -- vh-3 ==veth== eth0 10.77.2.11
//!                                                         APN emulator
//! ```
//!
//! One namespace per host; one namespace `<lab>-apn` holding one bridge per site (one L2
//! segment per site) and the emulator, whose TAP ports join the site bridges. All sites
//! share the stretched segment `10.77.0.0/16`, so a VM keeps its address when it moves.
//!
//! The lab knows the zone and the emulator's control protocol; it knows nothing of VMs or
//! databases. Everything it creates lives inside namespaces named `<lab>-*`, so `down`
//! can find and remove all of it from the namespace list alone, whatever state file or
//! process survived.

pub mod cross;
pub mod etcd;
mod icmp;
pub mod probe;
mod state;
pub mod sys;
pub mod wan_bench;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use dczone_apn::control::{self, ControlError, EmulatorConfig, PathConfig, PortConfig};
use dczone_apn::PathParams;
use dczone_zone::{format_bandwidth, HostRef, Zone, ZoneError, LAB_PREFIX_LEN};

pub use state::{LabState, LinkState, Phase};

/// Why a lab operation failed. Each variant names the step.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("the lab needs root or {}: {} missing; run as root (e.g. with sudo)", .missing.join(" and "), if .missing.len() > 1 { "they are" } else { "it is" })]
    NotPrivileged { missing: Vec<&'static str> },
    #[error("invalid lab name '{0}': use 1-8 characters of a-z and 0-9")]
    BadLabName(String),
    #[error(transparent)]
    Zone(#[from] ZoneError),
    #[error("{step} failed: `{command}` said: {stderr}")]
    Command {
        step: String,
        command: String,
        stderr: String,
    },
    #[error("cannot run {what}")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} failed")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {} is unreadable ({reason}); run `dczone lab down` to clean up", file.display())]
    CorruptState { file: PathBuf, reason: String },
    #[error("lab '{0}' is not up; run `dczone lab up` first")]
    NotUp(String),
    #[error("unknown host '{host}'; hosts are {known}")]
    UnknownHost { host: String, known: String },
    #[error("unknown site '{site}'; sites are {known}")]
    UnknownSite { site: String, known: String },
    #[error("no link joins '{a}' and '{b}'; links are {known}")]
    NoLink { a: String, b: String, known: String },
    #[error("invalid value for {field}: {reason}")]
    BadValue { field: String, reason: String },
    #[error(transparent)]
    Pki(#[from] dczone_pki::PkiError),
    #[error(transparent)]
    Tls(#[from] dczone_pki::tls::TlsError),
    #[error("the APN emulator did not start (log: {})", log.display())]
    EmulatorStart {
        log: PathBuf,
        #[source]
        source: ControlError,
    },
    #[error("the APN emulator is not answering; run `dczone lab up` to restart it")]
    Emulator(#[source] ControlError),
    #[error("probe {step} between {a} and {b} failed")]
    Probe {
        step: &'static str,
        a: String,
        b: String,
        #[source]
        source: probe::ProbeError,
    },
}

pub use dczone_zone::error_chain;

/// Where the lab keeps its state, and which executable runs the emulator.
#[derive(Debug, Clone)]
pub struct Lab {
    name: String,
    dir: PathBuf,
    exe: PathBuf,
    /// The emulator polls instead of sleeping (see `dczone_apn::control::PRECISE_SPIN_NS`).
    precise: bool,
}

/// What `lab status` shows.
#[derive(Debug, Serialize)]
pub struct Status {
    pub lab: String,
    pub up: bool,
    pub zone: String,
    pub zone_source: String,
    pub lab_scale: f64,
    pub emulator: EmulatorStatus,
    pub sites: Vec<SiteStatus>,
    pub hosts: Vec<HostStatus>,
    pub links: Vec<LinkStatus>,
}

#[derive(Debug, Serialize)]
pub struct EmulatorStatus {
    pub pid: Option<i32>,
    pub alive: bool,
    pub namespace: String,
    pub rss_bytes: Option<u64>,
    pub cpu_ms: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct SiteStatus {
    pub id: String,
    pub kind: String,
    pub region: String,
    pub bridge: String,
    pub isolated: bool,
}

#[derive(Debug, Serialize)]
pub struct HostStatus {
    pub id: String,
    pub site: String,
    pub namespace: String,
    pub ip: String,
    pub mac: String,
    pub present: bool,
}

#[derive(Debug, Serialize)]
pub struct LinkStatus {
    pub a: String,
    pub b: String,
    pub distance_km: Option<f64>,
    pub deterministic: bool,
    pub one_way_delay_ms: f64,
    pub bandwidth: String,
    pub bandwidth_bps: u64,
    /// What the emulator enforces: bandwidth / lab_scale.
    pub lab_bandwidth_bps: u64,
    pub jitter_ms: f64,
    pub loss_percent: f64,
    pub cut: bool,
}

/// A runtime change to one link (`lab link set`). `None` keeps the current value.
#[derive(Debug, Clone, Default)]
pub struct LinkChange {
    pub one_way_delay_ms: Option<f64>,
    pub bandwidth: Option<String>,
    pub loss_percent: Option<f64>,
    pub jitter_ms: Option<f64>,
    /// `Some(true)`: an APN path; `Some(false)`: a conventional WAN.
    pub deterministic: Option<bool>,
}

const APN_SUFFIX: &str = "apn";

/// Every lab bridge: a plain learning switch, no spanning tree, forwarding at once.
const BRIDGE_OPTS: &str = "type bridge stp_state 0 forward_delay 0";

/// The bridge inside every host namespace; VM TAPs join it.
pub const HOST_BRIDGE: &str = "br0";
/// A host's uplink to its site's network, a port of [`HOST_BRIDGE`].
pub const HOST_UPLINK: &str = "eth0";

/// Bridged frames must not traverse iptables: the lab's L2 is a wire.
fn disable_bridge_netfilter(ns: &str) -> Result<(), LabError> {
    sys::in_namespace(ns, || {
        for t in ["iptables", "ip6tables", "arptables"] {
            let _ = std::fs::write(format!("/proc/sys/net/bridge/bridge-nf-call-{t}"), "0");
        }
    })?
    .join()
    .map_err(|_| LabError::BadValue {
        field: "bridge sysctls".into(),
        reason: "namespace thread panicked".into(),
    })
}

impl Lab {
    /// `state_root` is e.g. `/run/dczone`; `exe` is the `dczone` binary (it runs the
    /// emulator as `dczone apn-run`).
    pub fn new(name: &str, state_root: &Path, exe: &Path) -> Result<Lab, LabError> {
        let valid = !name.is_empty()
            && name.len() <= 8
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if !valid {
            return Err(LabError::BadLabName(name.to_string()));
        }
        Ok(Lab {
            name: name.to_string(),
            dir: state_root.join(name),
            exe: exe.to_path_buf(),
            precise: false,
        })
    }

    /// A lab whose emulator busy-polls for microsecond timing (costs a core).
    pub fn precise(mut self) -> Lab {
        self.precise = true;
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The lab's state directory; other layers keep their files under it.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn state_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    pub fn control_socket(&self) -> PathBuf {
        self.dir.join("apn.sock")
    }

    pub fn apn_namespace(&self) -> String {
        format!("{}-{APN_SUFFIX}", self.name)
    }

    pub fn host_namespace(&self, host: &str) -> String {
        format!("{}-{host}", self.name)
    }

    fn prefix(&self) -> String {
        format!("{}-", self.name)
    }

    /// Loads the state of a lab that is up (or half-built).
    pub fn state(&self) -> Result<LabState, LabError> {
        LabState::load(&self.state_path())?.ok_or_else(|| LabError::NotUp(self.name.clone()))
    }

    pub(crate) fn lock(&self) -> Result<File, LabError> {
        let io = |source| LabError::Io {
            what: format!("lock {}", self.dir.display()),
            source,
        };
        std::fs::create_dir_all(&self.dir).map_err(io)?;
        let f = File::create(self.dir.join("lock")).map_err(io)?;
        // SAFETY: flock on an fd we own; the lock is released when `f` is dropped.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io(std::io::Error::last_os_error()));
        }
        Ok(f)
    }

    fn require_privileges() -> Result<(), LabError> {
        let missing = sys::missing_capabilities();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(LabError::NotPrivileged { missing })
        }
    }

    /// Is everything of this lab in place and the emulator answering?
    fn healthy(&self, state: &LabState, zone: &Zone) -> bool {
        state.phase == Phase::Up
            && sys::namespace_exists(&self.apn_namespace())
            && zone
                .hosts()
                .iter()
                .all(|h| sys::namespace_exists(&self.host_namespace(&h.id)))
            && control::request(&self.control_socket(), &control::Request::Ping).is_ok()
    }

    /// Builds the lab for `zone`. Idempotent: a healthy lab of the same zone is left alone;
    /// anything else of this lab's is torn down first. Returns `false` if it was already up.
    /// Only hosts and the network: etcd starts through the hosts' agents
    /// (`etcd_start_host`).
    pub fn up(&self, zone: &Zone, source: &str, toml: &str) -> Result<bool, LabError> {
        let built = self.build_if_needed(zone, source, toml)?;
        if built {
            self.calibrate(&|_, _, _| {})?;
        }
        Ok(built)
    }

    fn build_if_needed(&self, zone: &Zone, source: &str, toml: &str) -> Result<bool, LabError> {
        Self::require_privileges()?;
        let _lock = self.lock()?;
        if let Ok(Some(state)) = LabState::load(&self.state_path()) {
            if state.zone_toml == toml && self.healthy(&state, zone) {
                return Ok(false);
            }
        }
        self.teardown()?;
        let mut state = LabState::new(&self.name, zone, source, toml);
        std::fs::create_dir_all(&self.dir).map_err(|source| LabError::Io {
            what: format!("create {}", self.dir.display()),
            source,
        })?;
        state.save(&self.state_path())?;
        let result = self.build(zone, &mut state);
        if result.is_err() {
            // Leave nothing half-built behind; the build error is what the user needs.
            let _ = self.teardown();
        }
        result.map(|()| true)
    }

    fn build(&self, zone: &Zone, state: &mut LabState) -> Result<(), LabError> {
        let apn = self.apn_namespace();
        sys::ip("create the APN namespace", &["netns", "add", &apn])?;
        disable_bridge_netfilter(&apn)?;
        for (i, site) in zone.sites.iter().enumerate() {
            sys::ip_script(
                &format!("create the bridge and APN port of site {}", site.id),
                &apn,
                &[
                    format!("link add br-{i} {BRIDGE_OPTS}"),
                    format!("link set br-{i} up"),
                    format!("tuntap add dev apn-{i} mode tap vnet_hdr"),
                    format!("link set apn-{i} master br-{i} up"),
                ],
            )?;
        }
        for h in zone.hosts() {
            self.add_host(&h)?;
        }
        self.start_emulator(zone, state)?;
        state.phase = Phase::Up;
        state.save(&self.state_path())
    }

    fn add_host(&self, h: &HostRef) -> Result<(), LabError> {
        let apn = self.apn_namespace();
        let ns = self.host_namespace(&h.id);
        let step = format!("create host {}", h.id);
        let peer = format!("vh-{}", h.global_index);
        let addr = format!("{}/{LAB_PREFIX_LEN}", h.ip());
        sys::ip(&step, &["netns", "add", &ns])?;
        sys::ip_script(
            &step,
            &apn,
            &[
                format!("link add {peer} type veth peer name eth0 netns {ns}"),
                format!("link set {peer} master br-{} up", h.site),
            ],
        )?;
        // The host's uplink joins a host bridge, as on a hypervisor host: the host address
        // lives on br0 and VM TAPs join br0 too.
        sys::ip_script(
            &step,
            &ns,
            &[
                "link set lo up".to_string(),
                format!("link add {HOST_BRIDGE} {BRIDGE_OPTS}"),
                format!("link set eth0 master {HOST_BRIDGE} up"),
                format!("link set {HOST_BRIDGE} address {} up", h.mac()),
                format!("addr add {addr} dev {HOST_BRIDGE}"),
            ],
        )?;
        disable_bridge_netfilter(&ns)
    }

    /// The emulator's paths for the current link state.
    fn paths(zone: &Zone, state: &LabState) -> Vec<PathConfig> {
        let params: Vec<_> = state.links.iter().map(|l| l.params()).collect();
        let cut: Vec<_> = state.links.iter().map(|l| l.cut).collect();
        let mut out = Vec::new();
        for (a, sa) in zone.sites.iter().enumerate() {
            for (b, sb) in zone.sites.iter().enumerate() {
                if a == b {
                    continue;
                }
                let spec = zone.path(a, b, &params, &cut);
                let isolated = state.isolated.contains(&sa.id) || state.isolated.contains(&sb.id);
                let compensation = state
                    .stack_compensation_ns
                    .get(&state::pair_key(a, b))
                    .copied()
                    .unwrap_or(0);
                out.push(PathConfig {
                    from: sa.id.clone(),
                    to: sb.id.clone(),
                    params: PathParams {
                        delay_ns: spec.one_way_delay_ns.saturating_sub(compensation),
                        rate_bps: zone.lab_rate_bps(spec.bandwidth_bps),
                        jitter_ns: spec.jitter_ns,
                        loss: spec.loss,
                        blackhole: spec.blackholed || isolated,
                        queue_limit_bytes: None,
                        bulk_lane: spec.deterministic,
                    },
                });
            }
        }
        out
    }

    fn start_emulator(&self, zone: &Zone, state: &mut LabState) -> Result<(), LabError> {
        let config = EmulatorConfig {
            version: control::PROTOCOL_VERSION,
            ports: zone
                .sites
                .iter()
                .enumerate()
                .map(|(i, s)| PortConfig {
                    name: s.id.clone(),
                    tap: format!("apn-{i}"),
                })
                .collect(),
            paths: Self::paths(zone, state),
            control_socket: self.control_socket(),
            spin_ns: std::env::var("DCZONE_APN_SPIN_NS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(if self.precise {
                    control::PRECISE_SPIN_NS
                } else {
                    control::default_spin_ns()
                }),
            idle_poll_ns: std::env::var("DCZONE_APN_IDLE_POLL_NS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(if self.precise {
                    control::PRECISE_IDLE_POLL_NS
                } else {
                    control::default_idle_poll_ns()
                }),
            seed: 0x5eed,
            priority_ports: control::default_priority_ports(),
            bulk_ports: control::default_bulk_ports(),
        };
        let config_path = self.dir.join("apn.json");
        let log_path = self.dir.join("apn.log");
        let io = |what: &str| {
            let what = what.to_string();
            move |source| LabError::Io { what, source }
        };
        std::fs::write(
            &config_path,
            serde_json::to_vec_pretty(&config).expect("config serializes"),
        )
        .map_err(io("write the emulator config"))?;
        let _ = std::fs::remove_file(self.control_socket());
        let config_arg = config_path.display().to_string();
        let pid = self.spawn_daemon(
            &self.apn_namespace(),
            &self.exe,
            &["apn-run", "--config", &config_arg],
            &log_path,
            "the APN emulator",
        )?;
        state.emulator_pid = Some(pid);
        state.save(&self.state_path())?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match control::request(&self.control_socket(), &control::Request::Ping) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(LabError::EmulatorStart {
                        log: log_path,
                        source: e,
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Starts `program` detached (its own session) in namespace `ns`, its output to
    /// `log`; returns its pid. See [`spawn_detached`].
    pub fn spawn_daemon(
        &self,
        ns: &str,
        program: &Path,
        args: &[&str],
        log: &Path,
        what: &str,
    ) -> Result<i32, LabError> {
        spawn_detached(Some(ns), program, args, log, what)
    }

    /// Removes everything this lab created. Idempotent; works from the namespace list
    /// alone, so it also cleans up after a crash or a `kill -9` of any lab process.
    pub fn down(&self) -> Result<usize, LabError> {
        Self::require_privileges()?;
        let _lock = self.lock()?;
        self.teardown()
    }

    fn teardown(&self) -> Result<usize, LabError> {
        if let Ok(Some(state)) = LabState::load(&self.state_path()) {
            if let Some(pid) = state.emulator_pid {
                sys::kill(pid, libc::SIGKILL);
            }
        }
        let prefix = self.prefix();
        let mut removed = 0;
        let ours: Vec<String> = sys::namespaces()
            .into_iter()
            .filter(|n| n.starts_with(&prefix))
            .collect();
        for ns in &ours {
            for pid in sys::pids_in_namespace(ns) {
                sys::kill(pid, libc::SIGKILL);
            }
        }
        for ns in &ours {
            // Deleting the namespace removes its bridges, veths and TAPs with it.
            let pids = sys::pids_in_namespace(ns);
            let deadline = Instant::now() + Duration::from_secs(5);
            while pids.iter().any(|&p| sys::alive(p)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            sys::ip(&format!("remove namespace {ns}"), &["netns", "delete", ns])?;
            removed += 1;
        }
        for f in ["state.json", "apn.json", "apn.sock"] {
            let _ = std::fs::remove_file(self.dir.join(f));
        }
        // VMs of the lab ran in its namespaces and are gone with them.
        let _ = std::fs::remove_dir_all(self.dir.join("vms"));
        // So did the database platform and its consensus store.
        let _ = std::fs::remove_dir_all(self.dir.join("etcd"));
        let _ = std::fs::remove_dir_all(self.dir.join("db"));
        // And the storage clusters (their OSDs' sparse block files too).
        let _ = std::fs::remove_dir_all(self.dir.join("ceph"));
        // The lab's zone CA, its hosts' certificates and the operator's access bundle are
        // the lab's: its hosts are gone, and the next lab makes its own.
        for d in ["pki", "access", "qemu-tls"] {
            let _ = std::fs::remove_dir_all(self.dir.join(d));
        }
        Ok(removed)
    }

    pub fn status(&self) -> Result<Status, LabError> {
        let state = self.state()?;
        let zone = state.zone()?;
        let stats = control::stats(&self.control_socket()).ok();
        let pid_alive = state.emulator_pid.is_some_and(sys::alive);
        Ok(Status {
            lab: self.name.clone(),
            up: state.phase == Phase::Up && stats.is_some(),
            zone: zone.name.clone(),
            zone_source: state.zone_source.clone(),
            lab_scale: zone.lab_scale,
            emulator: EmulatorStatus {
                pid: state.emulator_pid,
                alive: pid_alive && stats.is_some(),
                namespace: self.apn_namespace(),
                rss_bytes: stats.as_ref().map(|s| s.rss_bytes),
                cpu_ms: stats.as_ref().map(|s| s.cpu_ns / 1_000_000),
            },
            sites: zone
                .sites
                .iter()
                .enumerate()
                .map(|(i, s)| SiteStatus {
                    id: s.id.clone(),
                    kind: s.kind.to_string(),
                    region: s.region.clone(),
                    bridge: format!("br-{i}"),
                    isolated: state.isolated.contains(&s.id),
                })
                .collect(),
            hosts: zone
                .hosts()
                .iter()
                .map(|h| HostStatus {
                    id: h.id.clone(),
                    site: zone.sites[h.site].id.clone(),
                    namespace: self.host_namespace(&h.id),
                    ip: h.ip().to_string(),
                    mac: h.mac(),
                    present: sys::namespace_exists(&self.host_namespace(&h.id)),
                })
                .collect(),
            links: zone
                .links
                .iter()
                .zip(&state.links)
                .map(|(l, s)| LinkStatus {
                    a: zone.sites[l.a].id.clone(),
                    b: zone.sites[l.b].id.clone(),
                    distance_km: l.distance_km,
                    deterministic: s.deterministic,
                    one_way_delay_ms: s.one_way_delay_ns as f64 / 1e6,
                    bandwidth: format_bandwidth(s.bandwidth_bps),
                    bandwidth_bps: s.bandwidth_bps,
                    lab_bandwidth_bps: zone.lab_rate_bps(s.bandwidth_bps),
                    jitter_ms: s.jitter_ns as f64 / 1e6,
                    loss_percent: s.loss * 100.0,
                    cut: s.cut,
                })
                .collect(),
        })
    }

    /// Resolves a host id of the running lab to its namespace.
    pub fn host(&self, host: &str) -> Result<(HostRef, String), LabError> {
        let zone = self.state()?.zone()?;
        let h = zone.host(host).ok_or_else(|| LabError::UnknownHost {
            host: host.to_string(),
            known: zone
                .hosts()
                .iter()
                .map(|h| h.id.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
        let ns = self.host_namespace(&h.id);
        Ok((h, ns))
    }

    /// Runs `cmd` in `host`'s namespace with inherited stdio; returns its exit code.
    pub fn exec(&self, host: &str, cmd: &[String]) -> Result<i32, LabError> {
        let (_, ns) = self.host(host)?;
        let Some((prog, args)) = cmd.split_first() else {
            return Err(LabError::BadValue {
                field: "command".into(),
                reason: "give a command after --".into(),
            });
        };
        let status = Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(prog)
            .args(args)
            .status()
            .map_err(|source| LabError::Spawn {
                what: format!("ip netns exec {ns} {prog}"),
                source,
            })?;
        use std::os::unix::process::ExitStatusExt;
        Ok(status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
    }

    /// Index of site `id`, or an error listing the sites.
    pub fn site(zone: &Zone, id: &str) -> Result<usize, LabError> {
        zone.site_index(id).ok_or_else(|| LabError::UnknownSite {
            site: id.to_string(),
            known: zone
                .sites
                .iter()
                .map(|s| s.id.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// Applies `change` to the state of the link `a`-`b` (or, with `site`, the isolation of
    /// a site) and pushes the resulting paths to the running emulator.
    fn modify(
        &self,
        change: impl FnOnce(&Zone, &mut LabState) -> Result<(), LabError>,
    ) -> Result<(), LabError> {
        let _lock = self.lock()?;
        let mut state = self.state()?;
        let zone = state.zone()?;
        change(&zone, &mut state)?;
        self.push_paths(&zone, &state)
    }

    /// Sends the paths of `state` to the emulator and saves `state`.
    pub(crate) fn push_paths(&self, zone: &Zone, state: &LabState) -> Result<(), LabError> {
        let paths = Self::paths(zone, state);
        control::request(
            &self.control_socket(),
            &control::Request::SetPaths { paths },
        )
        .map_err(LabError::Emulator)?;
        state.save(&self.state_path())
    }

    fn link_of(zone: &Zone, a: &str, b: &str) -> Result<usize, LabError> {
        let (ia, ib) = (Self::site(zone, a)?, Self::site(zone, b)?);
        zone.link_index(ia, ib).ok_or_else(|| LabError::NoLink {
            a: a.to_string(),
            b: b.to_string(),
            known: zone
                .links
                .iter()
                .map(|l| format!("{}-{}", zone.sites[l.a].id, zone.sites[l.b].id))
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// Blackholes (`cut = true`) or restores the link between two sites.
    pub fn link_cut(&self, a: &str, b: &str, cut: bool) -> Result<(), LabError> {
        self.modify(|zone, state| {
            let li = Self::link_of(zone, a, b)?;
            state.links[li].cut = cut;
            Ok(())
        })
    }

    /// Changes a link's delay, bandwidth, loss or jitter on the running emulator.
    pub fn link_set(&self, a: &str, b: &str, change: &LinkChange) -> Result<(), LabError> {
        let bad = |field: &str, reason: String| LabError::BadValue {
            field: field.to_string(),
            reason,
        };
        if let Some(d) = change.one_way_delay_ms {
            if !dczone_zone::is_non_negative(d) {
                return Err(bad("--delay", format!("must be zero or more ms, got {d}")));
            }
        }
        if let Some(l) = change.loss_percent {
            if !(0.0..100.0).contains(&l) {
                return Err(bad(
                    "--loss",
                    format!("must be in [0, 100) percent, got {l}"),
                ));
            }
        }
        if let Some(j) = change.jitter_ms {
            if !dczone_zone::is_non_negative(j) {
                return Err(bad("--jitter", format!("must be zero or more ms, got {j}")));
            }
        }
        let bandwidth = change
            .bandwidth
            .as_deref()
            .map(dczone_zone::parse_bandwidth)
            .transpose()
            .map_err(|reason| bad("--bandwidth", reason))?;
        self.modify(|zone, state| {
            let li = Self::link_of(zone, a, b)?;
            // Host-stack latency depends on the delay; it is measured again below.
            if change.one_way_delay_ms.is_some() {
                state.stack_compensation_ns.clear();
            }
            let l = &mut state.links[li];
            if let Some(d) = change.one_way_delay_ms {
                l.one_way_delay_ns = (d * 1e6).round() as u64;
            }
            if let Some(bps) = bandwidth {
                l.bandwidth_bps = bps;
            }
            if let Some(p) = change.loss_percent {
                l.loss = p / 100.0;
            }
            if let Some(j) = change.jitter_ms {
                l.jitter_ns = (j * 1e6).round() as u64;
            }
            if let Some(d) = change.deterministic {
                l.deterministic = d;
            }
            if l.deterministic && (l.jitter_ns > 0 || l.loss > 0.0) {
                return Err(bad(
                    "--wan",
                    "an APN link has no jitter or loss: give --wan conventional, or \
                     --jitter 0 --loss 0"
                        .into(),
                ));
            }
            Ok(())
        })?;
        if change.one_way_delay_ms.is_some() {
            self.calibrate(&|_, _, _| {})?;
        }
        Ok(())
    }

    /// Puts every link of the zone on `wan`'s profile (see [`dczone_zone::wan`]): the APN,
    /// or a conventional WAN over the same fibre.
    pub fn set_wan(&self, wan: dczone_zone::Wan) -> Result<(), LabError> {
        let w = wan.link();
        self.modify(|_, state| {
            for l in &mut state.links {
                l.deterministic = w.deterministic;
                l.jitter_ns = (w.jitter_ms * 1e6).round() as u64;
                l.loss = w.loss_percent / 100.0;
            }
            Ok(())
        })
    }

    /// Cuts a site off from every other site (a disaster), or restores it.
    pub fn site_isolate(&self, site: &str, isolate: bool) -> Result<(), LabError> {
        self.modify(|zone, state| {
            let id = zone.sites[Self::site(zone, site)?].id.clone();
            state.isolated.retain(|s| *s != id);
            if isolate {
                state.isolated.push(id);
            }
            Ok(())
        })
    }
}

/// Starts `program` detached from this process's session (a Ctrl-C of the command that
/// started it does not kill it), in namespace `ns` (`ip netns exec`) or, with `None`, in
/// this process's own, with stdout and stderr to `log`; returns its pid. A thread reaps
/// it should it exit while this process runs.
pub fn spawn_detached(
    ns: Option<&str>,
    program: &Path,
    args: &[&str],
    log: &Path,
    what: &str,
) -> Result<i32, LabError> {
    let io = |what: String| move |source| LabError::Io { what, source };
    let out = File::create(log).map_err(io(format!("create {}", log.display())))?;
    let err = out
        .try_clone()
        .map_err(io(format!("create {}", log.display())))?;
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
        None => Command::new(program),
    };
    cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: setsid is async-signal-safe; it detaches the daemon from our session.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        })
    };
    let child = cmd.spawn().map_err(|source| LabError::Spawn {
        what: format!("{what} ({})", program.display()),
        source,
    })?;
    let pid = child.id() as i32;
    std::thread::spawn(move || {
        let mut child = child;
        let _ = child.wait();
    });
    Ok(pid)
}
