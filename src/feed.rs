//! The change feed on one replica: one task reads the events the database gets and hands each
//! to every watcher of this replica, so a hundred watchers cost one reader of the database.
//!
//! The task reads `sequence > last read` in sequence order whenever a commit is signalled
//! (PostgreSQL `LISTEN/NOTIFY` from any replica, or a local commit) and at least every
//! [`POLL`] besides; while no watcher is connected it only reads the latest sequence at each
//! poll, so a replica nobody watches spends next to nothing on the feed. Sequences are taken
//! in commit order (see `store::events`), so once it has read N no lower sequence can appear:
//! nothing is skipped. A watcher ([`Watcher`]) first catches up from the database in pages
//! from its cursor, then follows the task's broadcast; one that falls behind the broadcast's
//! buffer catches up from the database again. It skips whatever is not above its cursor, so
//! it never sends an event twice.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use tokio::sync::{broadcast, watch};

use crate::domain::{ChangeEvent, EventFilter};
use crate::store::{Result, Store};

/// How often the feed reads the database without being signalled: the longest a commit whose
/// signal was lost (the listening connection down) waits to reach the watchers.
pub const POLL: Duration = Duration::from_millis(250);

/// Events read per statement, by the feed and by a watcher catching up.
pub const PAGE: u32 = 1_000;

/// Events the broadcast keeps for watchers that are slower than the feed; one that falls
/// further behind catches up from the database.
const BUFFER: usize = 8_192;

/// This replica's feed: its reader task's broadcast, and whether the replica is draining.
pub struct Feed {
    store: Arc<dyn Store>,
    events: broadcast::Sender<Arc<ChangeEvent>>,
    /// True once the reader task has read the sequence it broadcasts after: a watcher reads
    /// the database only after that (see [`Watcher::catch_up`]).
    started: watch::Sender<bool>,
    draining: watch::Receiver<bool>,
}

impl Feed {
    /// The feed of `store`, and its reader task, which runs until `draining` turns true (as
    /// do the watchers).
    pub fn spawn(
        store: Arc<dyn Store>,
        draining: watch::Receiver<bool>,
    ) -> (Arc<Self>, tokio::task::JoinHandle<()>) {
        let (events, _) = broadcast::channel(BUFFER);
        let feed = Arc::new(Self {
            store,
            events,
            started: watch::Sender::new(false),
            draining,
        });
        let task = tokio::spawn(feed.clone().read());
        (feed, task)
    }

    /// Reads new events and broadcasts them, until the replica drains.
    async fn read(self: Arc<Self>) {
        let mut draining = self.draining.clone();
        let mut cursor = loop {
            match self.store.latest_sequence().await {
                Ok(latest) => break latest,
                Err(e) => tracing::warn!(error = %e, "the change feed cannot read the database"),
            }
            tokio::select! {
                _ = draining.wait_for(|d| *d) => return,
                () = tokio::time::sleep(POLL) => {}
            }
        };
        self.started.send_replace(true);
        let mut signals = match self.store.commit_signals().await {
            Ok(signals) => signals,
            Err(e) => {
                tracing::warn!(error = %e, "the change feed is not signalled of commits; it polls");
                futures::stream::pending().boxed()
            }
        };
        let mut polled = true;
        loop {
            // Unwatched, a commit's signal is let pass; the poll moves the cursor along.
            if polled || self.watched() {
                match self.advance(cursor).await {
                    Ok(last) => cursor = last,
                    Err(e) => {
                        tracing::warn!(error = %e, "the change feed cannot read the database");
                    }
                }
            }
            polled = tokio::select! {
                _ = draining.wait_for(|d| *d) => return,
                Some(()) = signals.next() => false,
                () = tokio::time::sleep(POLL) => true,
            };
        }
    }

    fn watched(&self) -> bool {
        self.events.receiver_count() > 0
    }

    /// Broadcasts every event after `cursor` to this replica's watchers; returns the cursor
    /// to read after next time.
    ///
    /// With no watcher the events are not read, only the latest sequence, which becomes the
    /// cursor. It is read before the watchers are counted, so a watcher that subscribes after
    /// the count reads from the database everything up to it (see [`Feed::watch`]), and one
    /// that subscribed before is counted.
    async fn advance(&self, cursor: i64) -> Result<i64> {
        if !self.watched() {
            let latest = self.store.latest_sequence().await?;
            if !self.watched() {
                return Ok(latest.max(cursor));
            }
        }
        self.broadcast_after(cursor).await
    }

