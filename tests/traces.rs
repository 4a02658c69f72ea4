//! Traces end to end: an in-process OTLP collector receives what the service exports while
//! every RPC is called with a known `traceparent`. Its own test binary, because telemetry is
//! installed once per process.

#[path = "api/helpers.rs"]
#[allow(dead_code)]
mod helpers;

use std::collections::HashSet;
use std::io::Write as _;
use std::sync::{Arc, Mutex};

use helpers::*;
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
    metrics_service_server::{MetricsService, MetricsServiceServer},
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind, status::StatusCode};
use partner_payouts::proto::payments::v1::sandbox_ledger_client::SandboxLedgerClient;
use partner_payouts::proto::payouts::v1 as pb;
use partner_payouts::sandbox;

/// A resource's string attributes.
type Attributes = Vec<(String, String)>;

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
    metric_names: Arc<Mutex<HashSet<String>>>,
    /// The service, method and status code of every `rpc.server.call.duration` point.
    durations: Arc<Mutex<HashSet<(String, String, i64)>>>,
    /// The attributes of every exporting resource.
    resources: Arc<Mutex<Vec<Attributes>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().expect("lock");
        for resource in request.into_inner().resource_spans {
            let attributes = resource.resource.iter().flat_map(|r| &r.attributes);
            self.resources.lock().expect("lock").push(
                attributes
                    .filter_map(|kv| match kv.value.as_ref()?.value.as_ref()? {
                        Value::StringValue(v) => Some((kv.key.clone(), v.clone())),
                        _ => None,
                    })
                    .collect(),
            );
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let mut names = self.metric_names.lock().expect("lock");
        let mut durations = self.durations.lock().expect("lock");
        for resource in request.into_inner().resource_metrics {
            for scope in resource.scope_metrics {
                for metric in scope.metrics {
                    if let Some(Data::Histogram(histogram)) = &metric.data
                        && metric.name == "rpc.server.call.duration"
                    {
                        assert_eq!(metric.unit, "s", "durations in seconds");
                        durations.extend(histogram.data_points.iter().filter_map(|point| {
                            let attr = |key: &str| {
                                point
                                    .attributes
                                    .iter()
                                    .find(|kv| kv.key == key)?
                                    .value
                                    .clone()?
                                    .value
                            };
                            match (
                                attr("rpc.system"),
                                attr("rpc.service"),
                                attr("rpc.method"),
                                attr("rpc.grpc.status_code"),
                            ) {
                                (
                                    Some(Value::StringValue(system)),
                                    Some(Value::StringValue(s)),
                                    Some(Value::StringValue(m)),
                                    Some(Value::IntValue(c)),
                                ) if system == "grpc" => Some((s, m, c)),
                                _ => None,
                            }
                        }));
                    }
                    names.insert(metric.name);
                }
            }
        }
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

/// Log lines, kept to search for leaks.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
/// Seeded in a partner's account; it must appear nowhere.
const SECRET_ACCOUNT: &str = "3561248790123";

fn traced<T>(message: T, parent_span_id: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{parent_span_id}-01")
            .parse()
            .expect("header"),
    );
    request
}

fn attr<'a>(span: &'a Span, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn string_attr(span: &Span, key: &str) -> Option<String> {
    match attr(span, key) {
        Some(Value::StringValue(s)) => Some(s.clone()),
        _ => None,
    }
}

