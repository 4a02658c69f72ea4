//! A TCP proxy of the tests' own between the service and PostgreSQL, to fail the database the
//! way a network fails it: cut every open connection, reset or hold new ones, slow every
//! byte, and restore.

use std::net::SocketAddr;
use std::str::FromStr as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does with a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NewConnections {
    /// Connects it to PostgreSQL.
    Forward,
    /// Resets it at once, as a host with nothing listening does.
    Reset,
    /// Accepts it and then says nothing, as a network that drops every packet does.
    Hold,
}

struct Shared {
    upstream: SocketAddr,
    new: Mutex<NewConnections>,
    latency_ms: AtomicU64,
    /// Bumped to close every connection open through the proxy.
    cuts: watch::Sender<u64>,
    held: Mutex<Vec<TcpStream>>,
}

impl Shared {
    fn new_connections(&self) -> NewConnections {
        *self.new.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_new_connections(&self, new: NewConnections) {
        *self.new.lock().unwrap_or_else(PoisonError::into_inner) = new;
    }

    fn release_held(&self) {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

/// The proxy: `url` reaches the database of `database_url` through it.
pub struct DbProxy {
    url: String,
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

impl DbProxy {
    /// A proxy on a loopback port of its own to the server of `database_url` (a
    /// `postgres://` URL), forwarding every connection.
    pub async fn start(database_url: &str) -> Self {
        let options =
            sqlx::postgres::PgConnectOptions::from_str(database_url).expect("a PostgreSQL URL");
        let upstream = tokio::net::lookup_host((options.get_host(), options.get_port()))
            .await
            .expect("the database host resolves")
            .next()
            .expect("an address for the database host");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shared = Arc::new(Shared {
            upstream,
            new: Mutex::new(NewConnections::Forward),
            latency_ms: AtomicU64::new(0),
            cuts: watch::channel(0).0,
            held: Mutex::new(Vec::new()),
        });
        let accept = tokio::spawn(accept(listener, shared.clone()));
        Self {
            url: through(database_url, addr),
            shared,
            accept,
        }
    }

    /// The database URL through the proxy.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// PostgreSQL is gone: every open connection is closed and every new one reset.
    pub fn lose_database(&self) {
        self.shared.set_new_connections(NewConnections::Reset);
        self.cut();
    }

    /// PostgreSQL is silent: every open connection is closed and new ones are accepted and
    /// then left without an answer.
    pub fn silence_database(&self) {
        self.shared.set_new_connections(NewConnections::Hold);
        self.cut();
    }

    /// Closes every connection open through the proxy (and every one it holds).
    pub fn cut(&self) {
        self.shared.cuts.send_modify(|cuts| *cuts += 1);
        self.shared.release_held();
    }

    /// Every chunk of bytes, either way, waits `latency` before it is passed on.
    pub fn delay(&self, latency: Duration) {
        let ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX);
        self.shared.latency_ms.store(ms, Ordering::SeqCst);
    }

    /// Back to normal: new connections are forwarded, without delay. Connections held
    /// meanwhile are closed.
    pub fn restore(&self) {
        self.delay(Duration::ZERO);
        self.shared.set_new_connections(NewConnections::Forward);
        self.shared.release_held();
    }
}

impl Drop for DbProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// `database_url` with its host and port replaced by `addr`.
fn through(database_url: &str, addr: SocketAddr) -> String {
    let (scheme, rest) = database_url.split_once("://").expect("URL has a scheme");
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let userinfo = authority
        .rsplit_once('@')
        .map(|(user, _)| format!("{user}@"))
        .unwrap_or_default();
    format!("{scheme}://{userinfo}{addr}{path}")
}

async fn accept(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        match shared.new_connections() {
            NewConnections::Forward => {
                tokio::spawn(forward(client, shared.clone()));
            }
            NewConnections::Reset => {
                let _ = client.set_zero_linger();
                drop(client);
            }
            NewConnections::Hold => shared
                .held
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(client),
        }
    }
}

async fn forward(client: TcpStream, shared: Arc<Shared>) {
    let mut cuts = shared.cuts.subscribe();
    let Ok(server) = TcpStream::connect(shared.upstream).await else {
        return;
    };
    let _ = (client.set_nodelay(true), server.set_nodelay(true));
    let (from_client, to_client) = client.into_split();
    let (from_server, to_server) = server.into_split();
    tokio::select! {
        _ = pipe(from_client, to_server, &shared) => {}
        _ = pipe(from_server, to_client, &shared) => {}
        _ = cuts.changed() => {}
    }
}

async fn pipe(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    shared: &Shared,
) -> std::io::Result<()> {
    let mut buf = vec![0_u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        let latency = shared.latency_ms.load(Ordering::SeqCst);
        if latency > 0 {
            tokio::time::sleep(Duration::from_millis(latency)).await;
        }
        to.write_all(&buf[..n]).await?;
    }
}

#[test]
fn the_url_through_the_proxy_keeps_user_and_database() {
    let addr: SocketAddr = "127.0.0.1:6000".parse().expect("addr");
    assert_eq!(
        through("postgres://postgres@127.0.0.1:5432/payouts_test_1", addr),
        "postgres://postgres@127.0.0.1:6000/payouts_test_1"
    );
    assert_eq!(
        through("postgres://localhost/db?sslmode=disable", addr),
        "postgres://127.0.0.1:6000/db?sslmode=disable"
    );
}
