//! What every operator's change (evidence attached, a review, a retry, a cancel, a pause or
//! resumption, a new bank account) does around its own checks and its store call: the request
//! id is checked and noted in the call's audit record (even when the call is refused), the id
//! of what the change names is parsed, every bad field is named at once, what the change names
//! (and what its answer names) is noted, and the call's [`Mutation`] is recorded under the
//! digest of the request without its id and answered with the change's response.

use prost::Message;
use tonic::{Request, Response, Status};

use super::claims::touched_claim;
use super::{Mutation, Violations, convert, idempotency, missing, record_touched};
use crate::audit::{CallRecord, Resource};
use crate::domain::{Claim, ClaimId, DisbursementId, Partner, PartnerId};
use crate::principal::Principal;
use crate::proto::payouts::v1 as pb;
use crate::store::{self, Disbursement, DispatchState, OperatorRequest, Recorded, Stored};

/// A request that changes something: its request id, the method the id is taken for, what
/// it names before the change (for the audit log), and the response the changed value gives.
pub trait Change: Message + Sized {
    const METHOD: &'static str;
    /// What the store answers a change with.
    type Value: Changed;
    type Response: Message + Default + 'static;

    /// The id of what the change acts on (`()` for dispatch as a whole).
    type Id: Copy;

    fn request_id(&mut self) -> &mut String;
    /// The id the request names, or why not (recorded under its field).
    fn id(&self, v: &mut Violations) -> Option<Self::Id>;
    /// The resource the request names, if any: named before the change is tried, so that a
    /// refused attempt is found by it in the audit log.
    fn names(&self) -> Option<(Resource, &str)>;
    fn response(value: &Self::Value) -> Self::Response;
    /// Notes for the call what the answer names besides what the request named.
    fn touched(_response: &Self::Response, _call: &CallRecord) {}
}

/// What a change's request names: nothing (dispatch as a whole), or `resource` by the id in
/// its field `id`, of type `$ty`.
macro_rules! named {
    () => {
        type Id = ();

        fn id(&self, _v: &mut Violations) -> Option<()> {
            Some(())
        }

        fn names(&self) -> Option<(Resource, &str)> {
            None
        }
    };
    ($resource:ident($id:ident: $ty:ty)) => {
        type Id = $ty;

        fn id(&self, v: &mut Violations) -> Option<$ty> {
            v.id(stringify!($id), &self.$id)
        }

        fn names(&self) -> Option<(Resource, &str)> {
            Some((Resource::$resource, self.$id.as_str()))
        }
    };
}

macro_rules! changes {
    ($(
        $request:ident => $method:literal $(, naming $resource:ident($id:ident: $ty:ty))?
            -> $response:ident { $field:ident: $value:ty = $shown:path }
            $(noting $noted:path)?,
    )*) => {
        $(impl Change for pb::$request {
            const METHOD: &'static str = $method;
            type Value = $value;
            type Response = pb::$response;

            named!($($resource($id: $ty))?);

            fn request_id(&mut self) -> &mut String {
                &mut self.request_id
            }

            fn response(value: &$value) -> pb::$response {
                pb::$response { $field: Some($shown(value)) }
            }

            $(fn touched(response: &pb::$response, call: &CallRecord) {
                $noted(call, response.$field.as_ref());
            })?
        })*
    };
}

