//! The per-call record: what a handler learns about its mutating call while serving it, for
//! the call's audit entry.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::writer::GroupWriter;
use super::{AuditDraft, OpenEntry};
use crate::domain::text;
use crate::store::AuditEvent;

/// A resource a call acted on. The audit entry names one: the most specific (a claim before
/// its disbursement, a disbursement before its partner).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Resource {
    Partner,
    Disbursement,
    Claim,
}

/// What the handler noted about the call.
#[derive(Debug, Default)]
struct Notes {
    draft: AuditDraft,
    resource: Option<(Resource, String)>,
    /// The call's entry was written in the call's own transaction.
    audited: bool,
    /// The call was answered with the first response to its request id.
    replayed: bool,
}

struct Shared {
    notes: Mutex<Notes>,
    writer: GroupWriter,
}

/// The audit record of one mutating call, made by the [`AuditLayer`](super::AuditLayer) and
/// found in the request's extensions ([`CallRecord::of`]); cheap to clone. Outside an audited
/// call (a read, or a call served without the layer) it is detached: it notes nothing and
/// has no draft.
#[derive(Clone, Default)]
pub struct CallRecord(Option<Arc<Shared>>);

impl CallRecord {
    pub(super) fn new(draft: AuditDraft, writer: GroupWriter) -> Self {
        Self(Some(Arc::new(Shared {
            notes: Mutex::new(Notes {
                draft,
                ..Notes::default()
            }),
            writer,
        })))
    }

    /// The record of the call `request` belongs to.
    pub fn of<T>(request: &tonic::Request<T>) -> Self {
        request
            .extensions()
            .get::<CallRecord>()
            .cloned()
            .unwrap_or_default()
    }

    fn notes(&self) -> Option<MutexGuard<'_, Notes>> {
        let shared = self.0.as_ref()?;
        Some(shared.notes.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Notes the request id the caller sent, valid or not: shown escaped and cut short.
    pub fn note_request_id(&self, raw: &str) {
        if let Some(mut notes) = self.notes() {
            notes.draft.request_id = text::shown(raw, text::MAX_SHOWN_CHARS).trim().to_owned();
        }
    }

    /// Notes a resource the call acted on; the entry names the most specific one.
    pub fn touched(&self, resource: Resource, id: &str) {
        if let Some(mut notes) = self.notes()
            && notes
                .resource
                .as_ref()
                .is_none_or(|(held, _)| resource >= *held)
        {
            notes.resource = Some((resource, id.to_owned()));
        }
    }

    /// Notes that the call was answered by replaying the first response to its request id.
    pub fn replayed(&self) {
        if let Some(mut notes) = self.notes() {
            notes.replayed = true;
        }
    }

    /// Notes that the call's entry was written with its change, so the layer writes none.
    pub fn audited(&self) {
        if let Some(mut notes) = self.notes() {
            notes.audited = true;
        }
    }

    /// The draft of the call's entry, for a handler that writes it in the same transaction as
    /// the change it records (and then says so with [`CallRecord::audited`]); `None` outside
    /// an audited call.
    pub fn draft(&self) -> Option<AuditDraft> {
        self.notes().map(|notes| notes.draft.clone())
    }

    /// Writes the entries of calls made within this one (rows of an import) that no
    /// transaction of theirs recorded, and waits until they are stored. A failure is logged.
    pub async fn write(&self, events: Vec<AuditEvent>) {
        if let Some(shared) = &self.0 {
            shared.writer.record(events).await;
        }
    }

    /// The call's entry, its outcome to come, or `None` when it was written with the call's
    /// change. What is noted after this is not recorded.
    pub(super) fn entry(&self) -> Option<OpenEntry> {
        let notes = self.notes()?;
        if notes.audited {
            return None;
        }
        let resource_id = notes
            .resource
            .as_ref()
            .map(|(_, id)| id.clone())
            .unwrap_or_default();
        Some(notes.draft.opened(resource_id).replayed(notes.replayed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;

    async fn record() -> (CallRecord, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("dir");
        let store = SqliteStore::migrated_in(&dir).await;
        let writer = GroupWriter::spawn(Arc::new(store));
        let draft = AuditDraft::new("ops", "/payouts.v1.ClaimService/ReviewClaim", "192.0.2.1:9");
        (CallRecord::new(draft, writer), dir)
    }

    #[tokio::test]
    async fn the_entry_names_the_most_specific_resource_the_request_id_and_a_replay() {
        let (call, _dir) = record().await;
        call.note_request_id("  0190a6c4-7d8e-7000-8000-000000000001 ");
        call.touched(Resource::Claim, "claim");
        call.touched(Resource::Partner, "partner");
        call.touched(Resource::Disbursement, "disbursement");
        call.replayed();
        let event = call.entry().expect("entry").close(tonic::Code::Ok);
        assert_eq!(event.resource_id, "claim");
        assert_eq!(event.request_id, "0190a6c4-7d8e-7000-8000-000000000001");
        assert!(event.replayed);
        assert_eq!(event.principal, "ops");

        call.touched(Resource::Claim, "another claim");
        let event = call.entry().expect("entry").close(tonic::Code::Ok);
        assert_eq!(
            event.resource_id, "another claim",
            "the later of equals wins"
        );
    }

    #[tokio::test]
    async fn a_call_audited_with_its_rows_gets_no_entry_from_the_layer() {
        let (call, _dir) = record().await;
        assert_eq!(call.draft().expect("draft").principal, "ops");
        call.audited();
        assert!(call.entry().is_none());
    }

    #[test]
    fn a_detached_record_notes_nothing() {
        let call = CallRecord::default();
        call.note_request_id("r");
        call.touched(Resource::Claim, "c");
        call.replayed();
        call.audited();
        assert!(call.draft().is_none());
        assert!(call.entry().is_none());
    }
}
