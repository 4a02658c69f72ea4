//! The caller of a gRPC method, as authentication named it: put in the request's extensions by
//! the auth layer, read by the handlers and the audit log.

/// The caller, as authenticated. Without configured authentication every caller is `local-dev`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal(pub String);

impl Principal {
    pub const LOCAL_DEV: &'static str = "local-dev";
    /// Who the audit log names for `partner-payouts reseal`, which no caller runs.
    pub const RESEAL: &'static str = "reseal";

    pub fn of<T>(request: &tonic::Request<T>) -> String {
        request
            .extensions()
            .get::<Principal>()
            .map_or_else(|| Self::LOCAL_DEV.to_owned(), |p| p.0.clone())
    }
}
