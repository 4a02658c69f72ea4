//! `payouts.v1.PartnerService`.

use std::sync::Arc;

use futures::future::BoxFuture;
use tonic::{Request, Response, Status, Streaming};

use super::imports::{self, Import, RowResult, Written};
use super::operation::Operation;
use super::{
    Context, Violations, convert, found, idempotency, listing, missing, record_touched, respond,
    stored_id,
};
use crate::audit::{CallRecord, Resource};
use crate::domain::text;
use crate::domain::{
    AccountNumber, BankAccount, BankCode, BusinessRegistrationNumber, ContactEmail, NewPartner,
    PartnerProfile, PersonOrBusinessName,
};
use crate::principal::Principal;
use crate::proto::payouts::v1::{self as pb, partner_service_server::PartnerService};
use crate::store::{AccountUpdate, BatchAudit, Idempotency, PartnerFilter, Store, Stored};

pub struct Partners {
    pub ctx: Context,
}

/// Longer than any etag this service gives out (a quoted version number).
const MAX_ETAG_CHARS: usize = 64;

/// Parses a `BankAccount` message found at `prefix` (e.g. `partner.bank_account`).
pub fn parse_bank_account(
    v: &mut Violations,
    prefix: &str,
    account: Option<&pb::BankAccount>,
) -> Option<BankAccount> {
    let Some(account) = account else {
        v.add(prefix, "is required");
        return None;
    };
    let pb::BankAccount {
        bank_code,
        account_number,
        holder_name,
    } = account;
    let bank_code = v.check(
        format_args!("{prefix}.bank_code"),
        BankCode::parse(bank_code),
    );
    let account_number = v.check(
        format_args!("{prefix}.account_number"),
        AccountNumber::parse(account_number),
    );
    let holder_name = v.check(
        format_args!("{prefix}.holder_name"),
        PersonOrBusinessName::parse(holder_name),
    );
    Some(BankAccount {
        bank_code: bank_code?,
        account_number: account_number?,
        holder_name: holder_name?,
    })
}

fn parse_new_partner(v: &mut Violations, partner: Option<&pb::Partner>) -> Option<NewPartner> {
    let Some(partner) = partner else {
        v.add("partner", "is required");
        return None;
    };
    // Output-only fields (id, times, etag) are ignored on input.
    let pb::Partner {
        partner_id: _,
        business_registration_number,
        legal_name,
        representative_name,
        affected_services,
        bank_account,
        contact_email,
        create_time: _,
        update_time: _,
        etag: _,
    } = partner;
    let brn = v.check(
        "partner.business_registration_number",
        BusinessRegistrationNumber::parse(business_registration_number),
    );
    let legal_name = v.check(
        "partner.legal_name",
        PersonOrBusinessName::parse(legal_name),
    );
    let representative_name = v.check(
        "partner.representative_name",
        PersonOrBusinessName::parse(representative_name),
    );
    let mut services = Vec::new();
    if affected_services.is_empty() {
        v.add(
            "partner.affected_services",
            "name at least one affected service",
        );
    }
    for (i, raw) in affected_services.iter().enumerate() {
        if let Some(s) = v.check(
            format_args!("partner.affected_services[{i}]"),
            convert::parse_affected_service(*raw),
        ) {
            services.push(s);
        }
    }
    services.sort();
    services.dedup();
    let bank_account = parse_bank_account(v, "partner.bank_account", bank_account.as_ref());
    let contact_email = v.check("partner.contact_email", ContactEmail::parse(contact_email));
    let (legal_name, representative_name, bank_account) =
        (legal_name?, representative_name?, bank_account?);
    v.check(
        "partner.bank_account.holder_name",
        bank_account.check_holder(&legal_name, &representative_name),
    )?;
    Some(NewPartner {
        profile: PartnerProfile {
            business_registration_number: brn?,
            legal_name,
            representative_name,
            affected_services: services,
            contact_email: contact_email?,
        },
        bank_account,
    })
}

/// The `RegisterPartner` response kept for replays.
pub fn render_registered(p: &crate::domain::Partner) -> Vec<u8> {
    prost::Message::encode_to_vec(&pb::RegisterPartnerResponse {
        partner: Some(convert::partner(p)),
    })
}

/// The partner a registration's answer names, for the audit log.
pub fn registered_id(stored: &Stored<crate::domain::Partner>) -> String {
    stored_id(stored, |r: pb::RegisterPartnerResponse| {
        r.partner.map(|p| p.partner_id)
    })
}

/// A `RegisterPartner` request (or an `ImportPartners` row, which is one) as the store takes
/// it: `principal`'s request id with the digest of the rest, and the partner. The error is the
/// call's.
pub fn prepare_registration(
    request: pb::RegisterPartnerRequest,
    principal: &str,
) -> Result<(Idempotency, NewPartner), Status> {
    let mut v = Violations::default();
    let request_id = v.request_id(&request.request_id);
    let partner = parse_new_partner(&mut v, request.partner.as_ref());
    v.finish()?;
    let (Some(request_id), Some(partner)) = (request_id, partner) else {
        return Err(missing());
    };
    let body = pb::RegisterPartnerRequest {
        request_id: String::new(),
        ..request
    };
    Ok((
        idempotency(principal, request_id, "RegisterPartner", &body),
        partner,
    ))
}

/// `ImportPartners`: every row is a `RegisterPartner` call, written in batches.
struct PartnerImport {
    store: Arc<dyn Store>,
}