changes! {
    AttachEvidenceRequest => "AttachEvidence", naming Claim(claim_id: ClaimId)
        -> AttachEvidenceResponse { claim: Claim = convert::claim } noting touched_claim,
    ReviewClaimRequest => "ReviewClaim", naming Claim(claim_id: ClaimId)
        -> ReviewClaimResponse { claim: Claim = convert::claim } noting touched_claim,
    RetryDisbursementRequest => "RetryDisbursement",
        naming Disbursement(disbursement_id: DisbursementId)
        -> RetryDisbursementResponse { disbursement: Disbursement = convert::disbursement },
    CancelDisbursementRequest => "CancelDisbursement",
        naming Disbursement(disbursement_id: DisbursementId)
        -> CancelDisbursementResponse { disbursement: Disbursement = convert::disbursement },
    PauseDispatchRequest => "PauseDispatch"
        -> PauseDispatchResponse { state: DispatchState = convert::dispatch_state },
    ResumeDispatchRequest => "ResumeDispatch"
        -> ResumeDispatchResponse { state: DispatchState = convert::dispatch_state },
    UpdatePartnerBankAccountRequest => "UpdatePartnerBankAccount",
        naming Partner(partner_id: PartnerId)
        -> UpdatePartnerBankAccountResponse { partner: Partner = convert::partner },
}

/// A value a change stores, and what it acted on as the change's audit entry names it.
pub trait Changed: 'static {
    fn resource_id(&self) -> String;
}

macro_rules! changed {
    ($($value:ty: |$v:ident| $id:expr,)*) => {
        $(impl Changed for $value {
            fn resource_id(&self) -> String {
                let $v = self;
                $id
            }
        })*
    };
}

changed! {
    Claim: |c| c.claim_id.to_string(),
    Disbursement: |d| d.disbursement_id.to_string(),
    Partner: |p| p.partner_id.to_string(),
    // Dispatch as a whole: a pause or resumption names no resource in the audit log.
    DispatchState: |_s| String::new(),
}

/// An operator's change whose request passed its checks.
pub struct Operation<B: Change> {
    /// Who asks, as the audit log names them.
    pub actor: String,
    pub call: CallRecord,
    /// The id of what the change acts on.
    pub id: B::Id,
    /// The request without its request id: the body whose digest goes with the id.
    pub body: B,
    mutation: Mutation<B::Value, B::Response>,
}

impl<B: Change> Operation<B> {
    /// Checks `request`: its request id, the id of what it names, then the rest with `parse`,
    /// which records every bad field in the violations and gives what the change needs when
    /// there was none (it may put the body in the form its digest is taken of). What the
    /// request names is then noted for the call.
    pub fn parse<P>(
        request: Request<B>,
        parse: impl FnOnce(&mut Violations, &mut B) -> Option<P>,
    ) -> Result<(Self, P), Status> {
        let actor = Principal::of(&request);
        let call = CallRecord::of(&request);
        let mut body = request.into_inner();
        let raw = std::mem::take(body.request_id());
        let mut v = Violations::default();
        let request_id = v.request_id(&raw);
        // In the audit log even when refused.
        call.note_request_id(&raw);
        let id = body.id(&mut v);
        let parsed = parse(&mut v, &mut body);
        v.finish()?;
        let (Some(request_id), Some(id), Some(parsed)) = (request_id, id, parsed) else {
            return Err(missing());
        };
        if let Some(named) = body.names() {
            record_touched(&call, &[named]);
        }
        let idem = idempotency(&actor, request_id, B::METHOD, &body);
        let mutation = Mutation::new(&call, idem, B::Value::resource_id, B::response);
        let operation = Self {
            actor,
            call,
            id,
            body,
            mutation,
        };
        Ok((operation, parsed))
    }

    /// The change's answer (see [`Mutation::answer`]) once `write` has made it, recorded as
    /// [`Mutation::recorded`] says; what the answer names is noted for the call.
    pub async fn answer<'m, F>(
        &'m self,
        write: impl FnOnce(Recorded<'m, B::Value>) -> F,
    ) -> Result<Response<B::Response>, Status>
    where
        F: Future<Output = store::Result<Stored<B::Value>>>,
    {
        let response = self
            .mutation
            .answer(write(self.mutation.recorded()))
            .await?;
        B::touched(response.get_ref(), &self.call);
        Ok(response)
    }

    /// The operator's request: who asks, and why.
    pub fn asked<'a>(&'a self, reason: &'a str) -> OperatorRequest<'a> {
        OperatorRequest {
            actor: &self.actor,
            reason,
        }
    }
}
