//! A watcher of the change feed during the end-to-end run: how many events one watcher
//! receives per second, and how long after its change each one reaches it (`occur_time`, set
//! in the writing transaction, to receipt: an upper bound on commit-to-receipt).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use partner_payouts::proto::payouts::v1::{
    self as pb, event_service_client::EventServiceClient, watch_events_response::Kind,
};
use tokio::task::JoinHandle;

/// What the watcher saw.
pub struct Watched {
    pub events: u64,
    /// Microseconds from an event's `occur_time` to its receipt.
    pub lag_us: Histogram<u64>,
    /// From the first event received to the last.
    pub span: Duration,
    /// Every sequence above the one before it.
    pub in_order: bool,
}

fn now_us() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_micros(),
    )
    .unwrap_or(u64::MAX)
}

/// Follows the feed from the start until `expected` events arrived (or the stream ends).
pub fn spawn(
    channel: tonic::transport::Channel,
    expected: u64,
) -> JoinHandle<anyhow::Result<Watched>> {
    tokio::spawn(async move {
        let mut stream = EventServiceClient::new(channel)
            .watch_events(pb::WatchEventsRequest::default())
            .await?
            .into_inner();
        let mut watched = Watched {
            events: 0,
            lag_us: Histogram::new(3)?,
            span: Duration::ZERO,
            in_order: true,
        };
        let (mut first, mut last_sequence) = (None, 0);
        while watched.events < expected {
            let Some(message) = stream.message().await? else {
                break;
            };
            let Some(Kind::Event(event)) = message.kind else {
                continue;
            };
            let received = now_us();
            let started = *first.get_or_insert_with(std::time::Instant::now);
            watched.span = started.elapsed();
            watched.in_order &= event.sequence > last_sequence;
            last_sequence = event.sequence;
            watched.events += 1;
            if let Some(t) = event.occur_time {
                let occurred = u64::try_from(t.seconds).unwrap_or(0) * 1_000_000
                    + u64::try_from(t.nanos / 1_000).unwrap_or(0);
                watched.lag_us.record(received.saturating_sub(occurred))?;
            }
        }
        Ok(watched)
    })
}

impl Watched {
    pub fn print(&self) {
        let ms = |q: f64| self.lag_us.value_at_quantile(q) as f64 / 1000.0;
        println!(
            "feed watcher: events={} in_order={} events_per_s={:.0} lag_ms p50={:.1} p90={:.1} \
             p99={:.1} max={:.1}",
            self.events,
            self.in_order,
            self.events as f64 / self.span.as_secs_f64().max(1e-9),
            ms(0.5),
            ms(0.9),
            ms(0.99),
            self.lag_us.max() as f64 / 1000.0
        );
    }
}
