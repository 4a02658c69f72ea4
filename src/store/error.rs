//! What a store operation can fail with, and which failures are the database's own rather
//! than the call's: a database out of reach ([`StoreError::Unavailable`]), or a transaction it
//! rolled back for contention ([`StoreError::Contention`]), which [`retry_contention`] runs
//! again a few times before the caller hears of it.

use std::time::Duration;

use crate::domain::{ClaimId, PartnerId, Refusal, ReviewRefused};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("a partner with this business registration number is already registered")]
    PartnerAlreadyRegistered { partner_id: PartnerId },
    #[error("this partner has already filed a claim")]
    ClaimAlreadyFiled { claim_id: ClaimId },
    #[error("request_id was already used with a different request")]
    RequestIdReused,
    #[error("etag does not match the partner's current etag {current}")]
    EtagMismatch { current: String },
    #[error(transparent)]
    Review(#[from] ReviewRefused),
    #[error("{field}: {description}")]
    InvalidField {
        field: &'static str,
        description: String,
    },
    #[error("the same principal may not {0}")]
    SamePrincipal(&'static str),
    #[error("{message}")]
    Precondition {
        reason: &'static str,
        message: String,
    },
    /// The database could not be reached or used: no connection within the acquire timeout,
    /// a connection lost, the server shutting down or refusing connections, a SQLite lock
    /// held past the busy timeout. The call's transaction did not commit, unless the
    /// connection was lost during its commit: a retry with the same request id then replays it.
    #[error("the database is unavailable: {0:#}")]
    Unavailable(anyhow::Error),
    /// The database rolled the transaction back to break a deadlock or a serialization
    /// conflict, every time it was run ([`retry_contention`]). Nothing of it was stored.
    #[error("the database gave the transaction up for contention: {0:#}")]
    Contention(anyhow::Error),
    /// A fault of ours or of the stored data: a bug.
    #[error(transparent)]
    Unexpected(anyhow::Error),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// What a failure of the database means for the call that met it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// The database is out of reach: the call may succeed later, unchanged.
    Unavailable,
    /// The database rolled the transaction back for contention: run it again.
    Contention,
    /// Anything else: a value refused, a statement wrong, a bug.
    Other,
}

/// PostgreSQL's SQLSTATEs of a server out of reach, besides class 08 (connection exception):
/// shutting down (57P01, 57P02), starting up (57P03), out of connection slots (53300).
const PG_UNAVAILABLE: [&str; 4] = ["57P01", "57P02", "57P03", "53300"];
/// PostgreSQL's SQLSTATEs of contention: serialization failure, deadlock detected.
const PG_CONTENTION: [&str; 2] = ["40001", "40P01"];
/// SQLite's primary result codes of a lock another connection holds: BUSY, LOCKED.
const SQLITE_BUSY: i32 = 5;
const SQLITE_LOCKED: i32 = 6;

/// How the database failed, as far as the call is concerned.
fn failure_of(e: &sqlx::Error) -> Failure {
    match e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => Failure::Unavailable,
        sqlx::Error::Database(db) => {
            if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
                let code = pg.code();
                if code.starts_with("08") || PG_UNAVAILABLE.contains(&code) {
                    Failure::Unavailable
                } else if PG_CONTENTION.contains(&code) {
                    Failure::Contention
                } else {
                    Failure::Other
                }
            } else if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                let code = db
                    .code()
                    .and_then(|c| c.parse::<i32>().ok())
                    .unwrap_or_default();
                if matches!(code & 0xff, SQLITE_BUSY | SQLITE_LOCKED) {
                    Failure::Unavailable
                } else {
                    Failure::Other
                }
            } else {
                Failure::Other
            }
        }
        _ => Failure::Other,
    }
}

impl StoreError {
    fn of_failure(failure: Failure, error: anyhow::Error) -> Self {
        match failure {
            Failure::Unavailable => Self::Unavailable(error),
            Failure::Contention => Self::Contention(error),
            Failure::Other => Self::Unexpected(error),
        }
    }

    /// The same failure for another row of a batch that failed as a whole: of the same kind
    /// (every row's caller is answered alike), with its message.
    pub fn for_another_row(&self) -> Self {
        let failure = match self {
            Self::Unavailable(_) => Failure::Unavailable,
            Self::Contention(_) => Failure::Contention,
            _ => Failure::Other,
        };
        Self::of_failure(failure, anyhow::anyhow!("batch write failed: {self:#}"))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        Self::of_failure(failure_of(&e), e.into())
    }
}

/// An error from below the store keeps its kind: a database error anywhere in its chain
/// decides it.
impl From<anyhow::Error> for StoreError {
    fn from(e: anyhow::Error) -> Self {
        let failure = e
            .chain()
            .find_map(|c| c.downcast_ref::<sqlx::Error>())
            .map_or(Failure::Other, failure_of);
        Self::of_failure(failure, e)
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        match e {
            sqlx::migrate::MigrateError::Execute(e) => e.into(),
            e => Self::Unexpected(e.into()),
        }
    }
}

impl From<Refusal> for StoreError {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::SamePrincipal(rule) => Self::SamePrincipal(rule.action()),
            Refusal::Review(refused) => Self::Review(refused),
            Refusal::NotRetryable(_) => Self::Precondition {
                reason: "DISBURSEMENT_NOT_FAILED",
                message: refusal.to_string(),
            },
            Refusal::NotCancellable(_) => Self::Precondition {
                reason: "DISBURSEMENT_NOT_CANCELLABLE",
                message: refusal.to_string(),
            },
        }
    }
}

