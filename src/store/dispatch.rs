//! The dispatcher's bookkeeping in SQL, for both databases, a leased batch at a time: a round
//! of the dispatcher costs a constant number of transactions however many disbursements it
//! works on. Expanded inside [`sql_store!`], whose helpers it uses.
//!
//! - [`Store::lease_batch`] leases due outbox rows and reads their disbursements;
//! - [`Store::record_dispatch`] writes what the backend answered for a batch (attempts, holders
//!   verified, final states with their history, rows made due again) and makes instruction
//!   keys, in one transaction, with multi-row statements;
//! - [`Store::renew_leases`] keeps a long round's rows from being taken over.
//!
//! A disbursement's row is written before its outbox row (as `CancelDisbursement` does), and
//! `dispatch_control`, which serialises key assignment across replicas, is locked after the
//! batch's attempts, final states and released rows are written, so that it is held briefly.
//! Reads take no row locks: every status change is an update guarded by the status it
//! expects, which a concurrent cancel makes fail.
//!
//! [`Store::lease_batch`]: crate::store::Store::lease_batch
//! [`Store::record_dispatch`]: crate::store::Store::record_dispatch
//! [`Store::renew_leases`]: crate::store::Store::renew_leases

/// Defines `dispatch_lease_batch`, `dispatch_renew_leases` and `dispatch_record` for `$store`,
/// inside [`sql_store!`] (which provides `Tx`, `DbRow`, `parsed`, `uuid_col`, `status_col`,
/// `disbursement_from_row`, `load_dispatch_state`); its `Store` methods call them.
macro_rules! dispatch_sql {
    ($store:ident, $db:ty, for_update = $for_update:literal, skip_locked = $skip_locked:literal) => {
        /// Bind parameters per statement: SQLite's default limit, also under PostgreSQL's.
        const DISPATCH_MAX_BINDS: usize = 32_766;

        /// Runs `head (ids...) tail` for each piece of `ids` that fits, returning all rows.
        async fn dispatch_select_in(
            tx: &mut Tx,
            head: &str,
            ids: &[String],
            tail: &str,
        ) -> Result<Vec<DbRow>> {
            let mut rows = Vec::with_capacity(ids.len());
            for piece in ids.chunks(DISPATCH_MAX_BINDS) {
                let mut qb = ::sqlx::QueryBuilder::<$db>::new(head);
                qb.push(" (");
                let mut list = qb.separated(", ");
                for id in piece {
                    list.push_bind(id.clone());
                }
                list.push_unseparated(")");
                qb.push(tail);
                rows.extend(qb.build().persistent(false).fetch_all(&mut **tx).await?);
            }
            Ok(rows)
        }

        async fn dispatch_lease_batch(
            store: &$store,
            now: Micros,
            lease_until: Micros,
            limit: u32,
        ) -> Result<Vec<Disbursement>> {
            let mut tx = store.begin_write().await?;
            let leased = dispatch_lease_in(&mut tx, now, lease_until, limit).await?;
            tx.commit().await?;
            Ok(leased)
        }

        async fn dispatch_lease_in(
            tx: &mut Tx,
            now: Micros,
            lease_until: Micros,
            limit: u32,
        ) -> Result<Vec<Disbursement>> {
            if load_dispatch_state(&mut **tx).await?.paused {
                return Ok(Vec::new());
            }
            let ids: Vec<String> = ::sqlx::query_scalar(concat!(
                "UPDATE outbox SET lease_until = $1 WHERE disbursement_id IN (\
                 SELECT disbursement_id FROM outbox WHERE due_time <= $2 AND lease_until <= $2 \
                 ORDER BY due_time LIMIT $3",
                $skip_locked,
                ") RETURNING disbursement_id"
            ))
            .bind(lease_until)
            .bind(now)
            .bind(i64::from(limit))
            .fetch_all(&mut **tx)
            .await?;
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            let rows = dispatch_select_in(
                tx,
                "SELECT * FROM disbursements WHERE disbursement_id IN",
                &ids,
                " ORDER BY disbursement_id",
            )
            .await?;
            rows.iter().map(disbursement_from_row).collect()
        }

        async fn dispatch_renew_leases(
            store: &$store,
            ids: &[Uuid],
            held_until: Micros,
            lease_until: Micros,
        ) -> Result<u64> {
            let mut tx = store.begin_write().await?;
            let mut renewed = 0;
            for piece in ids.chunks(DISPATCH_MAX_BINDS - 2) {
                let mut qb = ::sqlx::QueryBuilder::<$db>::new("UPDATE outbox SET lease_until = ");
                qb.push_bind(lease_until);
                qb.push(" WHERE lease_until = ");
                qb.push_bind(held_until);
                qb.push(" AND disbursement_id IN (");
                let mut list = qb.separated(", ");
                for id in piece {
                    list.push_bind(id.to_string());
                }
                list.push_unseparated(")");
                renewed += qb
                    .build()
                    .persistent(false)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
            }
            tx.commit().await?;
            Ok(renewed)
        }

        async fn dispatch_insert_attempts(tx: &mut Tx, attempts: &[(Uuid, Attempt)]) -> Result<()> {
            // One statement keeps the order of the list, which is the order of the ids.
            for piece in attempts.chunks(DISPATCH_MAX_BINDS / 7) {
                let mut qb = ::sqlx::QueryBuilder::<$db>::new(
                    "INSERT INTO disbursement_attempts (disbursement_id, operation, \
                     idempotency_key, outcome, code, message, time) ",
                );
                qb.push_values(piece, |mut b, (id, a)| {
                    b.push_bind(id.to_string())
                        .push_bind(a.operation.clone())
                        .push_bind(a.idempotency_key.clone())
                        .push_bind(a.outcome.clone())
                        .push_bind(a.code.clone())
                        .push_bind(a.message.clone())
                        .push_bind(a.time);
                });
                qb.build().persistent(false).execute(&mut **tx).await?;
            }
            Ok(())
        }

        /// One status change of the history, as `record_event` writes it.
        struct DispatchEvent<'a> {
            disbursement_id: Uuid,
            from: DisbursementStatus,
            to: DisbursementStatus,
            reason: &'a str,
        }

        async fn dispatch_insert_events(
            tx: &mut Tx,
            events: &[DispatchEvent<'_>],
            now: Micros,
        ) -> Result<()> {
            for piece in events.chunks(DISPATCH_MAX_BINDS / 6) {
                let mut qb = ::sqlx::QueryBuilder::<$db>::new(
                    "INSERT INTO disbursement_events (disbursement_id, from_status, to_status, \
                     actor, reason, time) ",
                );
                qb.push_values(piece, |mut b, e| {
                    b.push_bind(e.disbursement_id.to_string())
                        .push_bind(e.from.key())
                        .push_bind(e.to.key())
                        .push_bind("dispatcher")
                        .push_bind(e.reason.to_owned())
                        .push_bind(now);
                });
                qb.build().persistent(false).execute(&mut **tx).await?;
            }
            Ok(())
        }

        /// Moves each `(id, from, to)` that is still in `from`; returns the ids that moved.
        async fn dispatch_transition(
            tx: &mut Tx,
            moves: &[(Uuid, DisbursementStatus, DisbursementStatus)],
            now: Micros,
        ) -> Result<::std::collections::HashSet<Uuid>> {
            let mut moved = ::std::collections::HashSet::new();
            for piece in moves.chunks((DISPATCH_MAX_BINDS - 1) / 3) {
                let mut qb = ::sqlx::QueryBuilder::<$db>::new("UPDATE disbursements SET status = v.column3, update_time = ");
                qb.push_bind(now);
                qb.push(" FROM (");
                qb.push_values(piece, |mut b, (id, from, to)| {
                    b.push_bind(id.to_string()).push_bind(from.key()).push_bind(to.key());
                });
                qb.push(
                    ") AS v WHERE disbursements.disbursement_id = v.column1 \
                     AND disbursements.status = v.column2 RETURNING disbursement_id",
                );
                let ids: Vec<String> = qb
                    .build_query_scalar()
                    .persistent(false)
                    .fetch_all(&mut **tx)
                    .await?;
                for id in ids {
                    moved.insert(parsed("disbursements.disbursement_id", Uuid::parse_str(&id))?);
                }
            }
            Ok(moved)
        }

        /// Ends the dispatch of `finished`, as `finish_dispatch` does for one.
        async fn dispatch_finish(
            tx: &mut Tx,
            finished: &[(Uuid, DispatchOutcome)],
            now: Micros,
        ) -> Result<()> {
            if finished.is_empty() {
                return Ok(());
            }
            let ids: Vec<String> = finished.iter().map(|(id, _)| id.to_string()).collect();
            let mut status = ::std::collections::HashMap::new();
            for row in dispatch_select_in(
                tx,
                "SELECT disbursement_id, status FROM disbursements WHERE disbursement_id IN",
                &ids,
                "",
            )
            .await?
            {
                status.insert(uuid_col(&row, "disbursement_id")?, status_col(&row, "status")?);
            }
            let mut moves = Vec::with_capacity(finished.len());
            let mut reasons = Vec::with_capacity(finished.len());
            for (id, outcome) in finished {
                let from = *status.get(id).ok_or(StoreError::NotFound("disbursement"))?;
                let (to, reason) = match outcome {
                    DispatchOutcome::Paid => (DisbursementStatus::Paid, "backend reports paid"),
                    DispatchOutcome::Failed { code, .. } => {
                        (DisbursementStatus::Failed, code.as_str())
                    }
                };
                if from.can_become(to) {
                    moves.push((*id, from, to));
                    reasons.push(reason);
                }
            }
            let moved = dispatch_transition(tx, &moves, now).await?;
            let events: Vec<DispatchEvent<'_>> = moves
                .iter()
                .zip(&reasons)
                .filter(|((id, _, _), _)| moved.contains(id))
                .map(|(&(id, from, to), &reason)| DispatchEvent {
                    disbursement_id: id,
                    from,
                    to,
                    reason,
                })
                .collect();
            dispatch_insert_events(tx, &events, now).await?;
            // Only a disbursement that really fails now (not one cancelled meanwhile) takes the
            // failure code.
            let failures: Vec<(&Uuid, &String, &String)> = finished
                .iter()
                .filter(|(id, _)| moved.contains(id))
                .filter_map(|(id, outcome)| match outcome {
                    DispatchOutcome::Failed { code, message } => Some((id, code, message)),
                    DispatchOutcome::Paid => None,
                })
                .collect();
            for piece in failures.chunks(DISPATCH_MAX_BINDS / 3) {
                let mut qb = ::sqlx::QueryBuilder::<$db>::new(
                    "UPDATE disbursements SET failure_code = v.column2, failure_message = v.column3 FROM (",
                );
                qb.push_values(piece, |mut b, (id, code, message)| {
                    b.push_bind(id.to_string())
                        .push_bind((*code).clone())
                        .push_bind((*message).clone());
                });
                qb.push(") AS v WHERE disbursements.disbursement_id = v.column1");
                qb.build().persistent(false).execute(&mut **tx).await?;
            }
            for piece in ids.chunks(DISPATCH_MAX_BINDS) {
                let mut qb =
                    ::sqlx::QueryBuilder::<$db>::new("DELETE FROM outbox WHERE disbursement_id IN (");
                let mut list = qb.separated(", ");
                for id in piece {
                    list.push_bind(id.clone());
                }
                list.push_unseparated(")");
                qb.build().persistent(false).execute(&mut **tx).await?;
            }
            Ok(())
        }

        /// Releases the leases of `requeued` and makes each row due again, as `reschedule`
        /// does for one.
        async fn dispatch_requeue(
            tx: &mut Tx,
            requeued: &[(Uuid, $crate::store::Requeue)],
            back_off: &(dyn Fn(u32) -> Micros + Send + Sync),
        ) -> Result<()> {
            use $crate::store::Requeue;
            let mut failures = ::std::collections::HashMap::new();
            let backing_off: Vec<String> = requeued
                .iter()
                .filter(|(_, r)| *r == Requeue::BackOff)
                .map(|(id, _)| id.to_string())
                .collect();
            for piece in backing_off.chunks(DISPATCH_MAX_BINDS) {
                let mut qb = ::sqlx::QueryBuilder::<$db>::new(
                    "UPDATE outbox SET failures = failures + 1 WHERE disbursement_id IN (",
                );
                let mut list = qb.separated(", ");
                for id in piece {
                    list.push_bind(id.clone());
                }
                list.push_unseparated(") RETURNING disbursement_id, failures");
                for row in qb.build().persistent(false).fetch_all(&mut **tx).await? {
                    let n: i32 = row.try_get("failures")?;
                    failures.insert(uuid_col(&row, "disbursement_id")?, n.max(0).unsigned_abs());
                }
            }
            let due: Vec<(String, Micros)> = requeued
                .iter()
                .filter_map(|(id, r)| match r {
                    Requeue::At(at) => Some((id.to_string(), *at)),
                    // A row that is gone (finished meanwhile) has nothing to make due.
                    Requeue::BackOff => failures.get(id).map(|&n| (id.to_string(), back_off(n))),
                })
                .collect();
            for piece in due.chunks(DISPATCH_MAX_BINDS / 2) {
                let mut qb = ::sqlx::QueryBuilder::<$db>::new(
                    "UPDATE outbox SET lease_until = 0, due_time = v.column2 FROM (",
                );
                qb.push_values(piece, |mut b, (id, at)| {
                    b.push_bind(id.clone()).push_bind(*at);
                });
                qb.push(") AS v WHERE outbox.disbursement_id = v.column1");
                qb.build().persistent(false).execute(&mut **tx).await?;
            }
            Ok(())
        }

        /// Makes (or returns) the instruction keys of `ids` in order, as `assign_key` does for
        /// one, the budget counting the keys made earlier in the batch.
        async fn dispatch_assign_keys(
            tx: &mut Tx,
            ids: &[Uuid],
            budget_krw: Option<i64>,
            now: Micros,
        ) -> Result<(Vec<KeyAssignment>, ::std::collections::HashSet<Uuid>)> {
            let mut moved = ::std::collections::HashSet::new();
            if ids.is_empty() {
                return Ok((Vec::new(), moved));
            }
            // One key assignment at a time across replicas keeps the budget check exact.
            ::sqlx::query(concat!("SELECT id FROM dispatch_control WHERE id = 1", $for_update))
                .fetch_one(&mut **tx)
                .await?;
            let texts: Vec<String> = ids.iter().map(Uuid::to_string).collect();
            let mut rows = ::std::collections::HashMap::new();
            for row in dispatch_select_in(
                tx,
                "SELECT disbursement_id, status, amount_krw, key_seq, idempotency_key \
                 FROM disbursements WHERE disbursement_id IN",
                &texts,
                "",
            )
            .await?
            {
                let amount_krw: i64 = row.try_get("amount_krw")?;
                let key_seq: i64 = row.try_get("key_seq")?;
                let key: Option<String> = row.try_get("idempotency_key")?;
                rows.insert(
                    uuid_col(&row, "disbursement_id")?,
                    (status_col(&row, "status")?, amount_krw, key_seq, key),
                );
            }
            let mut committed: Option<i128> = None;
            if budget_krw.is_some() {
                let sum: i64 = ::sqlx::query_scalar(
                    "SELECT CAST(COALESCE(SUM(amount_krw), 0) AS BIGINT) FROM disbursements \
                     WHERE status IN ($1, $2)",
                )
                .bind(DisbursementStatus::Submitted.key())
                .bind(DisbursementStatus::Paid.key())
                .fetch_one(&mut **tx)
                .await?;
                committed = Some(i128::from(sum));
            }
            let mut answers = Vec::with_capacity(ids.len());
            let mut making: Vec<(Uuid, String)> = Vec::new();
            for id in ids {
                let Some((status, amount_krw, key_seq, existing)) = rows.get(id) else {
                    return Err(StoreError::NotFound("disbursement"));
                };
                match (status, existing) {
                    (DisbursementStatus::Submitted, Some(key)) => {
                        answers.push(KeyAssignment::Key(key.clone()));
                        continue;
                    }
                    (DisbursementStatus::Queued, _) => {}
                    _ => {
                        answers.push(KeyAssignment::Gone);
                        continue;
                    }
                }
                if let (Some(budget), Some(sum)) = (budget_krw, committed.as_mut()) {
                    if *sum + i128::from(*amount_krw) > i128::from(budget) {
                        answers.push(KeyAssignment::OverBudget);
                        continue;
                    }
                    *sum += i128::from(*amount_krw);
                }
                // Derived, not random: a crash between storing and sending resends the same key.
                let key = format!("{id}-{key_seq}");
                making.push((*id, key.clone()));
                answers.push(KeyAssignment::Key(key));
            }
            for piece in making.chunks((DISPATCH_MAX_BINDS - 3) / 2) {
                let mut qb = ::sqlx::QueryBuilder::<$db>::new(
                    "UPDATE disbursements SET idempotency_key = v.column2, holder_verified = TRUE, \
                     status = ",
                );
                qb.push_bind(DisbursementStatus::Submitted.key());
                qb.push(", update_time = ");
                qb.push_bind(now);
                qb.push(" FROM (");
                qb.push_values(piece, |mut b, (id, key)| {
                    b.push_bind(id.to_string()).push_bind(key.clone());
                });
                qb.push(
                    ") AS v WHERE disbursements.disbursement_id = v.column1 AND disbursements.status = ",
                );
                qb.push_bind(DisbursementStatus::Queued.key());
                qb.push(" RETURNING disbursement_id");
                let ids: Vec<String> = qb
                    .build_query_scalar()
                    .persistent(false)
                    .fetch_all(&mut **tx)
                    .await?;
                for id in ids {
                    moved.insert(parsed("disbursements.disbursement_id", Uuid::parse_str(&id))?);
                }
            }
            let events: Vec<DispatchEvent<'_>> = making
                .iter()
                .filter(|(id, _)| moved.contains(id))
                .map(|(id, _)| DispatchEvent {
                    disbursement_id: *id,
                    from: DisbursementStatus::Queued,
                    to: DisbursementStatus::Submitted,
                    reason: "instruction key stored before sending",
                })
                .collect();
            dispatch_insert_events(tx, &events, now).await?;
            // A row that left QUEUED meanwhile (cancelled) is not moved and gets no key.
            let made: ::std::collections::HashSet<&Uuid> = making.iter().map(|(id, _)| id).collect();
            let answers = ids
                .iter()
                .zip(answers)
                .map(|(id, answer)| match answer {
                    KeyAssignment::Key(_) if made.contains(id) && !moved.contains(id) => {
                        KeyAssignment::Gone
                    }
                    other => other,
                })
                .collect();
            Ok((answers, moved))
        }

        async fn dispatch_record(
            store: &$store,
            record: &$crate::store::DispatchRecord,
            budget_krw: Option<i64>,
            back_off: &(dyn Fn(u32) -> Micros + Send + Sync),
            now: Micros,
        ) -> Result<Vec<KeyAssignment>> {
            let mut tx = store.begin_write().await?;
            let keys = dispatch_record_in(&mut tx, record, budget_krw, back_off, now).await?;
            tx.commit().await?;
            Ok(keys)
        }

        async fn dispatch_record_in(
            tx: &mut Tx,
            record: &$crate::store::DispatchRecord,
            budget_krw: Option<i64>,
            back_off: &(dyn Fn(u32) -> Micros + Send + Sync),
            now: Micros,
        ) -> Result<Vec<KeyAssignment>> {
            dispatch_insert_attempts(tx, &record.attempts).await?;
            dispatch_finish(tx, &record.finished, now).await?;
            dispatch_requeue(tx, &record.requeued, back_off).await?;
            let (keys, keyed) =
                dispatch_assign_keys(tx, &record.assign_keys, budget_krw, now).await?;
            // A row given its key was marked verified with it, in the same statement.
            let verified: Vec<String> = record
                .verified
                .iter()
                .filter(|id| !keyed.contains(id))
                .map(Uuid::to_string)
                .collect();
            for piece in verified.chunks(DISPATCH_MAX_BINDS) {
                let mut qb = ::sqlx::QueryBuilder::<$db>::new(
                    "UPDATE disbursements SET holder_verified = TRUE WHERE disbursement_id IN (",
                );
                let mut list = qb.separated(", ");
                for id in piece {
                    list.push_bind(id.clone());
                }
                list.push_unseparated(")");
                qb.build().persistent(false).execute(&mut **tx).await?;
            }
            Ok(keys)
        }
    };
}
