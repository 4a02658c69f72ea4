//! The circuit breaker: when the bank fails several calls in a row, the dispatcher stops
//! calling it and probes with one call at a time until it answers.
//!
//! - **Closed**: calls go. [`BreakerConfig::trip_after`] failures in a row (`UNAVAILABLE`, a
//!   timeout, no connection) open it.
//! - **Open** until a time: calls are refused without being sent. It stays open for the
//!   `RetryInfo` delay of the failure that opened it, and at least a back-off that starts at
//!   [`BreakerConfig::first_open`] and doubles each time a probe fails, up to
//!   [`BreakerConfig::max_open`].
//! - **Half-open**: the first call after that time is the probe; the others are refused while
//!   it is on its way. The probe answered: closed. The probe failed: open again, for longer.
//!
//! A call answered after the breaker changed state (sent before it opened, say) does not move
//! it: only the calls sent in the current state count, so that the stragglers of an outage's
//! first moments do not close it again. Pure: the caller passes the time.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Failures in a row that open the breaker.
    pub trip_after: u32,
    /// How long it first stays open; doubles with each failed probe.
    pub first_open: Duration,
    /// The longest it stays open without a `RetryInfo` asking for longer.
    pub max_open: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            trip_after: 5,
            first_open: Duration::from_millis(250),
            max_open: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// The probe is on its way.
    HalfOpen,
}

/// Leave to send one call, and the breaker's state when it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    generation: u64,
    probe: bool,
}

#[cfg(test)]
impl Ticket {
    pub fn is_probe(&self) -> bool {
        self.probe
    }
}

/// How a call went, as far as the breaker is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The bank answered, whatever it said.
    Answered,
    /// No answer: `UNAVAILABLE`, a timeout, no connection; with the bank's `RetryInfo` delay.
    Failed { retry_after: Option<Duration> },
}

/// What a verdict changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    None,
    Opened { until: Instant },
    Closed,
}

#[derive(Debug, Clone)]
pub struct Breaker {
    config: BreakerConfig,
    state: State,
    /// Changes of state so far: a ticket of an earlier generation no longer counts.
    generation: u64,
    /// Times it opened since it was last closed.
    opened: u32,
}

