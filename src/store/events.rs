//! The change feed's store: the events each change writes in its own transaction (as that
//! transaction's last statement, see `sql/events.rs`), read back in sequence order.
//!
//! The sequence is taken in commit order. On PostgreSQL a transaction inserts its events
//! holding the feed's advisory lock ([`FEED_LOCK`]) until it commits; PostgreSQL makes a
//! committed transaction visible before it releases its locks, so the next holder takes a
//! higher sequence only once every lower one is visible. On SQLite the one writer holds the
//! database until it commits. Either way a reader that has read sequence N never later finds
//! a lower one.

use async_trait::async_trait;
use futures::stream::BoxStream;

use std::borrow::Cow;

use super::batch::{Column, Insert};
use super::intake::text_column;
use super::rows::{parsed, unexpected};
use super::{Micros, Result, StoreError};
use crate::domain::ids::uuid_text;
use crate::domain::{ChangeEvent, EventFilter, EventType, NewEvent};

/// The key of the advisory lock a PostgreSQL transaction holds from its events' insert to its
/// commit ("payoutsf").
pub const FEED_LOCK: i64 = 0x7061_796f_7574_7366;

/// The PostgreSQL channel every commit with events notifies, to wake the replicas' feeds.
pub const FEED_CHANNEL: &str = "payouts_feed";

/// The feed as the store keeps it.
#[async_trait]
pub trait EventStore {
    /// Up to `limit` events with a sequence above `after` that `filter` keeps, in sequence
    /// order.
    async fn list_events(
        &self,
        filter: &EventFilter,
        after: i64,
        limit: u32,
    ) -> Result<Vec<ChangeEvent>>;
    /// The highest sequence stored (0 for none).
    async fn latest_sequence(&self) -> Result<i64>;
    /// Yields soon after a transaction with events commits: on this replica, and (PostgreSQL)
    /// on any other. It may yield more often; it may also miss one while its connection is
    /// lost, so readers poll besides.
    async fn commit_signals(&self) -> Result<BoxStream<'static, ()>>;
}

/// The multi-row insert of `events`, each with a new event id.
pub(crate) fn events_insert(events: &[NewEvent]) -> Insert<'_> {
    let optional = |f: &dyn Fn(&NewEvent) -> Option<String>| {
        Column::NullableText(events.iter().map(|e| f(e).map(Cow::Owned)).collect())
    };
    Insert {
        head: "INSERT INTO change_events (event_id, event_type, time, actor, partner_id, \
               claim_id, disbursement_id, detail)",
        columns: vec![
            text_column(events, |_| uuid_text(uuid::Uuid::now_v7())),
            text_column(events, |e| e.event_type.key()),
            Column::BigInt(events.iter().map(|e| e.time).collect()),
            text_column(events, |e| e.actor.as_str()),
            text_column(events, |e| e.partner_id.text()),
            optional(&|e| e.claim_id.map(|c| c.text())),
            optional(&|e| e.disbursement_id.map(|d| d.text())),
            text_column(events, |e| {
                serde_json::to_string(&e.detail).expect("an event detail serializes")
            }),
        ],
        tail: "",
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct EventRow {
    sequence: i64,
    event_id: String,
    event_type: String,
    time: Micros,
    actor: String,
    partner_id: String,
    claim_id: Option<String>,
    disbursement_id: Option<String>,
    detail: String,
}

impl TryFrom<EventRow> for ChangeEvent {
    type Error = StoreError;

    fn try_from(r: EventRow) -> Result<Self> {
        let id = |col: &str, v: &str| parsed(col, v.parse::<uuid::Uuid>());
        Ok(ChangeEvent {
            sequence: r.sequence,
            event_id: id("event_id", &r.event_id)?,
            event: NewEvent {
                event_type: EventType::from_key(&r.event_type)
                    .ok_or_else(|| unexpected(format!("event_type {:?}", r.event_type)))?,
                time: r.time,
                actor: r.actor,
                partner_id: id("partner_id", &r.partner_id)?.into(),
                claim_id: r
                    .claim_id
                    .map(|c| id("claim_id", &c).map(Into::into))
                    .transpose()?,
                disbursement_id: r
                    .disbursement_id
                    .map(|d| id("disbursement_id", &d).map(Into::into))
                    .transpose()?,
                detail: parsed("detail", serde_json::from_str(&r.detail))?,
            },
        })
    }
}

/// Yields once for each change of `committed` (several changes may make one).
pub(crate) fn local_commits(committed: &tokio::sync::watch::Sender<u64>) -> BoxStream<'static, ()> {
    let receiver = committed.subscribe();
    Box::pin(futures::stream::unfold(
        receiver,
        |mut receiver| async move {
            receiver.changed().await.ok()?;
            Some(((), receiver))
        },
    ))
}
