//! The send rate the dispatcher learns from the bank's throttling: additive increase,
//! multiplicative decrease, on calls per second rather than calls in flight.
//!
//! Until the bank first throttles, calls are not paced. A throttled call (`RESOURCE_EXHAUSTED`)
//! sets the rate to [`DECREASE`] times the rate the bank accepted over the last [`WINDOW`] (or
//! the current rate, if lower), and holds every call back for the `RetryInfo` delay. Each
//! accepted call that had to wait for its turn then adds [`INCREASE_PER_CALL`] calls/s, so the
//! rate grows by about 5% a second while it is what holds the calls back, until the bank
//! throttles again. Only a call sent after the latest decrease can decrease it again: the calls
//! already on their way when the bank first refused say nothing new.
//!
//! Pure: the caller passes the time, so the rules are checked without a clock.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The share of the accepted rate the rate falls to when the bank throttles.
pub const DECREASE: f64 = 0.9;
/// Calls per second added by each accepted call that waited for its turn.
pub const INCREASE_PER_CALL: f64 = 0.05;
/// The lowest rate the dispatcher falls to, in calls per second.
pub const MIN_RATE: f64 = 1.0;
/// The highest rate it grows to, in calls per second.
pub const MAX_RATE: f64 = 1_000_000.0;
/// How far back accepted calls are counted to measure the rate the bank accepts.
pub const WINDOW: Duration = Duration::from_secs(1);
/// The shortest span an accepted rate is measured over: right after the first call, a handful
/// of calls would otherwise read as a very high rate.
const MIN_SPAN: Duration = Duration::from_millis(100);

/// A time a call may be sent at, and what the pace was when it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub at: Instant,
    /// Decreases so far when the slot was given.
    epoch: u64,
    /// Whether the call waits for its turn (the pace holds calls back).
    waits: bool,
}

#[derive(Debug, Clone)]
pub struct Pace {
    /// Calls per second; `None` until the bank first throttles.
    rate: Option<f64>,
    /// The earliest time the next call may be sent.
    next: Instant,
    epoch: u64,
    /// When the accepted calls of the last [`WINDOW`] were answered, oldest first.
    accepted: VecDeque<Instant>,
    first_accepted: Option<Instant>,
}

impl Pace {
    pub fn new(now: Instant) -> Self {
        Self {
            rate: None,
            next: now,
            epoch: 0,
            accepted: VecDeque::new(),
            first_accepted: None,
        }
    }

    /// The learned rate in calls per second, if the bank has throttled.
    pub fn rate(&self) -> Option<f64> {
        self.rate
    }

    /// The time the next call may be sent, asked at `now`; reserves it.
    pub fn reserve(&mut self, now: Instant) -> Slot {
        let at = self.next.max(now);
        if let Some(rate) = self.rate {
            self.next = at + Duration::from_secs_f64(1.0 / rate);
        }
        Slot {
            at,
            epoch: self.epoch,
            waits: at > now,
        }
    }

    /// The bank accepted (answered) the call sent at `slot`, at `now`.
    pub fn accepted(&mut self, slot: &Slot, now: Instant) {
        self.first_accepted.get_or_insert(now);
        self.accepted.push_back(now);
        self.forget_before(now);
        if slot.waits
            && let Some(rate) = &mut self.rate
        {
            *rate = (*rate + INCREASE_PER_CALL).min(MAX_RATE);
        }
    }

    /// The bank throttled the call sent at `slot`, at `now`, asking for `retry_after`.
    pub fn throttled(&mut self, slot: &Slot, now: Instant, retry_after: Duration) {
        self.next = self.next.max(now + retry_after);
        if slot.epoch != self.epoch {
            return;
        }
        let accepted = self.accepted_rate(now);
        let base = self.rate.map_or(accepted, |rate| rate.min(accepted));
        self.rate = Some((base * DECREASE).clamp(MIN_RATE, MAX_RATE));
        self.epoch += 1;
    }

    /// Calls per second the bank accepted over the last [`WINDOW`] (or since the first).
    fn accepted_rate(&mut self, now: Instant) -> f64 {
        self.forget_before(now);
        let since_first = self
            .first_accepted
            .map_or(Duration::ZERO, |first| now.saturating_duration_since(first));
        let span = since_first.clamp(MIN_SPAN, WINDOW);
        self.accepted.len() as f64 / span.as_secs_f64()
    }