    /// Broadcasts every event after `cursor`; returns the last sequence broadcast.
    async fn broadcast_after(&self, mut cursor: i64) -> Result<i64> {
        loop {
            let page = self
                .store
                .list_events(&EventFilter::default(), cursor, PAGE)
                .await?;
            let full = page.len() == PAGE as usize;
            for event in page {
                cursor = event.sequence;
                // No watcher now is fine: the next one catches up from the database.
                let _ = self.events.send(Arc::new(event));
            }
            if !full {
                return Ok(cursor);
            }
        }
    }

    /// A watcher of the events after `after` that `filter` keeps.
    pub fn watch(&self, filter: EventFilter, after: i64) -> Watcher {
        Watcher {
            // Subscribed before the first read of the database: whatever the feed broadcasts
            // from now on reaches this watcher, and what it broadcast before is stored.
            events: self.events.subscribe(),
            started: self.started.subscribe(),
            store: self.store.clone(),
            draining: self.draining.clone(),
            filter,
            cursor: after,
            backlog: std::collections::VecDeque::new(),
            caught_up: false,
        }
    }
}

/// What a watcher hands on next.
#[derive(Debug)]
pub enum Watched {
    Event(Arc<ChangeEvent>),
    /// Nothing for a while: the sequence the watcher has passed (a cursor to resume after).
    Quiet(i64),
}

/// One reader of the feed, from a cursor: the stored events first, then each new one.
pub struct Watcher {
    events: broadcast::Receiver<Arc<ChangeEvent>>,
    started: watch::Receiver<bool>,
    store: Arc<dyn Store>,
    draining: watch::Receiver<bool>,
    filter: EventFilter,
    /// The last sequence passed (sent, or left out by the filter).
    cursor: i64,
    backlog: std::collections::VecDeque<ChangeEvent>,
    /// Whether the database has been read up to the broadcast.
    caught_up: bool,
}

impl Watcher {
    /// The next event after the cursor that the filter keeps, or [`Watched::Quiet`] after
    /// `quiet` without one; `None` once the replica drains.
    pub async fn next(&mut self, quiet: Duration) -> Result<Option<Watched>> {
        let deadline = tokio::time::Instant::now() + quiet;
        loop {
            if let Some(event) = self.backlog.pop_front() {
                return Ok(Some(Watched::Event(Arc::new(event))));
            }
            if *self.draining.borrow() {
                return Ok(None);
            }
            if !self.caught_up {
                self.catch_up().await?;
                continue;
            }
            let received = tokio::select! {
                received = self.events.recv() => received,
                _ = self.draining.wait_for(|d| *d) => return Ok(None),
                () = tokio::time::sleep_until(deadline) => return Ok(Some(Watched::Quiet(self.cursor))),
            };
            match received {
                Ok(event) if event.sequence > self.cursor => {
                    self.cursor = event.sequence;
                    if self.filter.matches(&event.event) {
                        return Ok(Some(Watched::Event(event)));
                    }
                }
                // Read from the database already.
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(missed, "a watcher fell behind the feed; catching up");
                    self.caught_up = false;
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(None),
            }
        }
    }

    /// Reads the next page of stored events after the cursor that the filter keeps; caught
    /// up when the page is not full.
    ///
    /// Not before the feed's task has read the sequence it starts broadcasting after: the
    /// page then holds every event up to it, and the broadcast the ones after. (A watcher of
    /// a replica just started could otherwise read the database before an event commits,
    /// and the task, starting after that commit, never broadcast it.)
    async fn catch_up(&mut self) -> Result<()> {
        tokio::select! {
            _ = self.started.wait_for(|s| *s) => {}
            // Draining: `next` answers that.
            _ = self.draining.wait_for(|d| *d) => return Ok(()),
        }
        let page = self
            .store
            .list_events(&self.filter, self.cursor, PAGE)
            .await?;
        self.caught_up = page.len() < PAGE as usize;
        if let Some(last) = page.last() {
            self.cursor = last.sequence;
        }
        self.backlog.extend(page);
        Ok(())
    }
}
