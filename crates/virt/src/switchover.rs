//! When a coordinated batch switches over: pure decisions on an injected clock, so the rules
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
//! Pre-copy can be made to fall together too, by taking the stop away from QEMU: the
//! coordinated strategy drains every VM to a small dirty set, then stops every source VM
//! itself, back to back, and lets each migration complete with its VM stopped. T2 then
//! starts at one instant for all and lasts what is left to send (bounded by the drain
//! target) plus the device state; the source stays whole until the end, so a failure
//! still resumes it.
//!
//! Both batches run in two phases:
//! 1. pre-copy with paced first passes (a VM more than [`PACE_LEAD`] ahead of the slowest
//!    is throttled) and held VMs (past their first pass, sent slower than they dirty, so
//!    they do not converge and stop on their own). With a drain target (pre-copy), a VM
//!    past its first pass whose dirty set is above the target is sent at full speed
//!    instead, and held once it is below;
//! 2. the switch: as soon as one VM stopped by itself (pre-copy converged: QEMU decides
//!    that, and no rate set from outside, polled every few milliseconds, can keep a
//!    shrinking dirty set from converging within one round), or once every VM has sent its
//!    RAM once (what post-copy then fetches is only
//!    what was dirtied since) and, with a drain target, every dirty set is within twice
//!    the target; or, with a drain target, once the drain has lasted [`Drain::max`] since
//!    the last first pass ended (a dirty set that will not shrink: the stop leaves it to
//!    send while stopped); or once `max_hold` has passed since the start (a VM that cannot
//!    finish its first pass still moves: post-copy always completes, and a stopped
//!    pre-copy VM sends the rest while stopped), every VM is switched (post-copy) or
//!    stopped (pre-copy) at once.

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
    /// Bytes dirty at its last dirty-bitmap sync: what a stop now would leave to send.
    pub dirty_set: u64,
    /// Its source VM has stopped (QEMU converged by itself, or we stopped it).
    pub stopped: bool,
    /// How long ago its first pass ended (`None` while in it).
    pub since_first_pass: Option<Duration>,
}

/// The pre-copy drain before a common stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drain {
    /// The dirty set each VM is brought under, bytes.
    pub target: u64,
    /// How long the drain may last once every first pass is done.
    pub max: Duration,
}

/// What to do with one VM during phase 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pace {
    /// Full bandwidth.
    Full,
    /// Ahead of the slowest first pass: wait for it.
    Throttle,
    /// First pass done (and drained, with a drain target): hold (no convergence) until
    /// the switch.
    Hold,
    /// First pass done, dirty set above the drain target: full speed, to shrink it.
    Drain,
    /// Nothing to do (completed).
    Done,
}

/// Why the batch switches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SwitchReason {
    /// Every VM has sent its RAM once.
    AllReady,
    /// `max_hold` passed with some first pass unfinished: switch anyway.
    HoldExpired,
    /// Every first pass is done, but some dirty set stayed above the drain target for
    /// [`Drain::max`]: stop anyway.
    DrainExpired,
    /// One VM stopped on its own (pre-copy converged): the others follow at once, so that
    /// their T2 start with its.
    OneStopped,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Pace(Vec<Pace>),
    Switch(SwitchReason),
    /// Every VM completed in pre-copy: nothing to switch.
    Finished,
}

