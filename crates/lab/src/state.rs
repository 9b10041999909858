//! The lab's state file, `<state-dir>/<lab>/state.json`, version 1.
//!
//! Written before anything is created, so that `lab down` can clean up after a crash at
//! any point of `lab up`; rewritten after every runtime change of a link.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use dczone_zone::{LinkParams, Zone};

use crate::LabError;

pub const STATE_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// `lab up` started; some namespaces may exist.
    Building,
    Up,
}

/// The current, possibly runtime-modified, state of a link.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LinkState {
    pub one_way_delay_ns: u64,
    pub bandwidth_bps: u64,
    pub jitter_ns: u64,
    pub loss: f64,
    pub cut: bool,
    /// An APN path, or a conventional WAN (`lab link set --wan`).
    #[serde(default = "apn")]
    pub deterministic: bool,
}

fn apn() -> bool {
    true
}

impl LinkState {
    pub fn params(&self) -> LinkParams {
        LinkParams {
            one_way_delay_ns: self.one_way_delay_ns,
            bandwidth_bps: self.bandwidth_bps,
            jitter_ns: self.jitter_ns,
            loss: self.loss,
            deterministic: self.deterministic,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabState {
    pub version: u32,
    pub lab: String,
    /// Where the zone came from (a path, or the built-in reference).
    pub zone_source: String,
    pub zone_toml: String,
    pub phase: Phase,
    pub emulator_pid: Option<i32>,
    pub links: Vec<LinkState>,
    /// Sites cut off from every other site (`lab site isolate`).
    pub isolated: Vec<String>,
    /// Host-stack latency measured by `lab calibrate`, per site pair ("a|b", zone order),
    /// subtracted from each direction's delay (see `Lab::calibrate`).
    #[serde(default)]
    pub stack_compensation_ns: BTreeMap<String, u64>,
}

/// Key of an unordered site pair in [`LabState::stack_compensation_ns`].
pub fn pair_key(a: usize, b: usize) -> String {
    format!("{}|{}", a.min(b), a.max(b))
}

impl LabState {
    pub fn new(lab: &str, zone: &Zone, source: &str, toml: &str) -> LabState {
        LabState {
            version: STATE_VERSION,
            lab: lab.to_string(),
            zone_source: source.to_string(),
            zone_toml: toml.to_string(),
            phase: Phase::Building,
            emulator_pid: None,
            links: zone
                .links
                .iter()
                .map(|l| LinkState {
                    one_way_delay_ns: l.params.one_way_delay_ns,
                    bandwidth_bps: l.params.bandwidth_bps,
                    jitter_ns: l.params.jitter_ns,
                    loss: l.params.loss,
                    cut: false,
                    deterministic: l.params.deterministic,
                })
                .collect(),
            isolated: Vec::new(),
            stack_compensation_ns: BTreeMap::new(),
        }
    }

    pub fn zone(&self) -> Result<Zone, LabError> {
        dczone_zone::file::parse(&self.zone_toml, Path::new(&self.zone_source))
            .map_err(LabError::Zone)
    }

    pub fn load(path: &Path) -> Result<Option<LabState>, LabError> {
        match std::fs::read(path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| LabError::CorruptState {
                        file: path.to_path_buf(),
                        reason: e.to_string(),
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(LabError::Io {
                what: format!("read {}", path.display()),
                source,
            }),
        }
    }

    /// Writes atomically (temp file + rename).
    pub fn save(&self, path: &Path) -> Result<(), LabError> {
        let tmp = path.with_extension("json.tmp");
        let io = |source| LabError::Io {
            what: format!("write {}", path.display()),
            source,
        };
        let text = serde_json::to_vec_pretty(self).expect("state serializes");
        std::fs::write(&tmp, text).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}
