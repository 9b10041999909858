//! One directed path between two ports: a serializer (the rate limiter) followed by a
//! delay line. Pure logic on an injected clock (`now` in nanoseconds), so tests can state
//! exact departure times.
//!
//! A frame admitted at `now` starts serializing when the path is free
//! (`start = max(now, busy_until)`), leaves the serializer at
//! `start + wire_bytes * 8 / rate` and is delivered one propagation delay (plus jitter, on a
//! conventional WAN) later. Delay is constant per path, so a FIFO is enough: delivery times
//! never decrease (jitter is clamped to keep order, as a real fibre would).
//!
//! The queue is the backlog not yet serialized, `(busy_until - now) * rate`; it is capped
//! at `queue_limit_bytes`, beyond which frames are tail-dropped.
//!
//! Strict priority: a priority frame (HA heartbeats, consensus) does not wait behind the
//! bulk backlog. It is serialized at once and bulk frames admitted after it start later by
//! its serialization time, as behind a strict-priority scheduler on a real port (bulk
//! frames already admitted keep their times: a small approximation, the priority class is
//! tiny). Priority frames keep their own FIFO. On an APN path (no jitter, no loss) they
//! are only dropped when the path is cut; on a conventional WAN they suffer its jitter and
//! loss like any frame: a class of service orders queues, it does not mend the fibre.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// Parameters of a directed path. Wire format of the control protocol (see `control`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PathParams {
    pub delay_ns: u64,
    pub rate_bps: u64,
    #[serde(default)]
    pub jitter_ns: u64,
    /// Probability in [0, 1) that one wire segment is lost.
    #[serde(default)]
    pub loss: f64,
    /// Frames vanish (a cut fibre).
    #[serde(default)]
    pub blackhole: bool,
    /// Cap on the serialization backlog; `None` picks [`PathParams::default_queue_limit`].
    #[serde(default)]
    pub queue_limit_bytes: Option<u64>,
    /// Bulk transfers get a lane of their own with these same parameters (an APN path
    /// allocated on demand); `false`: they share this path with everything else.
    #[serde(default)]
    pub bulk_lane: bool,
}

/// The backlog may hold this many bandwidth-delay products (one-way delay x rate x 2 = one
/// RTT's worth of the path, times this factor).
pub const QUEUE_BDP_MULTIPLE: u64 = 2;
/// ... but never less than this, so short paths still absorb a TSO burst.
pub const QUEUE_FLOOR_BYTES: u64 = 1 << 20;

impl PathParams {
    /// `QUEUE_BDP_MULTIPLE` round-trip BDPs, at least `QUEUE_FLOOR_BYTES`.
    pub fn default_queue_limit(&self) -> u64 {
        let rtt_bdp =
            (u128::from(self.rate_bps) * u128::from(2 * self.delay_ns) / 8_000_000_000) as u64;
        (rtt_bdp * QUEUE_BDP_MULTIPLE).max(QUEUE_FLOOR_BYTES)
    }

    pub fn queue_limit(&self) -> u64 {
        self.queue_limit_bytes
            .unwrap_or_else(|| self.default_queue_limit())
    }

    /// Nanoseconds to serialize `bytes` at this rate.
    pub fn serialization_ns(&self, bytes: u64) -> u64 {
        (u128::from(bytes) * 8_000_000_000 / u128::from(self.rate_bps.max(1))) as u64
    }
}

/// Why a frame was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    Blackhole,
    QueueFull,
    Loss,
}

/// Counters of one path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathCounters {
    pub frames: u64,
    pub segments: u64,
    pub wire_bytes: u64,
    pub dropped_blackhole: u64,
    pub dropped_queue: u64,
    pub dropped_loss: u64,
    /// Largest backlog seen, in bytes.
    pub max_backlog_bytes: u64,
    /// Frames of the strict-priority class (included in `frames`).
    #[serde(default)]
    pub priority_frames: u64,
}

/// A small deterministic PRNG (xorshift64*) for loss and jitter.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A directed path holding frames of type `F` in flight.
#[derive(Debug)]
pub struct Path<F> {
    params: PathParams,
    busy_until: u64,
    last_delivery: u64,
    in_flight: VecDeque<(u64, F)>,
    /// Priority frames in flight (their own FIFO: they overtake bulk frames).
    priority: VecDeque<(u64, F)>,
    /// When the last priority frame leaves the serializer.
    priority_busy_until: u64,
    in_flight_bytes: u64,
    rng: Rng,
    pub counters: PathCounters,
}

