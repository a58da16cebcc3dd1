//! Opening a service's database: SQLite in a data directory by default, or
//! PostgreSQL by URL when scaled out. One code path serves both (sqlx's
//! `Any` driver, `$n` placeholders, portable SQL); the service tests run
//! against each.
//!
//! SQLite runs in WAL mode with a busy timeout, so writers from several
//! connections or processes queue instead of failing. With the default
//! `synchronous=NORMAL` a committed write is in the WAL before the call
//! returns and survives `kill -9` of the process; only an OS crash or power
//! loss can take the last commits. `--sqlite-synchronous full` adds an fsync
//! per commit for that too (payment commits twice per order; the barista
//! commits its writes in batches: measure first).

use std::path::Path;
use std::time::Duration;

use sqlx::AnyPool;
use sqlx::any::AnyPoolOptions;
use sqlx::{Connection, Executor};

/// Database flags every stateful service takes.
#[derive(Debug, Clone, clap::Args)]
pub struct DatabaseArgs {
    /// Directory for the embedded SQLite database (created if missing).
    #[arg(long, env = "BREWMESH_DATA_DIR", default_value = ".brewmesh")]
    pub data_dir: std::path::PathBuf,

    /// Database URL; overrides --data-dir: `postgres://user@host/db` when
    /// scaled out, or `sqlite:///var/lib/x.db`.
    #[arg(long, env = "BREWMESH_DATABASE_URL")]
    pub database_url: Option<String>,

    /// SQLite durability: `normal` survives a killed process, `full` also
    /// an OS crash or power loss, at an fsync per commit.
    #[arg(long, env = "BREWMESH_SQLITE_SYNCHRONOUS", default_value = "normal")]
    pub sqlite_synchronous: Synchronous,
}

/// SQLite's `synchronous` setting in WAL mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Synchronous {
    /// Commits survive a killed process.
    #[default]
    Normal,
    /// Commits also survive an OS crash or power loss.
    Full,
}

/// Why a database could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The data directory could not be created.
    #[error("preparing the data directory")]
    DataDir(#[from] std::io::Error),
    /// The database could not be opened or its schema applied.
    #[error("opening the database")]
    Database(#[from] sqlx::Error),
}

impl DatabaseArgs {
    /// Opens the database these flags name (`file` in the data directory
    /// unless a URL is given) and applies the `migrations` it lacks.
    pub async fn open(&self, file: &str, migrations: &[Migration]) -> Result<AnyPool, OpenError> {
        Ok(open(&self.url(file)?, self.sqlite_synchronous, migrations).await?)
    }

    /// Whether these flags name SQLite (the data directory, or a `sqlite:`
    /// URL).
    pub fn is_sqlite(&self) -> bool {
        self.database_url.as_deref().is_none_or(is_sqlite_url)
    }

    /// The URL to open: `--database-url`, or `<data-dir>/<file>` as SQLite.
    pub fn url(&self, file: &str) -> Result<String, std::io::Error> {
        match &self.database_url {
            Some(url) => Ok(url.clone()),
            None => {
                std::fs::create_dir_all(&self.data_dir)?;
                let path = std::path::absolute(&self.data_dir)?.join(file);
                if let Err(error) = keep_private(&self.data_dir, &path) {
                    // A mounted volume's root may not be ours to change.
                    tracing::warn!(dir = %self.data_dir.display(), %error, "the data could not be made private to this user");
                }
                Ok(sqlite_url(&path))
            }
        }
    }
}

/// The data directory readable by its owner only (0700), and the database
/// file 0600, made so before SQLite opens it: SQLite gives its `-wal` and
/// `-shm` files the database's mode. Orders, names and payments are nobody
/// else's to read.
fn keep_private(dir: &Path, file: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(file)?;
    std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600))
}

