//! The change feed (`payouts.v1.EventService`): every change's event, in commit order, listed
//! and watched; a reader that resumes from its last sequence misses nothing and sees nothing
//! twice, whichever replica it reads and whatever order concurrent writers commit in.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use partner_payouts::proto::payouts::v1::{
    self as pb, event_service_client::EventServiceClient,
    partner_service_client::PartnerServiceClient, watch_events_response::Kind,
};
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use crate::helpers::*;
use crate::on_both_databases;

fn events(app: &TestApp) -> EventServiceClient<Channel> {
    EventServiceClient::new(app.channel.clone())
}

/// Every event after `after` that `filter` keeps, read page by page.
async fn list_all(app: &TestApp, filter: pb::ListEventsRequest) -> Vec<pb::Event> {
    let mut all: Vec<pb::Event> = Vec::new();
    loop {
        let after_sequence = all.last().map_or(filter.after_sequence, |e| e.sequence);
        let page = events(app)
            .list_events(pb::ListEventsRequest {
                after_sequence,
                page_size: 1000,
                ..filter.clone()
            })
            .await
            .expect("list events")
            .into_inner()
            .events;
        if page.is_empty() {
            return all;
        }
        all.extend(page);
    }
}

fn of_partner(partner_id: &str) -> pb::ListEventsRequest {
    pb::ListEventsRequest {
        partner_id: partner_id.to_owned(),
        ..Default::default()
    }
}

fn status_change(e: &pb::Event) -> &pb::DisbursementStatusChange {
    match &e.detail {
        Some(pb::event::Detail::Disbursement(d)) => d,
        other => panic!("not a disbursement event: {other:?}"),
    }
}

/// Moves `partner`'s payouts to another account (bank 090, ending 5678).
async fn change_account(app: &TestApp, partner: &pb::Partner) {
    app.partners()
        .update_partner_bank_account(pb::UpdatePartnerBankAccountRequest {
            request_id: request_id(),
            partner_id: partner.partner_id.clone(),
            bank_account: Some(pb::BankAccount {
                bank_code: "090".into(),
                account_number: "3333-01-2345678".into(),
                holder_name: "Kim Minji".into(),
            }),
            etag: partner.etag.clone(),
        })
        .await
        .expect("change account");
}