/// Phase 1's decision at `elapsed` since the batch started; `drain`: what each VM's dirty
/// set must be brought under before the switch, and for how long at most (pre-copy), none
/// for post-copy.
pub fn decide(vms: &[VmView], elapsed: Duration, max_hold: Duration, drain: Option<Drain>) -> Step {
    let drain_to = drain.map(|d| d.target);
    let live: Vec<&VmView> = vms.iter().filter(|v| !v.done).collect();
    if live.is_empty() {
        return Step::Finished;
    }
    if vms.iter().any(|v| v.stopped) && live.iter().any(|v| !v.stopped) {
        return Step::Switch(SwitchReason::OneStopped);
    }
    let ready = |v: &VmView| !v.first_pass && drain_to.is_none_or(|t| v.dirty_set <= 2 * t);
    if live.iter().all(|v| ready(v)) {
        return Step::Switch(SwitchReason::AllReady);
    }
    if elapsed >= max_hold {
        return Step::Switch(SwitchReason::HoldExpired);
    }
    let drained_for = live
        .iter()
        .map(|v| v.since_first_pass)
        .try_fold(Duration::MAX, |m, s| s.map(|s| m.min(s)));
    if drain.is_some_and(|d| drained_for.is_some_and(|t| t >= d.max)) {
        return Step::Switch(SwitchReason::DrainExpired);
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
                v if !v.first_pass && drain_to.is_some_and(|t| v.dirty_set > t) => Pace::Drain,
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
            dirty_set: 0,
            stopped: false,
            since_first_pass: (!first_pass).then_some(Duration::from_millis(100)),
        }
    }

    const MIB: u64 = 1 << 20;
    const DRAIN: Drain = Drain {
        target: MIB,
        max: Duration::from_secs(10),
    };

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
            None,
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
            decide(&ready, Duration::from_secs(1), HOLD, None),
            Step::Switch(SwitchReason::AllReady)
        );
        // One VM still sending its RAM: not yet.
        let one_left = [vm(false, 1.0), vm(true, 0.97), vm(false, 1.0)];
        assert!(matches!(
            decide(&one_left, Duration::from_secs(1), HOLD, None),
            Step::Pace(_)
        ));
    }

    #[test]
    fn a_vm_that_cannot_finish_its_first_pass_still_moves_when_the_hold_expires() {
        let stuck = [vm(false, 1.0), vm(true, 0.2)];
        assert!(matches!(
            decide(&stuck, HOLD - Duration::from_millis(1), HOLD, None),
            Step::Pace(_)
        ));
        assert_eq!(
            decide(&stuck, HOLD, HOLD, None),
            Step::Switch(SwitchReason::HoldExpired)
        );
    }

    #[test]
    fn vms_that_completed_in_pre_copy_are_left_alone() {
        let mut done = vm(false, 1.0);
        done.done = true;
        assert_eq!(
            decide(&[done, done], Duration::ZERO, HOLD, None),
            Step::Finished
        );
        assert_eq!(
            decide(&[done, vm(false, 1.0)], Duration::ZERO, HOLD, None),
            Step::Switch(SwitchReason::AllReady)
        );
        assert_eq!(
            decide(&[done, vm(true, 0.1)], Duration::ZERO, HOLD, None),
            Step::Pace(vec![Pace::Done, Pace::Full])
        );
    }

    #[test]
    fn pre_copy_drains_every_dirty_set_under_the_target_before_the_common_stop() {
        let with = |dirty_set| VmView {
            dirty_set,
            ..vm(false, 1.0)
        };
        let t = Some(DRAIN);
        // Past their first pass: the big dirty set is drained, the small one held.
        assert_eq!(
            decide(
                &[with(8 * MIB), with(MIB / 2)],
                Duration::from_secs(2),
                HOLD,
                t
            ),
            Step::Pace(vec![Pace::Drain, Pace::Hold])
        );
        // Within twice the target (a held VM's set grows again a little): stop them all.
        assert_eq!(
            decide(
                &[with(2 * MIB), with(MIB / 2)],
                Duration::from_secs(2),
                HOLD,
                t
            ),
            Step::Switch(SwitchReason::AllReady)
        );
        // A dirty set that will not shrink (a VM dirtying faster than the path): the drain
        // expires, counted from the end of the last first pass, and the batch stops anyway,
        // sending the rest while stopped.
        let since = |d: u64, secs: u64| VmView {
            since_first_pass: Some(Duration::from_secs(secs)),
            ..with(d)
        };
        assert!(matches!(
            decide(
                &[since(64 * MIB, 15), since(MIB / 2, 9)],
                Duration::from_secs(25),
                HOLD,
                t
            ),
            Step::Pace(_)
        ));
        assert_eq!(
            decide(
                &[since(64 * MIB, 15), since(MIB / 2, 10)],
                Duration::from_secs(25),
                HOLD,
                t
            ),
            Step::Switch(SwitchReason::DrainExpired)
        );
        // Not while a first pass goes on, however long the others have waited.
        assert!(matches!(
            decide(
                &[since(64 * MIB, 15), vm(true, 0.9)],
                Duration::from_secs(25),
                HOLD,
                t
            ),
            Step::Pace(_)
        ));
    }

    #[test]
    fn one_vm_stopping_by_itself_stops_the_others_at_once() {
        let mut early = vm(false, 1.0);
        early.stopped = true;
        let draining = VmView {
            dirty_set: 8 << 20,
            ..vm(false, 1.0)
        };
        assert_eq!(
            decide(
                &[early, draining, vm(true, 0.5)],
                Duration::from_secs(1),
                HOLD,
                Some(DRAIN)
            ),
            Step::Switch(SwitchReason::OneStopped)
        );
        // Completed before the batch noticed: still the signal for the others.
        let mut gone = early;
        gone.done = true;
        assert_eq!(
            decide(&[gone, draining], Duration::from_secs(1), HOLD, Some(DRAIN)),
            Step::Switch(SwitchReason::OneStopped)
        );
    }
}
