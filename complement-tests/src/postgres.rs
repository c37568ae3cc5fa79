//! Throwaway Postgres databases for the Postgres variant of each test:
//! `CREATE DATABASE myelin_test_<pid>_<counter>_<random>` on the server named
//! by `MYELIN_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`), and `DROP DATABASE ... WITH
//! (FORCE)` when the test server goes away.

use anyhow::{anyhow, Context};
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

/// Where the admin connection goes when `MYELIN_TEST_DATABASE_URL` is unset.
pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The admin URL in force: `$MYELIN_TEST_DATABASE_URL` or
/// [`DEFAULT_ADMIN_URL`].
pub fn admin_url() -> String {
    std::env::var("MYELIN_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_owned())
}

/// A database created for one test server. Call [`drop_blocking`] to remove
/// it; the harness does so after the server process is dead.
///
/// [`drop_blocking`]: ThrowawayDatabase::drop_blocking
pub struct ThrowawayDatabase {
    admin_url: String,
    name: String,
    url: String,
}

impl ThrowawayDatabase {
    /// Connects to the admin URL and creates a fresh, uniquely named
    /// database.
    pub async fn create() -> anyhow::Result<ThrowawayDatabase> {
        let admin_url = admin_url();
        let name = unique_name();
        let client = connect(&admin_url).await?;
        client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .with_context(|| format!("CREATE DATABASE {name} on {admin_url}"))?;
        let mut url = reqwest::Url::parse(&admin_url).with_context(|| {
            format!("MYELIN_TEST_DATABASE_URL={admin_url} is not a postgres:// URL")
        })?;
        url.set_path(&format!("/{name}"));
        Ok(ThrowawayDatabase {
            admin_url,
            name,
            url: url.to_string(),
        })
    }

    /// The connection URL of the new database (the admin URL with its path
    /// replaced).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Drops the database, forcing out any connection still open. Blocks the
    /// calling thread (it runs its own small runtime on a helper thread, so it
    /// is safe to call from `Drop` inside a tokio runtime). Failures are
    /// reported on stderr, not raised: a leftover database must not fail a
    /// test that passed.
    pub fn drop_blocking(self) {
        let ThrowawayDatabase {
            admin_url, name, ..
        } = self;
        let worker = std::thread::spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(err) => return Err(anyhow!("building a runtime: {err}")),
            };
            runtime.block_on(async {
                let client = connect(&admin_url).await?;
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .await
                    .with_context(|| format!("DROP DATABASE {name}"))
            })
        });
        match worker.join() {
            Ok(Ok(())) => {}
            Ok(Err(err)) => eprintln!("warning: could not drop test database: {err:#}"),
            Err(_) => eprintln!("warning: the thread dropping the test database panicked"),
        }
    }
}

/// Opens an admin connection, with an error that says how to point the
/// tests at a Postgres server.
async fn connect(admin_url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let connecting = tokio_postgres::connect(admin_url, tokio_postgres::NoTls);
    let (client, connection) = tokio::time::timeout(Duration::from_secs(10), connecting)
        .await
        .map_err(|_| anyhow!("timed out"))
        .and_then(|result| result.map_err(anyhow::Error::from))
        .map_err(|err| {
            anyhow!(
                "cannot connect to Postgres at {admin_url}: {err:#}. The Postgres variant of every \
                 black-box test needs a server where this role may CREATE DATABASE: start one, or \
                 set MYELIN_TEST_DATABASE_URL to its admin URL, e.g. \
                 MYELIN_TEST_DATABASE_URL=postgres://postgres:secret@127.0.0.1:5432/postgres"
            )
        })?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            eprintln!("warning: Postgres admin connection: {err}");
        }
    });
    Ok(client)
}

/// `myelin_test_<pid>_<counter>_<random>`: unique across concurrent test
/// processes and reruns.
fn unique_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let counter = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    hasher.write_u64(counter);
    let random = hasher.finish() & 0xffff_ffff;
    format!(
        "myelin_test_{}_{}_{:08x}",
        std::process::id(),
        counter,
        random
    )
}
