//! Bulk intake in SQL, for both databases: a batch of partners or claims written in one
//! transaction with set-based statements, so a batch of N rows costs a handful of statements
//! and one commit instead of N. Expanded inside [`sql_store!`], whose helpers it uses.
//!
//! Each row must get exactly what the one-row method ([`Store::register_partner`],
//! [`Store::submit_claim`]) would have answered had the rows come one at a time, in order:
//! - rows that share a request id, registration number or partner with an earlier row of the
//!   batch wait for a later *wave* of the same transaction, so they see what that row did;
//! - request ids are taken first (`INSERT .. ON CONFLICT DO NOTHING`), as the one-row path
//!   does, so a concurrent call with the same id waits for us and then replays, or we for it;
//! - a row refused after its id was taken gives the id back, as a rolled-back call would.
//!
//! A concurrent writer can still slip in between a check and an insert (a unique violation) or
//! PostgreSQL can pick the transaction to break a deadlock: then the whole batch is rolled back
//! and redone row by row through the one-row methods, whose answers are the reference.
//!
//! [`Store::register_partner`]: crate::store::Store::register_partner
//! [`Store::submit_claim`]: crate::store::Store::submit_claim

/// Defines `bulk_register_partners` and `bulk_submit_claims` for `$store`, inside
/// [`sql_store!`] (which provides `Tx`, `DbRow`, `unexpected`, `uuid_col`, `services_key`).
macro_rules! bulk_sql {
    ($store:ident, $db:ty, for_update = $for_update:literal) => {
        use $crate::store::BatchAudit;
        use $crate::store::batch::{BatchSql, Column, Insert, Lookup, NOT_WRITTEN_WHOLE};

        /// Why a batch could not be written as a batch.
        enum BulkError {
            /// A concurrent writer got in between (or PostgreSQL broke a deadlock with us):
            /// redo the batch row by row.
            Race,
            Store(StoreError),
        }

        impl From<::sqlx::Error> for BulkError {
            fn from(e: ::sqlx::Error) -> Self {
                if let ::sqlx::Error::Database(db) = &e {
                    // 40P01: deadlock detected; 40001: serialization failure.
                    if db.is_unique_violation()
                        || matches!(db.code().as_deref(), Some("40P01" | "40001"))
                    {
                        return Self::Race;
                    }
                }
                Self::Store(e.into())
            }
        }

        impl From<StoreError> for BulkError {
            fn from(e: StoreError) -> Self {
                Self::Store(e)
            }
        }

        type BulkResult<T> = ::std::result::Result<T, BulkError>;

        /// What the batch answered each row; `None` until its wave decides it.
        type Answers<T> = Vec<Option<Result<Stored<T>>>>;

        fn bulk_finish<T>(answers: Answers<T>) -> Vec<Result<Stored<T>>> {
            answers
                .into_iter()
                .map(|a| {
                    a.unwrap_or_else(|| Err(unexpected("a row of the batch was not answered")))
                })
                .collect()
        }

        /// Splits rows into waves. A row goes one wave after the last earlier row that shares
        /// any of its keys, so the rows of one wave never interfere, and a later wave sees
        /// what the earlier ones wrote, in row order.
        fn bulk_waves(keys: &[Vec<String>]) -> Vec<Vec<usize>> {
            let mut last_wave: ::std::collections::HashMap<&str, usize> =
                ::std::collections::HashMap::new();
            let mut waves: Vec<Vec<usize>> = Vec::new();
            for (row, row_keys) in keys.iter().enumerate() {
                let wave = row_keys
                    .iter()
                    .filter_map(|k| last_wave.get(k.as_str()).map(|w| w + 1))
                    .max()
                    .unwrap_or(0);
                for k in row_keys {
                    last_wave.insert(k.as_str(), wave);
                }
                if waves.len() == wave {
                    waves.push(Vec::new());
                }
                waves[wave].push(row);
            }
            waves
        }

        /// The statements of a batch in this database's form.
        type BatchStatements = Vec<::sqlx::QueryBuilder<$db>>;

        /// Rows whose column (the last word of `head`) is one of `values`. Planned afresh
        /// each time (not kept prepared): a plan made while a table was small (a sequential
        /// scan) would otherwise stay while a bulk load makes it large.
        async fn bulk_select_in(
            tx: &mut Tx,
            head: &str,
            values: Vec<String>,
            tail: &str,
        ) -> BulkResult<Vec<DbRow>> {
            let mut rows = Vec::new();
            for mut qb in <$db as BatchSql>::matching(head, values, tail) {
                rows.extend(qb.build().persistent(false).fetch_all(&mut **tx).await?);
            }
            Ok(rows)
        }

        async fn bulk_execute(tx: &mut Tx, statements: BatchStatements) -> BulkResult<()> {
            for mut qb in statements {
                qb.build()
                    .persistent(<$db as BatchSql>::PREPARED)
                    .execute(&mut **tx)
                    .await?;
            }
            Ok(())
        }

        async fn bulk_fetch(tx: &mut Tx, statements: BatchStatements) -> BulkResult<Vec<DbRow>> {
            let mut rows = Vec::new();
            for mut qb in statements {
                rows.extend(
                    qb.build()
                        .persistent(<$db as BatchSql>::PREPARED)
                        .fetch_all(&mut **tx)
                        .await?,
                );
            }
            Ok(rows)
        }

        fn text_column<T>(items: &[T], f: impl Fn(&T) -> String) -> Column {
            Column::Text(items.iter().map(f).collect())
        }

        /// The insert of audit log entries.
        fn audit_insert(events: &[AuditEvent]) -> Insert<'static> {
            Insert {
                head: "INSERT INTO audit_events (audit_event_id, time, principal, method, \
                       resource_id, request_id, outcome_code, peer_address, count, replayed)",
                columns: vec![
                    text_column(events, |e| e.audit_event_id.to_string()),
                    Column::BigInt(events.iter().map(|e| e.time).collect()),
                    text_column(events, |e| e.principal.clone()),
                    text_column(events, |e| e.method.clone()),
                    text_column(events, |e| e.resource_id.clone()),
                    text_column(events, |e| e.request_id.clone()),
                    text_column(events, |e| e.outcome_code.clone()),
                    text_column(events, |e| e.peer_address.clone()),
                    Column::BigInt(events.iter().map(|e| e.count).collect()),
                    Column::Bool(events.iter().map(|e| e.replayed).collect()),
                ],
                tail: "",
            }
        }

        /// Appends audit log entries in the caller's transaction.
        async fn bulk_insert_audit(tx: &mut Tx, events: &[AuditEvent]) -> Result<()> {
            for mut qb in <$db as BatchSql>::insert_all(vec![audit_insert(events)]) {
                qb.build()
                    .persistent(<$db as BatchSql>::PREPARED)
                    .execute(&mut **tx)
                    .await?;
            }
            Ok(())
        }

        /// A row's request as the batch statements name it: its request id and its principal
        /// (the idempotency record's key), as [`REQUEST_KEY`] returns it.
        fn request_key(idem: &Idempotency) -> String {
            format!("{}/{}", idem.request_id, idem.principal)
        }

        /// [`request_key`] in SQL, on the idempotency table. A request id (a UUID) has no `/`,
        /// so the key is unambiguous whatever the principal's name.
        const REQUEST_KEY: &str = "request_id || '/' || principal";

        /// The insert that takes request ids, each with the response its row will give if it
        /// is written; in a fixed order (by principal, then request id), so two batches
        /// sharing requests cannot deadlock on them.
        fn request_ids_insert(
            idems: Vec<(&Idempotency, Option<Vec<u8>>)>,
            now: Micros,
        ) -> Insert<'static> {
            let mut sorted = idems;
            sorted.sort_by(|(a, _), (b, _)| {
                (&a.principal, a.request_id).cmp(&(&b.principal, b.request_id))
            });
            let n = sorted.len();
            let (idems, responses): (Vec<&Idempotency>, Vec<Option<Vec<u8>>>) =
                sorted.into_iter().unzip();
            Insert {
                head: "INSERT INTO idempotency \
                       (request_id, principal, method, fingerprint, response, create_time)",
                columns: vec![
                    text_column(&idems, |i| i.request_id.to_string()),
                    text_column(&idems, |i| i.principal.clone()),
                    text_column(&idems, |i| i.method.to_owned()),
                    text_column(&idems, |i| i.fingerprint.clone()),
                    Column::NullableBytes(responses),
                    Column::BigInt(vec![now; n]),
                ],
                tail: " ON CONFLICT (request_id, principal) DO NOTHING",
            }
        }

        /// Takes the request ids that are new (see [`request_ids_insert`]) and, in the same
        /// round trip where the database allows, runs `lookup`. Returns the requests taken, by
        /// [`request_key`] (the others were used before), and the lookup's values by key.
        async fn bulk_take_request_ids_and_look_up(
            tx: &mut Tx,
            idems: Vec<(&Idempotency, Option<Vec<u8>>)>,
            now: Micros,
            lookup: Lookup<'_>,
        ) -> BulkResult<(
            ::std::collections::HashSet<String>,
            ::std::collections::HashMap<String, String>,
        )> {
            let statements = <$db as BatchSql>::insert_and_lookup(
                request_ids_insert(idems, now),
                REQUEST_KEY,
                lookup,
            );
            let mut taken = ::std::collections::HashSet::new();
            let mut found = ::std::collections::HashMap::new();
            for row in bulk_fetch(tx, statements).await? {
                let part: String = row.try_get("part")?;
                let a: String = row.try_get("a")?;
                if part == "inserted" {
                    taken.insert(a);
                } else {
                    found.insert(a, row.try_get::<String, _>("b")?);
                }
            }
            Ok((taken, found))
        }

        /// Takes the request ids that are new (see [`request_ids_insert`]); returns the
        /// requests taken, by [`request_key`]. The others were used before.
        async fn bulk_take_request_ids(
            tx: &mut Tx,
            idems: Vec<(&Idempotency, Option<Vec<u8>>)>,
            now: Micros,
        ) -> BulkResult<::std::collections::HashSet<String>> {
            let mut insert = request_ids_insert(idems, now);
            insert.tail = concat!(
                " ON CONFLICT (request_id, principal) DO NOTHING ",
                "RETURNING request_id || '/' || principal AS request_key"
            );
            let rows = bulk_fetch(tx, <$db as BatchSql>::insert_all(vec![insert])).await?;
            let mut taken = ::std::collections::HashSet::new();
            for row in &rows {
                taken.insert(row.try_get::<String, _>("request_key")?);
            }
            Ok(taken)
        }

        /// The answers to rows whose request id their principal used before: the first
        /// response when the method and body match, else `RequestIdReused` (as
        /// `claim_request` decides). Other principals' uses of the same ids are not looked at.
        async fn bulk_replays<T>(
            tx: &mut Tx,
            idems: &[(usize, &Idempotency)],
            answers: &mut Answers<T>,
        ) -> BulkResult<()> {
            if idems.is_empty() {
                return Ok(());
            }
            let ids: Vec<String> = idems.iter().map(|(_, i)| i.request_id.to_string()).collect();
            // By request id alone, which leads the key's index; the principal is matched below.
            let rows = bulk_select_in(
                tx,
                "SELECT request_id || '/' || principal AS request_key, method, fingerprint, \
                 response FROM idempotency WHERE request_id",
                ids,
                "",
            )
            .await?;
            let mut earlier = ::std::collections::HashMap::new();
            for row in &rows {
                let method: String = row.try_get("method")?;
                let fingerprint: String = row.try_get("fingerprint")?;
                let response: Option<Vec<u8>> = row.try_get("response")?;
                earlier.insert(
                    row.try_get::<String, _>("request_key")?,
                    (method, fingerprint, response),
                );
            }
            for (row, idem) in idems {
                answers[*row] = Some(match earlier.remove(&request_key(idem)) {
                    None => Err(unexpected("a request id neither new nor recorded")),
                    Some((method, fingerprint, _))
                        if method != idem.method || fingerprint != idem.fingerprint =>
                    {
                        Err(StoreError::RequestIdReused)
                    }
                    Some((_, _, Some(response))) => Ok(Stored::Replayed(response)),
                    Some((_, _, None)) => {
                        Err(unexpected("request id recorded without its response"))
                    }
                });
            }
            Ok(())
        }

        /// Gives back the request ids of rows refused after taking them, each its own
        /// principal's (one statement per principal: rows refused are few).
        async fn bulk_release_request_ids(tx: &mut Tx, idems: &[&Idempotency]) -> BulkResult<()> {
            let mut by_principal: ::std::collections::BTreeMap<&str, Vec<String>> =
                ::std::collections::BTreeMap::new();
            for idem in idems {
                by_principal
                    .entry(idem.principal.as_str())
                    .or_default()
                    .push(idem.request_id.to_string());
            }
            for (principal, ids) in by_principal {
                let statements = <$db as BatchSql>::matching(
                    "DELETE FROM idempotency WHERE request_id",
                    ids,
                    " AND principal = ",
                );
                for mut qb in statements {
                    qb.push_bind(principal.to_owned());
                    qb.build().persistent(false).execute(&mut **tx).await?;
                }
            }
            Ok(())
        }

        /// Writes the audit entries of a batch answered row by row (after a race), in a
        /// transaction of their own.
        async fn bulk_audit_after<T>(
            store: &$store,
            answers: &[Result<Stored<T>>],
            audit: BatchAudit<'_, T>,
        ) -> Result<()> {
            let events = audit.events(answers);
            if events.is_empty() {
                return Ok(());
            }
            let mut tx = store.begin_write().await?;
            bulk_insert_audit(&mut tx, &events).await?;
            tx.commit().await?;
            Ok(())
        }

        /// Runs `rows` as a batch, or row by row through the one-row method after a race.
        async fn bulk_register_partners(
            store: &$store,
            rows: &[(Idempotency, NewPartner)],
            render: Render<'_, Partner>,
            audit: BatchAudit<'_, Partner>,
        ) -> Result<Vec<Result<Stored<Partner>>>> {
            match bulk_try_register_partners(store, rows, render, audit).await {
                Ok(answers) => Ok(answers),
                Err(BulkError::Store(e)) => Err(e),
                Err(BulkError::Race) => {
                    ::tracing::debug!(rows = rows.len(), "concurrent writer: registering row by row");
                    let mut answers = Vec::with_capacity(rows.len());
                    for (idem, partner) in rows {
                        answers.push(
                            <$store as $crate::store::Store>::register_partner(
                                store, idem, partner, render,
                            )
                            .await,
                        );
                    }
                    bulk_audit_after(store, &answers, audit).await?;
                    Ok(answers)
                }
            }
        }

        async fn bulk_try_register_partners(
            store: &$store,
            rows: &[(Idempotency, NewPartner)],
            render: Render<'_, Partner>,
            audit: BatchAudit<'_, Partner>,
        ) -> BulkResult<Vec<Result<Stored<Partner>>>> {
            let mut answers: Answers<Partner> = rows.iter().map(|_| None).collect();
            let keys: Vec<Vec<String>> = rows
                .iter()
                .map(|(idem, p)| {
                    vec![
                        format!("request:{}", request_key(idem)),
                        format!("brn:{}", p.profile.business_registration_number.as_str()),
                    ]
                })
                .collect();
            // Each row as it will be stored if it is new, and the response it will give: made
            // before the transaction, so the request id is taken with its response at once.
            let now = now_micros();
            let mut candidates: Vec<Option<(Partner, String)>> = rows
                .iter()
                .map(|(_, partner)| {
                    let partner_id = Uuid::now_v7();
                    let sealed = store
                        .cipher
                        .seal(partner_id, partner.bank_account.account_number.expose())
                        .encode();
                    Some((partner.registered(partner_id, now), sealed))
                })
                .collect();
            let waves = bulk_waves(&keys);
            if waves.len() == 1
                && let Some(answers) =
                    bulk_register_whole(store, rows, &candidates, render, audit, now).await?
            {
                return Ok(answers);
            }
            let mut tx = store.begin_write().await?;
            // A wave's partners are inserted with the next statement that may: before the next
            // wave looks up registration numbers, or with the audit entries after the last.
            let mut pending: Option<Insert<'static>> = None;
            for wave in waves {
                if let Some(insert) = pending.take() {
                    bulk_execute(&mut tx, <$db as BatchSql>::insert_all(vec![insert])).await?;
                }
                let idems = wave
                    .iter()
                    .map(|&i| (&rows[i].0, candidates[i].as_ref().map(|(p, _)| render(p))))
                    .collect();
                let lookup = Lookup {
                    table: "partners",
                    key: "business_registration_number",
                    value: "partner_id",
                    values: wave
                        .iter()
                        .map(|&i| rows[i].1.profile.business_registration_number.as_str().to_owned())
                        .collect(),
                };
                let (taken, registered) =
                    bulk_take_request_ids_and_look_up(&mut tx, idems, now, lookup).await?;
                let (fresh, used): (Vec<usize>, Vec<usize>) = wave
                    .iter()
                    .partition(|&&i| taken.contains(&request_key(&rows[i].0)));
                let used: Vec<(usize, &Idempotency)> =
                    used.into_iter().map(|i| (i, &rows[i].0)).collect();
                bulk_replays(&mut tx, &used, &mut answers).await?;

                let mut released = Vec::new();
                let mut created: Vec<(usize, Partner, String)> = Vec::new();
                for i in fresh {
                    let (idem, partner) = &rows[i];
                    let brn = partner.profile.business_registration_number.as_str();
                    if let Some(partner_id) = registered.get(brn) {
                        let partner_id = Uuid::parse_str(partner_id)
                            .map_err(|_| unexpected("a partner id is not a UUID"))?;
                        answers[i] = Some(Err(StoreError::PartnerAlreadyRegistered { partner_id }));
                        released.push(idem);
                        continue;
                    }
                    let (partner, sealed) = candidates[i]
                        .take()
                        .ok_or_else(|| unexpected("a row was written twice"))?;
                    created.push((i, partner, sealed));
                }
                bulk_release_request_ids(&mut tx, &released).await?;
                pending = Some(partners_insert(rows, &created, now));
                for (i, partner, _) in created {
                    answers[i] = Some(Ok(Stored::Fresh(partner)));
                }
            }
            let answers = bulk_finish(answers);
            let mut inserts: Vec<Insert<'_>> = pending.into_iter().collect();
            inserts.push(audit_insert(&audit.events(&answers)));
            bulk_execute(&mut tx, <$db as BatchSql>::insert_all(inserts)).await?;
            tx.commit().await?;
            Ok(answers)
        }

        /// Writes a batch whose rows share no key in one statement, as if every row were new
        /// (its request id unused, its registration number not yet registered), which is the
        /// common case: one round trip instead of a transaction of four. `None`, with nothing
        /// stored, if a row was not new (or the database cannot): the batch must then be
        /// written step by step, which answers such rows.
        async fn bulk_register_whole(
            store: &$store,
            rows: &[(Idempotency, NewPartner)],
            candidates: &[Option<(Partner, String)>],
            render: Render<'_, Partner>,
            audit: BatchAudit<'_, Partner>,
            now: Micros,
        ) -> BulkResult<Option<Vec<Result<Stored<Partner>>>>> {
            let Some(created) = candidates
                .iter()
                .enumerate()
                .map(|(i, c)| c.as_ref().map(|(p, sealed)| (i, p.clone(), sealed.clone())))
                .collect::<Option<Vec<(usize, Partner, String)>>>()
            else {
                return Ok(None);
            };
            let idems = rows
                .iter()
                .zip(&created)
                .map(|((idem, _), (_, partner, _))| (idem, Some(render(partner))))
                .collect();
            let answers: Vec<Result<Stored<Partner>>> = created
                .iter()
                .map(|(_, partner, _)| Ok(Stored::Fresh(partner.clone())))
                .collect();
            let mut partners = partners_insert(rows, &created, now);
            partners.tail = " ON CONFLICT (business_registration_number) DO NOTHING";
            let Some(mut statement) = <$db as BatchSql>::insert_whole(vec![
                request_ids_insert(idems, now),
                partners,
                audit_insert(&audit.events(&answers)),
            ]) else {
                return Ok(None);
            };
            match statement.build().persistent(true).execute(&store.pool).await {
                Ok(_) => Ok(Some(answers)),
                Err(::sqlx::Error::Database(e)) if e.code().as_deref() == Some(NOT_WRITTEN_WHOLE) => {
                    Ok(None)
                }
                Err(e) => Err(e.into()),
            }
        }

        /// The insert of a wave's new partners: the same columns and values as
        /// `register_partner`.
        fn partners_insert(
            rows: &[(Idempotency, NewPartner)],
            created: &[(usize, Partner, String)],
            now: Micros,
        ) -> Insert<'static> {
            let n = created.len();
            let profiles: Vec<&PartnerProfile> = created.iter().map(|(_, p, _)| &p.profile).collect();
            let accounts: Vec<&BankAccount> =
                created.iter().map(|(i, _, _)| &rows[*i].1.bank_account).collect();
            Insert {
                head: "INSERT INTO partners (partner_id, business_registration_number, legal_name, \
                       representative_name, affected_services, bank_code, account_sealed, \
                       account_last4, holder_name, account_changed_by, account_change_time, \
                       contact_email, create_time, update_time, version)",
                columns: vec![
                    text_column(created, |(_, p, _)| p.partner_id.to_string()),
                    text_column(&profiles, |p| p.business_registration_number.as_str().to_owned()),
                    text_column(&profiles, |p| p.legal_name.as_str().to_owned()),
                    text_column(&profiles, |p| p.representative_name.as_str().to_owned()),
                    text_column(&profiles, |p| services_key(&p.affected_services)),
                    text_column(&accounts, |a| a.bank_code.as_str().to_owned()),
                    text_column(created, |(_, _, sealed)| sealed.clone()),
                    text_column(&accounts, |a| a.account_number.last4().to_owned()),
                    text_column(&accounts, |a| a.holder_name.as_str().to_owned()),
                    Column::Text(vec![String::new(); n]),
                    Column::BigInt(vec![0; n]),
                    text_column(&profiles, |p| p.contact_email.as_str().to_owned()),
                    Column::BigInt(vec![now; n]),
                    Column::BigInt(vec![now; n]),
                    Column::BigInt(vec![1; n]),
                ],
                tail: "",
            }
        }

        /// Runs `rows` as a batch, or row by row through the one-row method after a race.
        async fn bulk_submit_claims(
            store: &$store,
            rows: &[$crate::store::ClaimSubmission],
            render: Render<'_, Claim>,
            audit: BatchAudit<'_, Claim>,
        ) -> Result<Vec<Result<Stored<Claim>>>> {
            match bulk_try_submit_claims(store, rows, render, audit).await {
                Ok(answers) => Ok(answers),
                Err(BulkError::Store(e)) => Err(e),
                Err(BulkError::Race) => {
                    ::tracing::debug!(rows = rows.len(), "concurrent writer: submitting row by row");
                    let mut answers = Vec::with_capacity(rows.len());
                    for row in rows {
                        answers.push(bulk_submit_one(store, row, render).await);
                    }
                    bulk_audit_after(store, &answers, audit).await?;
                    Ok(answers)
                }
            }
        }

        async fn bulk_submit_one(
            store: &$store,
            row: &$crate::store::ClaimSubmission,
            render: Render<'_, Claim>,
        ) -> Result<Stored<Claim>> {
            let partner_id = match &row.partner {
                $crate::store::PartnerRef::Id(id) => *id,
                $crate::store::PartnerRef::RegistrationNumber(brn) => {
                    let found = ::sqlx::query(
                        "SELECT partner_id FROM partners WHERE business_registration_number = $1",
                    )
                    .bind(brn.as_str())
                    .fetch_optional(&store.pool)
                    .await?;
                    // No such partner: the nil id makes `submit_claim` answer NOT_FOUND, after
                    // it has looked at the request id as it always does first.
                    match found {
                        Some(r) => uuid_col(&r, "partner_id")?,
                        None => Uuid::nil(),
                    }
                }
            };
            let claim = NewClaim {
                partner_id,
                ..row.claim.clone()
            };
            <$store as $crate::store::Store>::submit_claim(store, &row.idem, &claim, render).await
        }

        /// Resolves each row's partner to its id, if it exists. Partners are never deleted and
        /// their registration numbers never change, so this holds for the whole batch.
        async fn bulk_resolve_partners(
            tx: &mut Tx,
            rows: &[$crate::store::ClaimSubmission],
        ) -> BulkResult<Vec<Option<Uuid>>> {
            use $crate::store::PartnerRef;
            let mut ids = Vec::new();
            let mut brns = Vec::new();
            for row in rows {
                match &row.partner {
                    PartnerRef::Id(id) => ids.push(id.to_string()),
                    PartnerRef::RegistrationNumber(brn) => brns.push(brn.as_str().to_owned()),
                }
            }
            let mut known_ids = ::std::collections::HashSet::new();
            let mut by_brn = ::std::collections::HashMap::new();
            if !ids.is_empty() {
                for row in bulk_select_in(
                    tx,
                    "SELECT partner_id FROM partners WHERE partner_id",
                    ids,
                    "",
                )
                .await?
                {
                    known_ids.insert(uuid_col(&row, "partner_id")?);
                }
            }
            if !brns.is_empty() {
                for row in bulk_select_in(
                    tx,
                    "SELECT partner_id, business_registration_number FROM partners \
                     WHERE business_registration_number",
                    brns,
                    "",
                )
                .await?
                {
                    let brn: String = row.try_get("business_registration_number")?;
                    by_brn.insert(brn, uuid_col(&row, "partner_id")?);
                }
            }
            Ok(rows
                .iter()
                .map(|row| match &row.partner {
                    PartnerRef::Id(id) => known_ids.contains(id).then_some(*id),
                    PartnerRef::RegistrationNumber(brn) => by_brn.get(brn.as_str()).copied(),
                })
                .collect())
        }

        /// Where a partner's payout goes, as the approving transaction copies it.
        struct BulkPayee {
            bank_code: String,
            account_sealed: String,
            account_last4: String,
            holder_name: String,
        }

        /// One claim being filed by the batch.
        struct BulkFiled {
            row: usize,
            claim: Claim,
        }

        /// The claim a row files if it is new: what `load_claim` would read back after
        /// `submit_claim`.
        fn bulk_claim(row: &$crate::store::ClaimSubmission, partner_id: Uuid, now: Micros) -> Claim {
            let d = &row.claim.decision;
            let submitted_by = &row.claim.submitted_by;
            Claim {
                claim_id: Uuid::now_v7(),
                partner_id,
                status: d.status,
                items: row.claim.items.clone(),
                decision: d.clone(),
                compensation_krw: d.compensation_krw,
                evidence: row
                    .claim
                    .evidence
                    .iter()
                    .map(|e| AttachedEvidence {
                        evidence: e.clone(),
                        attach_time: now,
                        attached_by: submitted_by.clone(),
                    })
                    .collect(),
                submitted_by: submitted_by.clone(),
                reviewed_by: None,
                review_reason: None,
                create_time: now,
                update_time: now,
                disbursement_id: (d.status == ClaimStatus::Approved).then(Uuid::now_v7),
            }
        }

        async fn bulk_try_submit_claims(
            store: &$store,
            rows: &[$crate::store::ClaimSubmission],
            render: Render<'_, Claim>,
            audit: BatchAudit<'_, Claim>,
        ) -> BulkResult<Vec<Result<Stored<Claim>>>> {
            let mut answers: Answers<Claim> = rows.iter().map(|_| None).collect();
            let mut tx = store.begin_write().await?;
            let now = now_micros();
            let partners = bulk_resolve_partners(&mut tx, rows).await?;
            let keys: Vec<Vec<String>> = rows
                .iter()
                .zip(&partners)
                .map(|(row, partner)| {
                    let mut keys = vec![format!("request:{}", request_key(&row.idem))];
                    keys.extend(partner.map(|p| format!("partner:{p}")));
                    keys
                })
                .collect();
            // The claim each row files if it is new, made before it is written so that its
            // request id is taken with its response at once.
            let mut candidates: Vec<Option<Claim>> = rows
                .iter()
                .zip(&partners)
                .map(|(row, partner)| partner.map(|p| bulk_claim(row, p, now)))
                .collect();
            // A wave's rows are inserted with the next statement that may: before the next
            // wave looks at the partners' claims, or with the audit entries after the last.
            let mut pending: Vec<Insert<'static>> = Vec::new();
            for wave in bulk_waves(&keys) {
                if !pending.is_empty() {
                    let inserts = ::std::mem::take(&mut pending);
                    bulk_execute(&mut tx, <$db as BatchSql>::insert_all(inserts)).await?;
                }
                let idems = wave
                    .iter()
                    .map(|&i| (&rows[i].idem, candidates[i].as_ref().map(render)))
                    .collect();
                let taken = bulk_take_request_ids(&mut tx, idems, now).await?;
                let (fresh, used): (Vec<usize>, Vec<usize>) = wave
                    .iter()
                    .partition(|&&i| taken.contains(&request_key(&rows[i].idem)));
                let used: Vec<(usize, &Idempotency)> =
                    used.into_iter().map(|i| (i, &rows[i].idem)).collect();
                bulk_replays(&mut tx, &used, &mut answers).await?;

                let mut released = Vec::new();
                let mut filing = Vec::new();
                for i in fresh {
                    if partners[i].is_some() {
                        filing.push(i);
                    } else {
                        answers[i] = Some(Err(StoreError::NotFound("partner")));
                        released.push(&rows[i].idem);
                    }
                }
                // Lock the partners (in id order, as every batch does) so that concurrent
                // claims for the same partner wait for this one, as in `submit_claim`.
                let mut partner_ids: Vec<String> = filing
                    .iter()
                    .filter_map(|&i| partners[i].map(|p| p.to_string()))
                    .collect();
                partner_ids.sort();
                let mut payees = ::std::collections::HashMap::new();
                let mut filed_before = ::std::collections::HashMap::new();
                for row in bulk_select_in(
                    &mut tx,
                    "SELECT partner_id, bank_code, account_sealed, account_last4, holder_name \
                     FROM partners WHERE partner_id",
                    partner_ids.clone(),
                    concat!(" ORDER BY partner_id", $for_update),
                )
                .await?
                {
                    payees.insert(
                        uuid_col(&row, "partner_id")?,
                        BulkPayee {
                            bank_code: row.try_get("bank_code")?,
                            account_sealed: row.try_get("account_sealed")?,
                            account_last4: row.try_get("account_last4")?,
                            holder_name: row.try_get("holder_name")?,
                        },
                    );
                }
                for row in bulk_select_in(
                    &mut tx,
                    "SELECT partner_id, claim_id FROM claims WHERE partner_id",
                    partner_ids,
                    "",
                )
                .await?
                {
                    filed_before.insert(uuid_col(&row, "partner_id")?, uuid_col(&row, "claim_id")?);
                }
                let mut filed: Vec<BulkFiled> = Vec::new();
                for i in filing {
                    let row = &rows[i];
                    let partner_id = partners[i].ok_or_else(|| unexpected("unresolved partner"))?;
                    if !payees.contains_key(&partner_id) {
                        answers[i] = Some(Err(StoreError::NotFound("partner")));
                        released.push(&row.idem);
                        continue;
                    }
                    if let Some(&claim_id) = filed_before.get(&partner_id) {
                        answers[i] = Some(Err(StoreError::ClaimAlreadyFiled { claim_id }));
                        released.push(&row.idem);
                        continue;
                    }
                    let claim = candidates[i]
                        .take()
                        .ok_or_else(|| unexpected("a row was written twice"))?;
                    filed.push(BulkFiled { row: i, claim });
                }
                bulk_release_request_ids(&mut tx, &released).await?;
                pending = claims_inserts(rows, &filed, &payees, now)?;
                for f in filed {
                    answers[f.row] = Some(Ok(Stored::Fresh(f.claim)));
                }
            }
            let answers = bulk_finish(answers);
            pending.push(audit_insert(&audit.events(&answers)));
            bulk_execute(&mut tx, <$db as BatchSql>::insert_all(pending)).await?;
            tx.commit().await?;
            Ok(answers)
        }

        /// The rows `submit_claim` writes, for every claim of a wave: the claims, their
        /// evidence, and for approved ones the disbursement, its first history entry and its
        /// outbox row (the inserts, in that order).
        fn claims_inserts(
            rows: &[$crate::store::ClaimSubmission],
            filed: &[BulkFiled],
            payees: &::std::collections::HashMap<Uuid, BulkPayee>,
            now: Micros,
        ) -> BulkResult<Vec<Insert<'static>>> {
            if filed.is_empty() {
                return Ok(Vec::new());
            }
            let json = |value: ::serde_json::Result<String>| {
                value.map_err(|e| StoreError::Unexpected(e.into()))
            };
            let (mut items, mut decisions) = (Vec::new(), Vec::new());
            for f in filed {
                items.push(json(::serde_json::to_string(&f.claim.items))?);
                decisions.push(json(::serde_json::to_string(&f.claim.decision))?);
            }
            let n = filed.len();
            let claims: Vec<&Claim> = filed.iter().map(|f| &f.claim).collect();
            let mut inserts = Vec::with_capacity(5);
            inserts.push(Insert {
                head: "INSERT INTO claims (claim_id, partner_id, status, tier, reported_loss_krw, \
                 recognized_loss_krw, compensation_krw, policy_version, items, decision, \
                 submitted_by, create_time, update_time)",
                columns: vec![
                    text_column(&claims, |c| c.claim_id.to_string()),
                    text_column(&claims, |c| c.partner_id.to_string()),
                    text_column(&claims, |c| c.decision.status.key().to_owned()),
                    text_column(&claims, |c| c.decision.tier.key().to_owned()),
                    Column::BigInt(claims.iter().map(|c| c.decision.reported_loss_krw).collect()),
                    Column::BigInt(
                        claims.iter().map(|c| c.decision.recognized_loss_krw).collect(),
                    ),
                    Column::BigInt(claims.iter().map(|c| c.decision.compensation_krw).collect()),
                    text_column(&claims, |c| c.decision.policy_version.clone()),
                    Column::Text(items),
                    Column::Text(decisions),
                    text_column(&claims, |c| c.submitted_by.clone()),
                    Column::BigInt(vec![now; n]),
                    Column::BigInt(vec![now; n]),
                ],
                tail: "",
            });

            let evidence: Vec<(&Claim, i32, &AttachedEvidence)> = claims
                .iter()
                .flat_map(|c| (1..).zip(&c.evidence).map(move |(seq, e)| (*c, seq, e)))
                .collect();
            let ne = evidence.len();
            inserts.push(Insert {
                head: "INSERT INTO evidence (claim_id, seq, kind, uri, sha256, attach_time, attached_by)",
                columns: vec![
                    text_column(&evidence, |(c, _, _)| c.claim_id.to_string()),
                    Column::Int(evidence.iter().map(|(_, seq, _)| *seq).collect()),
                    text_column(&evidence, |(_, _, e)| e.evidence.kind.key().to_owned()),
                    text_column(&evidence, |(_, _, e)| e.evidence.uri.clone()),
                    text_column(&evidence, |(_, _, e)| e.evidence.sha256.clone()),
                    Column::BigInt(vec![now; ne]),
                    text_column(&evidence, |(_, _, e)| e.attached_by.clone()),
                ],
                tail: "",
            });

            // Approval and disbursement are one, as in `create_disbursement`.
            let approved: Vec<(&BulkFiled, String, &BulkPayee)> = filed
                .iter()
                .filter_map(|f| {
                    let id = f.claim.disbursement_id?;
                    payees.get(&f.claim.partner_id).map(|p| (f, id.to_string(), p))
                })
                .collect();
            let na = approved.len();
            let ids = text_column(&approved, |(_, id, _)| id.clone());
            inserts.push(Insert {
                head: "INSERT INTO disbursements (disbursement_id, claim_id, partner_id, amount_krw, \
                 status, bank_code, account_sealed, account_last4, holder_name, trace_context, \
                 create_time, update_time)",
                columns: vec![
                    ids.clone(),
                    text_column(&approved, |(f, _, _)| f.claim.claim_id.to_string()),
                    text_column(&approved, |(f, _, _)| f.claim.partner_id.to_string()),
                    Column::BigInt(approved.iter().map(|(f, _, _)| f.claim.compensation_krw).collect()),
                    Column::Text(vec![DisbursementStatus::Queued.key().to_owned(); na]),
                    text_column(&approved, |(_, _, p)| p.bank_code.clone()),
                    text_column(&approved, |(_, _, p)| p.account_sealed.clone()),
                    text_column(&approved, |(_, _, p)| p.account_last4.clone()),
                    text_column(&approved, |(_, _, p)| p.holder_name.clone()),
                    Column::NullableText(
                        approved
                            .iter()
                            .map(|(f, _, _)| rows[f.row].claim.trace_context.clone())
                            .collect(),
                    ),
                    Column::BigInt(vec![now; na]),
                    Column::BigInt(vec![now; na]),
                ],
                tail: "",
            });
            inserts.push(Insert {
                head: "INSERT INTO disbursement_events (disbursement_id, from_status, to_status, \
                 actor, reason, time)",
                columns: vec![
                    ids.clone(),
                    Column::NullableText(vec![None; na]),
                    Column::Text(vec![DisbursementStatus::Queued.key().to_owned(); na]),
                    text_column(&approved, |(f, _, _)| f.claim.submitted_by.clone()),
                    Column::Text(vec!["claim approved".to_owned(); na]),
                    Column::BigInt(vec![now; na]),
                ],
                tail: "",
            });
            inserts.push(Insert {
                head: "INSERT INTO outbox (disbursement_id, due_time)",
                columns: vec![ids, Column::BigInt(vec![now; na])],
                tail: "",
            });
            Ok(inserts)
        }
    };
}
