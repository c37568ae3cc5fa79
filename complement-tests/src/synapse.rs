//! One real Synapse per test, on loopback, for federation tests against the
//! reference homeserver.
//!
//! [`Synapse::start`] runs `python -m synapse.app.homeserver` from a
//! virtualenv with a configuration generated into a throwaway directory, waits
//! until its client API answers, and kills it (and deletes the directory) when
//! the last handle is dropped. Tests drive it through the same
//! [`Client`](crate::Client) as a Myelin [`TestServer`](crate::TestServer):
//! [`Synapse::register_user`] (the shared-secret admin API),
//! [`Synapse::register`], [`Synapse::login`] and [`Synapse::anonymous`] mirror
//! the `TestServer` methods.
//!
//! # The virtualenv
//!
//! `complement-tests/synapse/install.sh` installs the pinned
//! `matrix-synapse` from PyPI into `$MYELIN_SYNAPSE_VENV`, default
//! `$HOME/.cache/myelin-synapse/venv`, once (about 20 s on a 2-core
//! machine), under an `flock` so parallel tests and test processes do not
//! race. The harness runs it on first use in each test process (it returns
//! at once when the venv is there), so `cargo test --workspace` on a fresh
//! machine needs only CPython 3.10+ with `venv` and PyPI access; `.ci/run`
//! also runs it up front so the install is not charged to one test's
//! timeout. The pin lives only in that script.
//!
//! # The configuration
//!
//! Written as JSON (which is YAML) to `<dir>/homeserver.yaml`; the main
//! points:
//!
//! - `server_name: "127.0.0.1:<federation port>"`: an IP literal with a
//!   port, so peers connect straight to the federation listener with no
//!   `.well-known` or SRV lookup (and no SNI).
//! - Listeners: plain HTTP `client` on `127.0.0.1:<client port>`, and TLS
//!   `federation` + `keys` on `127.0.0.1:<federation port>` with a
//!   self-signed certificate (`synapse/make_keys.py`, which also writes the
//!   ed25519 signing key; both run with the venv's Python).
//! - Outbound federation to loopback: `federation_verify_certificates:
//!   false`, `ip_range_blacklist` = Synapse's default list without
//!   `127.0.0.0/8` and `::1/128`, and `ip_range_whitelist:
//!   ["127.0.0.1/32"]` (in 1.163 `federation_ip_range_blacklist` is only a
//!   backwards-compatibility override; when absent, federation uses the
//!   two above). `trusted_key_servers: []`, so keys are fetched from the
//!   origin server itself.
//! - Backoff: `federation.destination_min_retry_interval: 1s`,
//!   `destination_retry_multiplier: 2`, `destination_max_retry_interval:
//!   10s` (defaults are 10 minutes to 7 days), and short per-request retry
//!   delays, so a peer that was down is retried within seconds. Durations
//!   take the suffixes s, m, h, d, w, y or none (milliseconds): `"500ms"`
//!   is an error (`m` is minutes).
//! - Rate limits (`rc_*`) raised far above what a test does.
//! - SQLite database, `report_stats: false`, presence on,
//!   `enable_registration: false` with a `registration_shared_secret`,
//!   `room_list_publication_rules: [{action: allow}]` and
//!   `allow_public_rooms_over_federation: true`.
//! - Logging: INFO to `<dir>/synapse.log`, which also receives the process's
//!   stdout and stderr; [`Synapse::log_tail`] shows it.
//!
//! Synapse 1.163 creates rooms at version 12 by default
//! (`default_room_version`); pass `{"default_room_version": "10"}` to
//! [`Synapse::start_with`] to test older room versions. Any top-level key
//! given there replaces the generated one.

use crate::client::Client;
use crate::server::{free_port, free_port_other_than};
use anyhow::{anyhow, bail, Context};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha1::Sha1;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a freshly started Synapse may take to answer `/versions`.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// How many times a Synapse that exits during start-up (for example because
/// another process took one of its ports) is tried again on new ports.
const START_ATTEMPTS: usize = 3;