impl Breaker {
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            state: State::Closed { failures: 0 },
            generation: 0,
            opened: 0,
        }
    }

    #[cfg(test)]
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed { .. })
    }

    /// Leave to send a call at `now`, or the time until which calls are refused.
    pub fn admit(&mut self, now: Instant) -> Result<Ticket, Instant> {
        let probe = match self.state {
            State::Closed { .. } => false,
            State::Open { until } if now < until => return Err(until),
            State::Open { .. } => {
                self.change(State::HalfOpen);
                true
            }
            State::HalfOpen => return Err(now + self.config.first_open),
        };
        Ok(Ticket {
            generation: self.generation,
            probe,
        })
    }

    /// Whether `ticket`, given earlier, still lets its call go at `now` (the breaker may
    /// have opened meanwhile); if not, until when calls are refused.
    pub fn still_admits(&self, ticket: &Ticket, now: Instant) -> Result<(), Instant> {
        if ticket.generation == self.generation {
            return Ok(());
        }
        match self.state {
            State::Open { until } if now < until => Err(until),
            _ => Err(now + self.config.first_open),
        }
    }

    /// Records how the call sent under `ticket` went, at `now`.
    pub fn record(&mut self, ticket: &Ticket, verdict: Verdict, now: Instant) -> Change {
        if ticket.generation != self.generation {
            return Change::None;
        }
        match (self.state, verdict) {
            (State::Closed { .. }, Verdict::Answered) => {
                self.state = State::Closed { failures: 0 };
                Change::None
            }
            (State::Closed { failures }, Verdict::Failed { retry_after }) => {
                let failures = failures + 1;
                if failures >= self.config.trip_after.max(1) {
                    self.open(now, retry_after)
                } else {
                    self.state = State::Closed { failures };
                    Change::None
                }
            }
            (State::HalfOpen, Verdict::Answered) => {
                self.opened = 0;
                self.change(State::Closed { failures: 0 });
                Change::Closed
            }
            (State::HalfOpen, Verdict::Failed { retry_after }) => self.open(now, retry_after),
            (State::Open { .. }, _) => Change::None,
        }
    }

    /// The probe under `ticket` was given up before it was answered: the next call probes.
    pub fn abandon(&mut self, ticket: &Ticket, now: Instant) {
        if ticket.probe && ticket.generation == self.generation {
            self.change(State::Open { until: now });
        }
    }

    fn open(&mut self, now: Instant, retry_after: Option<Duration>) -> Change {
        let doubling = 1u32 << self.opened.min(16);
        let back_off = self
            .config
            .first_open
            .saturating_mul(doubling)
            .min(self.config.max_open);
        let until = now + retry_after.unwrap_or_default().max(back_off);
        self.opened = self.opened.saturating_add(1);
        self.change(State::Open { until });
        Change::Opened { until }
    }

    fn change(&mut self, state: State) {
        self.state = state;
        self.generation += 1;
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const FAILED: Verdict = Verdict::Failed { retry_after: None };

    fn config() -> BreakerConfig {
        BreakerConfig {
            trip_after: 3,
            first_open: Duration::from_millis(100),
            max_open: Duration::from_millis(400),
        }
    }

    /// Sends one call at `now` and records `verdict` for it at once.
    fn call(b: &mut Breaker, now: Instant, verdict: Verdict) -> Result<Change, Instant> {
        let ticket = b.admit(now)?;
        Ok(b.record(&ticket, verdict, now))
    }

    #[test]
    fn failures_in_a_row_open_it_and_a_probe_that_answers_closes_it() {
        let t0 = Instant::now();
        let mut b = Breaker::new(config());
        assert_eq!(call(&mut b, t0, FAILED), Ok(Change::None));
        assert_eq!(call(&mut b, t0, Verdict::Answered), Ok(Change::None));
        assert_eq!(call(&mut b, t0, FAILED), Ok(Change::None));
        assert_eq!(call(&mut b, t0, FAILED), Ok(Change::None));
        let until = t0 + Duration::from_millis(100);
        assert_eq!(call(&mut b, t0, FAILED), Ok(Change::Opened { until }));
        assert_eq!(b.admit(t0 + Duration::from_millis(99)), Err(until));

        // The probe fails: open twice as long. The next probe answers: closed.
        let probe = b.admit(until).expect("probe");
        assert!(probe.is_probe());
        assert!(b.admit(until).is_err(), "one probe at a time");
        let until = until + Duration::from_millis(200);
        assert_eq!(
            b.record(&probe, FAILED, until - Duration::from_millis(200)),
            Change::Opened { until }
        );
        let probe = b.admit(until).expect("probe");
        assert_eq!(b.record(&probe, Verdict::Answered, until), Change::Closed);
        assert!(b.is_closed());
        assert!(!b.admit(until).expect("closed").is_probe());
    }

    #[test]
    fn a_retry_delay_longer_than_the_back_off_is_honoured() {
        let t0 = Instant::now();
        let mut b = Breaker::new(config());
        let retry_after = Some(Duration::from_secs(30));
        for _ in 0..2 {
            call(&mut b, t0, FAILED).expect("closed");
        }
        let opened = call(&mut b, t0, Verdict::Failed { retry_after });
        let until = t0 + Duration::from_secs(30);
        assert_eq!(opened, Ok(Change::Opened { until }));
    }

    #[test]
    fn calls_sent_before_it_opened_neither_close_it_nor_count() {
        let t0 = Instant::now();
        let mut b = Breaker::new(config());
        let early = b.admit(t0).expect("closed");
        for _ in 0..3 {
            call(&mut b, t0, FAILED).expect("closed");
        }
        assert!(!b.is_closed());
        assert_eq!(b.record(&early, Verdict::Answered, t0), Change::None);
        assert!(!b.is_closed());
        assert!(b.still_admits(&early, t0).is_err());
    }

    #[test]
    fn an_abandoned_probe_lets_the_next_call_probe() {
        let t0 = Instant::now();
        let mut b = Breaker::new(config());
        for _ in 0..3 {
            call(&mut b, t0, FAILED).expect("closed");
        }
        let later = t0 + Duration::from_secs(1);
        let probe = b.admit(later).expect("probe");
        b.abandon(&probe, later);
        assert!(b.admit(later).expect("probe again").is_probe());
    }

    proptest! {
        /// Over any run of calls: at most one probe is ever on its way; while open, nothing
        /// is let through before the time it said; the breaker opens exactly when
        /// `trip_after` calls in a row have failed while it was closed; an open spell lasts
        /// at least `first_open` and at most `max_open` (no `RetryInfo` here).
        #[test]
        fn the_breaker_keeps_its_rules(
            steps in prop::collection::vec((0..300u64, any::<bool>(), any::<bool>()), 1..300)
        ) {
            let c = config();
            let t0 = Instant::now();
            let mut b = Breaker::new(c);
            let mut now = t0;
            let mut refused_until: Option<Instant> = None;
            let mut failed_in_a_row = 0;
            for (after_ms, fails, answer_now) in steps {
                now += Duration::from_millis(after_ms);
                let was_closed = b.is_closed();
                match b.admit(now) {
                    Err(until) => {
                        prop_assert!(until > now);
                        refused_until = Some(until);
                        continue;
                    }
                    Ok(ticket) => {
                        if let Some(until) = refused_until.take() {
                            prop_assert!(now >= until);
                        }
                        if ticket.is_probe() {
                            prop_assert!(b.admit(now).is_err(), "a second probe");
                        }
                        if !answer_now {
                            if ticket.is_probe() {
                                b.abandon(&ticket, now);
                            }
                            continue;
                        }
                        let verdict = if fails { FAILED } else { Verdict::Answered };
                        let change = b.record(&ticket, verdict, now);
                        if was_closed {
                            failed_in_a_row = if fails { failed_in_a_row + 1 } else { 0 };
                            let trips = failed_in_a_row == c.trip_after;
                            prop_assert_eq!(matches!(change, Change::Opened { .. }), trips);
                        }
                        if let Change::Opened { until } = change {
                            failed_in_a_row = 0;
                            prop_assert!(until >= now + c.first_open);
                            prop_assert!(until <= now + c.max_open);
                        }
                        if change == Change::Closed {
                            prop_assert!(ticket.is_probe());
                        }
                    }
                }
            }
        }
    }
}
