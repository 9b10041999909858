//! When a post-copy batch switches over: pure decisions on an injected clock, so the rules
//! are unit-tested without QEMU.
//!
//! A coordinated cluster must stop at one instant, so that SVC-T2 (first stop to last
//! resume) is the largest single T2, not the spread of the VMs' convergence times. Pre-copy
//! cannot promise that: each VM's switchover moment is QEMU's own convergence test, and a
//! prediction of it on a shared, noisy host misses by hundreds of milliseconds. Post-copy
//! can: `migrate-start-postcopy` stops the source at its next iteration whatever is left,
//! sends the device state and lets the destination run, fetching missing pages on demand.
//! T2 then no longer depends on what is left, only on the device state.
//!
//! The batch runs in two phases:
//! 1. pre-copy with paced first passes (a VM more than [`PACE_LEAD`] ahead of the slowest
//!    is throttled) and held VMs (past their first pass, sent slower than they dirty, so
//!    they do not converge and stop on their own), as in the coordinated strategy;
//! 2. the switch: once every VM has sent its RAM once (what post-copy then fetches is only
//!    what was dirtied since), or once `max_hold` has passed (a VM that cannot finish its
//!    first pass still moves: post-copy always completes), every VM is switched at once.

use std::time::Duration;

/// How far ahead (fraction of its RAM) a VM may get in its first pass before it waits.
pub const PACE_LEAD: f64 = 0.03;

/// What the batch knows of one VM at an instant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VmView {
    /// Migration completed (in pre-copy, by itself).
    pub done: bool,
    /// Still in its first pass over RAM.
    pub first_pass: bool,
    /// Fraction of RAM its first pass has covered.
    pub progress: f64,
}

/// What to do with one VM during phase 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// Full bandwidth.
    Full,
    /// Ahead of the slowest first pass: wait for it.
    Throttle,
    /// First pass done: hold (no convergence) until the switch.
    Hold,
    /// Nothing to do (completed).
    Done,
}

/// Why the batch switches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchReason {
    /// Every VM has sent its RAM once.
    AllReady,
    /// `max_hold` passed with some first pass unfinished: switch anyway.
    HoldExpired,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Pace(Vec<Pace>),
    Switch(SwitchReason),
    /// Every VM completed in pre-copy: nothing to switch.
    Finished,
}

/// Phase 1's decision at `elapsed` since the batch started.
pub fn decide(vms: &[VmView], elapsed: Duration, max_hold: Duration) -> Step {
    let live: Vec<&VmView> = vms.iter().filter(|v| !v.done).collect();
    if live.is_empty() {
        return Step::Finished;
    }
    if live.iter().all(|v| !v.first_pass) {
        return Step::Switch(SwitchReason::AllReady);
    }
    if elapsed >= max_hold {
        return Step::Switch(SwitchReason::HoldExpired);
    }
    let slowest = live
        .iter()
        .filter(|v| v.first_pass)
        .map(|v| v.progress)
        .fold(f64::INFINITY, f64::min);
    Step::Pace(
        vms.iter()
            .map(|v| match v {
                v if v.done => Pace::Done,
                v if !v.first_pass => Pace::Hold,
                v if v.progress > slowest + PACE_LEAD => Pace::Throttle,
                _ => Pace::Full,
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOLD: Duration = Duration::from_secs(30);

    fn vm(first_pass: bool, progress: f64) -> VmView {
        VmView {
            done: false,
            first_pass,
            progress,
        }
    }

    #[test]
    fn first_passes_are_paced_to_the_slowest_and_finished_ones_held() {
        let step = decide(
            &[
                vm(true, 0.50),
                vm(true, 0.52),
                vm(true, 0.60),
                vm(false, 1.0),
            ],
            Duration::from_secs(3),
            HOLD,
        );
        assert_eq!(
            step,
            Step::Pace(vec![Pace::Full, Pace::Full, Pace::Throttle, Pace::Hold])
        );
    }

    #[test]
    fn the_switch_comes_once_every_first_pass_is_done() {
        let ready = [vm(false, 1.0), vm(false, 1.0), vm(false, 1.0)];
        assert_eq!(
            decide(&ready, Duration::from_secs(1), HOLD),
            Step::Switch(SwitchReason::AllReady)
        );
        // One VM still sending its RAM: not yet.
        let one_left = [vm(false, 1.0), vm(true, 0.97), vm(false, 1.0)];
        assert!(matches!(
            decide(&one_left, Duration::from_secs(1), HOLD),
            Step::Pace(_)
        ));
    }

    #[test]
    fn a_vm_that_cannot_finish_its_first_pass_still_moves_when_the_hold_expires() {
        let stuck = [vm(false, 1.0), vm(true, 0.2)];
        assert!(matches!(
            decide(&stuck, HOLD - Duration::from_millis(1), HOLD),
            Step::Pace(_)
        ));
        assert_eq!(
            decide(&stuck, HOLD, HOLD),
            Step::Switch(SwitchReason::HoldExpired)
        );
    }

    #[test]
    fn vms_that_completed_in_pre_copy_are_left_alone() {
        let mut done = vm(false, 1.0);
        done.done = true;
        assert_eq!(decide(&[done, done], Duration::ZERO, HOLD), Step::Finished);
        assert_eq!(
            decide(&[done, vm(false, 1.0)], Duration::ZERO, HOLD),
            Step::Switch(SwitchReason::AllReady)
        );
        assert_eq!(
            decide(&[done, vm(true, 0.1)], Duration::ZERO, HOLD),
            Step::Pace(vec![Pace::Done, Pace::Full])
        );
    }
}