/// Synapse's default `ip_range_blacklist` (1.163) without the loopback
/// ranges, so that it federates with servers on 127.0.0.1.
const IP_RANGE_BLACKLIST: &[&str] = &[
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "192.0.0.0/24",
    "169.254.0.0/16",
    "192.88.99.0/24",
    "198.18.0.0/15",
    "192.0.2.0/24",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "fe80::/10",
    "fc00::/7",
    "2001:db8::/32",
    "ff00::/8",
    "fec0::/10",
];

/// A running Synapse. Cloning gives another handle to the same process; the
/// process is killed and its directory deleted when the last handle goes.
#[derive(Clone)]
pub struct Synapse {
    inner: Arc<Inner>,
}

struct Inner {
    server_name: String,
    client_url: String,
    federation_url: String,
    http: reqwest::Client,
    python: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    registration_shared_secret: String,
    child: Mutex<Option<Child>>,
    // Declared last so it is removed after the process is dead.
    dir: tempfile::TempDir,
}

impl Synapse {
    /// Installs Synapse if needed (see [`synapse_venv`]), starts one on two
    /// free loopback ports with the configuration described in the module
    /// documentation, and waits until its client API answers `/versions`.
    pub async fn start() -> anyhow::Result<Synapse> {
        Self::start_with(json!({})).await
    }

