//! The reference's metrics (SPEC.md section 3), as pure functions over time intervals.
//!
//! Times are microseconds on one clock (the QMP event clock for T1/T2, the load
//! generator's clock for client gaps). Nothing here reads a clock.

use serde::{Deserialize, Serialize};

/// A closed-open interval `[start_us, end_us)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interval {
    pub start_us: u64,
    pub end_us: u64,
}

impl Interval {
    pub fn new(start_us: u64, end_us: u64) -> Interval {
        Interval {
            start_us,
            end_us: end_us.max(start_us),
        }
    }

    pub fn len_us(&self) -> u64 {
        self.end_us - self.start_us
    }
}

/// SVC-T2 (and SVC-T1): from the earliest start to the latest end of the intervals.
pub fn span_us(intervals: &[Interval]) -> u64 {
    let start = intervals.iter().map(|i| i.start_us).min();
    let end = intervals.iter().map(|i| i.end_us).max();
    match (start, end) {
        (Some(s), Some(e)) => e - s,
        _ => 0,
    }
}

/// The intervals merged so that no instant is counted twice, in time order.
pub fn union(intervals: &[Interval]) -> Vec<Interval> {
    let mut sorted: Vec<Interval> = intervals
        .iter()
        .copied()
        .filter(|i| i.len_us() > 0)
        .collect();
    sorted.sort_by_key(|i| i.start_us);
    let mut out: Vec<Interval> = Vec::new();
    for i in sorted {
        match out.last_mut() {
            Some(last) if i.start_us <= last.end_us => last.end_us = last.end_us.max(i.end_us),
            _ => out.push(i),
        }
    }
    out
}

/// Time during which at least one interval is open.
pub fn union_us(intervals: &[Interval]) -> u64 {
    union(intervals).iter().map(Interval::len_us).sum()
}

/// Availability gaps of one client stream: given the completion times of successful
/// requests (sorted or not), every interval between consecutive successes longer than
/// `threshold_us` (the request period times a tolerance) is a gap.
pub fn gaps(success_us: &[u64], threshold_us: u64) -> Vec<Interval> {
    let mut t = success_us.to_vec();
    t.sort_unstable();
    t.windows(2)
        .filter(|w| w[1] - w[0] > threshold_us)
        .map(|w| Interval::new(w[0], w[1]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iv(a: u64, b: u64) -> Interval {
        Interval::new(a, b)
    }

    #[test]
    fn overlapping_intervals_count_once() {
        let t2 = [iv(100, 200), iv(150, 260), iv(250, 300)];
        assert_eq!(span_us(&t2), 200);
        assert_eq!(union_us(&t2), 200);
        assert_eq!(union(&t2), vec![iv(100, 300)]);
    }

    #[test]
    fn disjoint_intervals_span_more_than_their_union() {
        let t2 = [iv(0, 30), iv(1000, 1040), iv(500, 520)];
        assert_eq!(span_us(&t2), 1040);
        assert_eq!(union_us(&t2), 30 + 40 + 20);
        assert_eq!(union(&t2).len(), 3);
    }

    #[test]
    fn nested_intervals_are_absorbed() {
        let t2 = [iv(0, 1000), iv(100, 200), iv(300, 400)];
        assert_eq!(span_us(&t2), 1000);
        assert_eq!(union_us(&t2), 1000);
    }

    #[test]
    fn empty_and_touching() {
        assert_eq!(span_us(&[]), 0);
        assert_eq!(union_us(&[]), 0);
        assert_eq!(union_us(&[iv(0, 10), iv(10, 20)]), 20);
        assert_eq!(union_us(&[iv(5, 5)]), 0);
    }

    #[test]
    fn gaps_between_successes() {
        let ok = [0, 10, 20, 300, 310, 1000];
        assert_eq!(gaps(&ok, 50), vec![iv(20, 300), iv(310, 1000)]);
        assert!(gaps(&ok, 1000).is_empty());
    }
}
