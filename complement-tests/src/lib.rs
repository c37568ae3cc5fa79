//! Black-box test harness for Myelin: starts the real `myelin` binary on a
//! random port against a throwaway SQLite or Postgres database and talks to it
//! only over HTTP, the way a Matrix client would.
//!
//! The pieces:
//!
//! - [`server`]: finding or building the binary, starting it with the
//!   environment contract below, waiting for it to answer, and killing it
//!   (and dropping its database) on drop.
//!   [`TestServer::start_federating`] starts one that also serves the
//!   Server-Server API on its own HTTPS port, for federation tests.
//! - [`synapse`]: one real Synapse (installed from PyPI into a cached
//!   virtualenv on first use) on loopback, to federate with; driven through
//!   the same [`Client`].
//! - [`postgres`]: creating and dropping a throwaway Postgres database.
//! - [`client`]: a small typed client-server API client ([`Client`]) plus
//!   assertion helpers for Matrix error bodies; public so that other tools
//!   (such as the bench binary) can reuse it.
//! - [`backend_tests!`]: turns each listed `async fn` into a `#[tokio::test]`
//!   per storage backend; [`run_backend_test`] is what those tests call.
//! - [`e2ee`]: end-to-end-encryption key material for the E2EE tests and
//!   `e2ee-bench`: ed25519 key pairs, signed device, one-time, fallback and
//!   cross-signing keys.
//! - [`bench`]: the statistics the benchmark programs (`src/bin/`) print.
//! - [`eventually`]: a bounded poll for effects a server may apply in the
//!   background.
//! - [`ws`]: a client of the WebSocket sync extension (tests and `ws-bench`).
//! - [`federation`]: what the federation tests share: two-server scenarios
//!   ([`pair_tests!`]), waits for what another server delivers, and
//!   [`Peer`], which acts as a test server with its own signing key (signed
//!   requests, transactions and events).
//!
//! # How the server is started
//!
//! - Binary: `$MYELIN_BIN` if set; otherwise `cargo build -p myelin --bin
//!   myelin` is run once per test process (with `$CARGO`, else `cargo`, in
//!   the workspace directory, honouring `CARGO_TARGET_DIR`) and the
//!   executable cargo reports is used (`--release` when the harness itself
//!   is a release build, as the benchmark programs are). Running cargo from inside `cargo
//!   test` is fine: cargo releases its build-directory lock before it runs
//!   the test binaries.
//! - Environment: `MYELIN_SERVER_NAME=localhost:<port>`,
//!   `MYELIN_CLIENT_LISTEN=127.0.0.1:<port>`, `MYELIN_DATA_DIR=<tempdir>`,
//!   `MYELIN_REGISTRATION=open`, `MYELIN_DATABASE_URL=<url>`,
//!   `MYELIN_LOG=warn`; no arguments.
//! - Federating servers ([`TestServer::start_federating`]) get a second
//!   port and `MYELIN_SERVER_NAME=127.0.0.1:<fed port>`,
//!   `MYELIN_FEDERATION_LISTEN=127.0.0.1:<fed port>`,
//!   `MYELIN_FEDERATION_VERIFY_TLS=false`,
//!   `MYELIN_FEDERATION_ALLOW_PRIVATE_ADDRESSES=true`.
//! - Postgres admin URL: `$MYELIN_TEST_DATABASE_URL`, default
//!   `postgres://postgres@127.0.0.1:5432/postgres`.

pub mod bench;
pub mod client;
pub mod e2ee;
pub mod federation;
pub mod postgres;
pub mod server;
pub mod synapse;
pub mod ws;

pub use client::{
    assert_error, assert_status, enc, ok, query, state_path, success, unique_txn_id, Client,
    Response, CLIENT_V3,
};
pub use federation::Peer;
pub use server::{Backend, TestServer};
pub use synapse::{insecure_https_client, Synapse};

use futures::FutureExt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

/// Bounded poll for effects the spec lets a server apply asynchronously
/// (membership changes after a profile update or a deactivation): calls
/// `attempt` every 100 ms until it yields `Some`, for at most `within`.
/// Errors from `attempt` end the poll at once.
pub async fn eventually<T, F, Fut>(
    what: &str,
    within: Duration,
    mut attempt: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = attempt().await? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            anyhow::bail!("{what}: not true within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs one black-box test body against a fresh server on `backend`.
///
/// The body gets its own handle to the server (handles are cheap clones of
/// one running process). If the body returns an error or panics, the tail of
/// the server's log is printed before the test fails, so a failure shows
/// both sides.
pub async fn run_backend_test<F, Fut>(backend: Backend, body: F)
where
    F: FnOnce(TestServer) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    run_backend_test_with(backend, &[], body).await
}

/// [`run_backend_test`] on a server started with extra or overridden
/// environment variables (see [`TestServer::start_with`]).
pub async fn run_backend_test_with<F, Fut>(backend: Backend, env: &[(&str, &str)], body: F)
where
    F: FnOnce(TestServer) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let server = match TestServer::start_with(backend, env).await {
        Ok(server) => server,
        Err(err) => panic!("could not start myelin ({backend:?}): {err:#}"),
    };
    let outcome = AssertUnwindSafe(body(server.clone())).catch_unwind().await;
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(err)) => {
            server.print_log_tail();
            panic!("test failed on {backend:?}: {err:?}");
        }
        Err(panic) => {
            server.print_log_tail();
            eprintln!("test panicked on {backend:?}");
            std::panic::resume_unwind(panic);
        }
    }
}

/// Declares black-box tests that run once per storage backend.
///
/// Write each test as a plain `async fn name(server: TestServer) ->
/// anyhow::Result<()>` (so rustfmt and the compiler see it as ordinary
/// code), then list the functions:
///
/// ```ignore
/// async fn whoami_works(server: TestServer) -> anyhow::Result<()> {
///     let alice = server.register("alice", "pw").await?;
///     // ...
///     Ok(())
/// }
///
/// backend_tests!(whoami_works);
/// ```
///
/// For each function `name` this generates a module `name` holding two
/// `#[tokio::test]`s, `name::sqlite` and `name::postgres`, each starting a
/// fresh server on that backend. `cargo test name` runs both; `cargo test
/// sqlite` runs every SQLite variant. A test function left out of the list
/// is dead code, which `clippy -D warnings` reports. The test crate must
/// depend on `tokio` (this crate does).
///
/// To start the servers with extra or overridden environment variables,
/// put them first:
///
/// ```ignore
/// backend_tests!(env = [("MYELIN_REGISTRATION", "token")]; token_registration);
/// ```
#[macro_export]
macro_rules! backend_tests {
    (env = $env:expr; $($name:ident),+ $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                $crate::run_backend_test_with($crate::Backend::Sqlite, &$env, super::$name)
                    .await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                $crate::run_backend_test_with($crate::Backend::Postgres, &$env, super::$name)
                    .await;
            }
        }
    )+};
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                $crate::run_backend_test($crate::Backend::Sqlite, super::$name).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                $crate::run_backend_test($crate::Backend::Postgres, super::$name).await;
            }
        }
    )+};
}