    /// Like [`start`](Synapse::start), with each top-level key of
    /// `extra_config` (a JSON object) replacing or adding that key of the
    /// generated `homeserver.yaml`, e.g. `json!({"default_room_version":
    /// "10"})`.
    pub async fn start_with(extra_config: Value) -> anyhow::Result<Synapse> {
        let Value::Object(extra) = extra_config else {
            bail!("extra Synapse config must be a JSON object, got {extra_config}");
        };
        let venv = tokio::task::spawn_blocking(synapse_venv)
            .await
            .context("the Synapse install task panicked")??;
        let python = venv.join("bin").join("python");
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            match Self::start_once(&python, &extra).await {
                Ok(synapse) => return Ok(synapse),
                Err(StartError::Fatal(err)) => return Err(err),
                Err(StartError::ExitedEarly(err)) => last_error = Some(err),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow!("Synapse did not start")))
    }

    async fn start_once(
        python: &Path,
        extra: &serde_json::Map<String, Value>,
    ) -> Result<Synapse, StartError> {
        let dir = tempfile::Builder::new()
            .prefix("myelin-synapse-")
            .tempdir()
            .context("creating the Synapse directory")?;
        let client_port = free_port()?;
        let fed_port = free_port_other_than(client_port)?;
        let server_name = format!("127.0.0.1:{fed_port}");
        let client_url = format!("http://127.0.0.1:{client_port}");
        let federation_url = format!("https://127.0.0.1:{fed_port}");
        let path = |name: &str| dir.path().join(name);
        let log_path = path("synapse.log");
        let config_path = path("homeserver.yaml");

        let keys = Command::new(python)
            .arg(keys_script())
            .arg(path("tls.crt"))
            .arg(path("tls.key"))
            .arg(path("signing.key"))
            .stdin(Stdio::null())
            .output()
            .context("running synapse/make_keys.py")?;
        if !keys.status.success() {
            return Err(StartError::Fatal(anyhow!(
                "synapse/make_keys.py failed ({}): {}",
                keys.status,
                String::from_utf8_lossy(&keys.stderr)
            )));
        }

        let registration_shared_secret = random_hex(16);
        let log_config = json!({
            "version": 1,
            "formatters": {"precise": {
                "format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s"
            }},
            "handlers": {"file": {
                "class": "logging.FileHandler",
                "formatter": "precise",
                "filename": log_path,
                "encoding": "utf8",
            }},
            "root": {"level": "INFO", "handlers": ["file"]},
            "disable_existing_loggers": false,
        });
        std::fs::write(path("log.yaml"), log_config.to_string()).context("writing log.yaml")?;

        // Far above anything a test does.
        let unlimited = json!({"per_second": 10_000, "burst_count": 100_000});
        let mut config = json!({
            "server_name": server_name,
            "public_baseurl": format!("{client_url}/"),
            "pid_file": path("homeserver.pid"),
            "report_stats": false,
            "log_config": path("log.yaml"),
            "media_store_path": path("media"),
            "signing_key_path": path("signing.key"),
            "tls_certificate_path": path("tls.crt"),
            "tls_private_key_path": path("tls.key"),
            "database": {"name": "sqlite3", "args": {"database": path("homeserver.db")}},
            "listeners": [
                {
                    "port": client_port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": false,
                    "x_forwarded": false,
                    "resources": [{"names": ["client"], "compress": false}],
                },
                {
                    "port": fed_port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": true,
                    "x_forwarded": false,
                    "resources": [{"names": ["federation", "keys"], "compress": false}],
                },
            ],
            "federation_verify_certificates": false,
            "ip_range_blacklist": IP_RANGE_BLACKLIST,
            "ip_range_whitelist": ["127.0.0.1/32"],
            "trusted_key_servers": [],
            "suppress_key_server_warning": true,
            "federation": {
                "client_timeout": "20s",
                "max_short_retry_delay": 500,
                "max_long_retry_delay": "2s",
                "max_short_retries": 2,
                "max_long_retries": 3,
                "destination_min_retry_interval": "1s",
                "destination_retry_multiplier": 2,
                "destination_max_retry_interval": "10s",
            },
            "enable_registration": false,
            "registration_shared_secret": registration_shared_secret,
            "macaroon_secret_key": random_hex(32),
            "form_secret": random_hex(32),
            "room_list_publication_rules": [{"action": "allow"}],
            "allow_public_rooms_over_federation": true,
            "presence": {"enabled": true},
            "url_preview_enabled": false,
            "enable_metrics": false,
        });
        let rate_limits = json!({
            "rc_message": unlimited,
            "rc_registration": unlimited,
            "rc_login": {
                "address": unlimited,
                "account": unlimited,
                "failed_attempts": unlimited,
            },
            "rc_admin_redaction": unlimited,
            "rc_joins": {"local": unlimited, "remote": unlimited},
            "rc_joins_per_room": unlimited,
            "rc_key_requests": unlimited,
            "rc_3pid_validation": unlimited,
            "rc_invites": {
                "per_room": unlimited,
                "per_user": unlimited,
                "per_issuer": unlimited,
            },
            "rc_third_party_invite": unlimited,
            "rc_media_create": unlimited,
            "rc_presence": {"per_user": unlimited},
            "rc_delayed_event_mgmt": unlimited,
            "rc_room_creation": unlimited,
            "rc_reports": unlimited,
            "rc_user_directory": unlimited,
            "rc_profile": unlimited,
            "rc_federation": {
                "window_size": 1000,
                "sleep_limit": 10_000,
                "sleep_delay": 1,
                "reject_limit": 100_000,
                "concurrent": 100,
            },
        });
        for (key, value) in rate_limits.as_object().into_iter().flatten().chain(extra) {
            config[key] = value.clone();
        }
        std::fs::write(&config_path, config.to_string()).context("writing homeserver.yaml")?;

        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .context("building the HTTP client")?;
        let synapse = Synapse {
            inner: Arc::new(Inner {
                server_name,
                client_url,
                federation_url,
                http,
                python: python.to_owned(),
                config_path,
                log_path,
                registration_shared_secret,
                child: Mutex::new(None),
                dir,
            }),
        };
        synapse.spawn()?;
        synapse.wait_until_ready().await?;
        Ok(synapse)
    }

    /// Starts the process (output appended to the log) and records it.
    fn spawn(&self) -> anyhow::Result<()> {
        let log = OpenOptions::new()
            .append(true)
            .create(true)
            .open(&self.inner.log_path)
            .context("opening synapse.log")?;
        let log_err = log.try_clone().context("cloning the log handle")?;
        let child = Command::new(&self.inner.python)
            .args(["-m", "synapse.app.homeserver", "--config-path"])
            .arg(&self.inner.config_path)
            .current_dir(self.inner.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .spawn()
            .with_context(|| format!("spawning {}", self.inner.python.display()))?;
        *self
            .inner
            .child
            .lock()
            .map_err(|_| anyhow!("child lock poisoned"))? = Some(child);
        Ok(())
    }

    async fn wait_until_ready(&self) -> Result<(), StartError> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let url = format!("{}/_matrix/client/versions", self.inner.client_url);
        loop {
            if let Some(status) = self.exit_status() {
                self.inner.child.lock().ok().and_then(|mut c| c.take());
                return Err(StartError::ExitedEarly(anyhow!(
                    "Synapse exited during start-up with {status}; its log:\n{}",
                    self.log_tail(100)
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
                    "Synapse did not answer 200 on {url} within {STARTUP_TIMEOUT:?}; its log:\n{}",
                    self.log_tail(100)
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn exit_status(&self) -> Option<ExitStatus> {
        let mut child = self.inner.child.lock().ok()?;
        child.as_mut()?.try_wait().ok().flatten()
    }

    /// The process ID, or `None` once the process has been stopped.
    pub fn pid(&self) -> Option<u32> {
        let child = self.inner.child.lock().ok()?;
        child.as_ref().map(Child::id)
    }

    /// Sends SIGTERM and waits up to `within` for the process to exit (then
    /// SIGKILL). The ports, database and keys are kept for
    /// [`restart`](Synapse::restart). Does nothing if already stopped.
    pub async fn stop(&self, within: Duration) -> anyhow::Result<()> {
        let Some(pid) = self.pid() else {
            return Ok(());
        };
        let pid = libc::pid_t::try_from(pid).context("pid out of range")?;
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our
        // own child, which is not reaped until below or on drop.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + within;
        loop {
            {
                let mut slot = self
                    .inner
                    .child
                    .lock()
                    .map_err(|_| anyhow!("child lock poisoned"))?;
                let Some(child) = slot.as_mut() else {
                    return Ok(());
                };
                if child.try_wait().context("waiting for Synapse")?.is_some() {
                    slot.take();
                    return Ok(());
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    slot.take();
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the process if it runs (SIGTERM, at most 10 s) and starts it
    /// again with the same configuration, ports, database and keys, waiting
    /// until it answers.
    pub async fn restart(&self) -> anyhow::Result<()> {
        self.stop(Duration::from_secs(10)).await?;
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            self.spawn()?;
            match self.wait_until_ready().await {
                Ok(()) => return Ok(()),
                Err(StartError::Fatal(err)) => return Err(err),
                Err(StartError::ExitedEarly(err)) => {
                    // A port may still be held briefly.
                    last_error = Some(err);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow!("Synapse did not restart")))
    }

    /// `127.0.0.1:<federation port>`.
    pub fn server_name(&self) -> &str {
        &self.inner.server_name
    }

    /// `http://127.0.0.1:<client port>`, no trailing slash: the client API.
    pub fn client_url(&self) -> &str {
        &self.inner.client_url
    }

    /// Same as [`client_url`](Synapse::client_url), under the name
    /// [`TestServer`](crate::TestServer) uses.
    pub fn base_url(&self) -> &str {
        &self.inner.client_url
    }

    /// `https://127.0.0.1:<federation port>`, no trailing slash: the
    /// federation and key APIs, behind a self-signed certificate (see
    /// [`insecure_https_client`]).
    pub fn federation_url(&self) -> &str {
        &self.inner.federation_url
    }

    /// The directory holding the configuration, database, keys and log.
    pub fn data_dir(&self) -> &Path {
        self.inner.dir.path()
    }

    /// The fully qualified user ID for `localpart` on this server.
    pub fn user_id(&self, localpart: &str) -> String {
        format!("@{localpart}:{}", self.inner.server_name)
    }

    /// The fully qualified room alias for `localpart` on this server.
    pub fn alias(&self, localpart: &str) -> String {
        format!("#{localpart}:{}", self.inner.server_name)
    }

    /// A client-API client without an access token.
    pub fn anonymous(&self) -> Client {
        Client::anonymous(self.inner.http.clone(), &self.inner.client_url)
    }

    /// Registers `localpart` with `password` through the shared-secret admin
    /// API (`/_synapse/admin/v1/register`: a nonce, then an HMAC-SHA1 over
    /// nonce, user, password and admin flag), as a server admin if `admin`,
    /// and returns a client logged in as the new user.
    pub async fn register_user(
        &self,
        localpart: &str,
        password: &str,
        admin: bool,
    ) -> anyhow::Result<Client> {
        let anon = self.anonymous();
        let path = "/_synapse/admin/v1/register";
        let nonce_response = anon.get(path).await?;
        let nonce = nonce_response.body["nonce"].as_str().with_context(|| {
            format!(
                "GET {path}: {} {}",
                nonce_response.status, nonce_response.body
            )
        })?;
        let mut mac =
            Hmac::<Sha1>::new_from_slice(self.inner.registration_shared_secret.as_bytes())
                .context("HMAC key")?;
        let admin_flag = if admin { "admin" } else { "notadmin" };
        for (i, part) in [nonce, localpart, password, admin_flag].iter().enumerate() {
            if i > 0 {
                mac.update(b"\0");
            }
            mac.update(part.as_bytes());
        }
        let mac = hex(&mac.finalize().into_bytes());
        let response = anon
            .post(
                path,
                &json!({
                    "nonce": nonce,
                    "username": localpart,
                    "password": password,
                    "admin": admin,
                    "mac": mac,
                }),
            )
            .await?;
        if response.status != 200 {
            bail!(
                "registering {localpart} on Synapse: {} {}",
                response.status,
                response.body
            );
        }
        Client::from_login_response(
            self.inner.http.clone(),
            &self.inner.client_url,
            &response.body,
        )
    }

    /// [`register_user`](Synapse::register_user) without admin rights: the
    /// same signature as [`TestServer::register`](crate::TestServer::register).
    pub async fn register(&self, localpart: &str, password: &str) -> anyhow::Result<Client> {
        self.register_user(localpart, password, false).await
    }

    /// Logs in with `m.login.password` (an `m.id.user` identifier),
    /// optionally naming the device, and returns a client for the new session.
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
                "logging in to Synapse as {user}: {} {}",
                response.status,
                response.body
            );
        }
        Client::from_login_response(
            self.inner.http.clone(),
            &self.inner.client_url,
            &response.body,
        )
    }

    /// The last `lines` lines of `synapse.log` (Synapse's own INFO log and
    /// the process's stdout and stderr).
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

    /// Prints the tail of the log to stderr (shown by `cargo test` for
    /// failing tests).
    pub fn print_log_tail(&self) {
        eprintln!(
            "----- synapse log ({}) -----\n{}\n----- end of synapse log -----",
            self.inner.server_name,
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
    }
}

enum StartError {
    /// The process exited before it answered; worth another try on new
    /// ports.
    ExitedEarly(anyhow::Error),
    /// Anything else.
    Fatal(anyhow::Error),
}

impl From<anyhow::Error> for StartError {
    fn from(err: anyhow::Error) -> Self {
        StartError::Fatal(err)
    }
}

/// The directory of the Synapse helper scripts in this crate.
fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("synapse")
}

fn keys_script() -> PathBuf {
    scripts_dir().join("make_keys.py")
}

/// The Synapse virtualenv, installed on first use: runs
/// `complement-tests/synapse/install.sh` once per process (it returns at
/// once when the pinned version is already there, and holds an `flock`
/// while installing) and returns the venv path it prints. Blocks; call it
/// from `spawn_blocking` in async code ([`Synapse::start`] does).
pub fn synapse_venv() -> anyhow::Result<PathBuf> {
    static VENV: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    VENV.get_or_init(|| install_synapse().map_err(|err| format!("{err:#}")))
        .clone()
        .map_err(|err| anyhow!(err))
}

fn install_synapse() -> anyhow::Result<PathBuf> {
    let script = scripts_dir().join("install.sh");
    let output = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !output.status.success() {
        bail!(
            "{} failed ({}); see its output above",
            script.display(),
            output.status
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let venv = stdout
        .lines()
        .last()
        .map(PathBuf::from)
        .with_context(|| format!("{} printed no venv path", script.display()))?;
    if !venv.join("bin").join("python").exists() {
        bail!("{} has no bin/python", venv.display());
    }
    Ok(venv)
}

/// A client for the federation URLs of test servers (Synapse's and
/// federating Myelins'), whose certificates are self-signed: it accepts any
/// certificate.
pub fn insecure_https_client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .timeout(Duration::from_secs(60))
        .build()
        .context("building the HTTPS client")
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    // /dev/urandom is always there on the Linux machines tests run on.
    if let Ok(mut file) = File::open("/dev/urandom") {
        use std::io::Read;
        if file.read_exact(&mut buf).is_ok() {
            return hex(&buf);
        }
    }
    // Fallback: unique enough for a throwaway test secret.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{nanos:x}{:x}", std::process::id())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