/// `$first, $first+1, …`: `count` placeholders, for an `IN (…)` list.
pub fn placeholders(first: usize, count: usize) -> String {
    (first..first + count)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `($first, …), (…)`: `rows` rows of `columns` placeholders numbered from
/// `first`, for a multi-row `VALUES`.
pub fn rows(rows: usize, columns: usize, first: usize) -> String {
    (0..rows)
        .map(|r| format!("({})", placeholders(first + r * columns, columns)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The sqlx URL of a SQLite file, created on first open.
pub fn sqlite_url(path: &Path) -> String {
    format!("sqlite://{}?mode=rwc", path.display())
}

/// Whether `url` names a SQLite database.
pub fn is_sqlite_url(url: &str) -> bool {
    url.starts_with("sqlite:")
}

/// One schema migration: statements applied together, once. A service's
/// migrations are a list; the n-th (from 1) is schema version n. Append new
/// ones, never edit an old one.
pub type Migration = &'static [&'static str];

/// Set on every PostgreSQL connection (see [`open`]): a session idle inside
/// a transaction for 2 s is ended by the server, a lock waited for 3 s is
/// given up.
pub const POSTGRES_SESSION: &str =
    "SET idle_in_transaction_session_timeout = '2s'; SET lock_timeout = '3s'";

/// Opens a pool on `url` and brings the schema up to date: every migration
/// after the version recorded in `schema_migrations` is applied, in order,
/// in one transaction. A database whose version is newer than the binary's
/// last migration is refused (an older binary must not write a newer
/// schema).
pub async fn open(
    url: &str,
    synchronous: Synchronous,
    migrations: &[Migration],
) -> Result<AnyPool, sqlx::Error> {
    let pragmas = match synchronous {
        Synchronous::Normal => {
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON;"
        }
        Synchronous::Full => {
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON;"
        }
    };
    sqlx::any::install_default_drivers();
    let sqlite = is_sqlite_url(url);
    let postgres = url.starts_with("postgres:") || url.starts_with("postgresql:");
    // SQLite has one writer: with several connections, writers wait on
    // each other in SQLite's busy handler (sleeps), and under a burst of
    // orders the pool ran out of time (UNAVAILABLE). One connection queues
    // them in the pool instead: more orders/s for less CPU per order
    // (BENCHMARKS.md, CPU per order). Other processes on the same file
    // (replicas) still meet in the busy handler.
    let pool = AnyPoolOptions::new()
        .max_connections(if sqlite { 1 } else { 8 })
        .acquire_timeout(Duration::from_secs(10))
        // A ping before every acquire is one more round trip to the
        // connection per transaction; a broken connection fails its query.
        .test_before_acquire(false)
        .after_connect(move |conn, _meta| {
            Box::pin(async move {
                if sqlite {
                    conn.execute(pragmas).await?;
                }
                if postgres {
                    // A process paused inside a transaction (SIGSTOP, a
                    // hung VM) must not hold its row locks over everyone:
                    // the server ends its session, and a statement waiting
                    // on a lock gives up (lock_not_available: UNAVAILABLE,
                    // retried) instead of waiting for ever.
                    conn.execute(POSTGRES_SESSION).await?;
                }
                Ok(())
            })
        })
        .connect(url)
        .await?;
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    if postgres {
        // Replicas starting together migrate one at a time (PostgreSQL
        // can also fail concurrent CREATE ... IF NOT EXISTS on pg_type).
        // However long the other replica's migration takes.
        tx.execute("SET LOCAL lock_timeout = 0").await?;
        tx.execute("SELECT pg_advisory_xact_lock(7205759403792793)")
            .await?;
    }
    // A write first: on SQLite it takes the write lock for the whole
    // migration, so two processes cannot both see the same old version.
    tx.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_time BIGINT NOT NULL)",
    )
    .await?;
    let current: i64 =
        sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
            .fetch_one(&mut *tx)
            .await?;
    let latest = i64::try_from(migrations.len()).unwrap_or(i64::MAX);
    if current > latest {
        return Err(sqlx::Error::Configuration(
            format!(
                "the database schema is at version {current}, newer than this binary's {latest}"
            )
            .into(),
        ));
    }
    for (version, migration) in (1..)
        .zip(migrations.iter())
        .skip(usize::try_from(current).unwrap_or(0))
    {
        for statement in *migration {
            tx.execute(*statement).await?;
        }
        sqlx::query("INSERT INTO schema_migrations (version, applied_time) VALUES ($1, $2)")
            .bind(version)
            .bind(crate::time::now_micros())
            .execute(&mut *tx)
            .await?;
        tracing::info!(version, "applied schema migration");
    }
    tx.commit().await?;
    Ok(pool)
}

/// The status a database error answers with: `UNAVAILABLE` when it may pass
/// ([`is_transient`]), `DATA_LOSS` for a stored value this binary cannot
/// read, `INTERNAL` otherwise. Logged here, once.
pub fn status(error: &sqlx::Error, what: &str) -> tonic::Status {
    tracing::error!(%error, "{what} database error");
    if is_transient(error) {
        return tonic::Status::unavailable(format!(
            "the {what} database is unavailable; retry with the same idempotency key"
        ));
    }
    match error {
        sqlx::Error::Decode(_) | sqlx::Error::ColumnDecode { .. } => {
            tonic::Status::data_loss(format!("a stored {what} record cannot be read"))
        }
        _ => tonic::Status::internal(format!("{what} database error")),
    }
}

/// Whether `error` may pass if the call is tried again: the pool or the
/// connection gave out, SQLite stayed busy or locked past its busy timeout
/// (another process holds the write lock), or PostgreSQL refused for now
/// (serialization failure, deadlock, lock not available, too many
/// connections, shutting down).
pub fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => true,
        sqlx::Error::Database(database) => {
            let code = database.code();
            let code = code.as_deref().unwrap_or_default();
            // SQLite: the primary result code is the low byte of the
            // extended one (SQLITE_BUSY_SNAPSHOT is 517).
            let sqlite = code.parse::<u32>().is_ok_and(|c| matches!(c & 0xff, 5 | 6));
            // Serialization failure, deadlock, lock not available, too
            // many connections, shutting down, a session ended for idling
            // in its transaction (this process was paused), a cancelled
            // statement, and every connection exception (class 08).
            let postgres = matches!(
                code,
                "40001"
                    | "40P01"
                    | "55P03"
                    | "53300"
                    | "57P01"
                    | "57P02"
                    | "57P03"
                    | "25P03"
                    | "57014"
            ) || code.starts_with("08");
            sqlite || postgres
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn placeholders_number_rows_of_values_in_turn() {
        assert_eq!(super::placeholders(3, 2), "$3, $4");
        assert_eq!(super::rows(2, 3, 2), "($2, $3, $4), ($5, $6, $7)");
    }

    use super::*;

    /// On PostgreSQL (when the suite runs against one), every pooled
    /// session ends an idle transaction and gives up a lock wait.
    #[tokio::test]
    async fn postgres_sessions_bound_idle_transactions_and_lock_waits() {
        let Ok(server) = std::env::var("BREWMESH_TEST_POSTGRES_URL") else {
            return;
        };
        let url = format!("{}/postgres", server.trim_end_matches('/'));
        let pool = open(&url, Synchronous::Normal, &[]).await.unwrap();
        let lock: String = sqlx::query_scalar("SELECT current_setting('lock_timeout')")
            .fetch_one(&pool)
            .await
            .unwrap();
        let idle: String =
            sqlx::query_scalar("SELECT current_setting('idle_in_transaction_session_timeout')")
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!((lock.as_str(), idle.as_str()), ("3s", "2s"));
    }

    /// On PostgreSQL over TLS (`scripts/postgres.sh` turns it on), a URL
    /// with `sslmode=verify-full` and the server's CA gets an encrypted
    /// session; one trusting another CA is refused before it logs in.
    #[tokio::test]
    async fn postgres_over_tls_checks_the_servers_certificate() {
        let (Ok(server), Ok(ca)) = (
            std::env::var("BREWMESH_TEST_POSTGRES_URL"),
            std::env::var("BREWMESH_TEST_POSTGRES_CA"),
        ) else {
            return;
        };
        let url = |ca: &str| {
            format!(
                "{}/postgres?sslmode=verify-full&sslrootcert={ca}",
                server.trim_end_matches('/')
            )
        };
        let pool = open(&url(&ca), Synchronous::Normal, &[]).await.unwrap();
        let ssl: bool =
            sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                .fetch_one(&pool)
                .await
                .unwrap();
        assert!(ssl, "the session is encrypted");
        let dir = tempfile::tempdir().unwrap();
        let other = dir.path().join("other-ca.crt");
        let authority = crate::mtls::Authority::create().unwrap();
        std::fs::write(&other, authority.certificate_pem()).unwrap();
        let refused = open(&url(&other.display().to_string()), Synchronous::Normal, &[]).await;
        assert!(refused.is_err(), "a server the CA did not sign is refused");
    }

    /// Another connection holds the write lock past the busy timeout: a
    /// write fails, and its status is UNAVAILABLE (retry), not INTERNAL.
    #[tokio::test]
    async fn a_database_locked_by_another_writer_is_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let url = sqlite_url(&dir.path().join("t.db"));
        let pool = open(&url, Synchronous::Normal, &[V1]).await.unwrap();
        let mut holder = sqlx::AnyConnection::connect(&url).await.unwrap();
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut holder)
            .await
            .unwrap();
        let mut conn = pool.acquire().await.unwrap();
        sqlx::query("PRAGMA busy_timeout = 50")
            .execute(&mut *conn)
            .await
            .unwrap();
        let error = sqlx::query("INSERT INTO t (a) VALUES (1)")
            .execute(&mut *conn)
            .await
            .unwrap_err();
        assert!(is_transient(&error), "{error:?}");
        assert_eq!(status(&error, "test").code(), tonic::Code::Unavailable);
        drop(conn);
        sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    }

    const V1: Migration = &["CREATE TABLE t (a BIGINT NOT NULL)"];
    const V2: Migration = &["ALTER TABLE t ADD COLUMN b TEXT NOT NULL DEFAULT ''"];

    #[tokio::test]
    async fn the_data_directory_and_its_files_are_the_owner_s_alone() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let args = DatabaseArgs {
            data_dir: dir.path().join("data"),
            database_url: None,
            sqlite_synchronous: Synchronous::Normal,
        };
        let pool = args
            .open("x.db", &[&["CREATE TABLE t (n INTEGER)"]])
            .await
            .unwrap();
        sqlx::query("INSERT INTO t (n) VALUES (1)")
            .execute(&pool)
            .await
            .unwrap();
        let mode = |name: &str| {
            let path = args.data_dir.join(name);
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777
        };
        assert_eq!(mode(""), 0o700);
        for file in ["x.db", "x.db-wal", "x.db-shm"] {
            assert_eq!(mode(file), 0o600, "{file}");
        }
    }

    #[tokio::test]
    async fn migrations_apply_once_in_order_and_a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let url = sqlite_url(&dir.path().join("t.db"));
        open(&url, Synchronous::Normal, &[V1]).await.unwrap();
        // Reopening applies only what is new; V1 again would fail (no IF NOT EXISTS).
        let pool = open(&url, Synchronous::Normal, &[V1, V2]).await.unwrap();
        sqlx::query("INSERT INTO t (a, b) VALUES (1, 'x')")
            .execute(&pool)
            .await
            .unwrap();
        let versions: Vec<i64> =
            sqlx::query_scalar("SELECT version FROM schema_migrations ORDER BY version")
                .fetch_all(&pool)
                .await
                .unwrap();
        assert_eq!(versions, [1, 2]);
        let error = open(&url, Synchronous::Normal, &[V1]).await.unwrap_err();
        assert!(
            error.to_string().contains("newer than this binary"),
            "{error}"
        );
    }
}
