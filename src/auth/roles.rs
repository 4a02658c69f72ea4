//! Roles and the per-method access table: which role each gRPC method needs.
//!
//! The table is the single place that decides access. A method missing from it is denied, so a
//! newly added RPC stays closed until someone decides who may call it (a unit test fails first).

use std::fmt;
use std::str::FromStr;

/// What a principal may do. A principal holds any number of roles; no role implies another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Registers partners, updates their bank accounts, submits claims, attaches evidence.
    Registrar,
    /// Reviews claims held for review.
    Reviewer,
    /// Retries and cancels disbursements; pauses and resumes dispatch; reconciles settlement
    /// reports (which reopens returned payouts).
    Payments,
    /// Reads everything except the audit log: gets, lists, previews, the policy, the summary.
    Viewer,
    /// Reads the audit log.
    Auditor,
}

impl Role {
    /// Every role, in the order the settings file documents them.
    pub const ALL: [Role; 5] = [
        Role::Registrar,
        Role::Reviewer,
        Role::Payments,
        Role::Viewer,
        Role::Auditor,
    ];

    /// The name used in the settings file (`roles = ["registrar"]`) and in error details.
    pub const fn as_str(self) -> &'static str {
        match self {
            Role::Registrar => "registrar",
            Role::Reviewer => "reviewer",
            Role::Payments => "payments",
            Role::Viewer => "viewer",
            Role::Auditor => "auditor",
        }
    }

    pub(crate) const fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is not one of [`Role::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?}; known roles: registrar, reviewer, payments, viewer, auditor")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownRole(s.to_owned()))
    }
}

/// What calling a method takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequiredRole {
    /// Anyone may call it, even without credentials: health checks and reflection, so that
    /// load balancers and `grpcurl describe` work without a token.
    Open,
    /// Only a principal holding this role.
    Role(Role),
}

/// One row of the access table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MethodRule {
    /// The HTTP/2 path of the method, e.g. `/payouts.v1.PartnerService/RegisterPartner`.
    pub path: &'static str,
    /// The role a caller must hold.
    pub role: Role,
    /// Whether the request carries a `request_id`, i.e. changes state (and is audited).
    pub mutating: bool,
}

const fn rule(path: &'static str, role: Role, mutating: bool) -> MethodRule {
    MethodRule {
        path,
        role,
        mutating,
    }
}

/// Every `payouts.v1` method and the role it needs.
#[rustfmt::skip]
pub const METHOD_RULES: &[MethodRule] = &[
    // PartnerService
    rule("/payouts.v1.PartnerService/RegisterPartner", Role::Registrar, true),
    rule("/payouts.v1.PartnerService/UpdatePartnerBankAccount", Role::Registrar, true),
    // Bulk intake: each row is a RegisterPartner call, so it takes what that takes.
    rule("/payouts.v1.PartnerService/ImportPartners", Role::Registrar, true),
    rule("/payouts.v1.PartnerService/GetPartner", Role::Viewer, false),
    rule("/payouts.v1.PartnerService/ListPartners", Role::Viewer, false),
    // ClaimService
    rule("/payouts.v1.ClaimService/SubmitClaim", Role::Registrar, true),
    rule("/payouts.v1.ClaimService/AttachEvidence", Role::Registrar, true),
    // Bulk intake: each row is a SubmitClaim call.
    rule("/payouts.v1.ClaimService/ImportClaims", Role::Registrar, true),
    rule("/payouts.v1.ClaimService/ReviewClaim", Role::Reviewer, true),
    rule("/payouts.v1.ClaimService/PreviewCompensation", Role::Viewer, false),
    rule("/payouts.v1.ClaimService/GetClaim", Role::Viewer, false),
    rule("/payouts.v1.ClaimService/ListClaims", Role::Viewer, false),
    rule("/payouts.v1.ClaimService/GetPolicy", Role::Viewer, false),
    // DisbursementService
    rule("/payouts.v1.DisbursementService/RetryDisbursement", Role::Payments, true),
    rule("/payouts.v1.DisbursementService/CancelDisbursement", Role::Payments, true),
    rule("/payouts.v1.DisbursementService/PauseDispatch", Role::Payments, true),
    rule("/payouts.v1.DisbursementService/ResumeDispatch", Role::Payments, true),
    rule("/payouts.v1.DisbursementService/GetDisbursement", Role::Viewer, false),
    rule("/payouts.v1.DisbursementService/ListDisbursements", Role::Viewer, false),
    rule("/payouts.v1.DisbursementService/GetProgramSummary", Role::Viewer, false),
    // Finance reads every payout, but reconciling reopens returned ones (PAID -> FAILED).
    rule("/payouts.v1.DisbursementService/ExportDisbursements", Role::Viewer, false),
    rule("/payouts.v1.DisbursementService/ReconcileSettlements", Role::Payments, true),
    // AuditService
    rule("/payouts.v1.AuditService/ListAuditEvents", Role::Auditor, false),
    // EventService: the change feed, for automation that reacts to changes.
    rule("/payouts.v1.EventService/ListEvents", Role::Viewer, false),
    rule("/payouts.v1.EventService/WatchEvents", Role::Viewer, false),
];

/// Path prefixes anyone may call.
const OPEN_PREFIXES: &[&str] = &["/grpc.health.v1.Health/", "/grpc.reflection."];

fn normalise(path: &str) -> String {
    if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    }
}

/// The rule for `path` (`/payouts.v1.ClaimService/SubmitClaim`; the leading `/` is optional).
pub fn method_rule(path: &str) -> Option<&'static MethodRule> {
    let path = normalise(path);
    METHOD_RULES.iter().find(|r| r.path == path)
}

/// What calling `path` takes; `None` means no rule exists, and the call must be denied.
pub fn required_role(path: &str) -> Option<RequiredRole> {
    let path = normalise(path);
    if OPEN_PREFIXES.iter().any(|p| path.starts_with(p)) {
        return Some(RequiredRole::Open);
    }
    method_rule(&path).map(|r| RequiredRole::Role(r.role))
}

/// Whether the method at `path` changes state (its request has a `request_id`).
pub fn is_mutating(path: &str) -> bool {
    method_rule(path).is_some_and(|r| r.mutating)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use prost::Message;
    use prost_types::FileDescriptorSet;

    use super::*;

    /// Every `payouts.v1` method in the protos, with whether its request has `request_id`.
    fn proto_methods() -> BTreeMap<String, bool> {
        let set = FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET)
            .expect("the built descriptor set decodes");
        let files: Vec<_> = set
            .file
            .iter()
            .filter(|f| f.package() == "payouts.v1")
            .collect();
        let messages: BTreeMap<String, &prost_types::DescriptorProto> = files
            .iter()
            .flat_map(|f| f.message_type.iter())
            .map(|m| (format!(".payouts.v1.{}", m.name()), m))
            .collect();
        let mut methods = BTreeMap::new();
        for file in &files {
            for service in &file.service {
                for method in &service.method {
                    let input = messages
                        .get(method.input_type())
                        .unwrap_or_else(|| panic!("input type {} is defined", method.input_type()));
                    let has_request_id = input.field.iter().any(|f| f.name() == "request_id");
                    methods.insert(
                        format!("/payouts.v1.{}/{}", service.name(), method.name()),
                        has_request_id,
                    );
                }
            }
        }
        methods
    }

    #[test]
    fn every_proto_method_has_a_rule_and_mutating_matches_request_id() {
        let methods = proto_methods();
        assert!(methods.len() >= 18, "found only {methods:?}");
        for (path, has_request_id) in &methods {
            let rule = method_rule(path).unwrap_or_else(|| panic!("{path} has no access rule"));
            assert_eq!(
                rule.mutating, *has_request_id,
                "{path}: mutating must match whether the request has request_id"
            );
            assert_eq!(is_mutating(path), *has_request_id, "{path}");
            assert_eq!(required_role(path), Some(RequiredRole::Role(rule.role)));
        }
    }

    #[test]
    fn every_rule_names_a_method_that_exists() {
        let methods = proto_methods();
        // Rules may run ahead of the protos only for methods announced in the design.
        let announced: BTreeSet<&str> = ["/payouts.v1.AuditService/ListAuditEvents"].into();
        let mut seen = BTreeSet::new();
        for rule in METHOD_RULES {
            assert!(seen.insert(rule.path), "{} listed twice", rule.path);
            assert!(
                methods.contains_key(rule.path) || announced.contains(rule.path),
                "{} is not a method in the protos",
                rule.path
            );
        }
    }

    #[test]
    fn roles_follow_the_issue() {
        let role = |p: &str| match required_role(p) {
            Some(RequiredRole::Role(r)) => r,
            other => panic!("{p}: {other:?}"),
        };
        assert_eq!(
            role("/payouts.v1.PartnerService/RegisterPartner"),
            Role::Registrar
        );
        assert_eq!(
            role("payouts.v1.PartnerService/UpdatePartnerBankAccount"),
            Role::Registrar
        );
        assert_eq!(
            role("/payouts.v1.ClaimService/SubmitClaim"),
            Role::Registrar
        );
        assert_eq!(
            role("/payouts.v1.ClaimService/AttachEvidence"),
            Role::Registrar
        );
        assert_eq!(
            role("/payouts.v1.PartnerService/ImportPartners"),
            Role::Registrar
        );
        assert_eq!(
            role("/payouts.v1.ClaimService/ImportClaims"),
            Role::Registrar
        );
        assert_eq!(role("/payouts.v1.ClaimService/ReviewClaim"), Role::Reviewer);
        for m in [
            "RetryDisbursement",
            "CancelDisbursement",
            "PauseDispatch",
            "ResumeDispatch",
            "ReconcileSettlements",
        ] {
            assert_eq!(
                role(&format!("/payouts.v1.DisbursementService/{m}")),
                Role::Payments
            );
        }
        for p in [
            "/payouts.v1.PartnerService/GetPartner",
            "/payouts.v1.PartnerService/ListPartners",
            "/payouts.v1.ClaimService/PreviewCompensation",
            "/payouts.v1.ClaimService/GetClaim",
            "/payouts.v1.ClaimService/ListClaims",
            "/payouts.v1.ClaimService/GetPolicy",
            "/payouts.v1.DisbursementService/GetDisbursement",
            "/payouts.v1.DisbursementService/ListDisbursements",
            "/payouts.v1.DisbursementService/GetProgramSummary",
            "/payouts.v1.DisbursementService/ExportDisbursements",
        ] {
            assert_eq!(role(p), Role::Viewer, "{p}");
        }
        assert_eq!(
            role("/payouts.v1.AuditService/ListAuditEvents"),
            Role::Auditor
        );
    }

    #[test]
    fn health_and_reflection_are_open_and_unknown_paths_have_no_rule() {
        for p in [
            "/grpc.health.v1.Health/Check",
            "/grpc.health.v1.Health/Watch",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            assert_eq!(required_role(p), Some(RequiredRole::Open), "{p}");
            assert!(!is_mutating(p));
        }
        for p in [
            "/payouts.v1.PartnerService/DeletePartner",
            "/payouts.v1.PartnerService/",
            "/payouts.v1.PartnerService/GetPartnerX",
            "/other.v1.Thing/Do",
            "/grpc.healthz/Check",
            "",
        ] {
            assert_eq!(required_role(p), None, "{p}");
        }
    }

    #[test]
    fn role_names_parse_strictly() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
        }
        assert!("Registrar".parse::<Role>().is_err());
        assert!("admin".parse::<Role>().is_err());
    }
}
