//! What lets a dispatcher's call go to the bank, shared by all its rounds. A call waits for,
//! in order:
//!
//! 1. room in the **window** of calls in flight: `dispatch_concurrency` normally; one once the
//!    breaker opens, then one more for each call the bank answers (doubling every round trip)
//!    after it closes, so that a bank back from an outage is ramped up to, not flooded;
//! 2. leave from the **circuit breaker** ([`super::breaker`]): refused at once while it is
//!    open, the payout then being due again when it may probe;
//! 3. its turn at the **rate learned from throttling** ([`super::pace`]), which also honours
//!    the bank's `RetryInfo`;
//! 4. the **contractual rate limit** `dispatch_rate_limit_per_s`, if set (no bursts);
//!
//! then the breaker is asked again, in case it opened while the call waited. When the bank
//! answers, [`Admission::finish`] tells the pace, the breaker and the window how it went.

use std::num::NonZeroU32;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::Notify;
use tonic::{Code, Status};
use tonic_types::StatusExt as _;

use super::breaker::{Breaker, BreakerConfig, Change, Ticket, Verdict};
use super::pace::{Pace, Slot};

/// How long a throttled call waits when the bank sent no `RetryInfo`.
pub const THROTTLED_WITHOUT_DELAY: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy)]
pub struct FlowConfig {
    /// Calls in flight at most.
    pub concurrency: usize,
    /// A contractual limit on calls per second, never exceeded.
    pub rate_limit_per_s: Option<NonZeroU32>,
    pub breaker: BreakerConfig,
}

pub struct Flow {
    state: Mutex<State>,
    /// Woken when a call ends or the window grows.
    room: Notify,
    contract: Option<DefaultDirectRateLimiter>,
}

struct State {
    in_flight: usize,
    window: Window,
    pace: Pace,
    breaker: Breaker,
}

/// Calls the dispatcher lets itself have in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Window {
    limit: usize,
    max: usize,
}

impl Window {
    fn grow(&mut self) -> bool {
        let grown = self.limit < self.max;
        self.limit = (self.limit + 1).min(self.max);
        grown
    }

    fn restart(&mut self) {
        self.limit = 1;
    }
}

/// How a call went, for the flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The bank answered and took the call (whatever it said about the payout).
    Accepted,
    /// `RESOURCE_EXHAUSTED`: over the bank's rate limit, nothing applied; retry after this.
    Throttled { retry_after: Duration },
    /// No answer from the bank: `UNAVAILABLE`, a timeout (`DEADLINE_EXCEEDED`, or `CANCELLED`
    /// as the client reports its own deadline), no connection.
    Failed { retry_after: Option<Duration> },
}

impl Outcome {
    pub fn of<T>(result: &Result<T, Status>) -> Self {
        result
            .as_ref()
            .err()
            .map_or(Self::Accepted, Self::of_status)
    }

    pub fn of_status(status: &Status) -> Self {
        let retry_after = status
            .get_details_retry_info()
            .and_then(|info| info.retry_delay);
        match status.code() {
            Code::ResourceExhausted => Self::Throttled {
                retry_after: retry_after.unwrap_or(THROTTLED_WITHOUT_DELAY),
            },
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => {
                Self::Failed { retry_after }
            }
            _ => Self::Accepted,
        }
    }
}

/// A call let through; [`Admission::finish`] it with the bank's answer. Dropped, it frees its
/// place in the window (and, if it was the breaker's probe and never answered, lets the next
/// call probe).
pub struct Admission<'a> {
    flow: &'a Flow,
    ticket: Option<Ticket>,
    slot: Option<Slot>,
    finished: bool,
}

impl Flow {
    pub fn new(config: FlowConfig) -> Self {
        let max = config.concurrency.max(1);
        Self {
            state: Mutex::new(State {
                in_flight: 0,
                window: Window { limit: max, max },
                pace: Pace::new(Instant::now()),
                breaker: Breaker::new(config.breaker),
            }),
            room: Notify::new(),
            contract: config.rate_limit_per_s.map(|per_second| {
                RateLimiter::direct(Quota::per_second(per_second).allow_burst(NonZeroU32::MIN))
            }),
        }
    }

    // Every update under the lock is a few assignments: a poisoned lock is still consistent.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until a call may go; `Err(until)` if the breaker refuses it, open until then.
    pub async fn admit(&self) -> Result<Admission<'_>, Instant> {
        let mut admission = self.enter().await;
        let slot = {
            let mut state = self.lock();
            let now = Instant::now();
            admission.ticket = Some(state.breaker.admit(now)?);
            state.pace.reserve(now)
        };
        admission.slot = Some(slot);
        if slot.at > Instant::now() {
            tokio::time::sleep_until(slot.at.into()).await;
        }
        if let Some(contract) = &self.contract {
            contract.until_ready().await;
        }
        if let Some(ticket) = &admission.ticket {
            self.lock().breaker.still_admits(ticket, Instant::now())?;
        }
        Ok(admission)
    }

    /// Takes a place in the window, waiting for one.
    async fn enter(&self) -> Admission<'_> {
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            {
                let mut state = self.lock();
                if state.in_flight < state.window.limit {
                    state.in_flight += 1;
                    return Admission {
                        flow: self,
                        ticket: None,
                        slot: None,
                        finished: false,
                    };
                }
            }
            room.await;
        }
    }
}

