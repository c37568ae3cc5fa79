//! One running `myelin` process per test: finding (or building) the binary,
//! starting it with the environment contract on a free port against a fresh
//! data directory and database, waiting until it answers
//! `GET /_matrix/client/versions`, and tearing everything down on drop.
//!
//! For operations tests it can also start a server with extra or overridden
//! `MYELIN_*` variables ([`TestServer::start_with`]), run the same binary as
//! an admin CLI against the same configuration ([`TestServer::cli_command`],
//! [`TestServer::run_cli`]), stop the process with SIGTERM and collect its
//! exit status ([`TestServer::stop`]), and start a new process on the same
//! data directory, database and port ([`TestServer::restart`]).
//!
//! For federation tests, [`TestServer::start_federating`] starts a server
//! that also serves the Server-Server API: it gets two ports, a plain HTTP
//! client listener and an HTTPS federation listener (self-signed), and the
//! server name `127.0.0.1:<federation port>`, so that other servers on
//! loopback reach it by name with no well-known or SRV lookup. It sets
//!
//! - `MYELIN_SERVER_NAME=127.0.0.1:<federation port>`,
//! - `MYELIN_FEDERATION_LISTEN=127.0.0.1:<federation port>`,
//! - `MYELIN_FEDERATION_VERIFY_TLS=false` (peers' certificates are
//!   self-signed too), and
//! - `MYELIN_FEDERATION_ALLOW_PRIVATE_ADDRESSES=true` (peers are on
//!   loopback),
//!
//! on top of the usual variables. [`TestServer::stop`] and
//! [`TestServer::restart`] keep both ports, the data directory and the
//! database, so a test can take a server offline and bring it back under the
//! same name.

use crate::client::Client;
use crate::postgres::ThrowawayDatabase;
use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a freshly started server may take to answer `/versions`.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// How many times a server that exits during start-up (for example because
/// another process grabbed its port first) is tried again.
const START_ATTEMPTS: usize = 3;

/// Which storage backend a [`TestServer`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `sqlite://<data dir>/myelin.db`.
    Sqlite,
    /// A throwaway database on the Postgres named by
    /// `MYELIN_TEST_DATABASE_URL`.
    Postgres,
}

/// A running `myelin` process. Cloning gives another handle to the same
/// process; the process is killed (and its Postgres database dropped) when
/// the last handle goes.
#[derive(Clone)]
pub struct TestServer {
    inner: Arc<Inner>,
}

struct Inner {
    base_url: String,
    server_name: String,
    /// `https://127.0.0.1:<port>` for a federating server.
    federation_url: Option<String>,
    backend: Backend,
    http: reqwest::Client,
    log_path: PathBuf,
    binary: PathBuf,
    /// Every variable the process is started with, overrides applied.
    env: Vec<(String, String)>,
    database_url: String,
    child: Mutex<Option<Child>>,
    database: Mutex<Option<ThrowawayDatabase>>,
    // Declared last so it is removed after the process is dead.
    data_dir: tempfile::TempDir,
}

impl TestServer {
    /// Starts a fresh server on `backend` and waits until it serves
    /// `/versions`.
    pub async fn start(backend: Backend) -> anyhow::Result<TestServer> {
        Self::start_with(backend, &[]).await
    }

    /// Like [`start`](TestServer::start), with extra environment variables:
    /// each `(name, value)` replaces the harness's value for `name` (for
    /// example `("MYELIN_REGISTRATION", "token")`) or is added. The same
    /// variables are used by [`restart`](TestServer::restart) and
    /// [`cli_command`](TestServer::cli_command).
    pub async fn start_with(
        backend: Backend,
        overrides: &[(&str, &str)],
    ) -> anyhow::Result<TestServer> {
        Self::start_retrying(backend, None, overrides).await
    }

    /// Starts a fresh server on `backend` that federates: a plain HTTP
    /// client listener on one free port and an HTTPS federation listener on
    /// another, with the server name `127.0.0.1:<federation port>` and
    /// outbound federation allowed to loopback without certificate checks
    /// (see the module documentation for the exact variables). `overrides`
    /// work as in [`start_with`](TestServer::start_with). Waits until the
    /// client API serves `/versions`.
    pub async fn start_federating(
        backend: Backend,
        overrides: &[(&str, &str)],
    ) -> anyhow::Result<TestServer> {
        Self::start_retrying(backend, Some("127.0.0.1"), overrides).await
    }

