//! Configuration types shared by every layer. Loading them (file, then `MYELIN_*` environment
//! variables) is the binary's job; core only holds the values and their defaults.

use std::{net::SocketAddr, path::PathBuf};

use serde::Deserialize;

/// Who may create accounts through `POST /register`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RegistrationMode {
    /// Only an admin (`myelin user create`) makes accounts.
    #[default]
    Closed,
    /// Registration needs a token made by `myelin registration-token create`.
    Token,
    /// Anyone may register (`m.login.dummy`).
    Open,
}

impl std::str::FromStr for RegistrationMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "closed" => Ok(Self::Closed),
            "token" => Ok(Self::Token),
            "open" => Ok(Self::Open),
            other => Err(format!("expected closed, token or open, got {other:?}")),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pretty" => Ok(Self::Pretty),
            "json" => Ok(Self::Json),
            other => Err(format!("expected pretty or json, got {other:?}")),
        }
    }
}

/// The whole server configuration. Every field has a default, so an empty file is valid.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The server name in user IDs and room aliases (`@alice:SERVER_NAME`).
    pub server_name: String,
    /// Address of the plain-HTTP Client-Server API listener.
    pub client_listen: SocketAddr,
    /// Base URL clients are told to use in `/.well-known/matrix/client`; defaults to
    /// `http://<client_listen>`.
    pub public_base_url: Option<String>,
    /// Directory for the signing key and the SQLite database.
    pub data_dir: PathBuf,
    /// `sqlite://PATH` or `postgres://...`; defaults to `sqlite://<data_dir>/myelin.db`.
    pub database_url: Option<String>,
    /// Connection pool size.
    pub database_max_connections: u32,
    /// Registration mode: `closed`, `token` or `open`.
    pub registration: RegistrationMode,
    /// Largest request body accepted, in bytes (413 `M_TOO_LARGE` beyond).
    pub max_request_body_bytes: usize,
    /// Largest event accepted, in bytes of its canonical JSON (the spec's limit is 65,536).
    pub max_event_bytes: usize,
    /// Lifetime of access tokens issued with a refresh token, in milliseconds.
    pub access_token_lifetime_ms: u64,
    /// `pretty` or `json`.
    pub log_format: LogFormat,
    /// A `tracing` filter, e.g. `info` or `myelin=debug,info`.
    pub log_filter: String,
    /// Address of the TLS Server-Server API listener; `None` runs no federation listener.
    pub federation_listen: Option<SocketAddr>,
    /// PEM certificate chain for the federation listener. When neither it nor
    /// `tls_private_key` is set, a self-signed certificate is made once in `data_dir`.
    pub tls_certificate: Option<PathBuf>,
    /// PEM private key for `tls_certificate`.
    pub tls_private_key: Option<PathBuf>,
    /// Verify the TLS certificates of other servers (turn off only for tests).
    pub federation_verify_tls: bool,
    /// Extra trusted CA certificates (PEM) for outbound federation, e.g. a test CA.
    pub federation_ca_file: Option<PathBuf>,
    /// Allow outbound federation to loopback, private, link-local and similar addresses
    /// (off by default: a server name must not make us reach into our own network).
    pub federation_allow_private_addresses: bool,
    /// Notary servers asked for another server's keys when that server cannot be reached
    /// (`POST /_matrix/key/v2/query`); their own keys are fetched from them directly.
    pub trusted_key_servers: Vec<String>,
    /// Presence (`[presence]` table).
    pub presence: PresenceConfig,
    /// WebSocket sync (`dev.myelin.ws_sync`): largest client frame, in bytes (close 1009
    /// beyond).
    pub ws_sync_max_frame_bytes: usize,
    /// WebSocket sync: how long an unauthenticated socket may take to send its `auth` frame,
    /// in milliseconds (close 4408 after).
    pub ws_sync_auth_timeout_ms: u64,
    /// WebSocket sync: interval of the server's Ping frames, in milliseconds. A socket on
    /// which nothing arrives for 2.5 intervals is dropped.
    pub ws_sync_heartbeat_interval_ms: u64,
    /// WebSocket sync: longest time one frame may take to be written before the socket is
    /// closed as a slow consumer (1013), in milliseconds.
    pub ws_sync_write_timeout_ms: u64,
}

/// Presence options. The timeouts are in milliseconds.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PresenceConfig {
    /// Off: `PUT /presence` succeeds without effect, `GET` answers `offline`, syncs carry no
    /// presence and no `m.presence` EDUs are sent or used.
    pub enabled: bool,
    /// How long a device still counts as syncing after its last sync ended.
    pub grace_ms: u64,
    /// No activity for this long: `unavailable` (and no longer `currently_active`).
    pub idle_ms: u64,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        PresenceConfig {
            enabled: true,
            grace_ms: 30_000,
            idle_ms: 5 * 60 * 1000,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server_name: "localhost:8008".to_owned(),
            client_listen: SocketAddr::from(([127, 0, 0, 1], 8008)),
            public_base_url: None,
            data_dir: PathBuf::from("./myelin-data"),
            database_url: None,
            database_max_connections: 16,
            registration: RegistrationMode::Closed,
            max_request_body_bytes: 10 * 1024 * 1024,
            max_event_bytes: 65_536,
            access_token_lifetime_ms: 60 * 60 * 1000,
            log_format: LogFormat::Pretty,
            log_filter: "info,ruma_state_res=warn".to_owned(),
            federation_listen: None,
            tls_certificate: None,
            tls_private_key: None,
            federation_verify_tls: true,
            federation_ca_file: None,
            federation_allow_private_addresses: false,
            trusted_key_servers: Vec::new(),
            presence: PresenceConfig::default(),
            ws_sync_max_frame_bytes: 1024 * 1024,
            ws_sync_auth_timeout_ms: 10_000,
            ws_sync_heartbeat_interval_ms: 30_000,
            ws_sync_write_timeout_ms: 30_000,
        }
    }
}

impl Config {
    /// The database URL in force.
    pub fn database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("myelin.db").display()))
    }

    /// The base URL advertised to clients.
    pub fn public_base_url(&self) -> String {
        self.public_base_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.client_listen))
            .trim_end_matches('/')
            .to_owned()
    }
}
