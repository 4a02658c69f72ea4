//! The service as its clients meet it: `partner-payouts serve` in a process of its own, paying
//! into `partner-payouts sandbox-bank` in a third, and where the CPU of a run went.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// The built `partner-payouts` binary, from the same build as this generator.
const BINARY: &str = env!("CARGO_BIN_EXE_partner-payouts");

/// The service and the bank, each a child process; both are stopped when this is dropped.
pub struct Spawned {
    service: Child,
    bank: Child,
    pub target: String,
    pub bank_addr: SocketAddr,
}

impl Spawned {
    pub fn service_pid(&self) -> u32 {
        self.service.id()
    }

    pub fn bank_pid(&self) -> u32 {
        self.bank.id()
    }

    /// Asks the service to drain (SIGTERM) and waits for it, then stops the bank.
    pub fn stop(mut self) -> anyhow::Result<()> {
        terminate(&mut self.service)?;
        terminate(&mut self.bank)?;
        Ok(())
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.service.kill();
        let _ = self.bank.kill();
        let _ = self.service.wait();
        let _ = self.bank.wait();
    }
}

fn terminate(child: &mut Child) -> anyhow::Result<()> {
    let pid = libc::pid_t::try_from(child.id())?;
    // SAFETY: kill(2) on a child this process started and has not reaped.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill()?;
    child.wait()?;
    Ok(())
}

/// A port free on the loopback address at the time of asking.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Starts the bank and the service on `database_url` and waits until the service is SERVING.
/// Their logs go to files in `dir`.
pub async fn spawn(
    database_url: &str,
    dir: &Path,
    bank: &partner_payouts::sandbox::SandboxConfig,
) -> anyhow::Result<Spawned> {
    let bank_addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let millis = |d: Duration| d.as_millis().to_string();
    let mut bank_command = Command::new(BINARY);
    bank_command
        .args(["sandbox-bank", "--listen", &bank_addr.to_string()])
        .args(["--settle-delay-ms", &millis(bank.settle_delay)])
        .args(["--latency-ms", &millis(bank.latency)]);
    if let Some(rate) = bank.rate_limit_per_s {
        bank_command.args(["--rate-limit-per-s", &rate.to_string()]);
    }
    let bank_child = bank_command
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("bank.log"))?)
        .spawn()?;
    let listen = format!("127.0.0.1:{}", free_port()?);
    let mut service = Command::new(BINARY);
    service
        .arg("serve")
        .env("PAYOUTS_LISTEN_ADDR", &listen)
        // No admin port: a service already running here may hold the default one.
        .env("PAYOUTS_ADMIN_LISTEN_ADDR", "")
        .env("PAYOUTS_DATABASE_URL", database_url)
        .env("PAYOUTS_DATABASE_MAX_CONNECTIONS", "32")
        .env("PAYOUTS_PII_KEY_FILE", dir.join("pii.key"))
        .env(
            "PAYOUTS_PAYMENTS_BACKEND_URL",
            format!("http://{bank_addr}"),
        )
        .env("PAYOUTS_MAX_CONCURRENT_REQUESTS", "1024")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("service.log"))?);
    let mut bank_child = bank_child;
    let service = match service.spawn() {
        Ok(child) => child,
        Err(e) => {
            let _ = bank_child.kill();
            let _ = bank_child.wait();
            return Err(e.into());
        }
    };
    let spawned = Spawned {
        service,
        bank: bank_child,
        target: format!("http://{listen}"),
        bank_addr,
    };
    serving(&spawned.target, dir).await?;
    Ok(spawned)
}