    /// Like [`start_federating`](TestServer::start_federating), but named
    /// `<host>:<federation port>` (e.g. `localhost`, which also resolves to
    /// loopback): for tests that need servers whose host parts differ, such
    /// as server ACLs, which match host names without ports.
    pub async fn start_federating_as(
        backend: Backend,
        host: &str,
        overrides: &[(&str, &str)],
    ) -> anyhow::Result<TestServer> {
        Self::start_retrying(backend, Some(host), overrides).await
    }

    async fn start_retrying(
        backend: Backend,
        federation_host: Option<&str>,
        overrides: &[(&str, &str)],
    ) -> anyhow::Result<TestServer> {
        let binary = myelin_binary()?;
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            match Self::start_once(&binary, backend, federation_host, overrides).await {
                Ok(server) => return Ok(server),
                Err(StartError::Fatal(err)) => return Err(err),
                Err(StartError::ExitedEarly(err)) => last_error = Some(err),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow!("server did not start")))
    }

    async fn start_once(
        binary: &Path,
        backend: Backend,
        federation_host: Option<&str>,
        overrides: &[(&str, &str)],
    ) -> Result<TestServer, StartError> {
        let data_dir = tempfile::Builder::new()
            .prefix("myelin-test-")
            .tempdir()
            .context("creating the data directory")
            .map_err(StartError::Fatal)?;
        let port = free_port().map_err(StartError::Fatal)?;
        let federation_port = if federation_host.is_some() {
            Some(free_port_other_than(port).map_err(StartError::Fatal)?)
        } else {
            None
        };
        let server_name = match (federation_host, federation_port) {
            (Some(host), Some(fed_port)) => format!("{host}:{fed_port}"),
            _ => format!("localhost:{port}"),
        };
        let federation_url =
            federation_port.map(|fed_port| format!("https://127.0.0.1:{fed_port}"));
        let base_url = format!("http://127.0.0.1:{port}");
        let log_path = data_dir.path().join("myelin.log");

        let database = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(
                ThrowawayDatabase::create()
                    .await
                    .map_err(StartError::Fatal)?,
            ),
        };
        let database_url = match &database {
            Some(db) => db.url().to_owned(),
            None => format!("sqlite://{}", data_dir.path().join("myelin.db").display()),
        };

        let mut env: Vec<(String, String)> = vec![
            ("MYELIN_SERVER_NAME".into(), server_name.clone()),
            ("MYELIN_CLIENT_LISTEN".into(), format!("127.0.0.1:{port}")),
            (
                "MYELIN_DATA_DIR".into(),
                data_dir.path().display().to_string(),
            ),
            ("MYELIN_REGISTRATION".into(), "open".into()),
            ("MYELIN_DATABASE_URL".into(), database_url.clone()),
            ("MYELIN_LOG".into(), "warn".into()),
        ];
        if let Some(fed_port) = federation_port {
            env.extend([
                (
                    "MYELIN_FEDERATION_LISTEN".into(),
                    format!("127.0.0.1:{fed_port}"),
                ),
                ("MYELIN_FEDERATION_VERIFY_TLS".into(), "false".into()),
                (
                    "MYELIN_FEDERATION_ALLOW_PRIVATE_ADDRESSES".into(),
                    "true".into(),
                ),
            ]);
        }
        for (name, value) in overrides {
            match env.iter_mut().find(|(existing, _)| existing == name) {
                Some(slot) => slot.1 = (*value).to_owned(),
                None => env.push(((*name).to_owned(), (*value).to_owned())),
            }
        }

        let log = File::create(&log_path)
            .context("creating the server log")
            .map_err(StartError::Fatal)?;
        let child = spawn_server(binary, &env, log).map_err(StartError::Fatal)?;

        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .context("building the HTTP client")
            .map_err(StartError::Fatal)?;
        let server = TestServer {
            inner: Arc::new(Inner {
                base_url,
                server_name,
                federation_url,
                backend,
                http,
                log_path,
                binary: binary.to_owned(),
                env,
                database_url,
                child: Mutex::new(Some(child)),
                database: Mutex::new(database),
                data_dir,
            }),
        };
        server.wait_until_ready().await?;
        Ok(server)
    }

    async fn wait_until_ready(&self) -> Result<(), StartError> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let url = format!("{}/_matrix/client/versions", self.inner.base_url);
        loop {
            if let Some(status) = self.exit_status() {
                return Err(StartError::ExitedEarly(anyhow!(
                    "myelin exited during start-up with {status}; its log:\n{}",
                    self.log_tail(200)
                )));
            }
            let attempt = self
                .inner
                .http
                .get(&url)
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            if let Ok(response) = attempt {
                if response.status() == reqwest::StatusCode::OK {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(StartError::Fatal(anyhow!(
                    "myelin did not answer 200 on {url} within {STARTUP_TIMEOUT:?}; its log:\n{}",
                    self.log_tail(200)
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn exit_status(&self) -> Option<std::process::ExitStatus> {
        let mut child = self.inner.child.lock().ok()?;
        child.as_mut()?.try_wait().ok().flatten()
    }

    /// The process ID of the running server, or `None` once it has been
    /// stopped.
    pub fn pid(&self) -> Option<u32> {
        let child = self.inner.child.lock().ok()?;
        child.as_ref().map(Child::id)
    }

    /// The server's data directory (`MYELIN_DATA_DIR`).
    pub fn data_dir(&self) -> &Path {
        self.inner.data_dir.path()
    }

    /// The database URL the server was started with (`MYELIN_DATABASE_URL`).
    pub fn database_url(&self) -> &str {
        &self.inner.database_url
    }

    /// The `myelin` executable the server runs.
    pub fn binary(&self) -> &Path {
        &self.inner.binary
    }

    /// The environment the server was started with, overrides applied.
    pub fn env(&self) -> &[(String, String)] {
        &self.inner.env
    }

    /// A command for the same binary with the same `MYELIN_*` environment
    /// (so the same data directory and database) and stdin closed; add the
    /// arguments, e.g. `["user", "create", "carol", "--password", "pw"]`.
    pub fn cli_command(&self) -> Command {
        let mut command = Command::new(&self.inner.binary);
        command.envs(self.inner.env.iter().map(|(k, v)| (k, v)));
        command.stdin(Stdio::null());
        command
    }

    /// Runs [`cli_command`](TestServer::cli_command) with `args` to
    /// completion (at most 60 s) and returns its exit status and captured
    /// output.
    pub async fn run_cli(&self, args: &[&str]) -> anyhow::Result<Output> {
        let mut command = tokio::process::Command::from(self.cli_command());
        command.args(args).kill_on_drop(true);
        tokio::time::timeout(Duration::from_secs(60), command.output())
            .await
            .map_err(|_| anyhow!("myelin {args:?} did not finish within 60 s"))?
            .with_context(|| format!("running myelin {args:?}"))
    }

    /// Sends SIGTERM to the server process (it should shut down gracefully).
    /// Does nothing once the process has been stopped.
    pub fn terminate(&self) -> anyhow::Result<()> {
        let Some(pid) = self.pid() else {
            return Ok(());
        };
        let pid = libc::pid_t::try_from(pid).context("pid out of range")?;
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our
        // own child, which is not reaped until `wait_for_exit` or drop.
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            bail!("kill({pid}, SIGTERM): {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits up to `within` for the server process to exit and returns its
    /// status; the process is then forgotten (so [`pid`](TestServer::pid)
    /// is `None` and drop has nothing to kill). Errors if it is still
    /// running after `within` (drop will then kill it).
    pub async fn wait_for_exit(&self, within: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            {
                let mut slot = self
                    .inner
                    .child
                    .lock()
                    .map_err(|_| anyhow!("child lock poisoned"))?;
                let child = slot.as_mut().context("the server process is not running")?;
                if let Some(status) = child.try_wait().context("waiting for myelin")? {
                    slot.take();
                    return Ok(status);
                }
            }
            if Instant::now() > deadline {
                bail!("myelin did not exit within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then [`wait_for_exit`](TestServer::wait_for_exit).
    pub async fn stop(&self, within: Duration) -> anyhow::Result<ExitStatus> {
        self.terminate()?;
        self.wait_for_exit(within).await
    }

    /// Starts a new server process on the same data directory, database,
    /// port(s) and environment, stopping the current one first (SIGTERM, at
    /// most 10 s) if it still runs, and waits until it answers. Its output
    /// is appended to the same log. After [`stop`](TestServer::stop) this
    /// is how a stopped server is started again (a federating server keeps
    /// its server name and federation port).
    pub async fn restart(&self) -> anyhow::Result<()> {
        if self.pid().is_some() {
            let status = self.stop(Duration::from_secs(10)).await?;
            if !status.success() {
                bail!("myelin exited with {status} when stopped for a restart");
            }
        }
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            let log = OpenOptions::new()
                .append(true)
                .create(true)
                .open(&self.inner.log_path)
                .context("opening the server log")?;
            let child = spawn_server(&self.inner.binary, &self.inner.env, log)?;
            *self
                .inner
                .child
                .lock()
                .map_err(|_| anyhow!("child lock poisoned"))? = Some(child);
            match self.wait_until_ready().await {
                Ok(()) => return Ok(()),
                Err(StartError::Fatal(err)) => return Err(err),
                Err(StartError::ExitedEarly(err)) => {
                    // The port may be briefly taken; the process is dead.
                    self.inner.child.lock().ok().and_then(|mut c| c.take());
                    last_error = Some(err);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow!("server did not restart")))
    }

    /// `http://127.0.0.1:<port>`, no trailing slash.
    pub fn base_url(&self) -> &str {
        &self.inner.base_url
    }

    /// The server name the server was started with: `localhost:<port>`, or
    /// `127.0.0.1:<federation port>` for a federating server.
    pub fn server_name(&self) -> &str {
        &self.inner.server_name
    }

    /// `https://127.0.0.1:<federation port>`, no trailing slash, for a
    /// server started with [`start_federating`](TestServer::start_federating);
    /// `None` otherwise.
    pub fn federation_url(&self) -> Option<&str> {
        self.inner.federation_url.as_deref()
    }

    /// Whether this server was started with
    /// [`start_federating`](TestServer::start_federating).
    pub fn is_federating(&self) -> bool {
        self.inner.federation_url.is_some()
    }

    /// The storage backend this server runs on.
    pub fn backend(&self) -> Backend {
        self.inner.backend
    }

    /// The fully qualified user ID for `localpart` on this server.
    pub fn user_id(&self, localpart: &str) -> String {
        format!("@{localpart}:{}", self.inner.server_name)
    }

    /// The fully qualified room alias for `localpart` on this server.
    pub fn alias(&self, localpart: &str) -> String {
        format!("#{localpart}:{}", self.inner.server_name)
    }

    /// A client without an access token.
    pub fn anonymous(&self) -> Client {
        Client::anonymous(self.inner.http.clone(), &self.inner.base_url)
    }

    /// Registers `localpart` with `password` through the
    /// user-interactive-authentication flow (`m.login.dummy`) and returns a
    /// client logged in as the new user.
    pub async fn register(&self, localpart: &str, password: &str) -> anyhow::Result<Client> {
        let anon = self.anonymous();
        let request = json!({
            "username": localpart,
            "password": password,
            "initial_device_display_name": "complement-tests",
        });
        let first = anon.post("/register", &request).await?;
        let done = match first.status {
            200 => first,
            401 => {
                let session = first.body["session"].as_str().with_context(|| {
                    format!("registration 401 without a session: {}", first.body)
                })?;
                let mut second = request.clone();
                second["auth"] = json!({"type": "m.login.dummy", "session": session});
                anon.post("/register", &second).await?
            }
            _ => bail!(
                "registering {localpart}: unexpected {} {}",
                first.status,
                first.body
            ),
        };
        if done.status != 200 {
            bail!("registering {localpart}: {} {}", done.status, done.body);
        }
        Client::from_login_response(self.inner.http.clone(), &self.inner.base_url, &done.body)
    }

    /// Logs in with `m.login.password` (an `m.id.user` identifier), optionally
    /// naming the device, and returns a client for the new session.
    pub async fn login(
        &self,
        user: &str,
        password: &str,
        device_id: Option<&str>,
    ) -> anyhow::Result<Client> {
        let mut request = json!({
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user},
            "password": password,
        });
        if let Some(device_id) = device_id {
            request["device_id"] = Value::from(device_id);
        }
        let response = self.anonymous().post("/login", &request).await?;
        if response.status != 200 {
            bail!(
                "logging in as {user}: {} {}",
                response.status,
                response.body
            );
        }
        Client::from_login_response(
            self.inner.http.clone(),
            &self.inner.base_url,
            &response.body,
        )
    }

    /// The last `lines` lines of the server's combined stdout and stderr.
    pub fn log_tail(&self, lines: usize) -> String {
        match File::open(&self.inner.log_path) {
            Ok(file) => {
                let all: Vec<String> = BufReader::new(file).lines().map_while(Result::ok).collect();
                let start = all.len().saturating_sub(lines);
                all[start..].join("\n")
            }
            Err(err) => format!("(no log at {}: {err})", self.inner.log_path.display()),
        }
    }

    /// Prints the tail of the server log to stderr (shown by `cargo test` for
    /// failing tests).
    pub fn print_log_tail(&self) {
        eprintln!(
            "----- myelin log ({:?}, {}) -----\n{}\n----- end of myelin log -----",
            self.inner.backend,
            self.inner.base_url,
            self.log_tail(200)
        );
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Ok(mut child) = self.child.lock() {
            if let Some(mut child) = child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if let Ok(mut database) = self.database.lock() {
            if let Some(database) = database.take() {
                database.drop_blocking();
            }
        }
    }
}

enum StartError {
    /// The process exited before it answered; worth another try on a new
    /// port.
    ExitedEarly(anyhow::Error),
    /// Anything else.
    Fatal(anyhow::Error),
}

impl From<anyhow::Error> for StartError {
    fn from(err: anyhow::Error) -> Self {
        StartError::Fatal(err)
    }
}

/// Spawns `binary` with the variables in `env` added to the inherited
/// environment, no arguments, and stdout and stderr going to `log`.
fn spawn_server(binary: &Path, env: &[(String, String)], log: File) -> anyhow::Result<Child> {
    let log_err = log.try_clone().context("cloning the log handle")?;
    Command::new(binary)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err))
        .spawn()
        .with_context(|| format!("spawning {}", binary.display()))
}

/// A port that was free a moment ago.
pub(crate) fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// A free port different from `taken` (which was free a moment ago too, so
/// the kernel may hand it out again).
pub(crate) fn free_port_other_than(taken: u16) -> anyhow::Result<u16> {
    for _ in 0..16 {
        let port = free_port()?;
        if port != taken {
            return Ok(port);
        }
    }
    bail!("the kernel kept handing out port {taken}")
}

/// The `myelin` executable: `$MYELIN_BIN`, or the result of building it once
/// per process.
pub fn myelin_binary() -> anyhow::Result<PathBuf> {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            if let Some(path) = std::env::var_os("MYELIN_BIN") {
                let path = PathBuf::from(path);
                if !path.is_file() {
                    return Err(format!("MYELIN_BIN={} is not a file", path.display()));
                }
                return Ok(path);
            }
            build_myelin().map_err(|err| format!("{err:#}"))
        })
        .clone()
        .map_err(|err| anyhow!(err))
}

/// Runs `cargo build -p myelin --bin myelin` in the workspace and returns the
/// executable path cargo reports. A release build of the harness (the
/// benchmark programs) builds a release server.
fn build_myelin() -> anyhow::Result<PathBuf> {
    let release = !cfg!(debug_assertions);
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("complement-tests has no parent directory")?
        .to_path_buf();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(&cargo);
    command.args([
        "build",
        "-p",
        "myelin",
        "--bin",
        "myelin",
        "--message-format=json-render-diagnostics",
    ]);
    if release {
        command.arg("--release");
    }
    let output = command
        .current_dir(&workspace)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {cargo:?} build -p myelin"))?;
    if !output.status.success() {
        bail!(
            "`cargo build -p myelin --bin myelin` failed ({}); build the server first or set \
             MYELIN_BIN to a built myelin binary",
            output.status
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    for line in stdout.lines() {
        let Ok(message) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if message["reason"] == "compiler-artifact" && message["target"]["name"] == "myelin" {
            if let Some(path) = message["executable"].as_str() {
                return Ok(PathBuf::from(path));
            }
        }
    }
    // Fall back to the conventional location.
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace.join(dir),
        None => workspace.join("target"),
    };
    let path = target
        .join(if release { "release" } else { "debug" })
        .join("myelin");
    if path.is_file() {
        Ok(path)
    } else {
        bail!(
            "cargo built myelin but reported no executable and {} does not exist; set MYELIN_BIN",
            path.display()
        )
    }
}
