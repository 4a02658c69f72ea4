//! `payouts.v1.AuditService`: the audit log, for auditors.

use tonic::{Request, Response, Status};

use super::{Context, Violations, convert, next_page_token, page};
use crate::proto::payouts::v1::{self as pb, audit_service_server::AuditService};
use crate::store::AuditFilter;

pub struct Audit {
    pub ctx: Context,
}

fn micros(t: &prost_types::Timestamp) -> i64 {
    t.seconds
        .saturating_mul(1_000_000)
        .saturating_add(i64::from(t.nanos) / 1_000)
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
        let (start, end) = (
            start_time.as_ref().map(micros),
            end_time.as_ref().map(micros),
        );
        if let (Some(start), Some(end)) = (start, end)
            && end <= start
        {
            v.add("end_time", "must be after start_time");
        }
        v.finish()?;
        let filter = AuditFilter {
            principal: Some(principal.trim().to_owned()).filter(|p| !p.is_empty()),
            resource_id: Some(resource_id.trim().to_owned()).filter(|r| !r.is_empty()),
            start_time: start,
            end_time: end,
        };
        let events = self.ctx.store.list_audit(&filter, &page).await?;
        Ok(Response::new(pb::ListAuditEventsResponse {
            next_page_token: next_page_token(
                &page,
                events.len(),
                events.last().map(|e| e.audit_event_id),
            ),
            audit_events: events
                .iter()
                .map(|e| pb::AuditEvent {
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
                })
                .collect(),
        }))
    }
}
