//! `payouts.v1.AuditService`: the audit log, for auditors.

use tonic::{Request, Response, Status};

use super::{Context, Violations, convert, next_page_token, page};
use crate::domain::text::{self, MAX_FILTER_CHARS};
use crate::proto::payouts::v1::{self as pb, audit_service_server::AuditService};
use crate::store::AuditFilter;

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
        let principal = v
            .check(
                "principal",
                text::optional_line(&principal, MAX_FILTER_CHARS),
            )
            .flatten();
        let resource_id = v
            .check(
                "resource_id",
                text::optional_line(&resource_id, MAX_FILTER_CHARS),
            )
            .flatten();
        let start = start_time
            .as_ref()
            .and_then(|t| v.check("start_time", convert::parse_timestamp(t)));
        let end = end_time
            .as_ref()
            .and_then(|t| v.check("end_time", convert::parse_timestamp(t)));
        if let (Some(start), Some(end)) = (start, end)
            && end <= start
        {
            v.add("end_time", "must be after start_time");
        }
        v.finish()?;
        let filter = AuditFilter {
            principal,
            resource_id,
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