/// Waits (up to a minute) for the gRPC health check to answer SERVING.
async fn serving(target: &str, dir: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let endpoint = tonic::transport::Endpoint::from_shared(target.to_owned())?;
        if let Ok(channel) = endpoint.connect().await {
            let answer = HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await;
            if answer.is_ok_and(|a| a.into_inner().status == ServingStatus::Serving as i32) {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!(
        "the service at {target} did not become SERVING within a minute; its log: {}",
        dir.join("service.log").display()
    )
}

/// CPU time, in clock ticks, taken so far by each side of a run, and by nobody.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuSample {
    service: u64,
    /// The part of `service` spent in the kernel on the service's behalf (stime).
    service_kernel: u64,
    bank: u64,
    client: u64,
    postgres: u64,
    idle: u64,
    all: u64,
}

impl CpuSample {
    /// Now. `service` and `bank` are the child processes' ids (None: in this process).
    pub fn take(service: Option<u32>, bank: Option<u32>) -> Self {
        let (idle, all) = machine_ticks().unwrap_or_default();
        let service = service.and_then(process_times).unwrap_or_default();
        Self {
            service: service.user + service.kernel,
            service_kernel: service.kernel,
            bank: bank.and_then(process_ticks).unwrap_or(0),
            client: process_ticks(std::process::id()).unwrap_or(0),
            postgres: postgres_ticks(),
            idle,
            all,
        }
    }

    /// Prints the CPU each side spent per call (or row) between `self` and `later`.
    pub fn report(&self, later: &Self, calls: u64, separate: bool) {
        // SAFETY: sysconf has no preconditions.
        let per_s = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
            .unwrap_or(100)
            .max(1);
        let per_call = |ticks: u64| {
            let micros = u128::from(ticks) * 1_000_000 / u128::from(per_s);
            micros as f64 / calls.max(1) as f64
        };
        let d = |a: u64, b: u64| b.saturating_sub(a);
        let service_kernel = d(self.service_kernel, later.service_kernel);
        let (service, bank, client) = (
            d(self.service, later.service),
            d(self.bank, later.bank),
            d(self.client, later.client),
        );
        let (postgres, idle, all) = (
            d(self.postgres, later.postgres),
            d(self.idle, later.idle),
            d(self.all, later.all),
        );
        let other = all.saturating_sub(service + bank + client + postgres + idle);
        let busy = |ticks: u64| 100.0 * ticks as f64 / all.max(1) as f64;
        if separate {
            println!(
                "cpu per call (µs, all cores): service={:.1} (of it in the kernel {:.1}) \
                 postgres={:.1} client={:.1} bank={:.1} other={:.1} idle={:.1}; share of the \
                 machine: service={:.0}% postgres={:.0}% client={:.0}% idle={:.0}%",
                per_call(service),
                per_call(service_kernel),
                per_call(postgres),
                per_call(client),
                per_call(bank),
                per_call(other),
                per_call(idle),
                busy(service),
                busy(postgres),
                busy(client),
                busy(idle)
            );
        } else {
            println!(
                "cpu per call (µs, all cores): service and client in one process={:.1} \
                 postgres={:.1} other={:.1} idle={:.1}; idle share {:.0}%",
                per_call(client),
                per_call(postgres),
                per_call(other),
                per_call(idle),
                busy(idle)
            );
        }
    }
}

/// The CPU a process has taken, in clock ticks: in its own code and in the kernel for it.
#[derive(Clone, Copy, Debug, Default)]
struct ProcessTimes {
    user: u64,
    kernel: u64,
}

/// utime and stime of process `pid`.
fn process_times(pid: u32) -> Option<ProcessTimes> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields that follow it do not.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `rest` starts at field 3.
    Some(ProcessTimes {
        user: fields.get(11)?.parse().ok()?,
        kernel: fields.get(12)?.parse().ok()?,
    })
}

/// utime + stime of process `pid`, in clock ticks.
fn process_ticks(pid: u32) -> Option<u64> {
    process_times(pid).map(|t| t.user + t.kernel)
}

/// The CPU of every PostgreSQL process on the machine (backends and its own workers).
fn postgres_ticks() -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim_end() == "postgres")
        })
        .filter_map(process_ticks)
        .sum()
}

/// The machine's idle ticks (idle + iowait) and all its ticks, over every core.
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|f| f.parse().ok())
        .collect();
    let idle = ticks.get(3)? + ticks.get(4)?;
    Some((idle, ticks.iter().sum()))
}