fn int_attr(span: &Span, key: &str) -> Option<i64> {
    match attr(span, key) {
        Some(Value::IntValue(i)) => Some(*i),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_leaves_a_trace_and_no_account_number() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let collector_addr = listener.local_addr().expect("addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .add_service(MetricsServiceServer::new(collector.clone()))
            .serve_with_incoming(partner_payouts::net::incoming(listener)),
    );
    // SAFETY: set before anything reads the environment; the test is the only code running.
    unsafe {
        std::env::set_var(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://{collector_addr}"),
        );
        std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "100");
        std::env::set_var("OTEL_METRIC_EXPORT_INTERVAL", "500");
    }
    let logs = Captured::default();
    let telemetry = partner_payouts::telemetry::init_with_writer(
        "json",
        partner_payouts::telemetry::Exposition::default(),
        logs.clone(),
    )
    .expect("telemetry");

    let bank_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let bank_addr = bank_listener.local_addr().expect("addr");
    tokio::spawn(sandbox::serve(
        bank_listener,
        sandbox::SandboxBank::new(sandbox::SandboxConfig::default()),
        std::future::pending(),
    ));
    let app = spawn_app(Db::Sqlite, |s| {
        s.payments_backend_url = Some(format!("http://{bank_addr}"));
    })
    .await;

    // One call of every RPC, each with its own parent span id in the same trace.
    let mut expected: Vec<(&str, String)> = Vec::new();
    let mut parent = {
        let mut n = 0u64;
        move |name: &'static str, expected: &mut Vec<(&'static str, String)>| {
            n += 1;
            let id = format!("{n:016x}");
            expected.push((name, id.clone()));
            id
        }
    };

    let mut partners = app.partners();
    let p = partners
        .register_partner(traced(
            pb::RegisterPartnerRequest {
                request_id: request_id(),
                partner: Some(partner_with_account(1, SECRET_ACCOUNT)),
            },
            &parent("payouts.v1.PartnerService/RegisterPartner", &mut expected),
        ))
        .await
        .expect("register")
        .into_inner()
        .partner
        .expect("partner");
    let p = partners
        .get_partner(traced(
            pb::GetPartnerRequest {
                partner_id: p.partner_id.clone(),
            },
            &parent("payouts.v1.PartnerService/GetPartner", &mut expected),
        ))
        .await
        .expect("get")
        .into_inner()
        .partner
        .expect("partner");
    partners
        .list_partners(traced(
            pb::ListPartnersRequest::default(),
            &parent("payouts.v1.PartnerService/ListPartners", &mut expected),
        ))
        .await
        .expect("list");
    partners
        .update_partner_bank_account(traced(
            pb::UpdatePartnerBankAccountRequest {
                request_id: request_id(),
                partner_id: p.partner_id.clone(),
                bank_account: Some(pb::BankAccount {
                    bank_code: "088".into(),
                    account_number: SECRET_ACCOUNT.into(),
                    holder_name: "Kim Minji".into(),
                }),
                etag: p.etag.clone(),
            },
            &parent(
                "payouts.v1.PartnerService/UpdatePartnerBankAccount",
                &mut expected,
            ),
        ))
        .await
        .expect("update");

    let mut claims = app.claims();
    claims
        .preview_compensation(traced(
            pb::PreviewCompensationRequest {
                items: vec![full_weight_item(100)],
            },
            &parent("payouts.v1.ClaimService/PreviewCompensation", &mut expected),
        ))
        .await
        .expect("preview");
    let approving_span = parent("payouts.v1.ClaimService/SubmitClaim", &mut expected);
    let approved = claims
        .submit_claim(traced(
            pb::SubmitClaimRequest {
                request_id: request_id(),
                partner_id: p.partner_id.clone(),
                items: vec![full_weight_item(100)],
                evidence: vec![],
            },
            &approving_span,
        ))
        .await
        .expect("submit")
        .into_inner()
        .claim
        .expect("claim");
    let other = register(&app, partner(2)).await;
    let pending = submit(&app, &other.partner_id, vec![full_weight_item(600_000)]).await;
    claims
        .attach_evidence(traced(
            pb::AttachEvidenceRequest {
                request_id: request_id(),
                claim_id: pending.claim_id.clone(),
                evidence: Some(pb::Evidence {
                    kind: pb::EvidenceKind::SalesLossProof as i32,
                    uri: "s3://claims/2/sales.pdf".into(),
                    sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
                        .into(),
                    attach_time: None,
                }),
            },
            &parent("payouts.v1.ClaimService/AttachEvidence", &mut expected),
        ))
        .await
        .expect("attach");
    claims
        .review_claim(traced(
            pb::ReviewClaimRequest {
                request_id: request_id(),
                claim_id: pending.claim_id.clone(),
                decision: pb::ReviewDecision::Approve as i32,
                compensation_krw: 50_000,
                reason: "proven".into(),
            },
            &parent("payouts.v1.ClaimService/ReviewClaim", &mut expected),
        ))
        .await
        .expect("review");
    claims
        .get_claim(traced(
            pb::GetClaimRequest {
                claim_id: approved.claim_id.clone(),
            },
            &parent("payouts.v1.ClaimService/GetClaim", &mut expected),
        ))
        .await
        .expect("get claim");
    claims
        .list_claims(traced(
            pb::ListClaimsRequest::default(),
            &parent("payouts.v1.ClaimService/ListClaims", &mut expected),
        ))
        .await
        .expect("list claims");
    claims
        .get_policy(traced(
            pb::GetPolicyRequest {},
            &parent("payouts.v1.ClaimService/GetPolicy", &mut expected),
        ))
        .await
        .expect("policy");

    let mut disbursements = app.disbursements();
    let paid = eventually(10, || {
        let mut client = app.disbursements();
        let id = approved.disbursement_id.clone();
        async move {
            let d = client
                .get_disbursement(pb::GetDisbursementRequest {
                    disbursement_id: id,
                })
                .await
                .ok()?
                .into_inner()
                .disbursement?;
            (d.status == pb::DisbursementStatus::Paid as i32).then_some(d)
        }
    })
    .await;
    disbursements
        .get_disbursement(traced(
            pb::GetDisbursementRequest {
                disbursement_id: paid.disbursement_id.clone(),
            },
            &parent(
                "payouts.v1.DisbursementService/GetDisbursement",
                &mut expected,
            ),
        ))
        .await
        .expect("get disbursement");
    disbursements
        .list_disbursements(traced(
            pb::ListDisbursementsRequest::default(),
            &parent(
                "payouts.v1.DisbursementService/ListDisbursements",
                &mut expected,
            ),
        ))
        .await
        .expect("list disbursements");
    // Refused calls are traced too, with an error status.
    let retry_span = parent(
        "payouts.v1.DisbursementService/RetryDisbursement",
        &mut expected,
    );
    disbursements
        .retry_disbursement(traced(
            pb::RetryDisbursementRequest {
                request_id: request_id(),
                disbursement_id: paid.disbursement_id.clone(),
            },
            &retry_span,
        ))
        .await
        .expect_err("a paid disbursement is not retried");
    disbursements
        .cancel_disbursement(traced(
            pb::CancelDisbursementRequest {
                request_id: request_id(),
                disbursement_id: paid.disbursement_id.clone(),
                reason: "test".into(),
            },
            &parent(
                "payouts.v1.DisbursementService/CancelDisbursement",
                &mut expected,
            ),
        ))
        .await
        .expect_err("a paid disbursement is not cancelled");
    disbursements
        .pause_dispatch(traced(
            pb::PauseDispatchRequest {
                request_id: request_id(),
                reason: "test".into(),
            },
            &parent(
                "payouts.v1.DisbursementService/PauseDispatch",
                &mut expected,
            ),
        ))
        .await
        .expect("pause");
    disbursements
        .resume_dispatch(traced(
            pb::ResumeDispatchRequest {
                request_id: request_id(),
            },
            &parent(
                "payouts.v1.DisbursementService/ResumeDispatch",
                &mut expected,
            ),
        ))
        .await
        .expect("resume");
    disbursements
        .get_program_summary(traced(
            pb::GetProgramSummaryRequest {},
            &parent(
                "payouts.v1.DisbursementService/GetProgramSummary",
                &mut expected,
            ),
        ))
        .await
        .expect("summary");

    let (deadline_span, internal_span) = calls_that_fail_the_service_way(&app).await;

    // The sandbox received the approving call's trace with the instruction.
    let applied = SandboxLedgerClient::connect(format!("http://{bank_addr}"))
        .await
        .expect("ledger")
        .list_applied(partner_payouts::proto::payments::v1::ListAppliedRequest {})
        .await
        .expect("list applied")
        .into_inner()
        .instructions;
    let instruction = applied
        .iter()
        .find(|i| i.idempotency_key == paid.idempotency_key)
        .expect("instruction applied");
    assert!(
        instruction.traceparent.contains(TRACE_ID),
        "sandbox saw {:?}",
        instruction.traceparent
    );

    telemetry.shutdown();
    let spans = eventually(10, || {
        let collector = collector.clone();
        let wanted = expected.len();
        async move {
            let spans = collector.spans.lock().expect("lock").clone();
            let servers = spans
                .iter()
                .filter(|s| s.kind == SpanKind::Server as i32 && s.trace_id == hex(TRACE_ID))
                .count();
            (servers >= wanted).then_some(spans)
        }
    })
    .await;

    for (name, parent_id) in &expected {
        let matching: Vec<&Span> = spans
            .iter()
            .filter(|s| s.kind == SpanKind::Server as i32 && s.parent_span_id == hex(parent_id))
            .collect();
        assert_eq!(matching.len(), 1, "one SERVER span for {name}");
        let span = matching[0];
        assert_eq!(&span.name, name);
        assert_eq!(
            span.trace_id,
            hex(TRACE_ID),
            "{name} continues the caller's trace"
        );
        let (service, method) = name.split_once('/').expect("name");
        assert_eq!(string_attr(span, "rpc.system").as_deref(), Some("grpc"));
        assert_eq!(string_attr(span, "rpc.service").as_deref(), Some(service));
        assert_eq!(string_attr(span, "rpc.method").as_deref(), Some(method));
        let code = int_attr(span, "rpc.grpc.status_code").expect("status code");
        let failed = *parent_id == retry_span || name.ends_with("CancelDisbursement");
        assert_eq!(code != 0, failed, "{name} status {code}");
        // Refused for the caller's reasons (FAILED_PRECONDITION): not the server's error.
        let status = span.status.as_ref().map_or(0, |s| s.code);
        assert_ne!(status, StatusCode::Error as i32, "{name} span status");
        assert_eq!(
            string_attr(span, "server.address").as_deref(),
            Some("127.0.0.1"),
            "{name}"
        );
        assert_eq!(
            int_attr(span, "server.port"),
            Some(i64::from(app.addr.port())),
            "{name}"
        );
        assert_eq!(
            string_attr(span, "network.peer.address").as_deref(),
            Some("127.0.0.1"),
            "{name}"
        );
    }
    let resources = collector.resources.lock().expect("lock").clone();
    assert!(!resources.is_empty(), "spans come with their resource");
    for attributes in &resources {
        let instance = attributes.iter().find(|(k, _)| k == "service.instance.id");
        assert!(
            instance.is_some_and(|(_, v)| !v.is_empty()),
            "service.instance.id in {attributes:?}"
        );
    }
    let submit_span = spans
        .iter()
        .find(|s| s.parent_span_id == hex(&approving_span))
        .expect("submit span");
    assert_eq!(
        string_attr(submit_span, "payouts.claim_id").as_deref(),
        Some(approved.claim_id.as_str())
    );
    assert_eq!(
        string_attr(submit_span, "payouts.disbursement_id").as_deref(),
        Some(approved.disbursement_id.as_str())
    );
    let database_spans: Vec<&Span> = spans
        .iter()
        .filter(|s| s.trace_id == hex(TRACE_ID) && s.name.starts_with("store."))
        .collect();
    assert!(!database_spans.is_empty(), "database work shows as spans");
    for span in database_spans {
        let attr = |key: &str| string_attr(span, key);
        assert_eq!(attr("db.system.name").as_deref(), Some("sqlite"));
        assert_eq!(
            attr("db.operation.name").as_deref(),
            span.name.strip_prefix("store.")
        );
        assert_eq!(attr("db.namespace").as_deref(), Some("main"));
    }
    for backend in ["VerifyAccountHolder", "SubmitInstruction"] {
        let name = format!("payments.v1.PaymentsBackend/{backend}");
        assert!(
            spans.iter().any(|s| s.name == name
                && s.kind == SpanKind::Client as i32
                && s.trace_id == hex(TRACE_ID)),
            "{name} CLIENT span in the approving trace"
        );
    }

    assert_failed_spans(&spans, &[(deadline_span, 4), (internal_span, 13)]);
    let exported = format!("{spans:?}");
    let logged = String::from_utf8(logs.0.lock().expect("lock").clone()).expect("utf-8");
    assert!(!logged.is_empty(), "logs were captured");
    for haystack in [&exported, &logged] {
        assert!(!haystack.contains(SECRET_ACCOUNT), "account number leaked");
        assert!(
            !haystack.contains(&SECRET_ACCOUNT[..9]),
            "account number prefix leaked"
        );
    }
    assert_logs_name_their_trace(&logged);

    let names = eventually(10, || {
        let collector = collector.clone();
        async move {
            let names = collector.metric_names.lock().expect("lock").clone();
            names.contains("rpc.server.call.duration").then_some(names)
        }
    })
    .await;
    assert!(names.contains("payouts.dispatch.attempts"), "{names:?}");
    // The call past its deadline is counted as such in the duration metric.
    eventually(10, || {
        let collector = collector.clone();
        async move {
            let durations = collector.durations.lock().expect("lock");
            let deadline = (
                "payouts.v1.PartnerService".to_owned(),
                "RegisterPartner".to_owned(),
                4,
            );
            durations.contains(&deadline).then_some(())
        }
    })
    .await;
    let _ = std::io::stderr().flush();
}

