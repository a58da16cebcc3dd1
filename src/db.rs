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
//! per commit for that too (about 7 fsyncs per order: measure first).

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
    /// unless a URL is given) and applies `schema`.
    pub async fn open(&self, file: &str, schema: &[&str]) -> Result<AnyPool, OpenError> {
        Ok(open(&self.url(file)?, self.sqlite_synchronous, schema).await?)
    }

    /// The URL to open: `--database-url`, or `<data-dir>/<file>` as SQLite.
    pub fn url(&self, file: &str) -> Result<String, std::io::Error> {
        match &self.database_url {
            Some(url) => Ok(url.clone()),
            None => {
                std::fs::create_dir_all(&self.data_dir)?;
                Ok(sqlite_url(&std::path::absolute(&self.data_dir)?.join(file)))
            }
        }
    }
}

/// The sqlx URL of a SQLite file, created on first open.
pub fn sqlite_url(path: &Path) -> String {
    format!("sqlite://{}?mode=rwc", path.display())
}

/// Opens a pool on `url` and applies `schema` (idempotent DDL, one statement
/// per entry).
pub async fn open(
    url: &str,
    synchronous: Synchronous,
    schema: &[&str],
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
    let sqlite = url.starts_with("sqlite:");
    let postgres = url.starts_with("postgres:") || url.starts_with("postgresql:");
    let pool = AnyPoolOptions::new()
        .max_connections(if sqlite { 4 } else { 8 })
        .acquire_timeout(Duration::from_secs(10))
        .after_connect(move |conn, _meta| {
            Box::pin(async move {
                if sqlite {
                    conn.execute(pragmas).await?;
                }
                Ok(())
            })
        })
        .connect(url)
        .await?;
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    if postgres {
        // Replicas starting together would race their CREATE ... IF NOT
        // EXISTS (PostgreSQL can fail one on pg_type's unique index):
        // take turns.
        tx.execute("SELECT pg_advisory_xact_lock(7205759403792793)")
            .await?;
    }
    for statement in schema {
        tx.execute(*statement).await?;
    }
    tx.commit().await?;
    Ok(pool)
}

/// The status a database error answers with: `UNAVAILABLE` when it may pass
/// (the pool or the connection), `INTERNAL` otherwise. Logged here, once.
pub fn status(error: &sqlx::Error, what: &str) -> tonic::Status {
    tracing::error!(%error, "{what} database error");
    match error {
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
            tonic::Status::unavailable(format!(
                "the {what} database is unavailable; retry with the same idempotency key"
            ))
        }
        _ => tonic::Status::internal(format!("{what} database error")),
    }
}