/// `work`'s answer, or a timed-out I/O error (a database out of reach) when it takes longer
/// than `limit`.
pub(crate) async fn within<T, E: From<std::io::Error>>(
    limit: Duration,
    work: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    tokio::time::timeout(limit, work)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into()))
}

/// Runs of a transaction the database rolls back for contention, the first included. Two
/// transactions that deadlock are both run again, after pauses of their own; three retries
/// see them apart in all but pathological contention.
pub const CONTENTION_ATTEMPTS: u32 = 4;

/// The pause before run `attempt + 1`: random within [5 ms, 10 ms) doubled per attempt, so
/// transactions that met do not meet again in step.
fn contention_pause(attempt: u32) -> Duration {
    let floor = 5_u64 << (attempt - 1).min(8);
    Duration::from_millis(rand::random_range(floor..floor * 2))
}

/// Runs `transaction` (a whole transaction: the call's request id taken, its rows, its
/// commit) until it ends other than by [`StoreError::Contention`], at most
/// [`CONTENTION_ATTEMPTS`] times; then the last `Contention` is returned.
pub async fn retry_contention<T, F, Fut>(what: &'static str, mut transaction: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut attempt = 1;
    loop {
        match transaction().await {
            Err(StoreError::Contention(e)) if attempt < CONTENTION_ATTEMPTS => {
                tracing::debug!(what, attempt, error = %e, "transaction rolled back for contention; running it again");
                tokio::time::sleep(contention_pause(attempt)).await;
                attempt += 1;
            }
            Err(StoreError::Contention(e)) => {
                tracing::warn!(what, attempts = attempt, error = %e, "transaction rolled back for contention every time it ran");
                return Err(StoreError::Contention(e));
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn io(kind: std::io::ErrorKind) -> sqlx::Error {
        sqlx::Error::Io(std::io::Error::from(kind))
    }

    #[test]
    fn connection_failures_are_unavailable_and_the_rest_unexpected() {
        for e in [
            sqlx::Error::PoolTimedOut,
            sqlx::Error::PoolClosed,
            sqlx::Error::WorkerCrashed,
            io(std::io::ErrorKind::ConnectionReset),
            io(std::io::ErrorKind::UnexpectedEof),
        ] {
            let text = e.to_string();
            assert!(
                matches!(StoreError::from(e), StoreError::Unavailable(_)),
                "{text}"
            );
        }
        for e in [
            sqlx::Error::RowNotFound,
            sqlx::Error::Protocol("unexpected message".into()),
            sqlx::Error::Decode("bad".into()),
        ] {
            let text = e.to_string();
            assert!(
                matches!(StoreError::from(e), StoreError::Unexpected(_)),
                "{text}"
            );
        }
    }

    #[test]
    fn a_database_error_keeps_its_kind_under_context() {
        let wrapped = anyhow::Error::from(sqlx::Error::PoolTimedOut).context("reading partners");
        assert!(matches!(
            StoreError::from(wrapped),
            StoreError::Unavailable(_)
        ));
        assert!(matches!(
            StoreError::from(anyhow::anyhow!("a bug")),
            StoreError::Unexpected(_)
        ));
    }

    #[test]
    fn every_row_of_a_failed_batch_fails_alike() {
        let down = StoreError::from(sqlx::Error::PoolTimedOut);
        assert!(matches!(down.for_another_row(), StoreError::Unavailable(_)));
        let contended = StoreError::Contention(anyhow::anyhow!("40P01"));
        assert!(matches!(
            contended.for_another_row(),
            StoreError::Contention(_)
        ));
        let bug = StoreError::Unexpected(anyhow::anyhow!("bug"));
        assert!(matches!(bug.for_another_row(), StoreError::Unexpected(_)));
        assert!(
            bug.for_another_row().to_string().contains("bug"),
            "the copy keeps the message"
        );
    }

    #[tokio::test]
    async fn contention_is_run_again_and_other_failures_are_not() {
        let runs = AtomicU32::new(0);
        let done = retry_contention("test", || async {
            if runs.fetch_add(1, Ordering::SeqCst) < 2 {
                Err(StoreError::Contention(anyhow::anyhow!("40001")))
            } else {
                Ok("stored")
            }
        })
        .await;
        assert_eq!(done.expect("third run succeeds"), "stored");
        assert_eq!(runs.load(Ordering::SeqCst), 3);

        let runs = AtomicU32::new(0);
        let given_up: Result<()> = retry_contention("test", || async {
            runs.fetch_add(1, Ordering::SeqCst);
            Err(StoreError::Contention(anyhow::anyhow!("40P01")))
        })
        .await;
        assert!(matches!(given_up, Err(StoreError::Contention(_))));
        assert_eq!(runs.load(Ordering::SeqCst), CONTENTION_ATTEMPTS);

        let runs = AtomicU32::new(0);
        let down: Result<()> = retry_contention("test", || async {
            runs.fetch_add(1, Ordering::SeqCst);
            Err(sqlx::Error::PoolTimedOut.into())
        })
        .await;
        assert!(matches!(down, Err(StoreError::Unavailable(_))));
        assert_eq!(runs.load(Ordering::SeqCst), 1, "unavailable is not retried");
    }
}