/// Two calls that fail, traced under parents of their own (returned): a registration past its
/// caller's deadline (the partners are locked meanwhile), and a read of a partner whose stored
/// row is corrupt, which is answered INTERNAL with a RequestInfo naming the trace.
async fn calls_that_fail_the_service_way(app: &TestApp) -> (&'static str, &'static str) {
    use sqlx::Connection as _;
    use tonic_types::StatusExt as _;
    const DEADLINE_SPAN: &str = "00000000000000d1";
    const INTERNAL_SPAN: &str = "00000000000000d2";
    let mut db = sqlx::SqliteConnection::connect(&app.database_url)
        .await
        .expect("the service's database");
    sqlx::raw_sql("BEGIN IMMEDIATE")
        .execute(&mut db)
        .await
        .expect("lock");
    let mut late = traced(
        pb::RegisterPartnerRequest {
            request_id: request_id(),
            partner: Some(partner(3)),
        },
        DEADLINE_SPAN,
    );
    late.set_timeout(std::time::Duration::from_millis(300));
    let status = app
        .partners_leaving_deadlines()
        .register_partner(late)
        .await
        .expect_err("past its deadline");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut db)
        .await
        .expect("unlock");

    let corrupt = register(app, partner(4)).await;
    sqlx::query("UPDATE partners SET affected_services = 'NO_SUCH_SERVICE' WHERE partner_id = $1")
        .bind(&corrupt.partner_id)
        .execute(&mut db)
        .await
        .expect("corrupt a stored row");
    let status = app
        .partners()
        .get_partner(traced(
            pb::GetPartnerRequest {
                partner_id: corrupt.partner_id,
            },
            INTERNAL_SPAN,
        ))
        .await
        .expect_err("an unreadable row");
    assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
    let info = status.get_details_request_info().expect("RequestInfo");
    assert_eq!(info.request_id, TRACE_ID, "INTERNAL names the call's trace");
    (DEADLINE_SPAN, INTERNAL_SPAN)
}