impl Admission<'_> {
    /// Tells the flow how the call went.
    pub fn finish(mut self, outcome: Outcome) {
        let (Some(ticket), Some(slot)) = (self.ticket, self.slot) else {
            return;
        };
        self.finished = true;
        let now = Instant::now();
        let mut state = self.flow.lock();
        let verdict = match outcome {
            Outcome::Accepted => {
                state.pace.accepted(&slot, now);
                if state.window.grow() {
                    self.flow.room.notify_one();
                }
                Verdict::Answered
            }
            Outcome::Throttled { retry_after } => {
                let before = state.pace.rate();
                state.pace.throttled(&slot, now, retry_after);
                if state.pace.rate() != before {
                    tracing::debug!(rate_per_s = ?state.pace.rate(), "bank throttles: pace lowered");
                }
                Verdict::Answered
            }
            Outcome::Failed { retry_after } => Verdict::Failed { retry_after },
        };
        match state.breaker.record(&ticket, verdict, now) {
            Change::Opened { until } => {
                state.window.restart();
                tracing::warn!(
                    retry_in_ms = until.saturating_duration_since(now).as_millis(),
                    "payments backend keeps failing: calls held back, probing one at a time"
                );
            }
            Change::Closed => tracing::info!("payments backend answers again: ramping up"),
            Change::None => {}
        }
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        let mut state = self.flow.lock();
        state.in_flight = state.in_flight.saturating_sub(1);
        if !self.finished
            && let Some(ticket) = &self.ticket
        {
            state.breaker.abandon(ticket, Instant::now());
        }
        drop(state);
        self.flow.room.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tonic_types::ErrorDetails;

    use super::*;

    fn flow(concurrency: usize, rate_limit_per_s: Option<u32>) -> Flow {
        Flow::new(FlowConfig {
            concurrency,
            rate_limit_per_s: rate_limit_per_s.and_then(NonZeroU32::new),
            breaker: BreakerConfig {
                trip_after: 2,
                first_open: Duration::from_millis(50),
                max_open: Duration::from_millis(50),
            },
        })
    }

    async fn admitted(flow: &Flow) -> Admission<'_> {
        flow.admit().await.expect("admitted")
    }

    fn failed() -> Outcome {
        Outcome::Failed { retry_after: None }
    }

    #[test]
    fn answers_are_read_as_accepted_throttled_or_failed() {
        let ms = Duration::from_millis;
        let throttled = Status::with_error_details(
            Code::ResourceExhausted,
            "slow down",
            ErrorDetails::with_retry_info(Some(ms(7))),
        );
        let cases: [(Result<(), Status>, Outcome); 6] = [
            (Ok(()), Outcome::Accepted),
            (Err(Status::not_found("no such key")), Outcome::Accepted),
            (Err(throttled), Outcome::Throttled { retry_after: ms(7) }),
            (
                Err(Status::resource_exhausted("no delay given")),
                Outcome::Throttled {
                    retry_after: THROTTLED_WITHOUT_DELAY,
                },
            ),
            (Err(Status::unavailable("down")), failed()),
            (Err(Status::cancelled("Timeout expired")), failed()),
        ];
        for (result, outcome) in cases {
            assert_eq!(Outcome::of(&result), outcome, "{result:?}");
        }
    }

    #[tokio::test]
    async fn no_more_calls_are_in_flight_than_the_concurrency() {
        let flow = Arc::new(flow(3, None));
        let (now, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let calls = (0..12).map(|_| {
            let (flow, now, most) = (flow.clone(), now.clone(), most.clone());
            tokio::spawn(async move {
                let admission = admitted(&flow).await;
                most.fetch_max(now.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
                now.fetch_sub(1, Ordering::SeqCst);
                admission.finish(Outcome::Accepted);
            })
        });
        for call in futures::future::join_all(calls).await {
            call.expect("call");
        }
        assert_eq!(most.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn an_open_breaker_refuses_then_one_probe_closes_it_and_the_window_ramps_up() {
        let flow = flow(8, None);
        for _ in 0..2 {
            admitted(&flow).await.finish(failed());
        }
        let until = flow.admit().await.err().expect("refused while open");
        assert_eq!(flow.lock().window.limit, 1);
        tokio::time::sleep_until(until.into()).await;

        let probe = admitted(&flow).await;
        // While the probe is on its way, the next call waits for room in the window.
        let waiting = tokio::time::timeout(Duration::from_millis(50), flow.admit()).await;
        assert!(waiting.is_err(), "a second call went out beside the probe");
        probe.finish(Outcome::Accepted);
        assert_eq!(flow.lock().window.limit, 2);
        let (a, b) = (admitted(&flow).await, admitted(&flow).await);
        a.finish(Outcome::Accepted);
        b.finish(Outcome::Accepted);
        assert_eq!(flow.lock().window.limit, 4);
    }

    #[tokio::test]
    async fn a_probe_given_up_lets_the_next_call_probe() {
        let flow = flow(8, None);
        for _ in 0..2 {
            admitted(&flow).await.finish(failed());
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
        drop(admitted(&flow).await);
        admitted(&flow).await.finish(Outcome::Accepted);
        assert!(flow.lock().breaker.is_closed());
    }

    #[tokio::test]
    async fn a_throttled_call_holds_the_next_back_for_its_retry_delay() {
        let flow = flow(8, None);
        admitted(&flow).await.finish(Outcome::Throttled {
            retry_after: Duration::from_millis(40),
        });
        let started = Instant::now();
        admitted(&flow).await.finish(Outcome::Accepted);
        assert!(started.elapsed() >= Duration::from_millis(39));
        assert!(flow.lock().pace.rate().is_some(), "a rate is learned");
    }

    #[tokio::test]
    async fn the_contractual_limit_spaces_the_calls() {
        let flow = flow(8, Some(20));
        let started = Instant::now();
        for _ in 0..6 {
            admitted(&flow).await.finish(Outcome::Accepted);
        }
        // Six calls at 20/s without bursts: the sixth no sooner than 250 ms after the first.
        assert!(
            started.elapsed() >= Duration::from_millis(245),
            "{:?}",
            started.elapsed()
        );
    }
}