impl<F> Path<F> {
    pub fn new(params: PathParams, seed: u64) -> Path<F> {
        Path {
            params,
            busy_until: 0,
            last_delivery: 0,
            in_flight: VecDeque::new(),
            priority: VecDeque::new(),
            priority_busy_until: 0,
            in_flight_bytes: 0,
            rng: Rng::new(seed),
            counters: PathCounters::default(),
        }
    }

    pub fn params(&self) -> PathParams {
        self.params
    }

    /// Changes the parameters; frames already in flight keep their delivery time.
    pub fn set_params(&mut self, params: PathParams) {
        self.params = params;
    }

    /// Bytes waiting for the serializer at `now`.
    pub fn backlog_bytes(&self, now: u64) -> u64 {
        let wait = self.busy_until.saturating_sub(now);
        (u128::from(wait) * u128::from(self.params.rate_bps) / 8_000_000_000) as u64
    }

    /// Admits a frame of `wire_bytes` (`segments` Ethernet frames) at `now` and returns its
    /// delivery time, or why it was dropped.
    pub fn admit(
        &mut self,
        now: u64,
        wire_bytes: u64,
        segments: u64,
        frame: F,
        mem_bytes: u64,
    ) -> Result<u64, Drop> {
        let p = self.params;
        if p.blackhole {
            self.counters.dropped_blackhole += 1;
            return Err(Drop::Blackhole);
        }
        let backlog = self.backlog_bytes(now);
        if backlog + wire_bytes > p.queue_limit() && backlog > 0 {
            self.counters.dropped_queue += 1;
            return Err(Drop::QueueFull);
        }
        if p.loss > 0.0 && self.lost(segments) {
            return Err(Drop::Loss);
        }
        let start = now.max(self.busy_until);
        self.busy_until = start + p.serialization_ns(wire_bytes);
        self.counters.max_backlog_bytes = self.counters.max_backlog_bytes.max(backlog + wire_bytes);
        let delivery = self
            .jittered(self.busy_until + p.delay_ns)
            .max(self.last_delivery)
            .max(now);
        self.last_delivery = delivery;
        self.count(segments, wire_bytes, mem_bytes);
        self.in_flight.push_back((delivery, frame));
        Ok(delivery)
    }

    /// Draws whether a frame of `segments` wire segments is lost (and counts it).
    fn lost(&mut self, segments: u64) -> bool {
        let keep = (1.0 - self.params.loss).powi(segments.min(i32::MAX as u64) as i32);
        let lost = self.rng.unit() >= keep;
        if lost {
            self.counters.dropped_loss += 1;
        }
        lost
    }

    /// `delivery` moved uniformly within +/- the jitter.
    fn jittered(&mut self, delivery: u64) -> u64 {
        let j = self.params.jitter_ns;
        if j == 0 {
            return delivery;
        }
        let offset = (self.rng.unit() * (2 * j) as f64) as u64;
        (delivery + offset).saturating_sub(j)
    }

    fn count(&mut self, segments: u64, wire_bytes: u64, mem_bytes: u64) {
        self.counters.frames += 1;
        self.counters.segments += segments;
        self.counters.wire_bytes += wire_bytes;
        self.in_flight_bytes += mem_bytes;
    }

    /// Admits a priority frame: serialized ahead of the bulk backlog (see the module doc).
    pub fn admit_priority(
        &mut self,
        now: u64,
        wire_bytes: u64,
        segments: u64,
        frame: F,
        mem_bytes: u64,
    ) -> Result<u64, Drop> {
        let p = self.params;
        if p.blackhole {
            self.counters.dropped_blackhole += 1;
            return Err(Drop::Blackhole);
        }
        if p.loss > 0.0 && self.lost(segments) {
            return Err(Drop::Loss);
        }
        let ser = p.serialization_ns(wire_bytes);
        let start = now.max(self.priority_busy_until);
        self.priority_busy_until = start + ser;
        // The bulk frames behind it wait for it.
        self.busy_until = self.busy_until.max(now) + ser;
        let delivery = self.jittered(start + ser + p.delay_ns);
        let delivery = delivery.max(self.priority.back().map_or(0, |b| b.0));
        self.counters.priority_frames += 1;
        self.count(segments, wire_bytes, mem_bytes);
        self.priority.push_back((delivery, frame));
        Ok(delivery)
    }

