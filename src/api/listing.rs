//! What every list and export call shares: the page asked for, an optional time range, and
//! a page of rows with the token of the next page.

use tonic::{Response, Status};
use uuid::Uuid;

use super::{Violations, convert, next_page_token, page};
use crate::proto::payouts::v1 as pb;
use crate::store::{Micros, Page};

/// A list call's request: the page it asks for.
pub trait Listing {
    fn page_size(&self) -> i32;
    fn page_token(&self) -> &str;
}

/// A list call's response: a page of rows and the token of the next page.
pub trait Listed<P> {
    fn listed(next_page_token: String, rows: Vec<P>) -> Self;
}

macro_rules! listings {
    ($($request:ident => $response:ident { $rows:ident: $row:ident },)*) => {
        $(impl Listing for pb::$request {
            fn page_size(&self) -> i32 {
                self.page_size
            }

            fn page_token(&self) -> &str {
                &self.page_token
            }
        }

        impl Listed<pb::$row> for pb::$response {
            fn listed(next_page_token: String, $rows: Vec<pb::$row>) -> Self {
                Self { next_page_token, $rows }
            }
        })*
    };
}

listings! {
    ListPartnersRequest => ListPartnersResponse { partners: Partner },
    ListClaimsRequest => ListClaimsResponse { claims: Claim },
    ListDisbursementsRequest => ListDisbursementsResponse { disbursements: Disbursement },
    ListAuditEventsRequest => ListAuditEventsResponse { audit_events: AuditEvent },
}

/// The page `request` asks for and its filter, which `filter` reads (recording every bad
/// field); `INVALID_ARGUMENT` names every bad field of either.
pub fn parse<R: Listing, F>(
    request: &R,
    filter: impl FnOnce(&mut Violations, &R) -> F,
) -> Result<(Page, F), Status> {
    let mut v = Violations::default();
    let page = page(&mut v, request.page_size(), request.page_token());
    let filter = filter(&mut v, request);
    v.finish()?;
    Ok((page, filter))
}

/// The response to a list call whose store found `rows` for `page` (see [`page_of`]).
pub fn answer<R: Listed<P>, T, P, Id: Into<Uuid>>(
    page: &Page,
    rows: &[T],
    cursor: impl FnOnce(&T) -> Id,
    shown: impl FnMut(&T) -> P,
) -> Response<R> {
    let (next_page_token, rows) = page_of(page, rows, cursor, shown);
    Response::new(R::listed(next_page_token, rows))
}

/// `start_time` and `end_time` of a filter: each optional, each a valid timestamp, and the
/// end after the start when both are given.
pub fn time_range(
    v: &mut Violations,
    start_time: Option<&prost_types::Timestamp>,
    end_time: Option<&prost_types::Timestamp>,
) -> (Option<Micros>, Option<Micros>) {
    let start = start_time.and_then(|t| v.check("start_time", convert::parse_timestamp(t)));
    let end = end_time.and_then(|t| v.check("end_time", convert::parse_timestamp(t)));
    if let (Some(start), Some(end)) = (start, end)
        && end <= start
    {
        v.add("end_time", "must be after start_time");
    }
    (start, end)
}

/// The answer to a list call from the rows the store found for `page`: the token of the next
/// page (after the `cursor` of the last row, if the page is full) and each row as `shown`.
pub fn page_of<R, P, Id: Into<Uuid>>(
    page: &Page,
    rows: &[R],
    cursor: impl FnOnce(&R) -> Id,
    shown: impl FnMut(&R) -> P,
) -> (String, Vec<P>) {
    let next = next_page_token(page, rows.len(), rows.last().map(cursor));
    (next, rows.iter().map(shown).collect())
}
