//! The one path of a mutating call: take the caller's request id in the call's transaction
//! (or answer with what it answered before), run, keep the response for replays, write the
//! call's audit entry with its rows, commit.

use super::audit::insert_audit;
use super::{SqlStore, Tx};
use crate::store::idempotency::{Earlier, replay_of};
use crate::store::{Idempotency, Recorded, Result, Stored, now_micros, retry_contention};

/// A request id taken by a transaction still open: [`Claimed::finish`] ends the call.
pub(super) struct Claimed<'r, T> {
    call: Recorded<'r, T>,
}

impl SqlStore {
    /// Begins a writing transaction for `call` and takes its request id; `Err(replayed)` (with
    /// nothing written) when the caller used the id before.
    pub(super) async fn begin_call<'r, T>(
        &self,
        call: Recorded<'r, T>,
    ) -> Result<std::result::Result<(Tx, Claimed<'r, T>), Stored<T>>> {
        let mut tx = self.begin_write().await?;
        match claim_request(&mut tx, call.idem).await? {
            Some(first) => Ok(Err(Stored::Replayed(first))),
            None => Ok(Ok((tx, Claimed { call }))),
        }
    }

    /// `body` in a writing transaction of its own, committed with what `body` gives back;
    /// all of it again while the database rolls it back for contention
    /// ([`retry_contention`]).
    pub(super) async fn in_transaction<T, F, Fut>(&self, what: &'static str, body: F) -> Result<T>
    where
        F: Fn(Tx) -> Fut,
        Fut: Future<Output = Result<(Tx, T)>>,
    {
        let body = &body;
        retry_contention(what, move || async move {
            let (tx, value) = body(self.begin_write().await?).await?;
            tx.commit().await?;
            Ok(value)
        })
        .await
    }

    /// The whole of a mutating call named `what`: begins it ([`SqlStore::begin_call`]; a
    /// replay answers at once), runs `body` in its transaction and finishes it with the
    /// transaction and value `body` gives back ([`Claimed::finish`]); all of it again while
    /// the database rolls it back for contention ([`retry_contention`]).
    pub(super) async fn mutate<T, F, Fut>(
        &self,
        what: &'static str,
        call: Recorded<'_, T>,
        body: F,
    ) -> Result<Stored<T>>
    where
        F: Fn(Tx) -> Fut,
        Fut: Future<Output = Result<(Tx, T)>>,
    {
        let body = &body;
        retry_contention(what, move || async move {
            let (tx, call) = match self.begin_call(call).await? {
                Ok(begun) => begun,
                Err(replayed) => return Ok(replayed),
            };
            let (tx, value) = body(tx).await?;
            call.finish(tx, value).await
        })
        .await
    }
}

impl<T> Claimed<'_, T> {
    /// Keeps `value`'s response for replays and writes the call's audit entry, in `tx`, and
    /// commits.
    pub(super) async fn finish(self, mut tx: Tx, value: T) -> Result<Stored<T>> {
        let Recorded {
            idem,
            render,
            audit,
        } = self.call;
        save_response(&mut tx, idem, render(&value)).await?;
        if let Some(entry) = audit.and_then(|audit| audit(&value)) {
            insert_audit(&mut tx, &[entry]).await?;
        }
        tx.commit().await?;
        Ok(Stored::Fresh(value))
    }
}

/// Takes the caller's request id for this transaction, or returns what it already answered
/// the caller. Another principal's use of the same id is not looked at.
async fn claim_request(tx: &mut Tx, idem: &Idempotency) -> Result<Option<Vec<u8>>> {
    let inserted = sqlx::query(
        "INSERT INTO idempotency \
         (request_id, principal, method, fingerprint, response, create_time) \
         VALUES ($1, $2, $3, $4, NULL, $5) ON CONFLICT (request_id, principal) DO NOTHING",
    )
    .bind(idem.request_id.to_string())
    .bind(&idem.principal)
    .bind(idem.method)
    .bind(&idem.fingerprint)
    .bind(now_micros())
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if inserted == 1 {
        return Ok(None);
    }
    let earlier: Earlier = sqlx::query_as(
        "SELECT method, fingerprint, response FROM idempotency \
         WHERE request_id = $1 AND principal = $2",
    )
    .bind(idem.request_id.to_string())
    .bind(&idem.principal)
    .fetch_one(&mut **tx)
    .await?;
    replay_of(idem, earlier).map(Some)
}

async fn save_response(tx: &mut Tx, idem: &Idempotency, response: Vec<u8>) -> Result<()> {
    sqlx::query("UPDATE idempotency SET response = $1 WHERE request_id = $2 AND principal = $3")
        .bind(response)
        .bind(idem.request_id.to_string())
        .bind(&idem.principal)
        .execute(&mut **tx)
        .await?;
    Ok(())
}
