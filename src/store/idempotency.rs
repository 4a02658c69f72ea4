//! Request ids: what a mutating call records so that a repeated request replays its first
//! response, and the rule that decides a replay.

use uuid::Uuid;

use super::rows::unexpected;
use super::{AuditEvent, Result, StoreError};

/// The caller's request id, the method and a digest of the rest of the request.
///
/// A request id belongs to the principal that sent it: the record is keyed by both, so
/// another principal's use of the same id is a request of its own, never a replay of this
/// one (nor a sign that this one exists).
#[derive(Debug, Clone)]
pub struct Idempotency {
    /// The caller, as the audit log names it (`local-dev` without authentication).
    pub principal: String,
    pub request_id: Uuid,
    pub method: &'static str,
    pub fingerprint: String,
}

/// Turns a fresh result into the response bytes kept for replays.
pub type RenderFn<'f, T> = dyn Fn(&T) -> Vec<u8> + Send + Sync + 'f;
pub type Render<'a, T> = &'a RenderFn<'a, T>;

/// Makes a call's audit entry from the result it stored (`None`: the call is not audited
/// here).
pub type AuditFn<'f, T> = dyn Fn(&T) -> Option<AuditEvent> + Send + Sync + 'f;
pub type AuditOf<'a, T> = &'a AuditFn<'a, T>;

/// What a mutating call records beside its rows, in the same transaction: its request id with
/// the response kept for replays, and (when the caller gives one) its audit entry. A replay or
/// a refusal stores neither.
pub struct Recorded<'a, T> {
    pub idem: &'a Idempotency,
    pub render: Render<'a, T>,
    pub audit: Option<AuditOf<'a, T>>,
}

impl<T> Clone for Recorded<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Recorded<'_, T> {}

impl<'a, T> Recorded<'a, T> {
    /// A call whose audit entry `audit` makes is written with its rows.
    pub fn audited(idem: &'a Idempotency, render: Render<'a, T>, audit: AuditOf<'a, T>) -> Self {
        Self {
            idem,
            render,
            audit: Some(audit),
        }
    }

    /// A call recorded without an audit entry of its own (the audit layer writes it).
    pub fn unaudited(idem: &'a Idempotency, render: Render<'a, T>) -> Self {
        Self {
            idem,
            render,
            audit: None,
        }
    }
}

/// An earlier use of a request id by the same principal, as stored.
#[derive(sqlx::FromRow)]
pub(crate) struct Earlier {
    method: String,
    fingerprint: String,
    response: Option<Vec<u8>>,
}

/// What a request answers when its principal used its request id before: the first response
/// if the method and body are the same, else `RequestIdReused`.
pub(crate) fn replay_of(idem: &Idempotency, earlier: Earlier) -> Result<Vec<u8>> {
    if earlier.method != idem.method || earlier.fingerprint != idem.fingerprint {
        return Err(StoreError::RequestIdReused);
    }
    earlier
        .response
        .ok_or_else(|| unexpected("request id recorded without its response"))
}

/// An [`Earlier`] use found by a batch, with the request it belongs to (as
/// `request_id || '/' || principal`).
#[derive(sqlx::FromRow)]
pub(crate) struct KeyedEarlier {
    pub request_key: String,
    #[sqlx(flatten)]
    pub earlier: Earlier,
}