    /// Delivery time of the next frame, if any.
    pub fn next_delivery(&self) -> Option<u64> {
        let bulk = self.in_flight.front().map(|(t, _)| *t);
        let prio = self.priority.front().map(|(t, _)| *t);
        match (bulk, prio) {
            (Some(b), Some(p)) => Some(b.min(p)),
            (b, p) => b.or(p),
        }
    }

    /// Takes the next frame if it is due at `now` (priority first); `mem_bytes` must give
    /// back what `admit` was told.
    pub fn pop_due(&mut self, now: u64, mem_bytes: impl Fn(&F) -> u64) -> Option<F> {
        let queue = if self.priority.front().is_some_and(|(t, _)| *t <= now) {
            &mut self.priority
        } else if self.in_flight.front().is_some_and(|(t, _)| *t <= now) {
            &mut self.in_flight
        } else {
            return None;
        };
        let (_, f) = queue.pop_front()?;
        self.in_flight_bytes -= mem_bytes(&f);
        Some(f)
    }

    /// Memory held by frames in flight.
    pub fn in_flight_bytes(&self) -> u64 {
        self.in_flight_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const US: u64 = 1_000;

    fn params(delay_ns: u64, rate_bps: u64) -> PathParams {
        PathParams {
            delay_ns,
            rate_bps,
            jitter_ns: 0,
            loss: 0.0,
            blackhole: false,
            queue_limit_bytes: None,
            bulk_lane: false,
        }
    }

    fn admit(p: &mut Path<u32>, now: u64, bytes: u64, id: u32) -> Result<u64, Drop> {
        p.admit(now, bytes, 1, id, 1)
    }

    #[test]
    fn serialization_then_propagation_exact_times() {
        // 8 Mbit/s = 1 byte per microsecond; 0.5 ms one way.
        let mut p = Path::new(params(500 * US, 8_000_000), 1);
        assert_eq!(admit(&mut p, 0, 1000, 1), Ok(1000 * US + 500 * US));
        // Queued behind the first frame.
        assert_eq!(admit(&mut p, 0, 1000, 2), Ok(2000 * US + 500 * US));
        // Arrives after the serializer went idle: starts at once.
        assert_eq!(
            admit(&mut p, 5 * MS, 500, 3),
            Ok(5 * MS + 500 * US + 500 * US)
        );
        assert_eq!(p.next_delivery(), Some(1500 * US));
        assert_eq!(p.pop_due(1499 * US, |_| 1), None);
        assert_eq!(p.pop_due(1500 * US, |_| 1), Some(1));
        assert_eq!(p.pop_due(10 * MS, |_| 1), Some(2));
        assert_eq!(p.pop_due(10 * MS, |_| 1), Some(3));
        assert_eq!(p.pop_due(10 * MS, |_| 1), None);
        assert_eq!(p.in_flight_bytes(), 0);
    }

    #[test]
    fn priority_frames_overtake_the_bulk_backlog() {
        // 8 Mbit/s = 1 byte per microsecond; 0.5 ms one way; 10 ms of bulk queued.
        let mut p = Path::new(params(500 * US, 8_000_000), 1);
        for i in 0..10 {
            admit(&mut p, 0, 1000, i).unwrap();
        }
        // A 100-byte heartbeat at t = 1 ms leaves the serializer 100 us later and arrives
        // one delay after that, not after the 10 ms backlog.
        let hb = p.admit_priority(MS, 100, 1, 99, 1).unwrap();
        assert_eq!(hb, MS + 100 * US + 500 * US);
        // The bulk frames behind it are pushed back by its serialization time.
        assert_eq!(
            admit(&mut p, MS, 1000, 10),
            Ok(11 * MS + 100 * US + 500 * US)
        );
        // The bulk frame already on the wire arrives first, then the heartbeat, then the
        // rest of the backlog.
        assert_eq!(p.pop_due(1500 * US, |_| 1), Some(0));
        assert_eq!(p.next_delivery(), Some(hb));
        assert_eq!(p.pop_due(hb, |_| 1), Some(99));
        assert_eq!(p.next_delivery(), Some(2500 * US));
        assert_eq!(p.counters.priority_frames, 1);
        // A cut path drops priority frames too.
        let mut cut = params(0, 8_000_000);
        cut.blackhole = true;
        let mut c = Path::new(cut, 1);
        assert_eq!(c.admit_priority(0, 100, 1, 1u32, 1), Err(Drop::Blackhole));
    }

    #[test]
    fn backlog_is_capped() {
        let mut pp = params(0, 8_000_000);
        pp.queue_limit_bytes = Some(3000);
        let mut p = Path::new(pp, 1);
        assert!(admit(&mut p, 0, 1000, 1).is_ok());
        assert!(admit(&mut p, 0, 1000, 2).is_ok());
        assert!(admit(&mut p, 0, 1000, 3).is_ok());
        assert_eq!(admit(&mut p, 0, 1000, 4), Err(Drop::QueueFull));
        assert_eq!(p.backlog_bytes(0), 3000);
        // After 1 ms one frame has left the serializer, so one fits again.
        assert_eq!(p.backlog_bytes(1000 * US), 2000);
        assert_eq!(admit(&mut p, 1000 * US, 1000, 5), Ok(4000 * US));
        assert_eq!(p.counters.dropped_queue, 1);
    }

    #[test]
    fn default_queue_is_two_rtt_bdps_with_a_floor() {
        // 1 Gbit/s x 5 ms RTT = 625 kB; two of them.
        assert_eq!(
            params(2500 * US, 1_000_000_000).default_queue_limit(),
            1_250_000
        );
        assert_eq!(
            params(10 * US, 1_000_000).default_queue_limit(),
            QUEUE_FLOOR_BYTES
        );
    }

    #[test]
    fn blackhole_drops_everything() {
        let mut pp = params(MS, 1_000_000_000);
        pp.blackhole = true;
        let mut p = Path::new(pp, 1);
        assert_eq!(admit(&mut p, 0, 100, 1), Err(Drop::Blackhole));
        pp.blackhole = false;
        p.set_params(pp);
        assert!(admit(&mut p, 0, 100, 2).is_ok());
    }

    #[test]
    fn jitter_keeps_order_and_bounds() {
        let mut pp = params(MS, 100_000_000_000);
        pp.jitter_ns = 200 * US;
        let mut p = Path::new(pp, 7);
        let mut last = 0;
        for i in 0..1000u32 {
            let now = u64::from(i) * 10 * US;
            let t = admit(&mut p, now, 100, i).unwrap();
            assert!(t >= last, "delivery went backwards");
            assert!(
                t >= now + 800 * US && t <= now + 1200 * US + 10 * US,
                "{t} at {now}"
            );
            last = t;
        }
    }

    #[test]
    fn loss_rate_is_close_to_configured() {
        let mut pp = params(0, 100_000_000_000);
        pp.loss = 0.1;
        let mut p = Path::new(pp, 42);
        let lost = (0..100_000u32)
            .filter(|&i| admit(&mut p, u64::from(i) * US, 100, i).is_err())
            .count();
        assert!((9_000..11_000).contains(&lost), "lost {lost}");
    }

    #[test]
    fn priority_frames_suffer_a_conventional_wan_s_jitter_and_loss() {
        let mut pp = params(MS, 100_000_000_000);
        pp.jitter_ns = 500 * US;
        pp.loss = 0.1;
        let mut p = Path::new(pp, 9);
        let (mut lost, mut early, mut late) = (0, 0, 0);
        for i in 0..10_000u32 {
            let now = u64::from(i) * MS;
            match p.admit_priority(now, 100, 1, i, 1) {
                Err(Drop::Loss) => lost += 1,
                Ok(t) => {
                    assert!(
                        t >= now + 500 * US && t <= now + 1500 * US + US,
                        "{t} at {now}"
                    );
                    if t < now + MS {
                        early += 1;
                    } else if t > now + MS + US {
                        late += 1;
                    }
                }
                Err(e) => panic!("{e:?}"),
            }
        }
        assert!((800..1200).contains(&lost), "lost {lost}");
        assert!(early > 3000 && late > 3000, "early {early}, late {late}");
        assert_eq!(p.counters.dropped_loss, lost);
    }
}