/// Every JSON line logged inside a span has the trace's `trace_id` and the span's `span_id`
/// at its top level, and the calls traced under [`TRACE_ID`] logged lines with it.
fn assert_logs_name_their_trace(logged: &str) {
    let lines: Vec<serde_json::Value> = logged
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let in_spans: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l.get("span").is_some()).collect();
    assert!(!in_spans.is_empty(), "lines logged inside spans");
    for line in &in_spans {
        let id = |key: &str, len: usize| {
            let id = line[key]
                .as_str()
                .unwrap_or_else(|| panic!("{key} in {line}"));
            assert!(
                id.len() == len && id.bytes().all(|b| b.is_ascii_hexdigit()),
                "{line}"
            );
        };
        id("trace_id", 32);
        id("span_id", 16);
    }
    assert!(
        in_spans.iter().any(|l| l["trace_id"] == TRACE_ID),
        "lines of the traced calls carry their trace id"
    );
}

/// The SERVER span under each parent span id has the gRPC status code given, and an error
/// status.
fn assert_failed_spans(spans: &[Span], failed: &[(&str, i64)]) {
    for (parent_id, code) in failed {
        let span = spans
            .iter()
            .find(|s| s.kind == SpanKind::Server as i32 && s.parent_span_id == hex(parent_id))
            .expect("a span for the failed call");
        assert_eq!(
            int_attr(span, "rpc.grpc.status_code"),
            Some(*code),
            "{span:?}"
        );
        assert_eq!(
            span.status.as_ref().map(|s| s.code),
            Some(StatusCode::Error as i32)
        );
    }
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}
