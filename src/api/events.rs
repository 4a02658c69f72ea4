//! `payouts.v1.EventService`: the change feed, listed in pages or watched as a stream, from a
//! cursor (`after_sequence`).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tonic::{Request, Response, Status};

use super::{Context, Violations, convert};
use crate::domain::{ChangeEvent, EventDetail, EventFilter, EventType, Invalid};
use crate::feed::{Feed, Watched};
use crate::proto::payouts::v1::{self as pb, event_service_server::EventService};

/// Events a `ListEvents` page holds when the caller names no `page_size`.
const DEFAULT_PAGE_SIZE: u32 = 100;
/// The most a `ListEvents` page holds; a larger `page_size` is cut to it, as for every list.
const MAX_PAGE_SIZE: u32 = 1_000;
/// A watch stream quiet this long gets a heartbeat: it keeps the connection from looking idle
/// and gives a filtered watcher a cursor to resume after.
const HEARTBEAT: Duration = Duration::from_secs(15);
/// Messages a watch stream buffers for a slow caller before it stops reading.
const STREAM_BUFFER: usize = 256;

pub struct Events {
    pub ctx: Context,
    pub feed: Arc<Feed>,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEventsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl EventService for Events {
    async fn list_events(
        &self,
        request: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        let r = request.into_inner();
        let mut v = Violations::default();
        let after = cursor(&mut v, r.after_sequence);
        let limit = match r.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n < 0 => {
                v.add("page_size", "must not be negative");
                DEFAULT_PAGE_SIZE
            }
            n => n.unsigned_abs().min(MAX_PAGE_SIZE),
        };
        let filter = filter(&mut v, &r.types, &r.partner_id);
        v.finish()?;
        let events = self.ctx.store.list_events(&filter, after, limit).await?;
        Ok(Response::new(pb::ListEventsResponse {
            events: events.iter().map(event).collect(),
        }))
    }

    type WatchEventsStream = WatchStream;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let r = request.into_inner();
        let mut v = Violations::default();
        let after = cursor(&mut v, r.after_sequence);
        let filter = filter(&mut v, &r.types, &r.partner_id);
        v.finish()?;
        let mut watcher = self.feed.watch(filter, after);
        let (sender, receiver) = tokio::sync::mpsc::channel(STREAM_BUFFER);
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    next = watcher.next(HEARTBEAT) => next,
                    // The caller went away.
                    () = sender.closed() => return,
                };
                let message = match message {
                    Ok(Some(watched)) => Ok(watched_message(&watched)),
                    // The replica drains: the stream ends; the caller resumes elsewhere.
                    Ok(None) => return,
                    Err(e) => Err(Status::from(e)),
                };
                let failed = message.is_err();
                if sender.send(message).await.is_err() || failed {
                    return;
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(receiver);
        Ok(Response::new(Box::pin(stream)))
    }
}

/// `after_sequence`: 0 (from the start) or a sequence.
fn cursor(v: &mut Violations, after_sequence: i64) -> i64 {
    if after_sequence < 0 {
        v.add(
            "after_sequence",
            "must not be negative (0 reads from the start)",
        );
        return 0;
    }
    after_sequence
}

/// The filter of `types` and `partner_id`, recording every bad one.
fn filter(v: &mut Violations, types: &[i32], partner_id: &str) -> EventFilter {
    let mut filter = EventFilter {
        types: Vec::with_capacity(types.len()),
        partner_id: v.optional_id("partner_id", partner_id),
    };
    for (i, &raw) in types.iter().enumerate() {
        if let Some(t) = v.check(format_args!("types[{i}]"), parse_event_type(raw))
            && !filter.types.contains(&t)
        {
            filter.types.push(t);
        }
    }
    filter
}

fn parse_event_type(raw: i32) -> Result<EventType, Invalid> {
    EventType::ALL
        .into_iter()
        .find(|&t| event_type(t) as i32 == raw)
        .ok_or_else(|| Invalid::new("must be an EventType other than EVENT_TYPE_UNSPECIFIED"))
}

fn event_type(t: EventType) -> pb::EventType {
    match t {
        EventType::PartnerRegistered => pb::EventType::PartnerRegistered,
        EventType::PartnerBankAccountChanged => pb::EventType::PartnerBankAccountChanged,
        EventType::ClaimDecided => pb::EventType::ClaimDecided,
        EventType::ClaimReviewed => pb::EventType::ClaimReviewed,
        EventType::DisbursementStatusChanged => pb::EventType::DisbursementStatusChanged,
    }
}

fn watched_message(watched: &Watched) -> pb::WatchEventsResponse {
    let kind = match watched {
        Watched::Event(e) => pb::watch_events_response::Kind::Event(event(e)),
        Watched::Quiet(sequence) => pb::watch_events_response::Kind::Heartbeat(pb::Heartbeat {
            high_water_sequence: *sequence,
        }),
    };
    pb::WatchEventsResponse { kind: Some(kind) }
}

fn event(e: &ChangeEvent) -> pb::Event {
    let ChangeEvent {
        sequence,
        event_id,
        event: n,
    } = e;
    let detail = match &n.detail {
        EventDetail::Partner {
            bank_code,
            account_last4,
        } => pb::event::Detail::Partner(pb::PartnerChange {
            bank_code: bank_code.clone(),
            masked_account_number: format!("****{account_last4}"),
        }),
        EventDetail::Claim {
            status,
            tier,
            recognized_loss_krw,
            compensation_krw,
            policy_version,
            reason,
        } => pb::event::Detail::Claim(pb::ClaimDecision {
            status: convert::claim_status(*status).into(),
            tier: convert::tier(*tier).into(),
            recognized_loss_krw: *recognized_loss_krw,
            compensation_krw: compensation_krw.won(),
            policy_version: policy_version.clone(),
            reason: reason.clone(),
        }),
        EventDetail::Disbursement {
            from_status,
            to_status,
            amount_krw,
            failure_code,
            reason,
        } => pb::event::Detail::Disbursement(pb::DisbursementStatusChange {
            from_status: from_status.map_or(pb::DisbursementStatus::Unspecified, |s| {
                convert::disbursement_status(s)
            }) as i32,
            to_status: convert::disbursement_status(*to_status).into(),
            amount_krw: amount_krw.won(),
            failure_code: failure_code.clone().unwrap_or_default(),
            reason: reason.clone(),
        }),
    };
    pb::Event {
        sequence: *sequence,
        event_id: event_id.to_string(),
        r#type: event_type(n.event_type).into(),
        occur_time: convert::timestamp(n.time),
        actor: n.actor.clone(),
        partner_id: n.partner_id.to_string(),
        claim_id: n.claim_id.map(|c| c.to_string()).unwrap_or_default(),
        disbursement_id: n.disbursement_id.map(|d| d.to_string()).unwrap_or_default(),
        detail: Some(detail),
    }
}
