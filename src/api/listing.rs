//! What every list and export call shares: an optional time range, and a page of rows with
//! the token of the next page.

use uuid::Uuid;

use super::{Violations, convert, next_page_token};
use crate::store::{Micros, Page};

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
