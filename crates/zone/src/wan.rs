//! The WAN under the zone: the APN the product is built for, or a conventional carrier WAN
//! to compare it with (SPEC.md section 9).
//!
//! The two differ in what a link does to a frame, never in distance: both are the same
//! fibre (the zone's `distance_km`), so every difference measured between them comes from
//! the network, not the geography.
//!
//! | | APN | conventional |
//! |---|---|---|
//! | delay | fixed (5 us/km) | the same, plus jitter |
//! | jitter | none | uniform +/- [`CONVENTIONAL_JITTER_MS`] per link (order kept) |
//! | loss | none | [`CONVENTIONAL_LOSS_PERCENT`] of wire frames |
//! | bulk transfers (backup, bulk copy) | a path of their own, allocated on demand | share the pipe with everything else |
//! | HA traffic (consensus) | strict priority | strict priority (a carrier's EF class), same jitter and loss |
//!
//! The conventional figures are deliberately kind to the conventional WAN. Carriers'
//! service levels bound a managed IP VPN at much worse: Cisco's Powered Network IP
//! Multiservice SLA, which providers sign up to, allows 20 ms of jitter and 0.5 % loss
//! between provider edges; Verizon's North American packet delivery standard is 99.5 %
//! (0.5 % loss). The profile takes a tenth of that jitter bound and a fifth of that loss,
//! a well-run network on a good day; whatever it costs the key requirements, a real one
//! costs more.

use std::fmt;
use std::str::FromStr;

/// Jitter of one conventional link: the delivery time moves uniformly within +/- this.
pub const CONVENTIONAL_JITTER_MS: f64 = 2.0;
/// Loss of one conventional link, in percent of wire frames.
pub const CONVENTIONAL_LOSS_PERCENT: f64 = 0.1;

/// Which WAN joins the sites.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Wan {
    #[default]
    Apn,
    Conventional,
}

/// What a link becomes under a WAN profile.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WanLink {
    pub deterministic: bool,
    pub jitter_ms: f64,
    pub loss_percent: f64,
}

impl Wan {
    pub fn link(self) -> WanLink {
        match self {
            Wan::Apn => WanLink {
                deterministic: true,
                jitter_ms: 0.0,
                loss_percent: 0.0,
            },
            Wan::Conventional => WanLink {
                deterministic: false,
                jitter_ms: CONVENTIONAL_JITTER_MS,
                loss_percent: CONVENTIONAL_LOSS_PERCENT,
            },
        }
    }
}

impl fmt::Display for Wan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Wan::Apn => "apn",
            Wan::Conventional => "conventional",
        })
    }
}

impl FromStr for Wan {
    type Err = String;

    fn from_str(s: &str) -> Result<Wan, String> {
        match s {
            "apn" => Ok(Wan::Apn),
            "conventional" => Ok(Wan::Conventional),
            other => Err(format!(
                "unknown WAN `{other}`: give `apn` (fixed delay, no loss, bulk on paths of \
                 its own) or `conventional` (jitter, loss, one shared pipe)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_parse_and_differ_only_in_the_network() {
        assert_eq!("apn".parse::<Wan>(), Ok(Wan::Apn));
        assert_eq!("conventional".parse::<Wan>(), Ok(Wan::Conventional));
        let e = "internet".parse::<Wan>().unwrap_err();
        assert!(e.contains("apn") && e.contains("conventional"), "{e}");
        let apn = Wan::Apn.link();
        assert!(apn.deterministic && apn.jitter_ms == 0.0 && apn.loss_percent == 0.0);
        let c = Wan::Conventional.link();
        assert!(!c.deterministic && c.jitter_ms > 0.0 && c.loss_percent > 0.0);
        // Kinder than the published service-level bounds (20 ms jitter, 0.5 % loss).
        assert!(c.jitter_ms < 20.0 && c.loss_percent < 0.5);
    }
}
