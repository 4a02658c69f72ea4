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
        /// Bind parameters per statement: SQLite's default limit (32766), which is also under
        /// PostgreSQL's 65535. Every multi-row statement is cut into pieces that fit.
        const BULK_MAX_BINDS: usize = 32_766;

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

        /// Rows matching `head (values...) tail`, with `values` bound in pieces that fit.
        async fn bulk_select_in(
            tx: &mut Tx,
            head: &str,
            values: &[String],
            tail: &str,
        ) -> BulkResult<Vec<DbRow>> {
            let mut rows = Vec::new();
            for piece in values.chunks(BULK_MAX_BINDS) {
                let mut qb = ::sqlx::QueryBuilder::<$db>::new(head);
                qb.push(" (");
                let mut list = qb.separated(", ");
                for v in piece {
                    list.push_bind(v.clone());
                }
                list.push_unseparated(")");
                qb.push(tail);
                rows.extend(qb.build().persistent(false).fetch_all(&mut **tx).await?);
            }
            Ok(rows)
        }

        /// Takes the request ids that are new (in a fixed order, so two batches sharing ids
        /// cannot deadlock on them); returns those taken. The others were used before.
        async fn bulk_take_request_ids(
            tx: &mut Tx,
            idems: &[&Idempotency],
            now: Micros,
        ) -> BulkResult<::std::collections::HashSet<Uuid>> {
            let mut sorted = idems.to_vec();
            sorted.sort_by_key(|i| i.request_id);
            let mut taken = ::std::collections::HashSet::new();
            for piece in sorted.chunks(BULK_MAX_BINDS / 4) {
                let mut qb = ::sqlx::QueryBuilder::<$db>::new(
                    "INSERT INTO idempotency (request_id, method, fingerprint, response, create_time) ",
                );
                qb.push_values(piece, |mut b, idem| {
                    b.push_bind(idem.request_id.to_string())
                        .push_bind(idem.method)
                        .push_bind(idem.fingerprint.clone())
                        .push("NULL")
                        .push_bind(now);
                });
                qb.push(" ON CONFLICT (request_id) DO NOTHING RETURNING request_id");
                let ids: Vec<String> = qb
                    .build_query_scalar()
                    .persistent(false)
                    .fetch_all(&mut **tx)
                    .await?;
                for id in ids {
                    taken.insert(parsed("idempotency.request_id", Uuid::parse_str(&id))?);
                }
            }
            Ok(taken)
        }

        /// The answers to rows whose request id was used before: the first response when the
        /// method and body match, else `RequestIdReused` (as `claim_request` decides).
        async fn bulk_replays<T>(
            tx: &mut Tx,
            idems: &[(usize, &Idempotency)],
            answers: &mut Answers<T>,
        ) -> BulkResult<()> {
            if idems.is_empty() {
                return Ok(());
            }
            let ids: Vec<String> = idems.iter().map(|(_, i)| i.request_id.to_string()).collect();
            let rows = bulk_select_in(
                tx,
                "SELECT request_id, method, fingerprint, response FROM idempotency WHERE request_id IN",
                &ids,
                "",
            )
            .await?;
            let mut earlier = ::std::collections::HashMap::new();
            for row in &rows {
                let method: String = row.try_get("method")?;
                let fingerprint: String = row.try_get("fingerprint")?;
                let response: Option<Vec<u8>> = row.try_get("response")?;
                earlier.insert(uuid_col(row, "request_id")?, (method, fingerprint, response));
            }
            for (row, idem) in idems {
                answers[*row] = Some(match earlier.remove(&idem.request_id) {
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

        /// Gives back the request ids of rows refused after taking them.
        async fn bulk_release_request_ids(tx: &mut Tx, ids: &[Uuid]) -> BulkResult<()> {
            if ids.is_empty() {
                return Ok(());
            }
            let ids: Vec<String> = ids.iter().map(Uuid::to_string).collect();
            for piece in ids.chunks(BULK_MAX_BINDS) {
                let mut qb =
                    ::sqlx::QueryBuilder::<$db>::new("DELETE FROM idempotency WHERE request_id IN (");
                let mut list = qb.separated(", ");
                for id in piece {
                    list.push_bind(id.clone());
                }
                list.push_unseparated(")");
                qb.build().persistent(false).execute(&mut **tx).await?;
            }
            Ok(())
        }

        /// Keeps each created row's response for replays.
        async fn bulk_save_responses(
            tx: &mut Tx,
            responses: Vec<(Uuid, Vec<u8>)>,
        ) -> BulkResult<()> {
            for piece in responses.chunks(BULK_MAX_BINDS / 2) {
                let mut qb = ::sqlx::QueryBuilder::<$db>::new(
                    "UPDATE idempotency SET response = v.column2 FROM (",
                );
                qb.push_values(piece, |mut b, (id, response)| {
                    b.push_bind(id.to_string()).push_bind(response.clone());
                });
                qb.push(") AS v WHERE idempotency.request_id = v.column1");
                qb.build().persistent(false).execute(&mut **tx).await?;
            }
            Ok(())
        }

        /// Runs `rows` as a batch, or row by row through the one-row method after a race.
        async fn bulk_register_partners(
            store: &$store,
            rows: &[(Idempotency, NewPartner)],
            render: Render<'_, Partner>,
        ) -> Result<Vec<Result<Stored<Partner>>>> {
            match bulk_try_register_partners(store, rows, render).await {
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
                    Ok(answers)
                }
            }
        }

        async fn bulk_try_register_partners(
            store: &$store,
            rows: &[(Idempotency, NewPartner)],
            render: Render<'_, Partner>,
        ) -> BulkResult<Vec<Result<Stored<Partner>>>> {
            let mut answers: Answers<Partner> = rows.iter().map(|_| None).collect();
            let keys: Vec<Vec<String>> = rows
                .iter()
                .map(|(idem, p)| {
                    vec![
                        format!("request:{}", idem.request_id),
                        format!("brn:{}", p.profile.business_registration_number.as_str()),
                    ]
                })
                .collect();
            let mut tx = store.begin_write().await?;
            let now = now_micros();
            for wave in bulk_waves(&keys) {
                let idems: Vec<&Idempotency> = wave.iter().map(|&i| &rows[i].0).collect();
                let taken = bulk_take_request_ids(&mut tx, &idems, now).await?;
                let (fresh, used): (Vec<usize>, Vec<usize>) = wave
                    .iter()
                    .partition(|&&i| taken.contains(&rows[i].0.request_id));
                let used: Vec<(usize, &Idempotency)> =
                    used.into_iter().map(|i| (i, &rows[i].0)).collect();
                bulk_replays(&mut tx, &used, &mut answers).await?;

                let brns: Vec<String> = fresh
                    .iter()
                    .map(|&i| rows[i].1.profile.business_registration_number.as_str().to_owned())
                    .collect();
                let mut registered = ::std::collections::HashMap::new();
                if !brns.is_empty() {
                    for row in bulk_select_in(
                        &mut tx,
                        "SELECT partner_id, business_registration_number FROM partners \
                         WHERE business_registration_number IN",
                        &brns,
                        "",
                    )
                    .await?
                    {
                        let brn: String = row.try_get("business_registration_number")?;
                        registered.insert(brn, uuid_col(&row, "partner_id")?);
                    }
                }
                let mut released = Vec::new();
                let mut created: Vec<(usize, Partner, String)> = Vec::new();
                for i in fresh {
                    let (idem, partner) = &rows[i];
                    let brn = partner.profile.business_registration_number.as_str();
                    if let Some(&partner_id) = registered.get(brn) {
                        answers[i] = Some(Err(StoreError::PartnerAlreadyRegistered { partner_id }));
                        released.push(idem.request_id);
                        continue;
                    }
                    let partner_id = Uuid::now_v7();
                    let sealed = store
                        .cipher
                        .seal(partner_id, partner.bank_account.account_number.expose())
                        .encode();
                    created.push((
                        i,
                        Partner {
                            partner_id,
                            profile: partner.profile.clone(),
                            bank_account: AccountOnFile::from(&partner.bank_account),
                            create_time: now,
                            update_time: now,
                            version: 1,
                        },
                        sealed,
                    ));
                }
                bulk_release_request_ids(&mut tx, &released).await?;

                // The same columns and values as `register_partner`.
                for piece in created.chunks(BULK_MAX_BINDS / 12) {
                    let mut qb = ::sqlx::QueryBuilder::<$db>::new(
                        "INSERT INTO partners (partner_id, business_registration_number, legal_name, \
                         representative_name, affected_services, bank_code, account_sealed, \
                         account_last4, holder_name, account_changed_by, account_change_time, \
                         contact_email, create_time, update_time, version) ",
                    );
                    qb.push_values(piece, |mut b, (i, p, sealed)| {
                        let account = &rows[*i].1.bank_account;
                        let profile = &p.profile;
                        b.push_bind(p.partner_id.to_string())
                            .push_bind(profile.business_registration_number.as_str().to_owned())
                            .push_bind(profile.legal_name.as_str().to_owned())
                            .push_bind(profile.representative_name.as_str().to_owned())
                            .push_bind(services_key(&profile.affected_services))
                            .push_bind(account.bank_code.as_str().to_owned())
                            .push_bind(sealed.clone())
                            .push_bind(account.account_number.last4().to_owned())
                            .push_bind(account.holder_name.as_str().to_owned())
                            .push("''")
                            .push("0")
                            .push_bind(profile.contact_email.as_str().to_owned())
                            .push_bind(now)
                            .push_bind(now)
                            .push("1");
                    });
                    qb.build().persistent(false).execute(&mut *tx).await?;
                }
                let responses = created
                    .iter()
                    .map(|(i, p, _)| (rows[*i].0.request_id, render(p)))
                    .collect();
                bulk_save_responses(&mut tx, responses).await?;
                for (i, partner, _) in created {
                    answers[i] = Some(Ok(Stored::Fresh(partner)));
                }
            }
            tx.commit().await?;
            Ok(bulk_finish(answers))
        }

        /// Runs `rows` as a batch, or row by row through the one-row method after a race.
        async fn bulk_submit_claims(
            store: &$store,
            rows: &[$crate::store::ClaimSubmission],
            render: Render<'_, Claim>,
        ) -> Result<Vec<Result<Stored<Claim>>>> {
            match bulk_try_submit_claims(store, rows, render).await {
                Ok(answers) => Ok(answers),
                Err(BulkError::Store(e)) => Err(e),
                Err(BulkError::Race) => {
                    ::tracing::debug!(rows = rows.len(), "concurrent writer: submitting row by row");
                    let mut answers = Vec::with_capacity(rows.len());
                    for row in rows {
                        answers.push(bulk_submit_one(store, row, render).await);
                    }
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
                    "SELECT partner_id FROM partners WHERE partner_id IN",
                    &ids,
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
                     WHERE business_registration_number IN",
                    &brns,
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

        async fn bulk_try_submit_claims(
            store: &$store,
            rows: &[$crate::store::ClaimSubmission],
            render: Render<'_, Claim>,
        ) -> BulkResult<Vec<Result<Stored<Claim>>>> {
            let mut answers: Answers<Claim> = rows.iter().map(|_| None).collect();
            let mut tx = store.begin_write().await?;
            let now = now_micros();
            let partners = bulk_resolve_partners(&mut tx, rows).await?;
            let keys: Vec<Vec<String>> = rows
                .iter()
                .zip(&partners)
                .map(|(row, partner)| {
                    let mut keys = vec![format!("request:{}", row.idem.request_id)];
                    keys.extend(partner.map(|p| format!("partner:{p}")));
                    keys
                })
                .collect();
            for wave in bulk_waves(&keys) {
                let idems: Vec<&Idempotency> = wave.iter().map(|&i| &rows[i].idem).collect();
                let taken = bulk_take_request_ids(&mut tx, &idems, now).await?;
                let (fresh, used): (Vec<usize>, Vec<usize>) = wave
                    .iter()
                    .partition(|&&i| taken.contains(&rows[i].idem.request_id));
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
                        released.push(rows[i].idem.request_id);
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
                if !partner_ids.is_empty() {
                    for row in bulk_select_in(
                        &mut tx,
                        "SELECT partner_id, bank_code, account_sealed, account_last4, holder_name \
                         FROM partners WHERE partner_id IN",
                        &partner_ids,
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
                        "SELECT partner_id, claim_id FROM claims WHERE partner_id IN",
                        &partner_ids,
                        "",
                    )
                    .await?
                    {
                        filed_before
                            .insert(uuid_col(&row, "partner_id")?, uuid_col(&row, "claim_id")?);
                    }
                }
                let mut filed: Vec<BulkFiled> = Vec::new();
                for i in filing {
                    let row = &rows[i];
                    let partner_id = partners[i].ok_or_else(|| unexpected("unresolved partner"))?;
                    if !payees.contains_key(&partner_id) {
                        answers[i] = Some(Err(StoreError::NotFound("partner")));
                        released.push(row.idem.request_id);
                        continue;
                    }
                    if let Some(&claim_id) = filed_before.get(&partner_id) {
                        answers[i] = Some(Err(StoreError::ClaimAlreadyFiled { claim_id }));
                        released.push(row.idem.request_id);
                        continue;
                    }
                    let d = &row.claim.decision;
                    let submitted_by = &row.claim.submitted_by;
                    // What `load_claim` would read back after `submit_claim`.
                    filed.push(BulkFiled {
                        row: i,
                        claim: Claim {
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
                            disbursement_id: (d.status == ClaimStatus::Approved)
                                .then(Uuid::now_v7),
                        },
                    });
                }
                bulk_release_request_ids(&mut tx, &released).await?;
                bulk_insert_claims(&mut tx, rows, &filed, &payees, now).await?;
                let responses = filed
                    .iter()
                    .map(|f| (rows[f.row].idem.request_id, render(&f.claim)))
                    .collect();
                bulk_save_responses(&mut tx, responses).await?;
                for f in filed {
                    answers[f.row] = Some(Ok(Stored::Fresh(f.claim)));
                }
            }
            tx.commit().await?;
            Ok(bulk_finish(answers))
        }

        /// The rows `submit_claim` writes, for every claim of a wave: the claims, their
        /// evidence, and for approved ones the disbursement, its first history entry and its
        /// outbox row, all in the caller's transaction.
        async fn bulk_insert_claims(
            tx: &mut Tx,
            rows: &[$crate::store::ClaimSubmission],
            filed: &[BulkFiled],
            payees: &::std::collections::HashMap<Uuid, BulkPayee>,
            now: Micros,
        ) -> BulkResult<()> {
            if filed.is_empty() {
                return Ok(());
            }
            let json = |value: ::serde_json::Result<String>| {
                value.map_err(|e| StoreError::Unexpected(e.into()))
            };
            let mut encoded = Vec::with_capacity(filed.len());
            for f in filed {
                encoded.push((
                    json(::serde_json::to_string(&f.claim.items))?,
                    json(::serde_json::to_string(&f.claim.decision))?,
                ));
            }
            let claims: Vec<(&BulkFiled, &(String, String))> = filed.iter().zip(&encoded).collect();
            for piece in claims.chunks(BULK_MAX_BINDS / 13) {
                let mut qb = ::sqlx::QueryBuilder::<$db>::new(
                    "INSERT INTO claims (claim_id, partner_id, status, tier, reported_loss_krw, \
                     recognized_loss_krw, compensation_krw, policy_version, items, decision, \
                     submitted_by, create_time, update_time) ",
                );
                qb.push_values(piece, |mut b, (f, (items, decision))| {
                    let c = &f.claim;
                    let d = &c.decision;
                    b.push_bind(c.claim_id.to_string())
                        .push_bind(c.partner_id.to_string())
                        .push_bind(d.status.key())
                        .push_bind(d.tier.key())
                        .push_bind(d.reported_loss_krw)
                        .push_bind(d.recognized_loss_krw)
                        .push_bind(d.compensation_krw)
                        .push_bind(d.policy_version.clone())
                        .push_bind(items.clone())
                        .push_bind(decision.clone())
                        .push_bind(c.submitted_by.clone())
                        .push_bind(now)
                        .push_bind(now);
                });
                qb.build().persistent(false).execute(&mut **tx).await?;
            }

            let evidence: Vec<(&Claim, i32, &AttachedEvidence)> = filed
                .iter()
                .flat_map(|f| {
                    (1..).zip(&f.claim.evidence).map(move |(seq, e)| (&f.claim, seq, e))
                })
                .collect();
            for piece in evidence.chunks(BULK_MAX_BINDS / 7) {
                let mut qb = ::sqlx::QueryBuilder::<$db>::new(
                    "INSERT INTO evidence (claim_id, seq, kind, uri, sha256, attach_time, attached_by) ",
                );
                qb.push_values(piece, |mut b, (claim, seq, e)| {
                    b.push_bind(claim.claim_id.to_string())
                        .push_bind(*seq)
                        .push_bind(e.evidence.kind.key())
                        .push_bind(e.evidence.uri.clone())
                        .push_bind(e.evidence.sha256.clone())
                        .push_bind(e.attach_time)
                        .push_bind(e.attached_by.clone());
                });
                qb.build().persistent(false).execute(&mut **tx).await?;
            }

            // Approval and disbursement are one, as in `create_disbursement`.
            let approved: Vec<(&BulkFiled, Uuid, &BulkPayee)> = filed
                .iter()
                .filter_map(|f| {
                    let id = f.claim.disbursement_id?;
                    payees.get(&f.claim.partner_id).map(|p| (f, id, p))
                })
                .collect();
            for piece in approved.chunks(BULK_MAX_BINDS / 12) {
                let mut qb = ::sqlx::QueryBuilder::<$db>::new(
                    "INSERT INTO disbursements (disbursement_id, claim_id, partner_id, amount_krw, \
                     status, bank_code, account_sealed, account_last4, holder_name, trace_context, \
                     create_time, update_time) ",
                );
                qb.push_values(piece, |mut b, (f, id, payee)| {
                    b.push_bind(id.to_string())
                        .push_bind(f.claim.claim_id.to_string())
                        .push_bind(f.claim.partner_id.to_string())
                        .push_bind(f.claim.compensation_krw)
                        .push_bind(DisbursementStatus::Queued.key())
                        .push_bind(payee.bank_code.clone())
                        .push_bind(payee.account_sealed.clone())
                        .push_bind(payee.account_last4.clone())
                        .push_bind(payee.holder_name.clone())
                        .push_bind(rows[f.row].claim.trace_context.clone())
                        .push_bind(now)
                        .push_bind(now);
                });
                qb.build().persistent(false).execute(&mut **tx).await?;
            }
            for piece in approved.chunks(BULK_MAX_BINDS / 6) {
                let mut qb = ::sqlx::QueryBuilder::<$db>::new(
                    "INSERT INTO disbursement_events (disbursement_id, from_status, to_status, \
                     actor, reason, time) ",
                );
                qb.push_values(piece, |mut b, (f, id, _)| {
                    b.push_bind(id.to_string())
                        .push_bind(None::<String>)
                        .push_bind(DisbursementStatus::Queued.key())
                        .push_bind(f.claim.submitted_by.clone())
                        .push_bind("claim approved")
                        .push_bind(now);
                });
                qb.build().persistent(false).execute(&mut **tx).await?;
            }
            for piece in approved.chunks(BULK_MAX_BINDS / 2) {
                let mut qb =
                    ::sqlx::QueryBuilder::<$db>::new("INSERT INTO outbox (disbursement_id, due_time) ");
                qb.push_values(piece, |mut b, (_, id, _)| {
                    b.push_bind(id.to_string()).push_bind(now);
                });
                qb.build().persistent(false).execute(&mut **tx).await?;
            }
            Ok(())
        }
    };
}
