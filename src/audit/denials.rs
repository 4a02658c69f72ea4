//! Refused mutating calls, recorded in aggregate: the [`DenialSink`] the authentication layer
//! tells about every call it refuses.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::Code;

use super::AuditDraft;
use crate::auth::{DenialSink, method_rule};
use crate::store::{AuditEvent, Micros, Store, now_micros};

/// Writes refused mutating calls to the audit log in aggregate: one entry per peer address,
/// principal (empty when unidentified), method and outcome per interval, whose `count` says how
/// many calls it stands for. The audit log is append-only, so it must grow with the number of
/// distinct refusers, not with the number of calls they make; the request path only bumps a
/// counter.
///
/// The counts are written every interval by a background task, when [`AuditDenials::flush`] is
/// called, and when the sink is dropped.
pub struct AuditDenials {
    writer: Arc<DenialWriter>,
    /// Dropping it tells the task to write what is left and stop.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl AuditDenials {
    /// Distinct (peer, principal, method, outcome) keys held between two writes. Past it, the
    /// calls of new peers are counted without their address, in one entry per principal,
    /// method and outcome, so a flood from many addresses costs neither memory nor log rows.
    pub const MAX_KEYS: usize = 10_000;

    /// Refused calls per write transaction at most.
    const MAX_EVENTS_PER_WRITE: usize = 512;

    /// Starts the task that writes the counts every `interval`; it writes what is left and
    /// ends when the sink is dropped. Must run inside the Tokio runtime.
    pub fn spawn(store: Arc<dyn Store>, interval: Duration) -> Self {
        Self::spawn_with_max_keys(store, interval, Self::MAX_KEYS)
    }

    fn spawn_with_max_keys(store: Arc<dyn Store>, interval: Duration, max_keys: usize) -> Self {
        let writer = Arc::new(DenialWriter {
            tally: Mutex::new(DenialTally::new(max_keys)),
            store,
        });
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task_writer = writer.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticks.tick() => task_writer.flush().await,
                    _ = &mut stop_rx => {
                        task_writer.flush().await;
                        break;
                    }
                }
            }
        });
        Self {
            writer,
            _stop: stop_tx,
        }
    }

    /// Writes the refused calls counted so far, now (e.g. before the server stops).
    pub async fn flush(&self) {
        self.writer.flush().await;
    }
}

impl DenialSink for AuditDenials {
    fn denied(&self, principal: Option<&str>, method: &str, code: Code, peer: Option<SocketAddr>) {
        // Only mutating calls are audited; the key then holds the rule's own path, so the
        // caller's path (any string) never becomes part of the state.
        let Some(rule) = method_rule(method).filter(|r| r.mutating) else {
            return;
        };
        let key = DenialKey {
            peer: peer.map(|p| p.ip().to_canonical()),
            principal: principal.unwrap_or_default().to_owned(),
            method: rule.path,
            code,
        };
        self.writer
            .tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .add(key, 1, now_micros());
    }
}

struct DenialWriter {
    tally: Mutex<DenialTally>,
    store: Arc<dyn Store>,
}

impl DenialWriter {
    async fn flush(&self) {
        let (counted, folded) = self
            .tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if counted.is_empty() {
            return;
        }
        if folded > 0 {
            tracing::warn!(
                calls = folded,
                max_peers = AuditDenials::MAX_KEYS,
                "refused calls came from too many distinct peers: some are audited without \
                 their peer address"
            );
        }
        for chunk in counted.chunks(AuditDenials::MAX_EVENTS_PER_WRITE) {
            let events: Vec<AuditEvent> = chunk.iter().map(|(k, t)| k.event(*t)).collect();
            if let Err(e) = self.store.append_audit(&events).await {
                // Kept for the next write: the counts are only lost if the service stops first.
                let calls: i64 = chunk.iter().map(|(_, t)| t.count).sum();
                tracing::error!(error = %e, calls, "audit log write of refused calls failed");
                let mut tally = self
                    .tally
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                for (key, t) in chunk {
                    tally.add(key.clone(), t.count, t.first);
                }
            }
        }
    }
}

