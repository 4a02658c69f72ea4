//! `payouts.v1.AuditService`: the audit log, for auditors.

use tonic::{Request, Response, Status};

use super::{Context, Violations, convert, listing, page};
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
        let pb::ListAuditEventsRequest {
            page_size,
            page_token,
            principal,
            resource_id,
            start_time,
            end_time,
        } = request.into_inner();
        let mut v = Violations::default();
        let page = page(&mut v, page_size, &page_token);
        let mut filter_text = |field, raw: &str| {
            v.check(field, text::optional_line(raw, MAX_FILTER_CHARS))
                .flatten()
        };
        let principal = filter_text("principal", &principal);
        let resource_id = filter_text("resource_id", &resource_id);
        let (start, end) = listing::time_range(&mut v, start_time.as_ref(), end_time.as_ref());
        v.finish()?;
        let filter = AuditFilter {
            principal,
            resource_id,
            start_time: start,
            end_time: end,
        };
        let events = self.ctx.store.list_audit(&filter, &page).await?;
        let (next_page_token, audit_events) =
            listing::page_of(&page, &events, |e| e.audit_event_id, audit_event);
        Ok(Response::new(pb::ListAuditEventsResponse {
            next_page_token,
            audit_events,
        }))
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