    fn forget_before(&mut self, now: Instant) {
        while self
            .accepted
            .front()
            .is_some_and(|&at| now.saturating_duration_since(at) > WINDOW)
        {
            self.accepted.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn calls_are_not_paced_until_the_bank_throttles() {
        let t0 = Instant::now();
        let mut pace = Pace::new(t0);
        for _ in 0..100 {
            let slot = pace.reserve(t0);
            assert_eq!(slot.at, t0);
            pace.accepted(&slot, t0);
        }
        assert_eq!(pace.rate(), None);
    }

    #[test]
    fn a_throttle_sets_the_rate_below_what_the_bank_accepted() {
        let t0 = Instant::now();
        let mut pace = Pace::new(t0);
        // 300 calls answered over a second, one every 3.33 ms.
        for i in 0..300u32 {
            let now = t0 + Duration::from_micros(u64::from(i) * 3_333);
            let slot = pace.reserve(now);
            pace.accepted(&slot, now);
        }
        let now = t0 + ms(1_000);
        let slot = pace.reserve(now);
        pace.throttled(&slot, now, ms(3));
        let rate = pace.rate().expect("learned");
        assert!((rate - 300.0 * DECREASE).abs() < 1.0, "{rate}");
        // The next call waits for the retry delay.
        assert_eq!(pace.reserve(now).at, now + ms(3));
    }

    #[test]
    fn calls_already_sent_when_the_rate_fell_do_not_lower_it_again() {
        let t0 = Instant::now();
        let mut pace = Pace::new(t0);
        let slots: Vec<Slot> = (0..5).map(|_| pace.reserve(t0)).collect();
        for slot in &slots[..3] {
            pace.accepted(slot, t0 + ms(200));
        }
        pace.throttled(&slots[3], t0 + ms(200), ms(1));
        let rate = pace.rate();
        pace.throttled(&slots[4], t0 + ms(201), ms(1));
        assert_eq!(pace.rate(), rate);
        let later = pace.reserve(t0 + ms(300));
        pace.throttled(&later, t0 + ms(310), ms(1));
        assert!(pace.rate() < rate, "{:?} then {:?}", rate, pace.rate());
    }

    /// One event of a run: a call asked for at `after_us` past the previous event, then
    /// accepted or throttled (with a retry delay) `latency_us` later.
    fn events() -> impl Strategy<Value = Vec<(u64, u64, Option<u64>)>> {
        prop::collection::vec(
            (0..5_000u64, 0..50_000u64, prop::option::of(1..20_000u64)),
            1..200,
        )
    }

    proptest! {
        /// Whatever the bank answers: slots are never before the call asked, a slot is at
        /// least 1/rate after the one before if a rate was learned when that one was given,
        /// and none is before a retry delay the bank asked for; the rate stays within its bounds; a throttle never
        /// raises it and an accepted call never lowers it.
        #[test]
        fn the_pace_keeps_its_rules(events in events()) {
            let t0 = Instant::now();
            let mut pace = Pace::new(t0);
            let mut now = t0;
            let mut last: Option<(Slot, f64)> = None;
            let mut held_until = t0;
            for (after_us, latency_us, throttle) in events {
                now += Duration::from_micros(after_us);
                let rate_before = pace.rate();
                let slot = pace.reserve(now);
                prop_assert!(slot.at >= now);
                prop_assert!(slot.at >= held_until);
                if let Some((last, rate)) = last {
                    let gap = slot.at.saturating_duration_since(last.at).as_secs_f64();
                    prop_assert!(gap >= 1.0 / rate - 1e-6, "gap {gap} at {rate}/s");
                }
                last = rate_before.map(|rate| (slot, rate));
                let answered = slot.at + Duration::from_micros(latency_us);
                match throttle {
                    Some(retry_us) => {
                        pace.throttled(&slot, answered, Duration::from_micros(retry_us));
                        held_until = held_until.max(answered + Duration::from_micros(retry_us));
                        let rate = pace.rate().expect("a throttle sets a rate");
                        prop_assert!(rate <= rate_before.unwrap_or(f64::MAX));
                    }
                    None => {
                        pace.accepted(&slot, answered);
                        prop_assert!(pace.rate() >= rate_before);
                    }
                }
                if let Some(rate) = pace.rate() {
                    prop_assert!((MIN_RATE..=MAX_RATE).contains(&rate));
                }
                now = now.max(answered);
            }
        }
    }
}
