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
//! A batch's rows go to the database as a table `v` (columns `column1`, `column2`, ...), built
//! by [`BatchSql::table`]: on PostgreSQL its columns are bound as arrays (`UNNEST`), so each
//! statement's text is the same for any number of rows and is prepared once per connection; on
//! SQLite they are a `VALUES` list, cut into pieces under the bind-parameter limit.
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
//! [`BatchSql::table`]: crate::store::batch::BatchSql::table

/// Defines `dispatch_lease_batch`, `dispatch_renew_leases` and `dispatch_record` for `$store`,
/// inside [`sql_store!`] (which provides `Tx`, `DbRow`, `parsed`, `uuid_col`, `status_col`,
/// `disbursement_from_row`, `load_dispatch_state`); its `Store` methods call them.
macro_rules! dispatch_sql {
    (
        $store:ident,
        $db:ty,
        for_update = $for_update:literal,
        skip_locked = $skip_locked:literal
    ) => {
        use $crate::store::batch::Column as Col;

        /// Runs `head v tail` with the batch's rows as the table `v`, in as many statements as
        /// the database needs; returns the rows they answered.
        async fn dispatch_rows(
            tx: &mut Tx,
            head: &str,
            columns: Vec<Col>,
            tail: &str,
        ) -> Result<Vec<DbRow>> {
            let mut answered = Vec::new();
            for mut qb in <$db as $crate::store::batch::BatchSql>::table(head, columns, tail) {
                answered.extend(
                    qb.build()
                        .persistent(<$db as $crate::store::batch::BatchSql>::PREPARED)
                        .fetch_all(&mut **tx)
                        .await?,
                );
            }
            Ok(answered)
        }

        fn dispatch_ids<'a>(ids: impl IntoIterator<Item = &'a Uuid>) -> Col {
            Col::Text(ids.into_iter().map(Uuid::to_string).collect())
        }

        /// The ids a statement answered in its `disbursement_id` column.
        fn dispatch_answered_ids(rows: &[DbRow]) -> Result<::std::collections::HashSet<Uuid>> {
            rows.iter().map(|row| uuid_col(row, "disbursement_id")).collect()
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
            let rows = dispatch_rows(
                tx,
                "SELECT * FROM disbursements WHERE disbursement_id IN (SELECT column1 FROM ",
                vec![Col::Text(ids)],
                ") ORDER BY disbursement_id",
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
            let renewed = dispatch_rows(
                &mut tx,
                "UPDATE outbox SET lease_until = v.column2 FROM ",
                vec![
                    dispatch_ids(ids),
                    Col::BigInt(vec![lease_until; ids.len()]),
                    Col::BigInt(vec![held_until; ids.len()]),
                ],
                " WHERE outbox.disbursement_id = v.column1 AND outbox.lease_until = v.column3 \
                 RETURNING disbursement_id",
            )
            .await?;
            tx.commit().await?;
            Ok(u64::try_from(renewed.len()).unwrap_or(u64::MAX))
        }

        async fn dispatch_insert_attempts(tx: &mut Tx, attempts: &[(Uuid, Attempt)]) -> Result<()> {
            let text = |f: fn(&Attempt) -> &String| {
                Col::Text(attempts.iter().map(|(_, a)| f(a).clone()).collect())
            };
            // Rows go in in the order of the list, which is the order of their ids.
            dispatch_rows(
                tx,
                "INSERT INTO disbursement_attempts (disbursement_id, operation, idempotency_key, \
                 outcome, code, message, time) \
                 SELECT column1, column2, column3, column4, column5, column6, column7 FROM ",
                vec![
                    dispatch_ids(attempts.iter().map(|(id, _)| id)),
                    text(|a| &a.operation),
                    text(|a| &a.idempotency_key),
                    text(|a| &a.outcome),
                    text(|a| &a.code),
                    text(|a| &a.message),
                    Col::BigInt(attempts.iter().map(|(_, a)| a.time).collect()),
                ],
                "",
            )
            .await?;
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
            let text = |f: &dyn Fn(&DispatchEvent<'_>) -> String| {
                Col::Text(events.iter().map(f).collect())
            };
            dispatch_rows(
                tx,
                "INSERT INTO disbursement_events (disbursement_id, from_status, to_status, actor, \
                 reason, time) SELECT column1, column2, column3, column4, column5, column6 FROM ",
                vec![
                    dispatch_ids(events.iter().map(|e| &e.disbursement_id)),
                    text(&|e| e.from.key().to_owned()),
                    text(&|e| e.to.key().to_owned()),
                    text(&|_| "dispatcher".to_owned()),
                    text(&|e| e.reason.to_owned()),
                    Col::BigInt(vec![now; events.len()]),
                ],
                "",
            )
            .await?;
            Ok(())
        }

        /// Moves each `(id, from, to)` that is still in `from`; returns the ids that moved.
        async fn dispatch_transition(
            tx: &mut Tx,
            moves: &[(Uuid, DisbursementStatus, DisbursementStatus)],
            now: Micros,
        ) -> Result<::std::collections::HashSet<Uuid>> {
            let moved = dispatch_rows(
                tx,
                "UPDATE disbursements SET status = v.column3, update_time = v.column4 FROM ",
                vec![
                    dispatch_ids(moves.iter().map(|(id, _, _)| id)),
                    Col::Text(moves.iter().map(|(_, from, _)| from.key().to_owned()).collect()),
                    Col::Text(moves.iter().map(|(_, _, to)| to.key().to_owned()).collect()),
                    Col::BigInt(vec![now; moves.len()]),
                ],
                " WHERE disbursements.disbursement_id = v.column1 \
                 AND disbursements.status = v.column2 RETURNING disbursement_id",
            )
            .await?;
            dispatch_answered_ids(&moved)
        }

        /// Ends the dispatch of `finished`: each still in a status that may become `PAID` or
        /// `FAILED` moves there with its history (a failure with its code), and its outbox row
        /// is removed.
        async fn dispatch_finish(
            tx: &mut Tx,
            finished: &[(Uuid, DispatchOutcome)],
            now: Micros,
        ) -> Result<()> {
            if finished.is_empty() {
                return Ok(());
            }
            let mut status = ::std::collections::HashMap::new();
            for row in dispatch_rows(
                tx,
                "SELECT disbursement_id, status FROM disbursements \
                 WHERE disbursement_id IN (SELECT column1 FROM ",
                vec![dispatch_ids(finished.iter().map(|(id, _)| id))],
                ")",
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
            dispatch_rows(
                tx,
                "UPDATE disbursements SET failure_code = v.column2, \
                 failure_message = v.column3 FROM ",
                vec![
                    dispatch_ids(failures.iter().map(|(id, _, _)| *id)),
                    Col::Text(failures.iter().map(|(_, code, _)| (*code).clone()).collect()),
                    Col::Text(failures.iter().map(|(_, _, message)| (*message).clone()).collect()),
                ],
                " WHERE disbursements.disbursement_id = v.column1",
            )
            .await?;
            dispatch_rows(
                tx,
                "DELETE FROM outbox WHERE disbursement_id IN (SELECT column1 FROM ",
                vec![dispatch_ids(finished.iter().map(|(id, _)| id))],
                ")",
            )
            .await?;
            Ok(())
        }

        /// Releases the leases of `requeued` and makes each row due again: at its time, or at
        /// the back-off for its failures so far after counting one more.
        async fn dispatch_requeue(
            tx: &mut Tx,
            requeued: &[(Uuid, $crate::store::Requeue)],
            back_off: &(dyn Fn(u32) -> Micros + Send + Sync),
        ) -> Result<()> {
            use $crate::store::Requeue;
            let mut failures = ::std::collections::HashMap::new();
            for row in dispatch_rows(
                tx,
                "UPDATE outbox SET failures = failures + 1 \
                 WHERE disbursement_id IN (SELECT column1 FROM ",
                vec![dispatch_ids(
                    requeued
                        .iter()
                        .filter(|(_, r)| *r == Requeue::BackOff)
                        .map(|(id, _)| id),
                )],
                ") RETURNING disbursement_id, failures",
            )
            .await?
            {
                let n: i32 = row.try_get("failures")?;
                failures.insert(uuid_col(&row, "disbursement_id")?, n.max(0).unsigned_abs());
            }
            let due: Vec<(&Uuid, Micros)> = requeued
                .iter()
                .filter_map(|(id, r)| match r {
                    Requeue::At(at) => Some((id, *at)),
                    // A row that is gone (finished meanwhile) has nothing to make due.
                    Requeue::BackOff => failures.get(id).map(|&n| (id, back_off(n))),
                })
                .collect();
            dispatch_rows(
                tx,
                "UPDATE outbox SET lease_until = 0, due_time = v.column2 FROM ",
                vec![
                    dispatch_ids(due.iter().map(|(id, _)| *id)),
                    Col::BigInt(due.iter().map(|(_, at)| *at).collect()),
                ],
                " WHERE outbox.disbursement_id = v.column1",
            )
            .await?;
            Ok(())
        }

        /// Makes (or returns) the instruction keys of `ids` in order and moves each from
        /// `QUEUED` to `SUBMITTED`, the budget counting the keys made earlier in the batch;
        /// also returns the ids that moved to `SUBMITTED`.
        async fn dispatch_assign_keys(
            tx: &mut Tx,
            ids: &[Uuid],
            budget_krw: Option<i64>,
            now: Micros,
        ) -> Result<(Vec<KeyAssignment>, ::std::collections::HashSet<Uuid>)> {
            if ids.is_empty() {
                return Ok((Vec::new(), ::std::collections::HashSet::new()));
            }
            // One key assignment at a time across replicas keeps the budget check exact.
            ::sqlx::query(concat!("SELECT id FROM dispatch_control WHERE id = 1", $for_update))
                .fetch_one(&mut **tx)
                .await?;
            let mut rows = ::std::collections::HashMap::new();
            for row in dispatch_rows(
                tx,
                "SELECT disbursement_id, status, amount_krw, key_seq, idempotency_key \
                 FROM disbursements WHERE disbursement_id IN (SELECT column1 FROM ",
                vec![dispatch_ids(ids)],
                ")",
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
            // Every row sent for has had its holder verified: the flag goes with the key.
            let n = making.len();
            let moved = dispatch_rows(
                tx,
                "UPDATE disbursements SET idempotency_key = v.column2, holder_verified = TRUE, \
                 status = v.column4, update_time = v.column5 FROM ",
                vec![
                    dispatch_ids(making.iter().map(|(id, _)| id)),
                    Col::Text(making.iter().map(|(_, key)| key.clone()).collect()),
                    Col::Text(vec![DisbursementStatus::Queued.key().to_owned(); n]),
                    Col::Text(vec![DisbursementStatus::Submitted.key().to_owned(); n]),
                    Col::BigInt(vec![now; n]),
                ],
                " WHERE disbursements.disbursement_id = v.column1 \
                 AND disbursements.status = v.column3 RETURNING disbursement_id",
            )
            .await?;
            let moved = dispatch_answered_ids(&moved)?;
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
            let made: ::std::collections::HashSet<&Uuid> =
                making.iter().map(|(id, _)| id).collect();
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
            dispatch_rows(
                tx,
                "UPDATE disbursements SET holder_verified = TRUE \
                 WHERE disbursement_id IN (SELECT column1 FROM ",
                vec![dispatch_ids(record.verified.iter().filter(|id| !keyed.contains(id)))],
                ")",
            )
            .await?;
            Ok(keys)
        }
    };
}
