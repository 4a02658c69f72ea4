//! The SQL both databases share, written once and instantiated for each pool type by
//! [`sql_store!`]. Each store supplies `begin_write` (how a writing transaction starts) and the
//! row-lock clauses its database understands.

/// Implements [`Store`](super::Store) for `$store`, which has a `pool: sqlx::Pool<$db>` and an
/// inherent `async fn begin_write(&self) -> Result<sqlx::Transaction<'static, $db>>`.
/// `$for_update` locks a selected row until commit; `$skip_locked` also skips rows that
/// another transaction holds (both empty on a database with one writer at a time).
macro_rules! sql_store {
    ($store:ident, $db:ty, db_system = $db_system:literal, for_update = $for_update:literal, skip_locked = $skip_locked:literal) => {
        use ::sqlx::Row as _;
        use ::uuid::Uuid;

        use $crate::domain::{
            AccountOnFile, AffectedService, AttachedEvidence, BankAccount, BankCode,
            BusinessRegistrationNumber, Claim, ClaimStatus, ContactEmail, Decision,
            DisbursementStatus, Evidence, EvidenceKind, LossItem, NewClaim, NewPartner, Partner,
            PartnerProfile, PersonOrBusinessName,
        };
        use $crate::store::{
            Attempt, AuditEvent, AuditFilter, ClaimFilter, CountKrw, Disbursement, DisbursementFilter, DispatchOutcome,
            DispatchState, Idempotency, KeyAssignment, Micros, Page, PartnerFilter,
            ProgramSummary, Render, Result, Review, StatusChange, StoreError, Stored, now_micros,
        };

        type Conn = <$db as ::sqlx::Database>::Connection;
        type Tx = ::sqlx::Transaction<'static, $db>;
        type DbRow = <$db as ::sqlx::Database>::Row;

        fn unexpected(what: impl ::std::fmt::Display) -> StoreError {
            StoreError::Unexpected(::anyhow::anyhow!("stored data is inconsistent: {what}"))
        }

        fn uuid_col(row: &DbRow, col: &str) -> Result<Uuid> {
            let text: String = row.try_get(col)?;
            Uuid::parse_str(&text).map_err(|e| unexpected(format!("{col}: {e}")))
        }

        fn parsed<T, E: ::std::fmt::Display>(
            col: &str,
            value: ::std::result::Result<T, E>,
        ) -> Result<T> {
            value.map_err(|e| unexpected(format!("{col}: {e}")))
        }

/// A partner's registration number, legal name and representative, as stored.
        fn identity_from_row(
            row: &DbRow,
        ) -> Result<(BusinessRegistrationNumber, PersonOrBusinessName, PersonOrBusinessName)> {
            let text = |col: &str| -> Result<String> { Ok(row.try_get::<String, _>(col)?) };
            Ok((
                parsed(
                    "business_registration_number",
                    BusinessRegistrationNumber::parse(&text("business_registration_number")?),
                )?,
                parsed("legal_name", PersonOrBusinessName::from_stored(&text("legal_name")?))?,
                parsed(
                    "representative_name",
                    PersonOrBusinessName::from_stored(&text("representative_name")?),
                )?,
            ))
        }

        fn partner_from_row(row: &DbRow) -> Result<Partner> {
            let services: String = row.try_get("affected_services")?;
            let affected_services = services
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| AffectedService::from_key(s).ok_or_else(|| unexpected(s)))
                .collect::<Result<Vec<_>>>()?;
            let text = |col: &str| -> Result<String> { Ok(row.try_get::<String, _>(col)?) };
            let (business_registration_number, legal_name, representative_name) =
                identity_from_row(row)?;
            Ok(Partner {
                partner_id: uuid_col(row, "partner_id")?,
                profile: PartnerProfile {
                    business_registration_number,
                    legal_name,
                    representative_name,
                    affected_services,
                    contact_email: parsed(
                        "contact_email",
                        ContactEmail::from_stored(&text("contact_email")?),
                    )?,
                },
                bank_account: account_from_row(row)?,
                create_time: row.try_get("create_time")?,
                update_time: row.try_get("update_time")?,
                version: row.try_get("version")?,
            })
        }

        fn account_from_row(row: &DbRow) -> Result<AccountOnFile> {
            let text = |col: &str| -> Result<String> { Ok(row.try_get::<String, _>(col)?) };
            Ok(AccountOnFile {
                bank_code: parsed("bank_code", BankCode::parse(&text("bank_code")?))?,
                account_last4: text("account_last4")?,
                holder_name: parsed(
                    "holder_name",
                    PersonOrBusinessName::from_stored(&text("holder_name")?),
                )?,
            })
        }

        fn services_key(services: &[AffectedService]) -> String {
            services.iter().map(|s| s.key()).collect::<Vec<_>>().join(",")
        }

        fn status_col(row: &DbRow, col: &str) -> Result<DisbursementStatus> {
            let key: String = row.try_get(col)?;
            DisbursementStatus::from_key(&key).ok_or_else(|| unexpected(format!("{col}: {key}")))
        }

        /// Takes the caller's request id for this transaction, or returns what it already
        /// answered the caller. Another principal's use of the same id is not looked at.
        async fn claim_request(tx: &mut Tx, idem: &Idempotency) -> Result<Option<Vec<u8>>> {
            let inserted = ::sqlx::query(
                "INSERT INTO idempotency \
                 (request_id, principal, method, fingerprint, response, create_time) \
                 VALUES ($1, $2, $3, $4, NULL, $5) ON CONFLICT (request_id, principal) DO NOTHING",
            )
            .bind(idem.request_id.to_string())
            .bind(&idem.principal)
            .bind(idem.method)
            .bind(&idem.fingerprint)
            .bind(now_micros())
            .execute(&mut **tx)
            .await?
            .rows_affected();
            if inserted == 1 {
                return Ok(None);
            }
            let row = ::sqlx::query(
                "SELECT method, fingerprint, response FROM idempotency \
                 WHERE request_id = $1 AND principal = $2",
            )
            .bind(idem.request_id.to_string())
            .bind(&idem.principal)
            .fetch_one(&mut **tx)
            .await?;
            let method: String = row.try_get("method")?;
            let fingerprint: String = row.try_get("fingerprint")?;
            if method != idem.method || fingerprint != idem.fingerprint {
                return Err(StoreError::RequestIdReused);
            }
            let response: Option<Vec<u8>> = row.try_get("response")?;
            response
                .map(Some)
                .ok_or_else(|| unexpected("request id recorded without its response"))
        }

        async fn save_response(tx: &mut Tx, idem: &Idempotency, response: Vec<u8>) -> Result<()> {
            ::sqlx::query(
                "UPDATE idempotency SET response = $1 WHERE request_id = $2 AND principal = $3",
            )
            .bind(response)
            .bind(idem.request_id.to_string())
            .bind(&idem.principal)
            .execute(&mut **tx)
                .await?;
            Ok(())
        }

        fn after_key(page: &Page) -> String {
            page.after.map(|id| id.to_string()).unwrap_or_default()
        }

        async fn load_partner(conn: &mut Conn, partner_id: Uuid) -> Result<Option<Partner>> {
            let row = ::sqlx::query("SELECT * FROM partners WHERE partner_id = $1")
                .bind(partner_id.to_string())
                .fetch_optional(&mut *conn)
                .await?;
            row.as_ref().map(partner_from_row).transpose()
        }

        async fn load_claim(conn: &mut Conn, claim_id: Uuid) -> Result<Option<Claim>> {
            let row = ::sqlx::query(
                "SELECT c.*, d.disbursement_id FROM claims c \
                 LEFT JOIN disbursements d ON d.claim_id = c.claim_id WHERE c.claim_id = $1",
            )
            .bind(claim_id.to_string())
            .fetch_optional(&mut *conn)
            .await?;
            let Some(row) = row else { return Ok(None) };
            let evidence = ::sqlx::query(
                "SELECT * FROM evidence WHERE claim_id = $1 ORDER BY seq",
            )
            .bind(claim_id.to_string())
            .fetch_all(&mut *conn)
            .await?;
            claim_from_rows(&row, &evidence).map(Some)
        }

        fn claim_from_rows(row: &DbRow, evidence: &[DbRow]) -> Result<Claim> {
            let items: String = row.try_get("items")?;
            let decision: String = row.try_get("decision")?;
            let status: String = row.try_get("status")?;
            let disbursement_id: Option<String> = row.try_get("disbursement_id")?;
            let evidence = evidence
                .iter()
                .map(|e| {
                    let kind: String = e.try_get("kind")?;
                    Ok(AttachedEvidence {
                        evidence: Evidence {
                            kind: EvidenceKind::from_key(&kind).ok_or_else(|| unexpected(&kind))?,
                            uri: e.try_get("uri")?,
                            sha256: e.try_get("sha256")?,
                        },
                        attach_time: e.try_get("attach_time")?,
                        attached_by: e.try_get("attached_by")?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Claim {
                claim_id: uuid_col(row, "claim_id")?,
                partner_id: uuid_col(row, "partner_id")?,
                status: ClaimStatus::from_key(&status).ok_or_else(|| unexpected(&status))?,
                items: parsed("items", ::serde_json::from_str::<Vec<LossItem>>(&items))?,
                decision: parsed("decision", ::serde_json::from_str::<Decision>(&decision))?,
                compensation_krw: row.try_get("compensation_krw")?,
                evidence,
                submitted_by: row.try_get("submitted_by")?,
                reviewed_by: row.try_get("reviewed_by")?,
                review_reason: row.try_get("review_reason")?,
                create_time: row.try_get("create_time")?,
                update_time: row.try_get("update_time")?,
                disbursement_id: disbursement_id
                    .map(|id| parsed("disbursement_id", Uuid::parse_str(&id)))
                    .transpose()?,
            })
        }

        async fn insert_evidence(
            tx: &mut Tx,
            claim_id: Uuid,
            evidence: &Evidence,
            actor: &str,
            now: Micros,
        ) -> Result<()> {
            ::sqlx::query(
                "INSERT INTO evidence (claim_id, seq, kind, uri, sha256, attach_time, attached_by) \
                 VALUES ($1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM evidence WHERE claim_id = $1), \
                 $2, $3, $4, $5, $6)",
            )
            .bind(claim_id.to_string())
            .bind(evidence.kind.key())
            .bind(&evidence.uri)
            .bind(&evidence.sha256)
            .bind(now)
            .bind(actor)
            .execute(&mut **tx)
            .await?;
            Ok(())
        }

        /// Approval and disbursement are one: the disbursement, its first history entry and
        /// its outbox row are written in the approving transaction.
        async fn create_disbursement(
            tx: &mut Tx,
            claim_id: Uuid,
            partner_id: Uuid,
            amount_krw: i64,
            actor: &str,
            trace_context: Option<&str>,
            now: Micros,
        ) -> Result<Uuid> {
            let disbursement_id = Uuid::now_v7();
            ::sqlx::query(
                "INSERT INTO disbursements (disbursement_id, claim_id, partner_id, amount_krw, \
                 status, bank_code, account_sealed, account_last4, holder_name, trace_context, \
                 create_time, update_time) \
                 SELECT $1, $2, partner_id, $4, $5, bank_code, account_sealed, account_last4, \
                 holder_name, $7, $6, $6 \
                 FROM partners WHERE partner_id = $3",
            )
            .bind(disbursement_id.to_string())
            .bind(claim_id.to_string())
            .bind(partner_id.to_string())
            .bind(amount_krw)
            .bind(DisbursementStatus::Queued.key())
            .bind(now)
            .bind(trace_context)
            .execute(&mut **tx)
            .await?;
            record_event(tx, disbursement_id, None, DisbursementStatus::Queued, actor, "claim approved", now)
                .await?;
            ::sqlx::query("INSERT INTO outbox (disbursement_id, due_time) VALUES ($1, $2)")
                .bind(disbursement_id.to_string())
                .bind(now)
                .execute(&mut **tx)
                .await?;
            Ok(disbursement_id)
        }

        async fn record_event(
            tx: &mut Tx,
            disbursement_id: Uuid,
            from: Option<DisbursementStatus>,
            to: DisbursementStatus,
            actor: &str,
            reason: &str,
            now: Micros,
        ) -> Result<()> {
            ::sqlx::query(
                "INSERT INTO disbursement_events (disbursement_id, from_status, to_status, actor, \
                 reason, time) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(disbursement_id.to_string())
            .bind(from.map(|s| s.key()))
            .bind(to.key())
            .bind(actor)
            .bind(reason)
            .bind(now)
            .execute(&mut **tx)
            .await?;
            Ok(())
        }

        /// Moves a disbursement from `from` to `to` if it is still in `from`; false otherwise.
        async fn transition(
            tx: &mut Tx,
            disbursement_id: Uuid,
            from: DisbursementStatus,
            to: DisbursementStatus,
            actor: &str,
            reason: &str,
            now: Micros,
        ) -> Result<bool> {
            if !from.can_become(to) {
                return Ok(false);
            }
            let moved = ::sqlx::query(
                "UPDATE disbursements SET status = $1, update_time = $2 \
                 WHERE disbursement_id = $3 AND status = $4",
            )
            .bind(to.key())
            .bind(now)
            .bind(disbursement_id.to_string())
            .bind(from.key())
            .execute(&mut **tx)
            .await?
            .rows_affected();
            if moved == 1 {
                record_event(tx, disbursement_id, Some(from), to, actor, reason, now).await?;
            }
            Ok(moved == 1)
        }

        async fn load_disbursement(
            conn: &mut Conn,
            disbursement_id: Uuid,
        ) -> Result<Option<Disbursement>> {
            let row = ::sqlx::query("SELECT * FROM disbursements WHERE disbursement_id = $1")
            .bind(disbursement_id.to_string())
            .fetch_optional(&mut *conn)
            .await?;
            let Some(row) = row else { return Ok(None) };
            let mut d = disbursement_from_row(&row)?;
            let id = disbursement_id.to_string();
            for a in ::sqlx::query(
                "SELECT * FROM disbursement_attempts WHERE disbursement_id = $1 ORDER BY id",
            )
            .bind(&id)
            .fetch_all(&mut *conn)
            .await?
            {
                d.attempts.push(Attempt {
                    operation: a.try_get("operation")?,
                    idempotency_key: a.try_get("idempotency_key")?,
                    outcome: a.try_get("outcome")?,
                    code: a.try_get("code")?,
                    message: a.try_get("message")?,
                    time: a.try_get("time")?,
                });
            }
            for e in ::sqlx::query(
                "SELECT * FROM disbursement_events WHERE disbursement_id = $1 ORDER BY id",
            )
            .bind(&id)
            .fetch_all(&mut *conn)
            .await?
            {
                let from: Option<String> = e.try_get("from_status")?;
                d.history.push(StatusChange {
                    from_status: from
                        .map(|f| DisbursementStatus::from_key(&f).ok_or_else(|| unexpected(&f)))
                        .transpose()?,
                    to_status: status_col(&e, "to_status")?,
                    actor: e.try_get("actor")?,
                    reason: e.try_get("reason")?,
                    time: e.try_get("time")?,
                });
            }
            Ok(Some(d))
        }

        fn disbursement_from_row(row: &DbRow) -> Result<Disbursement> {
            Ok(Disbursement {
                disbursement_id: uuid_col(row, "disbursement_id")?,
                claim_id: uuid_col(row, "claim_id")?,
                partner_id: uuid_col(row, "partner_id")?,
                amount_krw: row.try_get("amount_krw")?,
                status: status_col(row, "status")?,
                failure_code: row.try_get("failure_code")?,
                failure_message: row.try_get("failure_message")?,
                idempotency_key: row.try_get("idempotency_key")?,
                key_seq: row.try_get("key_seq")?,
                holder_verified: row.try_get("holder_verified")?,
                account: account_from_row(row)?,
                sealed_account: row.try_get("account_sealed")?,
                create_time: row.try_get("create_time")?,
                update_time: row.try_get("update_time")?,
                attempts: Vec::new(),
                history: Vec::new(),
                trace_context: row.try_get("trace_context")?,
            })
        }

        async fn require_disbursement(tx: &mut Tx, disbursement_id: Uuid) -> Result<Disbursement> {
            // Lock the row so concurrent retries and cancels see each other.
            ::sqlx::query(concat!(
                "SELECT disbursement_id FROM disbursements WHERE disbursement_id = $1",
                $for_update
            ))
            .bind(disbursement_id.to_string())
            .fetch_optional(&mut **tx)
            .await?
            .ok_or(StoreError::NotFound("disbursement"))?;
            load_disbursement(&mut *tx, disbursement_id)
                .await?
                .ok_or(StoreError::NotFound("disbursement"))
        }

        async fn load_dispatch_state(conn: &mut Conn) -> Result<DispatchState> {
            let row = ::sqlx::query("SELECT * FROM dispatch_control WHERE id = 1")
                .fetch_one(&mut *conn)
                .await?;
            Ok(DispatchState {
                paused: row.try_get("paused")?,
                reason: row.try_get("reason")?,
                changed_by: row.try_get("changed_by")?,
                change_time: row.try_get("change_time")?,
            })
        }

        bulk_sql!($store, $db, for_update = $for_update);
        dispatch_sql!($store, $db, for_update = $for_update, skip_locked = $skip_locked);

        #[::async_trait::async_trait]
        impl $crate::store::Store for $store {
            #[::tracing::instrument(name = "store.register_partner", skip_all, fields(otel.kind = "client", db.system = $db_system))]
            async fn register_partner(
                &self,
                idem: &Idempotency,
                partner: &NewPartner,
                render: Render<'_, Partner>,
            ) -> Result<Stored<Partner>> {
                let mut tx = self.begin_write().await?;
                if let Some(first) = claim_request(&mut tx, idem).await? {
                    return Ok(Stored::Replayed(first));
                }
                let brn = partner.profile.business_registration_number.as_str();
                let existing = ::sqlx::query(
                    "SELECT partner_id FROM partners WHERE business_registration_number = $1",
                )
                .bind(brn)
                .fetch_optional(&mut *tx)
                .await?;
                if let Some(row) = existing {
                    return Err(StoreError::PartnerAlreadyRegistered {
                        partner_id: uuid_col(&row, "partner_id")?,
                    });
                }
                let now = now_micros();
                let partner_id = Uuid::now_v7();
                let created = partner.registered(partner_id, now);
                let account = &partner.bank_account;
                let profile = &partner.profile;
                let sealed = self.cipher.seal(partner_id, account.account_number.expose());
                let inserted = ::sqlx::query(
                    "INSERT INTO partners (partner_id, business_registration_number, legal_name, \
                     representative_name, affected_services, bank_code, account_sealed, \
                     account_last4, holder_name, account_changed_by, account_change_time, \
                     contact_email, create_time, update_time, version) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, '', 0, $10, $11, $11, 1)",
                )
                .bind(partner_id.to_string())
                .bind(brn)
                .bind(profile.legal_name.as_str())
                .bind(profile.representative_name.as_str())
                .bind(services_key(&profile.affected_services))
                .bind(account.bank_code.as_str())
                .bind(sealed.encode())
                .bind(account.account_number.last4())
                .bind(account.holder_name.as_str())
                .bind(profile.contact_email.as_str())
                .bind(now)
                .execute(&mut *tx)
                .await;
                if let Err(::sqlx::Error::Database(e)) = &inserted {
                    if e.is_unique_violation() {
                        // Another request registered the same number between our check and insert.
                        drop(tx);
                        let row = ::sqlx::query(
                            "SELECT partner_id FROM partners WHERE business_registration_number = $1",
                        )
                        .bind(brn)
                        .fetch_one(&self.pool)
                        .await?;
                        return Err(StoreError::PartnerAlreadyRegistered {
                            partner_id: uuid_col(&row, "partner_id")?,
                        });
                    }
                }
                inserted?;
                save_response(&mut tx, idem, render(&created)).await?;
                tx.commit().await?;
                Ok(Stored::Fresh(created))
            }

            #[::tracing::instrument(name = "store.get_partner", skip_all, fields(otel.kind = "client", db.system = $db_system))]
            async fn get_partner(&self, partner_id: Uuid) -> Result<Option<Partner>> {
                let mut conn = self.pool.acquire().await?;
                load_partner(&mut conn, partner_id).await
            }

            #[::tracing::instrument(name = "store.list_partners", skip_all, fields(otel.kind = "client", db.system = $db_system))]
            async fn list_partners(
                &self,
                filter: &PartnerFilter,
                page: &Page,
            ) -> Result<Vec<Partner>> {
                let rows = ::sqlx::query(
                    "SELECT * FROM partners WHERE partner_id > $1 \
                     AND ($2 = '' OR business_registration_number = $2) \
                     ORDER BY partner_id LIMIT $3",
                )
                .bind(after_key(page))
                .bind(
                    filter
                        .business_registration_number
                        .as_ref()
                        .map(|b| b.as_str().to_owned())
                        .unwrap_or_default(),
                )
                .bind(i64::from(page.limit))
                .fetch_all(&self.pool)
                .await?;
                rows.iter().map(partner_from_row).collect()
            }

            #[::tracing::instrument(name = "store.update_bank_account", skip_all, fields(otel.kind = "client", db.system = $db_system))]
            async fn update_bank_account(
                &self,
                idem: &Idempotency,
                partner_id: Uuid,
                account: &BankAccount,
                etag: &str,
                actor: &str,
                render: Render<'_, Partner>,
            ) -> Result<Stored<Partner>> {
                let mut tx = self.begin_write().await?;
                if let Some(first) = claim_request(&mut tx, idem).await? {
                    return Ok(Stored::Replayed(first));
                }
                ::sqlx::query(concat!(
                    "SELECT partner_id FROM partners WHERE partner_id = $1",
                    $for_update
                ))
                .bind(partner_id.to_string())
                .fetch_optional(&mut *tx)
                .await?
                .ok_or(StoreError::NotFound("partner"))?;
                let mut partner = load_partner(&mut tx, partner_id)
                    .await?
                    .ok_or(StoreError::NotFound("partner"))?;
                if partner.etag() != etag {
                    return Err(StoreError::EtagMismatch {
                        current: partner.etag(),
                    });
                }
                account
                    .check_holder(&partner.profile.legal_name, &partner.profile.representative_name)
                    .map_err(|e| StoreError::InvalidField {
                        field: "bank_account.holder_name",
                        description: e.to_string(),
                    })?;
                let now = now_micros();
                ::sqlx::query(
                    "UPDATE partners SET bank_code = $1, account_sealed = $2, account_last4 = $3, \
                     holder_name = $4, account_changed_by = $5, account_change_time = $6, \
                     update_time = $6, version = version + 1 WHERE partner_id = $7",
                )
                .bind(account.bank_code.as_str())
                .bind(self.cipher.seal(partner_id, account.account_number.expose()).encode())
                .bind(account.account_number.last4())
                .bind(account.holder_name.as_str())
                .bind(actor)
                .bind(now)
                .bind(partner_id.to_string())
                .execute(&mut *tx)
                .await?;
                partner.bank_account = AccountOnFile::from(account);
                partner.update_time = now;
                partner.version += 1;
                save_response(&mut tx, idem, render(&partner)).await?;
                tx.commit().await?;
                Ok(Stored::Fresh(partner))
            }

            #[::tracing::instrument(name = "store.submit_claim", skip_all, fields(otel.kind = "client", db.system = $db_system))]
            async fn submit_claim(
                &self,
                idem: &Idempotency,
                claim: &NewClaim,
                render: Render<'_, Claim>,
            ) -> Result<Stored<Claim>> {
                let mut tx = self.begin_write().await?;
                if let Some(first) = claim_request(&mut tx, idem).await? {
                    return Ok(Stored::Replayed(first));
                }
                ::sqlx::query(concat!(
                    "SELECT partner_id FROM partners WHERE partner_id = $1",
                    $for_update
                ))
                .bind(claim.partner_id.to_string())
                .fetch_optional(&mut *tx)
                .await?
                .ok_or(StoreError::NotFound("partner"))?;
                let existing = ::sqlx::query("SELECT claim_id FROM claims WHERE partner_id = $1")
                    .bind(claim.partner_id.to_string())
                    .fetch_optional(&mut *tx)
                    .await?;
                if let Some(row) = existing {
                    return Err(StoreError::ClaimAlreadyFiled {
                        claim_id: uuid_col(&row, "claim_id")?,
                    });
                }
                let now = now_micros();
                let claim_id = Uuid::now_v7();
                let d = &claim.decision;
                ::sqlx::query(
                    "INSERT INTO claims (claim_id, partner_id, status, tier, reported_loss_krw, \
                     recognized_loss_krw, compensation_krw, policy_version, items, decision, \
                     submitted_by, create_time, update_time) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12)",
                )
                .bind(claim_id.to_string())
                .bind(claim.partner_id.to_string())
                .bind(d.status.key())
                .bind(d.tier.key())
                .bind(d.reported_loss_krw)
                .bind(d.recognized_loss_krw)
                .bind(d.compensation_krw)
                .bind(&d.policy_version)
                .bind(::serde_json::to_string(&claim.items).map_err(::anyhow::Error::from)?)
                .bind(::serde_json::to_string(d).map_err(::anyhow::Error::from)?)
                .bind(&claim.submitted_by)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                for evidence in &claim.evidence {
                    insert_evidence(&mut tx, claim_id, evidence, &claim.submitted_by, now).await?;
                }
                if d.status == ClaimStatus::Approved {
                    create_disbursement(
                        &mut tx,
                        claim_id,
                        claim.partner_id,
                        d.compensation_krw,
                        &claim.submitted_by,
                        claim.trace_context.as_deref(),
                        now,
                    )
                    .await?;
                }
                let stored = load_claim(&mut tx, claim_id)
                    .await?
                    .ok_or_else(|| unexpected("claim vanished"))?;
                save_response(&mut tx, idem, render(&stored)).await?;
                tx.commit().await?;
                Ok(Stored::Fresh(stored))
            }

            #[::tracing::instrument(name = "store.attach_evidence", skip_all, fields(otel.kind = "client", db.system = $db_system))]
            async fn attach_evidence(
                &self,
                idem: &Idempotency,
                claim_id: Uuid,
                evidence: &Evidence,
                actor: &str,
                render: Render<'_, Claim>,
            ) -> Result<Stored<Claim>> {
                let mut tx = self.begin_write().await?;
                if let Some(first) = claim_request(&mut tx, idem).await? {
                    return Ok(Stored::Replayed(first));
                }
                ::sqlx::query(concat!(
                    "SELECT claim_id FROM claims WHERE claim_id = $1",
                    $for_update
                ))
                .bind(claim_id.to_string())
                .fetch_optional(&mut *tx)
                .await?
                .ok_or(StoreError::NotFound("claim"))?;
                let now = now_micros();
                insert_evidence(&mut tx, claim_id, evidence, actor, now).await?;
                ::sqlx::query("UPDATE claims SET update_time = $1 WHERE claim_id = $2")
                    .bind(now)
                    .bind(claim_id.to_string())
                    .execute(&mut *tx)
                    .await?;
                let stored = load_claim(&mut tx, claim_id)
                    .await?
                    .ok_or(StoreError::NotFound("claim"))?;
                save_response(&mut tx, idem, render(&stored)).await?;
                tx.commit().await?;
                Ok(Stored::Fresh(stored))
            }

            #[::tracing::instrument(name = "store.review_claim", skip_all, fields(otel.kind = "client", db.system = $db_system))]
            async fn review_claim(
                &self,
                idem: &Idempotency,
                claim_id: Uuid,
                review: &Review<'_>,
                render: Render<'_, Claim>,
            ) -> Result<Stored<Claim>> {
                let Review { decision, reason, reviewer, trace_context } = *review;
                let mut tx = self.begin_write().await?;
                if let Some(first) = claim_request(&mut tx, idem).await? {
                    return Ok(Stored::Replayed(first));
                }
                ::sqlx::query(concat!(
                    "SELECT claim_id FROM claims WHERE claim_id = $1",
                    $for_update
                ))
                .bind(claim_id.to_string())
                .fetch_optional(&mut *tx)
                .await?
                .ok_or(StoreError::NotFound("claim"))?;
                let claim = load_claim(&mut tx, claim_id)
                    .await?
                    .ok_or(StoreError::NotFound("claim"))?;
                let $crate::domain::Reviewed { status, compensation_krw } =
                    $crate::domain::review(claim.under_review(), reviewer, decision)?;
                let now = now_micros();
                ::sqlx::query(
                    "UPDATE claims SET status = $1, compensation_krw = $2, reviewed_by = $3, \
                     review_reason = $4, update_time = $5 WHERE claim_id = $6",
                )
                .bind(status.key())
                .bind(compensation_krw)
                .bind(reviewer)
                .bind(reason)
                .bind(now)
                .bind(claim_id.to_string())
                .execute(&mut *tx)
                .await?;
                if status == ClaimStatus::Approved {
                    create_disbursement(
                        &mut tx,
                        claim_id,
                        claim.partner_id,
                        compensation_krw,
                        reviewer,
                        trace_context,
                        now,
                    )
                    .await?;
                }
                let stored = load_claim(&mut tx, claim_id)
                    .await?
                    .ok_or(StoreError::NotFound("claim"))?;
                save_response(&mut tx, idem, render(&stored)).await?;
                tx.commit().await?;
                Ok(Stored::Fresh(stored))
            }

            #[::tracing::instrument(name = "store.get_claim", skip_all, fields(otel.kind = "client", db.system = $db_system))]
            async fn get_claim(&self, claim_id: Uuid) -> Result<Option<Claim>> {
                let mut conn = self.pool.acquire().await?;
                load_claim(&mut conn, claim_id).await
            }

            #[::tracing::instrument(name = "store.list_claims", skip_all, fields(otel.kind = "client", db.system = $db_system))]
            async fn list_claims(&self, filter: &ClaimFilter, page: &Page) -> Result<Vec<Claim>> {
                let mut conn = self.pool.acquire().await?;
                let rows = ::sqlx::query(
                    "SELECT c.*, d.disbursement_id FROM claims c \
                     LEFT JOIN disbursements d ON d.claim_id = c.claim_id \
                     WHERE c.claim_id > $1 AND ($2 = '' OR c.status = $2) \
                     AND ($3 = '' OR c.tier = $3) AND ($4 = '' OR c.partner_id = $4) \
                     ORDER BY c.claim_id LIMIT $5",
                )
                .bind(after_key(page))
                .bind(filter.status.map(|s| s.key()).unwrap_or_default())
                .bind(filter.tier.map(|t| t.key()).unwrap_or_default())
                .bind(filter.partner_id.map(|p| p.to_string()).unwrap_or_default())
                .bind(i64::from(page.limit))
                .fetch_all(&mut *conn)
                .await?;
                let mut claims = Vec::with_capacity(rows.len());
                for row in &rows {
                    let evidence = ::sqlx::query(
                        "SELECT * FROM evidence WHERE claim_id = $1 ORDER BY seq",
                    )
                    .bind(row.try_get::<String, _>("claim_id")?)
                    .fetch_all(&mut *conn)
                    .await?;
                    claims.push(claim_from_rows(row, &evidence)?);
                }
                Ok(claims)
            }

            // Bulk intake.
            #[::tracing::instrument(name = "store.register_partners", skip_all, fields(otel.kind = "client", db.system = $db_system, rows = rows.len()))]
            async fn register_partners(
                &self,
                rows: &[(Idempotency, NewPartner)],
                render: Render<'_, Partner>,
                audit: $crate::store::BatchAudit<'_, Partner>,
            ) -> Result<Vec<Result<Stored<Partner>>>> {
                bulk_register_partners(self, rows, render, audit).await
            }

            #[::tracing::instrument(name = "store.submit_claims", skip_all, fields(otel.kind = "client", db.system = $db_system, rows = rows.len()))]
            async fn submit_claims(
                &self,
                rows: &[$crate::store::ClaimSubmission],
                render: Render<'_, Claim>,
                audit: $crate::store::BatchAudit<'_, Claim>,
            ) -> Result<Vec<Result<Stored<Claim>>>> {
                bulk_submit_claims(self, rows, render, audit).await
            }

            #[::tracing::instrument(name = "store.get_disbursement", skip_all, fields(otel.kind = "client", db.system = $db_system))]
            async fn get_disbursement(&self, disbursement_id: Uuid) -> Result<Option<Disbursement>> {
                let mut conn = self.pool.acquire().await?;
                load_disbursement(&mut conn, disbursement_id).await
            }

            #[::tracing::instrument(name = "store.list_disbursements", skip_all, fields(otel.kind = "client", db.system = $db_system))]
            async fn list_disbursements(
                &self,
                filter: &DisbursementFilter,
                page: &Page,
            ) -> Result<Vec<Disbursement>> {
                let mut conn = self.pool.acquire().await?;
                let ids: Vec<String> = ::sqlx::query_scalar(
                    "SELECT disbursement_id FROM disbursements WHERE disbursement_id > $1 \
                     AND ($2 = '' OR status = $2) AND ($3 = '' OR partner_id = $3) \
                     ORDER BY disbursement_id LIMIT $4",
                )
                .bind(after_key(page))
                .bind(filter.status.map(|s| s.key()).unwrap_or_default())
                .bind(filter.partner_id.map(|p| p.to_string()).unwrap_or_default())
                .bind(i64::from(page.limit))
                .fetch_all(&mut *conn)
                .await?;
                let mut out = Vec::with_capacity(ids.len());
                for id in ids {
                    let id = parsed("disbursement_id", Uuid::parse_str(&id))?;
                    if let Some(d) = load_disbursement(&mut conn, id).await? {
                        out.push(d);
                    }
                }
                Ok(out)
            }

            #[::tracing::instrument(name = "store.retry_disbursement", skip_all, fields(otel.kind = "client", db.system = $db_system))]
            async fn retry_disbursement(
                &self,
                idem: &Idempotency,
                disbursement_id: Uuid,
                actor: &str,
                render: Render<'_, Disbursement>,
            ) -> Result<Stored<Disbursement>> {
                let mut tx = self.begin_write().await?;
                if let Some(first) = claim_request(&mut tx, idem).await? {
                    return Ok(Stored::Replayed(first));
                }
                let d = require_disbursement(&mut tx, disbursement_id).await?;
                let changed: Option<(String, i64)> = ::sqlx::query_as(
                    "SELECT account_changed_by, account_change_time FROM partners WHERE partner_id = $1",
                )
                .bind(d.partner_id.to_string())
                .fetch_optional(&mut *tx)
                .await?;
                let account_change = changed.as_ref().map(|(changed_by, change_time)| {
                    $crate::domain::AccountChange { changed_by, change_time: *change_time }
                });
                $crate::domain::may_retry(d.status, d.create_time, account_change, actor)?;
                let now = now_micros();
                // The failed instruction is final at the backend, so the next one gets a new key,
                // and goes to the partner's account as it is now.
                ::sqlx::query(
                    "UPDATE disbursements SET key_seq = key_seq + 1, idempotency_key = NULL, \
                     holder_verified = FALSE, failure_code = NULL, failure_message = NULL, \
                     bank_code = p.bank_code, account_sealed = p.account_sealed, \
                     account_last4 = p.account_last4, holder_name = p.holder_name \
                     FROM partners p WHERE disbursement_id = $1 AND p.partner_id = disbursements.partner_id",
                )
                .bind(disbursement_id.to_string())
                .execute(&mut *tx)
                .await?;
                let requeued = transition(
                    &mut tx,
                    disbursement_id,
                    DisbursementStatus::Failed,
                    DisbursementStatus::Queued,
                    actor,
                    "retry requested",
                    now,
                )
                .await?;
                if !requeued {
                    // The row changed under the conditional update: answer for what it is now.
                    let current = require_disbursement(&mut tx, disbursement_id).await?;
                    $crate::domain::may_retry(current.status, current.create_time, None, actor)?;
                    return Err(unexpected("a FAILED disbursement could not be queued again"));
                }
                ::sqlx::query(
                    "INSERT INTO outbox (disbursement_id, due_time) VALUES ($1, $2) \
                     ON CONFLICT (disbursement_id) DO UPDATE SET due_time = $2, lease_until = 0, failures = 0",
                )
                .bind(disbursement_id.to_string())
                .bind(now)
                .execute(&mut *tx)
                .await?;
                let stored = load_disbursement(&mut tx, disbursement_id)
                    .await?
                    .ok_or(StoreError::NotFound("disbursement"))?;
                save_response(&mut tx, idem, render(&stored)).await?;
                tx.commit().await?;
                Ok(Stored::Fresh(stored))
            }

            #[::tracing::instrument(name = "store.cancel_disbursement", skip_all, fields(otel.kind = "client", db.system = $db_system))]
            async fn cancel_disbursement(
                &self,
                idem: &Idempotency,
                disbursement_id: Uuid,
                actor: &str,
                reason: &str,
                render: Render<'_, Disbursement>,
            ) -> Result<Stored<Disbursement>> {
                let mut tx = self.begin_write().await?;
                if let Some(first) = claim_request(&mut tx, idem).await? {
                    return Ok(Stored::Replayed(first));
                }
                let d = require_disbursement(&mut tx, disbursement_id).await?;
                $crate::domain::may_cancel(d.status)?;
                let now = now_micros();
                let cancelled = transition(
                    &mut tx,
                    disbursement_id,
                    DisbursementStatus::Queued,
                    DisbursementStatus::Cancelled,
                    actor,
                    reason,
                    now,
                )
                .await?;
                if !cancelled {
                    // The row changed under the conditional update: answer for what it is now.
                    let current = require_disbursement(&mut tx, disbursement_id).await?;
                    $crate::domain::may_cancel(current.status)?;
                    return Err(unexpected("a QUEUED disbursement could not be cancelled"));
                }
                ::sqlx::query("DELETE FROM outbox WHERE disbursement_id = $1")
                    .bind(disbursement_id.to_string())
                    .execute(&mut *tx)
                    .await?;
                let stored = load_disbursement(&mut tx, disbursement_id)
                    .await?
                    .ok_or(StoreError::NotFound("disbursement"))?;
                save_response(&mut tx, idem, render(&stored)).await?;
                tx.commit().await?;
                Ok(Stored::Fresh(stored))
            }

            #[::tracing::instrument(name = "store.set_dispatch_paused", skip_all, fields(otel.kind = "client", db.system = $db_system))]
            async fn set_dispatch_paused(
                &self,
                idem: &Idempotency,
                paused: bool,
                actor: &str,
                reason: &str,
                render: Render<'_, DispatchState>,
            ) -> Result<Stored<DispatchState>> {
                let mut tx = self.begin_write().await?;
                if let Some(first) = claim_request(&mut tx, idem).await? {
                    return Ok(Stored::Replayed(first));
                }
                ::sqlx::query(
                    "UPDATE dispatch_control SET paused = $1, reason = $2, changed_by = $3, \
                     change_time = $4 WHERE id = 1",
                )
                .bind(paused)
                .bind(reason)
                .bind(actor)
                .bind(now_micros())
                .execute(&mut *tx)
                .await?;
                let state = load_dispatch_state(&mut tx).await?;
                save_response(&mut tx, idem, render(&state)).await?;
                tx.commit().await?;
                Ok(Stored::Fresh(state))
            }

            #[::tracing::instrument(name = "store.program_summary", skip_all, fields(otel.kind = "client", db.system = $db_system))]
            async fn program_summary(&self) -> Result<ProgramSummary> {
                let mut conn = self.pool.acquire().await?;
                let mut summary = ProgramSummary {
                    dispatch: load_dispatch_state(&mut conn).await?,
                    ..ProgramSummary::default()
                };
                let rows = ::sqlx::query(
                    "SELECT status, COUNT(*) AS n, CAST(COALESCE(SUM(amount_krw), 0) AS BIGINT) AS krw \
                     FROM disbursements GROUP BY status",
                )
                .fetch_all(&mut *conn)
                .await?;
                for row in &rows {
                    let bucket = CountKrw {
                        count: row.try_get("n")?,
                        krw: row.try_get("krw")?,
                    };
                    summary.approved.count += bucket.count;
                    summary.approved.krw += bucket.krw;
                    *match status_col(row, "status")? {
                        DisbursementStatus::Queued => &mut summary.queued,
                        DisbursementStatus::Submitted => &mut summary.submitted,
                        DisbursementStatus::Paid => &mut summary.paid,
                        DisbursementStatus::Failed => &mut summary.failed,
                        DisbursementStatus::Cancelled => &mut summary.cancelled,
                    } = bucket;
                }
                let rows = ::sqlx::query(
                    "SELECT status, COUNT(*) AS n FROM claims WHERE status <> $1 GROUP BY status",
                )
                .bind(ClaimStatus::Approved.key())
                .fetch_all(&mut *conn)
                .await?;
                for row in &rows {
                    let status: String = row.try_get("status")?;
                    let n: i64 = row.try_get("n")?;
                    match ClaimStatus::from_key(&status) {
                        Some(ClaimStatus::PendingReview) => summary.pending_review_count = n,
                        Some(ClaimStatus::Rejected) => summary.rejected_count = n,
                        _ => return Err(unexpected(status)),
                    }
                }
                Ok(summary)
            }

            // Finance: export and reconciliation.

            #[::tracing::instrument(name = "store.export_disbursements", skip_all, fields(otel.kind = "client", db.system = $db_system))]
            async fn export_disbursements(
                &self,
                filter: &$crate::store::ExportFilter,
                after: Option<Uuid>,
                limit: u32,
            ) -> Result<Vec<$crate::store::ExportedDisbursement>> {
                // Keyset on the id, not on update_time: a row that changes while the export
                // runs can move in time but never in id, so it is exported at most once.
                let rows = ::sqlx::query(
                    "SELECT d.disbursement_id, d.claim_id, d.partner_id, d.amount_krw, d.status, \
                     d.bank_code, d.account_last4, d.holder_name, d.idempotency_key, \
                     d.failure_code, d.create_time, d.update_time, \
                     p.business_registration_number, p.legal_name, p.representative_name, \
                     c.policy_version, \
                     (SELECT MAX(e.time) FROM disbursement_events e \
                      WHERE e.disbursement_id = d.disbursement_id AND e.to_status = $6) AS paid_time \
                     FROM disbursements d \
                     JOIN partners p ON p.partner_id = d.partner_id \
                     JOIN claims c ON c.claim_id = d.claim_id \
                     WHERE d.disbursement_id > $1 AND ($2 = '' OR d.status = $2) \
                     AND d.update_time >= $3 AND d.update_time < $4 \
                     ORDER BY d.disbursement_id LIMIT $5",
                )
                .bind(after.map(|id| id.to_string()).unwrap_or_default())
                .bind(filter.status.map(|s| s.key()).unwrap_or_default())
                .bind(filter.start_time.unwrap_or(i64::MIN))
                .bind(filter.end_time.unwrap_or(i64::MAX))
                .bind(i64::from(limit))
                .bind(DisbursementStatus::Paid.key())
                .fetch_all(&self.pool)
                .await?;
                rows.iter()
                    .map(|row| {
                        let (business_registration_number, legal_name, representative_name) =
                            identity_from_row(row)?;
                        Ok($crate::store::ExportedDisbursement {
                            disbursement_id: uuid_col(row, "disbursement_id")?,
                            claim_id: uuid_col(row, "claim_id")?,
                            partner_id: uuid_col(row, "partner_id")?,
                            business_registration_number,
                            legal_name,
                            representative_name,
                            amount_krw: row.try_get("amount_krw")?,
                            status: status_col(row, "status")?,
                            account: account_from_row(row)?,
                            idempotency_key: row.try_get("idempotency_key")?,
                            paid_time: row.try_get("paid_time")?,
                            policy_version: row.try_get("policy_version")?,
                            failure_code: row.try_get("failure_code")?,
                            create_time: row.try_get("create_time")?,
                            update_time: row.try_get("update_time")?,
                        })
                    })
                    .collect()
            }

            #[::tracing::instrument(name = "store.start_settlement_run", skip_all, fields(otel.kind = "client", db.system = $db_system))]
            async fn start_settlement_run(
                &self,
                request_id: Uuid,
                cutoff_time: Micros,
                actor: &str,
            ) -> Result<Uuid> {
                const METHOD: &str = "ReconcileSettlements";
                let mut tx = self.begin_write().await?;
                // The request id is the actor's (the calling principal's), taken for this
                // method, so no other method of the actor can reuse it. Its report is too big to
                // fingerprint up front: seal_settlement_report compares reports, and a streamed
                // response is never replayed, so none is stored.
                let inserted = ::sqlx::query(
                    "INSERT INTO idempotency \
                     (request_id, principal, method, fingerprint, response, create_time) \
                     VALUES ($1, $2, $3, 'settlement_runs.report_sha256', NULL, $4) \
                     ON CONFLICT (request_id, principal) DO NOTHING",
                )
                .bind(request_id.to_string())
                .bind(actor)
                .bind(METHOD)
                .bind(now_micros())
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if inserted == 0 {
                    let method: String = ::sqlx::query_scalar(
                        "SELECT method FROM idempotency WHERE request_id = $1 AND principal = $2",
                    )
                    .bind(request_id.to_string())
                    .bind(actor)
                    .fetch_one(&mut *tx)
                    .await?;
                    if method != METHOD {
                        return Err(StoreError::RequestIdReused);
                    }
                }
                let run_id = Uuid::now_v7();
                ::sqlx::query(
                    "INSERT INTO settlement_runs (run_id, request_id, actor, cutoff_time, start_time) \
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(run_id.to_string())
                .bind(request_id.to_string())
                .bind(actor)
                .bind(cutoff_time)
                .bind(now_micros())
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(run_id)
            }

            #[::tracing::instrument(name = "store.stage_settlement_lines", skip_all, fields(otel.kind = "client", db.system = $db_system))]
            async fn stage_settlement_lines(
                &self,
                run_id: Uuid,
                lines: &[$crate::domain::SettlementLine],
            ) -> Result<()> {
                fn listed_twice(key: &str) -> StoreError {
                    StoreError::InvalidField {
                        field: "lines",
                        description: format!(
                            "idempotency_key {key} appears more than once in the report"
                        ),
                    }
                }
                if lines.is_empty() {
                    return Ok(());
                }
                let mut in_batch = ::std::collections::HashSet::with_capacity(lines.len());
                if let Some(twice) = lines.iter().find(|l| !in_batch.insert(l.idempotency_key.as_str())) {
                    return Err(listed_twice(&twice.idempotency_key));
                }
                let mut tx = self.begin_write().await?;
                // One statement per batch; a key already staged by an earlier batch is not
                // returned, which is how a key listed twice across batches shows.
                let mut insert = ::sqlx::QueryBuilder::<$db>::new(
                    "INSERT INTO settlement_lines (run_id, idempotency_key, amount_krw, status, settled_time) ",
                );
                insert.push_values(lines, |mut values, line| {
                    values
                        .push_bind(run_id.to_string())
                        .push_bind(line.idempotency_key.clone())
                        .push_bind(line.amount_krw)
                        .push_bind(line.status.key())
                        .push_bind(line.settled_time);
                });
                insert.push(" ON CONFLICT (run_id, idempotency_key) DO NOTHING RETURNING idempotency_key");
                let staged: ::std::collections::HashSet<String> = insert
                    .build()
                    .fetch_all(&mut *tx)
                    .await?
                    .iter()
                    .map(|row| row.try_get::<String, _>(0))
                    .collect::<::std::result::Result<_, _>>()?;
                if let Some(twice) = lines.iter().find(|l| !staged.contains(&l.idempotency_key)) {
                    return Err(listed_twice(&twice.idempotency_key));
                }
                tx.commit().await?;
                Ok(())
            }

            #[::tracing::instrument(name = "store.seal_settlement_report", skip_all, fields(otel.kind = "client", db.system = $db_system))]
            async fn seal_settlement_report(
                &self,
                run_id: Uuid,
                report_sha256: &str,
                line_count: i64,
            ) -> Result<()> {
                let mut tx = self.begin_write().await?;
                let conflicting: Option<String> = ::sqlx::query_scalar(
                    "SELECT o.run_id FROM settlement_runs r JOIN settlement_runs o \
                     ON o.request_id = r.request_id AND o.actor = r.actor AND o.run_id <> r.run_id \
                     WHERE r.run_id = $1 AND o.report_sha256 IS NOT NULL \
                     AND (o.report_sha256 <> $2 OR o.cutoff_time <> r.cutoff_time) LIMIT 1",
                )
                .bind(run_id.to_string())
                .bind(report_sha256)
                .fetch_optional(&mut *tx)
                .await?;
                if conflicting.is_some() {
                    return Err(StoreError::RequestIdReused);
                }
                ::sqlx::query(
                    "UPDATE settlement_runs SET report_sha256 = $1, line_count = $2 WHERE run_id = $3",
                )
                .bind(report_sha256)
                .bind(line_count)
                .bind(run_id.to_string())
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(())
            }

            #[::tracing::instrument(name = "store.reconcile_settlement_page", skip_all, fields(otel.kind = "client", db.system = $db_system))]
            async fn reconcile_settlement_page(
                &self,
                run_id: Uuid,
                after_key: &str,
                limit: u32,
                actor: &str,
                reason: &str,
            ) -> Result<$crate::store::SettlementPage> {
                use $crate::domain::{OurPayout, Reopening, SettlementLine, SettlementStatus};
                let mut tx = self.begin_write().await?;
                // One statement finds, for every line of the page, the disbursement that used
                // its key: as its current key, or as an earlier one a retry has replaced.
                let rows = ::sqlx::query(
                    "SELECT s.idempotency_key, s.amount_krw AS their_amount_krw, \
                     s.status AS their_status, s.settled_time, d.disbursement_id, \
                     d.status AS our_status, d.amount_krw AS our_amount_krw, d.failure_code, \
                     d.idempotency_key AS current_key \
                     FROM settlement_lines s LEFT JOIN disbursements d ON d.disbursement_id = COALESCE(\
                     (SELECT c.disbursement_id FROM disbursements c WHERE c.idempotency_key = s.idempotency_key), \
                     (SELECT a.disbursement_id FROM disbursement_attempts a \
                      WHERE a.idempotency_key = s.idempotency_key LIMIT 1)) \
                     WHERE s.run_id = $1 AND s.idempotency_key > $2 \
                     ORDER BY s.idempotency_key LIMIT $3",
                )
                .bind(run_id.to_string())
                .bind(after_key)
                .bind(i64::from(limit))
                .fetch_all(&mut *tx)
                .await?;
                let now = now_micros();
                let mut page = $crate::store::SettlementPage::default();
                for row in &rows {
                    let their_status: String = row.try_get("their_status")?;
                    let line = SettlementLine {
                        idempotency_key: row.try_get("idempotency_key")?,
                        amount_krw: row.try_get("their_amount_krw")?,
                        status: SettlementStatus::from_key(&their_status)
                            .ok_or_else(|| unexpected(&their_status))?,
                        settled_time: row.try_get("settled_time")?,
                    };
                    let disbursement_id: Option<String> = row.try_get("disbursement_id")?;
                    let disbursement_id = disbursement_id
                        .map(|id| parsed("disbursement_id", Uuid::parse_str(&id)))
                        .transpose()?;
                    let failure_code: Option<String> = row.try_get("failure_code")?;
                    let current_key: Option<String> = row.try_get("current_key")?;
                    let ours = match disbursement_id {
                        Some(_) => Some(OurPayout {
                            status: status_col(row, "our_status")?,
                            amount_krw: row.try_get("our_amount_krw")?,
                            failure_code: failure_code.as_deref(),
                            current_key: current_key.as_deref() == Some(line.idempotency_key.as_str()),
                        }),
                        None => None,
                    };
                    let verdict = $crate::domain::judge(&line, ours.as_ref());
                    let mut reopening = Reopening::NotAsked;
                    if verdict.reopen
                        && let Some(id) = disbursement_id
                    {
                        // Conditional on still being PAID: a concurrent run reopens it once.
                        reopening = if transition(&mut tx, id, DisbursementStatus::Paid, DisbursementStatus::Failed, actor, reason, now).await? {
                            ::sqlx::query(
                                "UPDATE disbursements SET failure_code = $1, failure_message = $2 \
                                 WHERE disbursement_id = $3",
                            )
                            .bind($crate::domain::failure::RETURNED)
                            .bind(reason)
                            .bind(id.to_string())
                            .execute(&mut *tx)
                            .await?;
                            page.reopened += 1;
                            Reopening::Done
                        } else {
                            Reopening::StatusChanged
                        };
                    }
                    page.lines += 1;
                    match verdict.into_mismatch(&line, disbursement_id, ours.as_ref(), reopening) {
                        None => page.matched += 1,
                        Some(mismatch) => page.mismatches.push(mismatch),
                    }
                    page.last_key = Some(line.idempotency_key);
                }
                tx.commit().await?;
                Ok(page)
            }

            #[::tracing::instrument(name = "store.paid_missing_from_report", skip_all, fields(otel.kind = "client", db.system = $db_system))]
            async fn paid_missing_from_report(
                &self,
                run_id: Uuid,
                cutoff_time: Micros,
                after: Option<Uuid>,
                limit: u32,
            ) -> Result<Vec<$crate::store::PaidPayout>> {
                // Paid before the cut-off: no PAID event at or after it (a payout paid, returned
                // and paid again after the cut-off is not expected in this report).
                let rows = ::sqlx::query(
                    "SELECT d.disbursement_id, d.idempotency_key, d.amount_krw, \
                     (SELECT MAX(e.time) FROM disbursement_events e \
                      WHERE e.disbursement_id = d.disbursement_id AND e.to_status = $2) AS paid_time \
                     FROM disbursements d \
                     WHERE d.status = $2 AND d.disbursement_id > $3 \
                     AND NOT EXISTS (SELECT 1 FROM disbursement_events e \
                      WHERE e.disbursement_id = d.disbursement_id AND e.to_status = $2 AND e.time >= $4) \
                     AND NOT EXISTS (SELECT 1 FROM settlement_lines s \
                      WHERE s.run_id = $1 AND s.idempotency_key = d.idempotency_key) \
                     ORDER BY d.disbursement_id LIMIT $5",
                )
                .bind(run_id.to_string())
                .bind(DisbursementStatus::Paid.key())
                .bind(after.map(|id| id.to_string()).unwrap_or_default())
                .bind(cutoff_time)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                rows.iter()
                    .map(|row| {
                        let key: Option<String> = row.try_get("idempotency_key")?;
                        let paid_time: Option<i64> = row.try_get("paid_time")?;
                        Ok($crate::store::PaidPayout {
                            disbursement_id: uuid_col(row, "disbursement_id")?,
                            idempotency_key: key.ok_or_else(|| unexpected("a PAID disbursement without a key"))?,
                            amount_krw: row.try_get("amount_krw")?,
                            paid_time: paid_time.ok_or_else(|| unexpected("a PAID disbursement without a PAID event"))?,
                        })
                    })
                    .collect()
            }

            #[::tracing::instrument(name = "store.finish_settlement_run", skip_all, fields(otel.kind = "client", db.system = $db_system))]
            async fn finish_settlement_run(
                &self,
                run_id: Uuid,
                totals: &$crate::store::SettlementTotals,
            ) -> Result<()> {
                ::sqlx::query(
                    "UPDATE settlement_runs SET line_count = $1, matched_count = $2, \
                     mismatch_count = $3, reopened_count = $4, finish_time = $5 WHERE run_id = $6",
                )
                .bind(totals.line_count)
                .bind(totals.matched_count)
                .bind(totals.mismatch_count)
                .bind(totals.reopened_count)
                .bind(now_micros())
                .bind(run_id.to_string())
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            #[::tracing::instrument(name = "store.append_audit", skip_all, fields(otel.kind = "client", db.system = $db_system))]
            async fn append_audit(&self, events: &[AuditEvent]) -> Result<()> {
                let mut tx = self.pool.begin().await?;
                // Events come in batches (calls finishing together, refused calls).
                bulk_insert_audit(&mut tx, events).await?;
                tx.commit().await?;
                Ok(())
            }

            #[::tracing::instrument(name = "store.list_audit", skip_all, fields(otel.kind = "client", db.system = $db_system))]
            async fn list_audit(&self, filter: &AuditFilter, page: &Page) -> Result<Vec<AuditEvent>> {
                let rows = ::sqlx::query(
                    "SELECT * FROM audit_events WHERE audit_event_id > $1 \
                     AND ($2 = '' OR principal = $2) AND ($3 = '' OR resource_id = $3) \
                     AND time >= $4 AND time < $5 ORDER BY audit_event_id LIMIT $6",
                )
                .bind(after_key(page))
                .bind(filter.principal.clone().unwrap_or_default())
                .bind(filter.resource_id.clone().unwrap_or_default())
                .bind(filter.start_time.unwrap_or(i64::MIN))
                .bind(filter.end_time.unwrap_or(i64::MAX))
                .bind(i64::from(page.limit))
                .fetch_all(&self.pool)
                .await?;
                rows.iter()
                    .map(|row| {
                        Ok(AuditEvent {
                            audit_event_id: uuid_col(row, "audit_event_id")?,
                            time: row.try_get("time")?,
                            principal: row.try_get("principal")?,
                            method: row.try_get("method")?,
                            resource_id: row.try_get("resource_id")?,
                            request_id: row.try_get("request_id")?,
                            outcome_code: row.try_get("outcome_code")?,
                            peer_address: row.try_get("peer_address")?,
                            count: row.try_get("count")?,
                            replayed: row.try_get("replayed")?,
                        })
                    })
                    .collect()
            }

            #[::tracing::instrument(name = "store.outbox_stats", skip_all, fields(otel.kind = "client", db.system = $db_system))]
            async fn outbox_stats(&self) -> Result<(i64, Option<Micros>)> {
                let row = ::sqlx::query("SELECT COUNT(*) AS n, MIN(due_time) AS oldest FROM outbox")
                    .fetch_one(&self.pool)
                    .await?;
                Ok((row.try_get("n")?, row.try_get("oldest")?))
            }

            #[::tracing::instrument(name = "store.lease_batch", skip_all, fields(otel.kind = "client", db.system = $db_system, limit = limit))]
            async fn lease_batch(
                &self,
                now: Micros,
                lease_until: Micros,
                limit: u32,
            ) -> Result<Vec<Disbursement>> {
                dispatch_lease_batch(self, now, lease_until, limit).await
            }

            #[::tracing::instrument(name = "store.renew_leases", skip_all, fields(otel.kind = "client", db.system = $db_system, rows = disbursement_ids.len()))]
            async fn renew_leases(
                &self,
                disbursement_ids: &[Uuid],
                held_until: Micros,
                lease_until: Micros,
            ) -> Result<u64> {
                dispatch_renew_leases(self, disbursement_ids, held_until, lease_until).await
            }

            #[::tracing::instrument(name = "store.record_dispatch", skip_all, fields(otel.kind = "client", db.system = $db_system, attempts = record.attempts.len(), keys = record.assign_keys.len()))]
            async fn record_dispatch(
                &self,
                record: &$crate::store::DispatchRecord,
                budget_krw: Option<i64>,
                back_off: &(dyn Fn(u32) -> Micros + Send + Sync),
                now: Micros,
            ) -> Result<Vec<KeyAssignment>> {
                dispatch_record(self, record, budget_krw, back_off, now).await
            }
        }
    };
}
