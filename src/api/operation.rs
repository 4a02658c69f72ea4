//! What every operator's change (evidence attached, a review, a retry, a cancel, a pause or
//! resumption, a new bank account) does around its own checks and its store call: the request
//! id is checked and noted in the call's audit record (even when the call is refused), every
//! bad field is named at once, and the call's [`Mutation`] is recorded under the digest of the
//! request without its id.

use prost::Message;
use tonic::{Request, Status};
use uuid::Uuid;

use super::{Mutation, Violations, idempotency, missing};
use crate::audit::CallRecord;
use crate::principal::Principal;
use crate::proto::payouts::v1 as pb;

/// A request that changes something: its request id, and the method the id is taken for.
pub trait Change: Message + Sized {
    const METHOD: &'static str;

    fn request_id(&mut self) -> &mut String;
}

macro_rules! changes {
    ($($request:ident => $method:literal,)*) => {
        $(impl Change for pb::$request {
            const METHOD: &'static str = $method;

            fn request_id(&mut self) -> &mut String {
                &mut self.request_id
            }
        })*
    };
}

changes! {
    AttachEvidenceRequest => "AttachEvidence",
    ReviewClaimRequest => "ReviewClaim",
    RetryDisbursementRequest => "RetryDisbursement",
    CancelDisbursementRequest => "CancelDisbursement",
    PauseDispatchRequest => "PauseDispatch",
    ResumeDispatchRequest => "ResumeDispatch",
    UpdatePartnerBankAccountRequest => "UpdatePartnerBankAccount",
}

/// An operator's change whose request passed its checks.
pub struct Operation<B> {
    /// Who asks, as the audit log names them.
    pub actor: String,
    pub call: CallRecord,
    /// The request without its request id: the body whose digest goes with the id.
    pub body: B,
    request_id: Uuid,
}

impl<B: Change> Operation<B> {
    /// Checks `request`: its request id, then the rest with `parse`, which records every bad
    /// field in the violations and gives what the change needs when there was none.
    pub fn parse<P>(
        request: Request<B>,
        parse: impl FnOnce(&mut Violations, &B) -> Option<P>,
    ) -> Result<(Self, P), Status> {
        let actor = Principal::of(&request);
        let call = CallRecord::of(&request);
        let mut body = request.into_inner();
        let raw = std::mem::take(body.request_id());
        let mut v = Violations::default();
        let request_id = v.request_id(&raw);
        // In the audit log even when refused.
        call.note_request_id(&raw);
        let parsed = parse(&mut v, &body);
        v.finish()?;
        let (Some(request_id), Some(parsed)) = (request_id, parsed) else {
            return Err(missing());
        };
        let operation = Self {
            actor,
            call,
            body,
            request_id,
        };
        Ok((operation, parsed))
    }

    /// The change's [`Mutation`] (see [`Mutation::new`]).
    pub fn mutation<T: 'static, R: Message + Default + 'static>(
        &self,
        resource: fn(&T) -> String,
        to_proto: fn(&T) -> R,
    ) -> Mutation<T, R> {
        let idem = idempotency(&self.actor, self.request_id, B::METHOD, &self.body);
        Mutation::new(&self.call, idem, resource, to_proto)
    }
}