on_both_databases!(
    a_claims_whole_life_is_told_in_order,
    |app: TestApp| async move {
        let partner = register(&app, partner(7)).await;
        change_account(&app, &partner).await;
        let claim = submit(&app, &partner.partner_id, vec![full_weight_item(200_000)]).await;
        wait_for(&app, &claim.disbursement_id, pb::DisbursementStatus::Paid).await;

        let life = list_all(&app, of_partner(&partner.partner_id)).await;
        use pb::EventType as T;
        let types: Vec<T> = life.iter().map(|e| e.r#type()).collect();
        assert_eq!(
            types,
            [
                T::PartnerRegistered,
                T::PartnerBankAccountChanged,
                T::ClaimDecided,
                T::DisbursementStatusChanged,
                T::DisbursementStatusChanged,
                T::DisbursementStatusChanged,
            ],
            "{life:#?}"
        );
        assert!(life.windows(2).all(|w| w[0].sequence < w[1].sequence));
        for e in &life {
            assert_eq!(e.partner_id, partner.partner_id);
            assert!(e.occur_time.is_some() && !e.event_id.is_empty() && !e.actor.is_empty());
            let shown = format!("{e:?}");
            assert!(
                !shown.contains("456789") && !shown.contains("2345678"),
                "{shown}"
            );
        }
        let Some(pb::event::Detail::Partner(account)) = &life[1].detail else {
            panic!("{:?}", life[1]);
        };
        assert_eq!(
            (
                account.bank_code.as_str(),
                account.masked_account_number.as_str()
            ),
            ("090", "****5678")
        );
        let Some(pb::event::Detail::Claim(decided)) = &life[2].detail else {
            panic!("{:?}", life[2]);
        };
        assert_eq!(decided.status(), pb::ClaimStatus::Approved);
        assert_eq!(decided.compensation_krw, 30_000);
        assert_eq!(decided.recognized_loss_krw, 200_000);
        assert_eq!(life[2].claim_id, claim.claim_id);
        assert_eq!(life[2].disbursement_id, claim.disbursement_id);
        use pb::DisbursementStatus as S;
        let moves: Vec<(S, S, i64)> = life[3..]
            .iter()
            .map(|e| {
                assert_eq!(e.disbursement_id, claim.disbursement_id);
                let d = status_change(e);
                (d.from_status(), d.to_status(), d.amount_krw)
            })
            .collect();
        assert_eq!(
            moves,
            [
                (S::Unspecified, S::Queued, 30_000),
                (S::Queued, S::Submitted, 30_000),
                (S::Submitted, S::Paid, 30_000),
            ]
        );
        assert_eq!(life[5].actor, "dispatcher");
    }
);

on_both_databases!(
    events_are_listed_in_pages_filtered_and_checked,
    |app: TestApp| async move {
        set_paused(&app, true).await;
        let mut partners = Vec::new();
        for seed in 0..5 {
            partners.push(register(&app, partner(100 + seed)).await);
        }
        submit(&app, &partners[0].partner_id, vec![full_weight_item(0)]).await;
        let all = list_all(&app, pb::ListEventsRequest::default()).await;
        assert_eq!(all.len(), 6, "{all:#?}");

        let mut client = events(&app);
        let page = |after_sequence, page_size| pb::ListEventsRequest {
            after_sequence,
            page_size,
            ..Default::default()
        };
        let first = client
            .list_events(page(0, 2))
            .await
            .expect("page")
            .into_inner();
        assert_eq!(first.events, all[..2]);
        let next = client
            .list_events(page(first.events[1].sequence, 0))
            .await
            .expect("page")
            .into_inner();
        assert_eq!(next.events, all[2..]);
        let last = all.last().expect("events").sequence;
        let empty = client.list_events(page(last, 0)).await.expect("page");
        assert!(empty.into_inner().events.is_empty(), "nothing newer yet");

        let decided = list_all(
            &app,
            pb::ListEventsRequest {
                types: vec![pb::EventType::ClaimDecided as i32],
                ..Default::default()
            },
        )
        .await;
        assert_eq!(decided.len(), 1);
        assert_eq!(decided[0].partner_id, partners[0].partner_id);
        let rejected = match &decided[0].detail {
            Some(pb::event::Detail::Claim(c)) => c.status(),
            other => panic!("{other:?}"),
        };
        assert_eq!(rejected, pb::ClaimStatus::Rejected);
        let one = list_all(&app, of_partner(&partners[3].partner_id)).await;
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].r#type(), pb::EventType::PartnerRegistered);
        // A filtered watch sends only what its filter keeps, then follows new events.
        let mut watched = events(&app)
            .watch_events(pb::WatchEventsRequest {
                after_sequence: 0,
                types: vec![
                    pb::EventType::PartnerRegistered as i32,
                    pb::EventType::PartnerBankAccountChanged as i32,
                ],
                partner_id: partners[3].partner_id.clone(),
            })
            .await
            .expect("watch")
            .into_inner();
        let mut next = async || {
            let message = tokio::time::timeout(Duration::from_secs(5), watched.message())
                .await
                .expect("a message in time")
                .expect("stream")
                .expect("open");
            match message.kind {
                Some(Kind::Event(e)) => e,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(next().await, one[0]);
        change_account(&app, &partners[3]).await;
        let account_changed = next().await;
        assert_eq!(
            account_changed.r#type(),
            pb::EventType::PartnerBankAccountChanged
        );
        assert!(account_changed.sequence > last);
        // Another partner's events are left out.
        let later = register(&app, partner(200)).await;
        submit(&app, &later.partner_id, vec![full_weight_item(0)]).await;
        let quiet = tokio::time::timeout(Duration::from_millis(600), watched.message()).await;
        assert!(quiet.is_err(), "nothing kept by the filter: {quiet:?}");

        let refused = client
            .list_events(pb::ListEventsRequest {
                after_sequence: -1,
                page_size: -5,
                types: vec![0, 99],
                partner_id: "not-a-uuid".into(),
            })
            .await
            .expect_err("bad fields");
        let mut fields = bad_fields(&refused);
        fields.sort();
        assert_eq!(
            fields,
            [
                "after_sequence",
                "page_size",
                "partner_id",
                "types[0]",
                "types[1]"
            ]
        );
        let refused = events(&app)
            .watch_events(pb::WatchEventsRequest {
                after_sequence: -3,
                ..Default::default()
            })
            .await
            .expect_err("bad cursor");
        assert_eq!(bad_fields(&refused), ["after_sequence"]);
    }
);

/// The sequences a watcher has received, shared with the test.
type Seen = Arc<Mutex<Vec<i64>>>;

/// Watches `app`'s feed after `after`, recording each event's sequence in `seen`, until the
/// stream ends or the task is aborted.
fn watcher(app: &TestApp, after: i64, seen: Seen) -> JoinHandle<()> {
    let mut client = events(app);
    tokio::spawn(async move {
        let mut stream = client
            .watch_events(pb::WatchEventsRequest {
                after_sequence: after,
                ..Default::default()
            })
            .await
            .expect("watch")
            .into_inner();
        while let Some(message) = stream.message().await.expect("watch stream") {
            if let Some(Kind::Event(e)) = message.kind {
                seen.lock().expect("seen").push(e.sequence);
            }
        }
    })
}

fn last_seen(seen: &Seen) -> i64 {
    seen.lock().expect("seen").last().copied().unwrap_or(0)
}

/// A transaction that has written an event holds the feed (on PostgreSQL, the feed's lock; on
/// SQLite, the database) until it commits: the changes committed meanwhile wait behind it, and
/// a reader gets its event first, then theirs, with nothing skipped.
async fn a_reader_waits_for_a_transaction_still_open(db: Db) {
    use sqlx::Connection as _;
    let app = spawn_app(db, |_| {}).await;
    register(&app, partner(1)).await;
    let before = list_all(&app, pb::ListEventsRequest::default()).await;
    assert_eq!(before.len(), 1);
    let seen = Seen::default();
    let watching = watcher(&app, 0, seen.clone());
    eventually(5, || async {
        (last_seen(&seen) == before[0].sequence).then_some(())
    })
    .await;

    let held_partner = uuid::Uuid::now_v7().to_string();
    let insert = "INSERT INTO change_events (event_id, event_type, time, actor, partner_id, \
                  detail) VALUES ($1, 'partner_registered', 1, 'held', $2, \
                  '{\"kind\":\"partner\",\"bank_code\":\"004\",\"account_last4\":\"0000\"}')";
    let event_id = uuid::Uuid::now_v7().to_string();
    let held = match db {
        Db::Postgres => {
            let mut conn = sqlx::PgConnection::connect(&app.database_url)
                .await
                .expect("connect");
            sqlx::query("BEGIN")
                .execute(&mut conn)
                .await
                .expect("begin");
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(partner_payouts::store::events::FEED_LOCK)
                .execute(&mut conn)
                .await
                .expect("the feed's lock");
            sqlx::query(insert)
                .bind(&event_id)
                .bind(&held_partner)
                .execute(&mut conn)
                .await
                .expect("held event");
            HeldOpen::Postgres(conn)
        }
        Db::Sqlite => {
            let mut conn = sqlx::SqliteConnection::connect(&app.database_url)
                .await
                .expect("connect");
            sqlx::query("BEGIN IMMEDIATE")
                .execute(&mut conn)
                .await
                .expect("begin");
            sqlx::query(insert)
                .bind(&event_id)
                .bind(&held_partner)
                .execute(&mut conn)
                .await
                .expect("held event");
            HeldOpen::Sqlite(conn)
        }
    };
    let mut later = Vec::new();
    for seed in 2..5 {
        let app_channel = app.channel.clone();
        later.push(tokio::spawn(async move {
            PartnerServiceClient::new(app_channel)
                .register_partner(pb::RegisterPartnerRequest {
                    request_id: request_id(),
                    partner: Some(partner(seed)),
                })
                .await
                .expect("register")
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        *seen.lock().expect("seen"),
        [before[0].sequence],
        "nothing is passed on while an earlier transaction is open"
    );
    assert!(
        later.iter().all(|t| !t.is_finished()),
        "the later writers wait"
    );
    held.commit().await;
    for task in later {
        task.await.expect("writer");
    }
    let after = list_all(&app, pb::ListEventsRequest::default()).await;
    assert_eq!(after.len(), 5);
    assert_eq!(after[1].event_id, event_id, "the held event comes first");
    let sequences: Vec<i64> = after.iter().map(|e| e.sequence).collect();
    eventually(5, || async {
        (*seen.lock().expect("seen") == sequences).then_some(())
    })
    .await;
    watching.abort();
    app.stop().await;
}

on_both_databases!(
    a_reader_waits_for_a_transaction_still_open,
    db = a_reader_waits_for_a_transaction_still_open
);

/// A transaction the test holds open on a connection of its own, committed when it says.
enum HeldOpen {
    Postgres(sqlx::PgConnection),
    Sqlite(sqlx::SqliteConnection),
}

impl HeldOpen {
    async fn commit(self) {
        match self {
            Self::Postgres(mut conn) => {
                sqlx::query("COMMIT")
                    .execute(&mut conn)
                    .await
                    .expect("commit");
            }
            Self::Sqlite(mut conn) => {
                sqlx::query("COMMIT")
                    .execute(&mut conn)
                    .await
                    .expect("commit");
            }
        }
    }
}

fn writers(apps: &[&TestApp], seed: u64, n: u64) -> Vec<JoinHandle<()>> {
    (0..8u64)
        .map(|w| {
            let channel = apps[w as usize % apps.len()].channel.clone();
            let app_like = ChannelApp(channel);
            tokio::spawn(async move { app_like.write(seed + w * 100, n).await })
        })
        .collect()
}

/// A service as its writers reach it: by channel.
struct ChannelApp(Channel);

impl ChannelApp {
    async fn write(&self, seed: u64, n: u64) {
        for k in 0..n {
            let partner = PartnerServiceClient::new(self.0.clone())
                .register_partner(pb::RegisterPartnerRequest {
                    request_id: request_id(),
                    partner: Some(partner(seed + k)),
                })
                .await
                .expect("register")
                .into_inner()
                .partner
                .expect("partner");
            partner_payouts::proto::payouts::v1::claim_service_client::ClaimServiceClient::new(
                self.0.clone(),
            )
            .submit_claim(pb::SubmitClaimRequest {
                request_id: request_id(),
                partner_id: partner.partner_id,
                items: vec![full_weight_item(200_000)],
                evidence: vec![],
            })
            .await
            .expect("submit");
        }
    }
}

/// Eight writers on two replicas over one database, two watchers on each: one watcher drops
/// its stream and resumes from its last sequence, then one replica dies and its watchers
/// resume on the other. Every watcher has seen exactly what `ListEvents` lists from 0, in
/// the same order: no gap, no repeat.
async fn every_watcher_sees_exactly_the_feed(db: Db) {
    let a = spawn_app(db, |_| {}).await;
    let b = spawn_app_on(db, &a.database_url, &a.pii_key_file).await;
    let seen: Vec<Seen> = (0..4).map(|_| Seen::default()).collect();
    let mut watching: Vec<JoinHandle<()>> = seen
        .iter()
        .enumerate()
        .map(|(i, s)| watcher(if i < 2 { &a } else { &b }, 0, s.clone()))
        .collect();

    let first = writers(&[&a, &b], 10_000, 4);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Watcher 1 drops its stream and comes back where it left off.
    watching[1].abort();
    let _ = (&mut watching[1]).await;
    watching[1] = watcher(&a, last_seen(&seen[1]), seen[1].clone());
    for w in first {
        w.await.expect("writer");
    }
    // Replica b dies, cutting its watchers' streams; they resume on a.
    for cut in &mut watching[2..] {
        cut.abort();
        let _ = cut.await;
    }
    b.kill();
    for i in 2..4 {
        watching[i] = watcher(&a, last_seen(&seen[i]), seen[i].clone());
    }
    for w in writers(&[&a], 20_000, 2) {
        w.await.expect("writer");
    }

    // 48 claims, each paid: then the feed is still.
    let paid = pb::ListEventsRequest {
        types: vec![pb::EventType::DisbursementStatusChanged as i32],
        ..Default::default()
    };
    eventually(60, || async {
        let changes = list_all(&a, paid.clone()).await;
        let paid = changes
            .iter()
            .filter(|e| status_change(e).to_status() == pb::DisbursementStatus::Paid)
            .count();
        (paid == 48).then_some(())
    })
    .await;
    let feed: Vec<i64> = list_all(&a, pb::ListEventsRequest::default())
        .await
        .iter()
        .map(|e| e.sequence)
        .collect();
    assert_eq!(
        feed.len(),
        48 * 5,
        "partner, claim, queued, submitted, paid each"
    );
    assert!(feed.windows(2).all(|w| w[0] < w[1]));
    // Each watcher has reached the feed's last event (or stalled), then holds exactly the feed.
    let last = *feed.last().expect("events");
    let settled = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < settled && seen.iter().any(|s| last_seen(s) < last) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (i, s) in seen.iter().enumerate() {
        let got = s.lock().expect("seen").clone();
        assert!(
            got == feed,
            "watcher {i} saw {} of {} events; missing {:?}, not in the feed or repeated {:?}",
            got.len(),
            feed.len(),
            feed.iter().filter(|q| !got.contains(q)).collect::<Vec<_>>(),
            got.iter()
                .enumerate()
                .filter(|(k, q)| !feed.contains(q) || got[..*k].contains(q))
                .map(|(_, q)| q)
                .collect::<Vec<_>>(),
        );
    }
    for w in watching {
        w.abort();
    }
    a.stop().await;
}

on_both_databases!(
    every_watcher_sees_exactly_the_feed,
    db = every_watcher_sees_exactly_the_feed
);

on_both_databases!(
    reviews_and_cancellations_are_told_too,
    |app: TestApp| async move {
        set_paused(&app, true).await;
        let partner = register(&app, partner(31)).await;
        let claim = submit(&app, &partner.partner_id, vec![full_weight_item(600_000)]).await;
        assert_eq!(claim.status(), pb::ClaimStatus::PendingReview);
        app.claims()
            .attach_evidence(pb::AttachEvidenceRequest {
                request_id: request_id(),
                claim_id: claim.claim_id.clone(),
                evidence: Some(pb::Evidence {
                    kind: pb::EvidenceKind::SalesLossProof as i32,
                    uri: "s3://payouts-evidence/claims/ledger.pdf".into(),
                    sha256: "ab".repeat(32),
                    attach_time: None,
                }),
            })
            .await
            .expect("evidence");
        let reviewed = app
            .claims()
            .review_claim(pb::ReviewClaimRequest {
                request_id: request_id(),
                claim_id: claim.claim_id.clone(),
                decision: pb::ReviewDecision::Approve as i32,
                compensation_krw: 40_000,
                reason: "ledger checked".into(),
            })
            .await
            .expect("review")
            .into_inner()
            .claim
            .expect("claim");
        app.disbursements()
            .cancel_disbursement(pb::CancelDisbursementRequest {
                request_id: request_id(),
                disbursement_id: reviewed.disbursement_id.clone(),
                reason: "duplicate business".into(),
            })
            .await
            .expect("cancel");

        let life = list_all(&app, of_partner(&partner.partner_id)).await;
        use pb::EventType as T;
        let types: Vec<T> = life.iter().map(|e| e.r#type()).collect();
        assert_eq!(
            types,
            [
                T::PartnerRegistered,
                T::ClaimDecided,
                T::ClaimReviewed,
                T::DisbursementStatusChanged,
                T::DisbursementStatusChanged,
            ],
            "{life:#?}"
        );
        let Some(pb::event::Detail::Claim(decided)) = &life[1].detail else {
            panic!("{:?}", life[1]);
        };
        assert_eq!(decided.status(), pb::ClaimStatus::PendingReview);
        assert_eq!(
            (decided.compensation_krw, life[1].disbursement_id.as_str()),
            (0, "")
        );
        let Some(pb::event::Detail::Claim(review)) = &life[2].detail else {
            panic!("{:?}", life[2]);
        };
        assert_eq!(review.status(), pb::ClaimStatus::Approved);
        assert_eq!(review.compensation_krw, 40_000);
        assert_eq!(review.reason, "ledger checked");
        assert_eq!(life[2].disbursement_id, reviewed.disbursement_id);
        use pb::DisbursementStatus as S;
        let cancelled = status_change(&life[4]);
        assert_eq!(
            (
                cancelled.from_status(),
                cancelled.to_status(),
                cancelled.amount_krw
            ),
            (S::Queued, S::Cancelled, 40_000)
        );
        assert_eq!(cancelled.reason, "duplicate business");
        assert_eq!(status_change(&life[3]).to_status(), S::Queued);
    }
);

/// The feed tells a disbursement's life as its status history does: the same moves, by the
/// same actors, for the same reasons, in the same order.
pub(crate) async fn feed_tells_the_history_of(app: &TestApp, d: &pb::Disbursement) {
    let feed: Vec<(
        pb::DisbursementStatus,
        pb::DisbursementStatus,
        String,
        String,
    )> = list_all(app, of_partner(&d.partner_id))
        .await
        .iter()
        .filter(|e| e.disbursement_id == d.disbursement_id)
        .filter(|e| e.r#type() == pb::EventType::DisbursementStatusChanged)
        .map(|e| {
            let c = status_change(e);
            assert_eq!(c.amount_krw, d.amount_krw);
            (
                c.from_status(),
                c.to_status(),
                e.actor.clone(),
                c.reason.clone(),
            )
        })
        .collect();
    let history: Vec<_> = d
        .history
        .iter()
        .map(|h| {
            (
                h.from_status(),
                h.to_status(),
                h.actor.clone(),
                h.reason.clone(),
            )
        })
        .collect();
    assert_eq!(feed, history);
}

on_both_databases!(
    a_watch_outlives_the_request_timeout_and_ends_when_the_server_drains,
    settings = |s: &mut partner_payouts::config::Settings| s.request_timeout_ms = 300,
    |app: TestApp| async move {
        let seen = Seen::default();
        let watching = watcher(&app, 0, seen.clone());
        tokio::time::sleep(Duration::from_millis(900)).await;
        register(&app, partner(5)).await;
        let feed = list_all(&app, pb::ListEventsRequest::default()).await;
        assert_eq!(feed.len(), 1);
        eventually(5, || async {
            (*seen.lock().expect("seen") == [feed[0].sequence]).then_some(())
        })
        .await;
        assert!(!watching.is_finished(), "the stream is still open");
        // Draining ends the stream (cleanly: the watcher's task would panic on an error), and
        // the server stops rather than wait for it.
        tokio::time::timeout(Duration::from_secs(10), app.stop())
            .await
            .expect("the server stops with a watch open");
        watching.await.expect("the stream ended cleanly");
    }
);
