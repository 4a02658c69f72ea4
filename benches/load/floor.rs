//! `floor`: RegisterPartner answered by a bare tonic server, in a process of its own, driven
//! as `register` drives the service. What that server spends per call is the transport's own
//! cost on this machine (HTTP/2 over loopback TCP, the gRPC framing, prost both ways, the
//! runtime), which every call to the service pays before any of its own work: the floor the
//! service's CPU per call is compared with, in the same sitting.
//!
//! The bare server decodes the request and answers with its partner as the service would
//! (an id, the account masked, two timestamps, an etag), on the service's runtime
//! (`app::runtime`), with no database, no layers and no spans.
//!
//! With `--hold-ms N` it holds every call until the next tick of an N ms clock and answers
//! all the calls held at once, as group commit answers a batch when its commit returns: the
//! transport's cost at the service's own pace and shape (many answers per wake-up and per
//! write), where without it the bare server answers each call as it comes, as fast as the
//! callers send.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use partner_payouts::proto::payouts::v1::partner_service_server::{
    PartnerService, PartnerServiceServer,
};
use partner_payouts::proto::payouts::v1::{self as pb};
use tonic::{Request, Response, Status};

use super::{CpuSample, Options, connect, drive_registrations};

/// The first argument that makes the generator the bare server:
/// `load floor-server ADDR HOLD_MS`.
pub const SERVER_ARG: &str = "floor-server";

/// The bare server's listening address and hold (0: none), when this process was started as
/// it.
pub fn server_args() -> Option<(String, u64)> {
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() != Some(SERVER_ARG) {
        return None;
    }
    let listen = args.next().unwrap_or_default();
    let hold_ms = args.next().and_then(|a| a.parse().ok()).unwrap_or(0);
    Some((listen, hold_ms))
}

/// Runs the bare server on `listen` until the process is killed.
pub fn serve(listen: &str, hold_ms: u64) -> anyhow::Result<()> {
    let addr = listen.parse()?;
    partner_payouts::app::runtime()?.block_on(async move {
        let tick = (hold_ms > 0).then(|| {
            let tick = Arc::new(tokio::sync::Notify::new());
            let ticker = tick.clone();
            tokio::spawn(async move {
                let mut clock = tokio::time::interval(Duration::from_millis(hold_ms));
                loop {
                    clock.tick().await;
                    ticker.notify_waiters();
                }
            });
            tick
        });
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(PartnerServiceServer::new(Bare { tick }))
            .serve(addr)
            .await?;
        Ok(())
    })
}

/// Drives the bare server with `o.count` RegisterPartner calls and reports them as
/// `register` does, with the server's CPU per call as the service's.
pub async fn run(o: &Options, base: u64) -> anyhow::Result<()> {
    let server = Server::spawn(o.hold_ms)?;
    let clients = server.connect(o.connections).await?;
    println!(
        "bare tonic server in a process of its own (pid {}) on {}, {}",
        server.child.id(),
        server.target,
        if o.hold_ms > 0 {
            format!("answering the calls held every {} ms together", o.hold_ms)
        } else {
            "answering each call at once".to_owned()
        }
    );
    let pid = server.child.id();
    let before = CpuSample::take(Some(pid), None);
    let report = drive_registrations(o, clients, base).await;
    report.print("floor");
    before.report(&CpuSample::take(Some(pid), None), o.count, true);
    Ok(())
}

/// The bare server's process, killed when dropped.
struct Server {
    child: Child,
    target: String,
}

impl Server {
    fn spawn(hold_ms: u64) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let listen = format!("127.0.0.1:{port}");
        let child = Command::new(std::env::current_exe()?)
            .args([SERVER_ARG, &listen, &hold_ms.to_string()])
            .stdout(Stdio::null())
            .spawn()?;
        Ok(Self {
            child,
            target: format!("http://{listen}"),
        })
    }

    /// Connects `connections` channels once the server listens (within 30 s).
    async fn connect(&self, connections: usize) -> anyhow::Result<super::Clients> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match connect(&self.target, connections).await {
                Ok(clients) => return Ok(clients),
                Err(e) if Instant::now() > deadline => {
                    anyhow::bail!("the bare server at {} never listened: {e}", self.target)
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Answers RegisterPartner only: at once, or at the next `tick`.
struct Bare {
    tick: Option<Arc<tokio::sync::Notify>>,
}

#[tonic::async_trait]
impl PartnerService for Bare {
    type ImportPartnersStream = tokio_stream::Empty<Result<pb::ImportPartnersResponse, Status>>;

    async fn register_partner(
        &self,
        request: Request<pb::RegisterPartnerRequest>,
    ) -> Result<Response<pb::RegisterPartnerResponse>, Status> {
        let mut partner = request.into_inner().partner.unwrap_or_default();
        if let Some(tick) = &self.tick {
            tick.notified().await;
        }
        let now = prost_types::Timestamp::from(SystemTime::now());
        partner.partner_id = uuid::Uuid::now_v7().to_string();
        if let Some(account) = partner.bank_account.as_mut() {
            // As the service shows it: four stars and the last four digits.
            let digits = account.account_number.len();
            let last4 = account.account_number.split_off(digits.saturating_sub(4));
            account.account_number = format!("****{last4}");
        }
        partner.create_time = Some(now);
        partner.update_time = Some(now);
        partner.etag = "\"1\"".to_owned();
        Ok(Response::new(pb::RegisterPartnerResponse {
            partner: Some(partner),
        }))
    }

    async fn get_partner(
        &self,
        _: Request<pb::GetPartnerRequest>,
    ) -> Result<Response<pb::GetPartnerResponse>, Status> {
        Err(Status::unimplemented(
            "the bare server answers RegisterPartner only",
        ))
    }

    async fn list_partners(
        &self,
        _: Request<pb::ListPartnersRequest>,
    ) -> Result<Response<pb::ListPartnersResponse>, Status> {
        Err(Status::unimplemented(
            "the bare server answers RegisterPartner only",
        ))
    }

    async fn update_partner_bank_account(
        &self,
        _: Request<pb::UpdatePartnerBankAccountRequest>,
    ) -> Result<Response<pb::UpdatePartnerBankAccountResponse>, Status> {
        Err(Status::unimplemented(
            "the bare server answers RegisterPartner only",
        ))
    }

    async fn import_partners(
        &self,
        _: Request<tonic::Streaming<pb::ImportPartnersRequest>>,
    ) -> Result<Response<Self::ImportPartnersStream>, Status> {
        Err(Status::unimplemented(
            "the bare server answers RegisterPartner only",
        ))
    }
}
