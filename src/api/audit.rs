//! `payouts.v1.AuditService`: the audit log, for auditors.

use tonic::{Request, Response, Status};

use super::{Context, convert, listing};
use crate::domain::text::{self, MAX_FILTER_CHARS};
use crate::proto::payouts::v1::{self as pb, audit_service_server::AuditService};
use crate::store::{AuditEvent, AuditFilter};

pub struct Audit {
    pub ctx: Context,
}

#[tonic::async_trait]
impl AuditService for Audit {
    async fn list_audit_events(
        &self,
        request: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        let (page, filter) = listing::parse(request.get_ref(), |v, r| {
            let mut filter_text = |field, raw: &str| {
                v.check(field, text::optional_line(raw, MAX_FILTER_CHARS))
                    .flatten()
            };
            let principal = filter_text("principal", &r.principal);
            let resource_id = filter_text("resource_id", &r.resource_id);
            let (start_time, end_time) =
                listing::time_range(v, r.start_time.as_ref(), r.end_time.as_ref());
            AuditFilter {
                principal,
                resource_id,
                start_time,
                end_time,
            }
        })?;
        let events = self.ctx.store.list_audit(&filter, &page).await?;
        Ok(listing::answer(
            &page,
            &events,
            |e| e.audit_event_id,
            audit_event,
        ))
    }
}

fn audit_event(e: &AuditEvent) -> pb::AuditEvent {
    pb::AuditEvent {
        audit_event_id: e.audit_event_id.to_string(),
        time: convert::timestamp(e.time),
        principal: e.principal.clone(),
        method: e.method.clone(),
        resource_id: e.resource_id.clone(),
        request_id: e.request_id.clone(),
        outcome_code: e.outcome_code.clone(),
        peer_address: e.peer_address.clone(),
        count: e.count,
        replayed: e.replayed,
    }
}