/// Who was refused what: the key refused calls are counted by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct DenialKey {
    /// `None` when the address is unknown, or was left out because too many peers were
    /// refused in one interval.
    peer: Option<IpAddr>,
    /// Empty when the caller could not be identified.
    principal: String,
    method: &'static str,
    code: Code,
}

impl DenialKey {
    /// The audit entry for `tally.count` refused calls, timed at the first of them.
    fn event(&self, tally: Tally) -> AuditEvent {
        let peer = self.peer.map(|ip| ip.to_string()).unwrap_or_default();
        AuditDraft::new(self.principal.as_str(), self.method, peer)
            .opened(String::new())
            .calls(tally.count, tally.first)
            .close(self.code)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tally {
    count: i64,
    /// When the first of the calls was refused.
    first: Micros,
}

/// Refused calls counted since the last write, for at most `max_keys` distinct peers' keys.
#[derive(Debug)]
struct DenialTally {
    max_keys: usize,
    counts: HashMap<DenialKey, Tally>,
    /// Calls counted without their peer address since the last write.
    folded: u64,
}

impl DenialTally {
    fn new(max_keys: usize) -> Self {
        Self {
            max_keys,
            counts: HashMap::new(),
            folded: 0,
        }
    }

    fn add(&mut self, mut key: DenialKey, count: i64, first: Micros) {
        // The keys without a peer number at most principals x methods x outcomes, all from
        // fixed sets, so the map stays bounded whatever connects.
        if key.peer.is_some()
            && self.counts.len() >= self.max_keys
            && !self.counts.contains_key(&key)
        {
            key.peer = None;
            self.folded += count.unsigned_abs();
        }
        let tally = self.counts.entry(key).or_insert(Tally { count: 0, first });
        tally.count = tally.count.saturating_add(count);
        tally.first = tally.first.min(first);
    }

    /// Everything counted so far, and how many calls of it were folded; leaves the tally empty.
    fn take(&mut self) -> (Vec<(DenialKey, Tally)>, u64) {
        let counted = std::mem::take(&mut self.counts).into_iter().collect();
        (counted, std::mem::take(&mut self.folded))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{AuditFilter, Page, sqlite::SqliteStore};

    const REGISTER: &str = "/payouts.v1.PartnerService/RegisterPartner";
    const REVIEW: &str = "/payouts.v1.ClaimService/ReviewClaim";

    fn key(peer: &str, principal: &str, method: &'static str, code: Code) -> DenialKey {
        DenialKey {
            peer: Some(peer.parse().expect("ip")),
            principal: principal.to_owned(),
            method,
            code,
        }
    }

    fn sorted(mut counted: Vec<(DenialKey, Tally)>) -> Vec<(DenialKey, Tally)> {
        counted.sort_by_key(|(k, _)| (k.peer, k.principal.clone(), k.method, k.code as i32));
        counted
    }

    #[test]
    fn refused_calls_are_counted_per_peer_principal_method_and_outcome() {
        let mut tally = DenialTally::new(100);
        let a = key("192.0.2.1", "", REGISTER, Code::Unauthenticated);
        for t in [30, 10, 20] {
            tally.add(a.clone(), 1, t);
        }
        let limited = DenialKey {
            code: Code::ResourceExhausted,
            ..a.clone()
        };
        tally.add(limited.clone(), 5, 40);
        let ops = key("192.0.2.1", "ops", REGISTER, Code::PermissionDenied);
        tally.add(ops.clone(), 1, 50);
        let other_method = key("192.0.2.1", "ops", REVIEW, Code::PermissionDenied);
        tally.add(other_method.clone(), 1, 60);
        let other_peer = key("192.0.2.2", "", REGISTER, Code::Unauthenticated);
        tally.add(other_peer.clone(), 1, 70);

        let (counted, folded) = tally.take();
        assert_eq!(folded, 0);
        assert_eq!(
            sorted(counted),
            sorted(vec![
                (
                    a,
                    Tally {
                        count: 3,
                        first: 10
                    }
                ),
                (
                    limited,
                    Tally {
                        count: 5,
                        first: 40
                    }
                ),
                (
                    ops,
                    Tally {
                        count: 1,
                        first: 50
                    }
                ),
                (
                    other_method,
                    Tally {
                        count: 1,
                        first: 60
                    }
                ),
                (
                    other_peer,
                    Tally {
                        count: 1,
                        first: 70
                    }
                ),
            ])
        );
        let (counted, folded) = tally.take();
        assert!(counted.is_empty(), "taking empties the tally");
        assert_eq!(folded, 0);
    }

    #[test]
    fn past_the_key_limit_new_peers_are_counted_without_their_address() {
        let mut tally = DenialTally::new(3);
        for i in 0..1_000u32 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from_bits(0xc000_0200 + i));
            let key = DenialKey {
                peer: Some(ip),
                principal: String::new(),
                method: REGISTER,
                code: Code::Unauthenticated,
            };
            tally.add(key.clone(), 1, 1);
            // A peer already held keeps being counted under its own address.
            if i < 3 {
                tally.add(key, 1, 2);
            }
        }
        assert!(tally.counts.len() <= 4, "{:?}", tally.counts.len());
        let (counted, folded) = tally.take();
        assert_eq!(folded, 997);
        let total: i64 = counted.iter().map(|(_, t)| t.count).sum();
        assert_eq!(total, 1_003, "no call is lost");
        let addressless: Vec<_> = counted.iter().filter(|(k, _)| k.peer.is_none()).collect();
        assert_eq!(addressless.len(), 1, "{counted:?}");
        assert_eq!(addressless[0].1.count, 997);
        assert!(
            counted
                .iter()
                .filter(|(k, _)| k.peer.is_some())
                .all(|(_, t)| t.count == 2),
            "{counted:?}"
        );
    }

    #[test]
    fn an_entry_names_its_calls_count_outcome_and_peer() {
        let k = key("::ffff:192.0.2.1", "ops", REGISTER, Code::PermissionDenied);
        let k = DenialKey {
            peer: k.peer.map(|ip| ip.to_canonical()),
            ..k
        };
        let event = k.event(Tally {
            count: 1_234,
            first: 99,
        });
        assert_eq!(event.count, 1_234);
        assert_eq!(event.time, 99);
        assert_eq!(event.principal, "ops");
        assert_eq!(event.method, REGISTER);
        assert_eq!(event.outcome_code, "PERMISSION_DENIED");
        assert_eq!(event.peer_address, "192.0.2.1");
        assert!(event.request_id.is_empty() && event.resource_id.is_empty());
        assert!(!event.replayed);
    }

    async fn store(dir: &tempfile::TempDir) -> Arc<dyn Store> {
        Arc::new(SqliteStore::migrated_in(dir).await)
    }

    async fn stored(store: &Arc<dyn Store>) -> Vec<AuditEvent> {
        store
            .list_audit(&AuditFilter::default(), &Page::first(1000))
            .await
            .expect("list")
    }

    async fn stored_until(store: &Arc<dyn Store>, calls: i64) -> Vec<AuditEvent> {
        for _ in 0..200 {
            let events = stored(store).await;
            if events.iter().map(|e| e.count).sum::<i64>() >= calls {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!(
            "{calls} refused calls were not written: {:?}",
            stored(store).await
        );
    }

    fn peer(s: &str) -> Option<SocketAddr> {
        Some(s.parse().expect("addr"))
    }

    #[tokio::test]
    async fn refused_calls_are_written_each_interval_as_one_entry_per_key() {
        let dir = tempfile::tempdir().expect("dir");
        let store = store(&dir).await;
        let sink = AuditDenials::spawn(store.clone(), Duration::from_millis(50));
        for port in 0..500u16 {
            sink.denied(
                None,
                REGISTER,
                Code::Unauthenticated,
                peer(&format!("192.0.2.1:{}", 1000 + port)),
            );
        }
        sink.denied(
            Some("ops"),
            REGISTER,
            Code::PermissionDenied,
            peer("192.0.2.1:1"),
        );
        // Calls that are not mutating are not audited.
        sink.denied(
            None,
            "/payouts.v1.PartnerService/GetPartner",
            Code::Unauthenticated,
            peer("192.0.2.1:1"),
        );
        sink.denied(
            None,
            "/no.such.Service/Method",
            Code::PermissionDenied,
            peer("192.0.2.1:1"),
        );
        let events = stored_until(&store, 501).await;
        assert_eq!(events.len(), 2, "{events:#?}");
        let unauthenticated = events
            .iter()
            .find(|e| e.outcome_code == "UNAUTHENTICATED")
            .expect("entry");
        assert_eq!(unauthenticated.count, 500);
        assert_eq!(unauthenticated.peer_address, "192.0.2.1");
        assert_eq!(unauthenticated.principal, "");
        assert_eq!(unauthenticated.method, REGISTER);

        // The next interval's refusals get entries of their own.
        for _ in 0..3 {
            sink.denied(None, REGISTER, Code::Unauthenticated, peer("192.0.2.1:9"));
        }
        let events = stored_until(&store, 504).await;
        assert_eq!(events.len(), 3, "{events:#?}");
        assert_eq!(events.iter().map(|e| e.count).sum::<i64>(), 504);
    }

    #[tokio::test]
    async fn what_is_left_is_written_on_flush_and_on_drop() {
        let dir = tempfile::tempdir().expect("dir");
        let store = store(&dir).await;
        // An interval no test waits for: only a flush or the drop writes.
        let sink = AuditDenials::spawn(store.clone(), Duration::from_secs(3600));
        // The first tick of an interval is immediate: let it pass.
        tokio::time::sleep(Duration::from_millis(50)).await;
        sink.denied(None, REVIEW, Code::Unauthenticated, peer("192.0.2.3:1"));
        sink.flush().await;
        let events = stored(&store).await;
        assert_eq!(events.len(), 1, "{events:#?}");
        assert_eq!(events[0].count, 1);

        sink.denied(None, REVIEW, Code::Unauthenticated, peer("192.0.2.3:1"));
        sink.denied(None, REVIEW, Code::Unauthenticated, peer("192.0.2.4:1"));
        drop(sink);
        let events = stored_until(&store, 3).await;
        assert_eq!(events.len(), 3, "{events:#?}");
    }

    #[tokio::test]
    async fn a_flood_from_many_peers_is_written_in_bounded_entries() {
        let dir = tempfile::tempdir().expect("dir");
        let store = store(&dir).await;
        let sink = AuditDenials::spawn_with_max_keys(store.clone(), Duration::from_secs(3600), 10);
        tokio::time::sleep(Duration::from_millis(50)).await;
        for i in 0..5_000u32 {
            let ip = std::net::Ipv4Addr::from_bits(0x0a00_0000 + i);
            sink.denied(
                None,
                REGISTER,
                Code::Unauthenticated,
                Some(SocketAddr::from((ip, 1))),
            );
        }
        sink.flush().await;
        let events = stored(&store).await;
        assert_eq!(events.len(), 11, "ten peers and one entry for the rest");
        assert_eq!(events.iter().map(|e| e.count).sum::<i64>(), 5_000);
        let rest = events
            .iter()
            .find(|e| e.peer_address.is_empty())
            .expect("the entry without a peer");
        assert_eq!(rest.count, 4_990);
    }
}