impl Import for PartnerImport {
    type Request = pb::ImportPartnersRequest;
    type Response = pb::ImportPartnersResponse;
    type Row = (Idempotency, NewPartner);
    type Value = crate::domain::Partner;
    type Stored = pb::RegisterPartnerResponse;
    type Proto = pb::Partner;

    const PATH: &'static str = "/payouts.v1.PartnerService/ImportPartners";

    fn request_id(request: &Self::Request) -> &str {
        &request.request_id
    }

    fn prepare(&self, request: Self::Request, principal: &str) -> Result<Self::Row, Status> {
        let pb::ImportPartnersRequest {
            request_id,
            partner,
        } = request;
        prepare_registration(
            pb::RegisterPartnerRequest {
                request_id,
                partner,
            },
            principal,
        )
    }

    fn write<'a>(
        &'a self,
        rows: &'a [Self::Row],
        audit: BatchAudit<'a, Self::Value>,
    ) -> BoxFuture<'a, Written<Self::Value>> {
        self.store
            .register_partners(rows, &render_registered, audit)
    }

    fn stored_id(stored: &Stored<Self::Value>) -> String {
        registered_id(stored)
    }

    fn fresh(value: &Self::Value) -> Self::Proto {
        convert::partner(value)
    }

    fn replayed(stored: Self::Stored) -> Option<Self::Proto> {
        stored.partner
    }

    fn response(row: i64, result: RowResult<Self::Proto>) -> Self::Response {
        use pb::import_partners_response::Outcome;
        let outcome = match &result {
            RowResult::Created(_) => Outcome::Created,
            RowResult::Replayed(_) => Outcome::Replayed,
            RowResult::Rejected(_) => Outcome::Rejected,
        };
        let (partner, error) = result.into_parts();
        pb::ImportPartnersResponse {
            row,
            outcome: outcome as i32,
            partner,
            error,
        }
    }
}

#[tonic::async_trait]
impl PartnerService for Partners {
    type ImportPartnersStream = imports::ImportAnswers<pb::ImportPartnersResponse>;

    async fn import_partners(
        &self,
        request: Request<Streaming<pb::ImportPartnersRequest>>,
    ) -> Result<Response<Self::ImportPartnersStream>, Status> {
        let import = PartnerImport {
            store: self.ctx.store.clone(),
        };
        Ok(Response::new(imports::run(import, request)))
    }

    async fn register_partner(
        &self,
        request: Request<pb::RegisterPartnerRequest>,
    ) -> Result<Response<pb::RegisterPartnerResponse>, Status> {
        let principal = Principal::of(&request);
        let call = CallRecord::of(&request);
        // In the audit log even when refused.
        call.note_request_id(&request.get_ref().request_id);
        let row = prepare_registration(request.into_inner(), &principal)?;
        // Shares a commit with whatever other registrations are in flight.
        let stored = self.ctx.intake.partners.submit(row, &call).await?;
        let response = respond(&call, stored, |p| pb::RegisterPartnerResponse {
            partner: Some(convert::partner(p)),
        })?;
        if let Some(p) = &response.get_ref().partner {
            record_touched(&call, &[(Resource::Partner, &p.partner_id)]);
        }
        Ok(response)
    }

    async fn get_partner(
        &self,
        request: Request<pb::GetPartnerRequest>,
    ) -> Result<Response<pb::GetPartnerResponse>, Status> {
        let call = CallRecord::of(&request);
        let get = |id| self.ctx.store.get_partner(id);
        let partner = found("partner_id", &request.get_ref().partner_id, "partner", get).await?;
        record_touched(
            &call,
            &[(Resource::Partner, &partner.partner_id.to_string())],
        );
        Ok(Response::new(pb::GetPartnerResponse {
            partner: Some(convert::partner(&partner)),
        }))
    }

    async fn list_partners(
        &self,
        request: Request<pb::ListPartnersRequest>,
    ) -> Result<Response<pb::ListPartnersResponse>, Status> {
        let (page, filter) = listing::parse(request.get_ref(), |v, r| {
            let brn = &r.business_registration_number;
            PartnerFilter {
                business_registration_number: if brn.is_empty() {
                    None
                } else {
                    v.check(
                        "business_registration_number",
                        BusinessRegistrationNumber::parse(brn),
                    )
                },
            }
        })?;
        let found = self.ctx.store.list_partners(&filter, &page).await?;
        Ok(listing::answer(
            &page,
            &found,
            |p| p.partner_id,
            convert::partner,
        ))
    }

    async fn update_partner_bank_account(
        &self,
        request: Request<pb::UpdatePartnerBankAccountRequest>,
    ) -> Result<Response<pb::UpdatePartnerBankAccountResponse>, Status> {
        let (op, account) = Operation::parse(request, |v, r| {
            let account = parse_bank_account(v, "bank_account", r.bank_account.as_ref());
            if r.etag.trim().is_empty() {
                v.add(
                    "etag",
                    "is required: pass the etag of the partner as last read",
                );
            } else {
                v.check("etag", text::required_line(&r.etag, MAX_ETAG_CHARS));
            }
            // The digest the request id goes with is of the etag as it is compared.
            r.etag = r.etag.trim().to_owned();
            account
        })?;
        let update = AccountUpdate {
            partner_id: op.id,
            account: &account,
            etag: &op.body.etag,
            actor: &op.actor,
        };
        let store = &self.ctx.store;
        op.answer(|rec| store.update_bank_account(rec, &update))
            .await
    }
}
