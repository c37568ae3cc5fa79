//! A small typed Matrix client-server API client over `reqwest`, and the
//! assertion helpers the black-box tests use on its responses.
//!
//! Every call returns a [`Response`] (HTTP status plus JSON body) and never
//! fails on a non-2xx status: the tests judge statuses and error codes
//! themselves. The `*_ok`-style conveniences ([`Client::create_room`],
//! [`Client::send_message`], ...) do require success and return an error
//! carrying the status and body otherwise.

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

/// Prefix added to paths that do not start with `/_matrix/` or
/// `/.well-known/`.
pub const CLIENT_V3: &str = "/_matrix/client/v3";

/// An HTTP response: the status code and the body parsed as JSON (or
/// `Value::String` holding the raw text if it was not JSON, `Value::Null` if
/// it was empty).
#[derive(Debug, Clone)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// The parsed body.
    pub body: Value,
}

impl Response {
    /// `body.errcode` as a string, or `""`.
    pub fn errcode(&self) -> &str {
        self.body["errcode"].as_str().unwrap_or("")
    }
}

/// Asserts `status == 200` and returns the body.
#[track_caller]
pub fn ok(response: Response) -> Value {
    assert_eq!(
        response.status, 200,
        "expected 200, got {} with body {}",
        response.status, response.body
    );
    response.body
}

/// Asserts the status code, showing the body on failure, and returns the
/// body.
#[track_caller]
pub fn assert_status(response: &Response, status: u16) -> &Value {
    assert_eq!(
        response.status, status,
        "expected status {status}, got {} with body {}",
        response.status, response.body
    );
    &response.body
}

/// Asserts a spec error response: the status code, `errcode`, and a string
/// `error` (the spec requires both keys on every error body).
#[track_caller]
pub fn assert_error(response: &Response, status: u16, errcode: &str) {
    assert_eq!(
        (response.status, response.errcode()),
        (status, errcode),
        "expected {status} {errcode}, got {} with body {}",
        response.status,
        response.body
    );
    assert!(
        response.body["error"].is_string(),
        "error body lacks a string `error`: {}",
        response.body
    );
}

/// Percent-encodes one path segment or query value (room IDs, aliases, event
/// IDs, user IDs, tokens).
pub fn enc(segment: &str) -> String {
    urlencoding::encode(segment).into_owned()
}

/// A transaction ID that is unique within this process and across reruns.
pub fn unique_txn_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "ct{}-{}-{}",
        std::process::id(),
        nanos,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Builds `?k=v&...` with encoded values (empty string for no pairs).
pub fn query(pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let joined: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect();
    format!("?{}", joined.join("&"))
}

/// One session on the server (or none, for an anonymous client).
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    base_url: String,
    /// Fully qualified user ID; empty for an anonymous client.
    pub user_id: String,
    /// Device ID of the session; empty for an anonymous client.
    pub device_id: String,
    /// Access token sent as `Authorization: Bearer`, if any.
    pub access_token: Option<String>,
    /// Refresh token from login or registration, if the server gave one.
    pub refresh_token: Option<String>,
}

impl Client {
    /// A client with no access token.
    pub fn anonymous(http: reqwest::Client, base_url: &str) -> Client {
        Client {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            user_id: String::new(),
            device_id: String::new(),
            access_token: None,
            refresh_token: None,
        }
    }

    /// A client for the session described by a `/login` or `/register`
    /// response body.
    pub fn from_login_response(
        http: reqwest::Client,
        base_url: &str,
        body: &Value,
    ) -> anyhow::Result<Client> {
        let field = |name: &str| -> anyhow::Result<String> {
            body[name]
                .as_str()
                .map(str::to_owned)
                .with_context(|| format!("login response lacks `{name}`: {body}"))
        };
        Ok(Client {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            user_id: field("user_id")?,
            device_id: field("device_id")?,
            access_token: Some(field("access_token")?),
            refresh_token: body["refresh_token"].as_str().map(str::to_owned),
        })
    }

    /// The same session with a different access token (or none).
    pub fn with_access_token(&self, token: Option<&str>) -> Client {
        Client {
            access_token: token.map(str::to_owned),
            ..self.clone()
        }
    }

    /// The base URL, `http://host:port`.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The full URL for `path`; paths not under `/_matrix/`, `/_synapse/`
    /// (Synapse's admin API) or `/.well-known/` are taken relative to
    /// `/_matrix/client/v3`.
    pub fn url(&self, path: &str) -> String {
        if path.starts_with("/_matrix/")
            || path.starts_with("/_synapse/")
            || path.starts_with("/.well-known/")
        {
            format!("{}{path}", self.base_url)
        } else {
            format!("{}{CLIENT_V3}{path}", self.base_url)
        }
    }

    /// Sends a request with an optional JSON body.
    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Response> {
        let bytes = body.map(|b| b.to_string().into_bytes());
        self.raw(method, path, bytes, Some("application/json"))
            .await
    }

    /// Sends a request with an arbitrary body (for malformed-input tests).
    pub async fn raw(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
        content_type: Option<&str>,
    ) -> anyhow::Result<Response> {
        let url = self.url(path);
        let mut request = self.http.request(method.clone(), &url);
        if let Some(token) = &self.access_token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            if let Some(content_type) = content_type {
                request = request.header(reqwest::header::CONTENT_TYPE, content_type);
            }
            request = request.body(body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("{method} {url}"))?;
        let status = response.status().as_u16();
        let text = response
            .text()
            .await
            .with_context(|| format!("reading the body of {method} {url}"))?;
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok(Response { status, body })
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> anyhow::Result<Response> {
        self.request(reqwest::Method::GET, path, None).await
    }

    /// `POST path` with a JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Response> {
        self.request(reqwest::Method::POST, path, Some(body)).await
    }

    /// `PUT path` with a JSON body.
    pub async fn put(&self, path: &str, body: &Value) -> anyhow::Result<Response> {
        self.request(reqwest::Method::PUT, path, Some(body)).await
    }

    /// `DELETE path` without a body.
    pub async fn delete(&self, path: &str) -> anyhow::Result<Response> {
        self.request(reqwest::Method::DELETE, path, None).await
    }

    /// `DELETE path` with a JSON body (for user-interactive auth).
    pub async fn delete_with(&self, path: &str, body: &Value) -> anyhow::Result<Response> {
        self.request(reqwest::Method::DELETE, path, Some(body))
            .await
    }

    /// Performs a request that is protected by user-interactive
    /// authentication, completing it with `m.login.password`: the first
    /// request goes without `auth` and must get 401 with a `session` and an
    /// `m.login.password` flow; the second carries the password. Returns the
    /// final response.
    pub async fn with_password_auth(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &Value,
        password: &str,
    ) -> anyhow::Result<Response> {
        let first = self.request(method.clone(), path, Some(body)).await?;
        if first.status != 401 {
            bail!(
                "{method} {path} without auth: expected 401, got {} {}",
                first.status,
                first.body
            );
        }
        let session = first.body["session"]
            .as_str()
            .with_context(|| format!("UIA 401 without session: {}", first.body))?;
        let has_password_flow = first.body["flows"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|flow| flow["stages"] == json!(["m.login.password"]));
        if !has_password_flow {
            bail!("UIA 401 offers no m.login.password flow: {}", first.body);
        }
        let mut second = body.clone();
        second["auth"] = self.password_auth(session, password);
        self.request(method, path, Some(&second)).await
    }

    /// An `m.login.password` UIA `auth` object for this user.
    pub fn password_auth(&self, session: &str, password: &str) -> Value {
        json!({
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": self.user_id},
            "password": password,
            "session": session,
        })
    }

    /// `GET /account/whoami`, returning `user_id`.
    pub async fn whoami(&self) -> anyhow::Result<String> {
        let response = self.get("/account/whoami").await?;
        let body = success(response, "whoami")?;
        body["user_id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("whoami without user_id: {body}"))
    }

    /// `POST /createRoom`, returning the room ID.
    pub async fn create_room(&self, body: &Value) -> anyhow::Result<String> {
        let response = self.post("/createRoom", body).await?;
        let body = success(response, "createRoom")?;
        string_field(&body, "room_id")
    }

    /// `PUT /rooms/{room}/send/{type}/{txn}` with a fresh transaction ID,
    /// returning the event ID.
    pub async fn send_event(
        &self,
        room_id: &str,
        event_type: &str,
        content: &Value,
    ) -> anyhow::Result<String> {
        let path = format!(
            "/rooms/{}/send/{}/{}",
            enc(room_id),
            enc(event_type),
            unique_txn_id()
        );
        let body = success(self.put(&path, content).await?, "send")?;
        string_field(&body, "event_id")
    }

    /// Sends an `m.text` `m.room.message` and returns its event ID.
    pub async fn send_message(&self, room_id: &str, text: &str) -> anyhow::Result<String> {
        self.send_event(
            room_id,
            "m.room.message",
            &json!({"msgtype": "m.text", "body": text}),
        )
        .await
    }

    /// `PUT /rooms/{room}/state/{type}/{state_key}`, returning the event ID.
    pub async fn send_state(
        &self,
        room_id: &str,
        event_type: &str,
        state_key: &str,
        content: &Value,
    ) -> anyhow::Result<String> {
        let body = success(
            self.put(&state_path(room_id, event_type, state_key), content)
                .await?,
            "put state",
        )?;
        string_field(&body, "event_id")
    }

    /// `GET /rooms/{room}/state/{type}/{state_key}` (the content, on
    /// success).
    pub async fn get_state(
        &self,
        room_id: &str,
        event_type: &str,
        state_key: &str,
    ) -> anyhow::Result<Response> {
        self.get(&state_path(room_id, event_type, state_key)).await
    }

    /// `GET /rooms/{room}/state`: every current state event.
    pub async fn room_state(&self, room_id: &str) -> anyhow::Result<Vec<Value>> {
        let body = success(
            self.get(&format!("/rooms/{}/state", enc(room_id))).await?,
            "room state",
        )?;
        body.as_array()
            .cloned()
            .ok_or_else(|| anyhow!("room state is not an array: {body}"))
    }

    /// `POST /join/{roomIdOrAlias}`, returning the room ID.
    pub async fn join(&self, room_id_or_alias: &str) -> anyhow::Result<String> {
        let response = self
            .post(&format!("/join/{}", enc(room_id_or_alias)), &json!({}))
            .await?;
        let body = success(response, "join")?;
        string_field(&body, "room_id")
    }

    /// `POST /rooms/{room}/invite`.
    pub async fn invite(&self, room_id: &str, user_id: &str) -> anyhow::Result<()> {
        let response = self
            .post(
                &format!("/rooms/{}/invite", enc(room_id)),
                &json!({"user_id": user_id}),
            )
            .await?;
        success(response, "invite").map(drop)
    }

    /// `POST /rooms/{room}/leave`.
    pub async fn leave(&self, room_id: &str) -> anyhow::Result<()> {
        let response = self
            .post(&format!("/rooms/{}/leave", enc(room_id)), &json!({}))
            .await?;
        success(response, "leave").map(drop)
    }

    /// `GET /sync` with the usual parameters; requires 200.
    pub async fn sync(
        &self,
        since: Option<&str>,
        timeout_ms: Option<u64>,
        filter: Option<&str>,
    ) -> anyhow::Result<Value> {
        let timeout = timeout_ms.map(|t| t.to_string());
        let mut params: Vec<(&str, &str)> = Vec::new();
        if let Some(since) = since {
            params.push(("since", since));
        }
        if let Some(timeout) = &timeout {
            params.push(("timeout", timeout));
        }
        if let Some(filter) = filter {
            params.push(("filter", filter));
        }
        self.sync_with(&params).await
    }

    /// `GET /sync` with arbitrary query parameters; requires 200.
    pub async fn sync_with(&self, params: &[(&str, &str)]) -> anyhow::Result<Value> {
        let response = self.get(&format!("/sync{}", query(params))).await?;
        success(response, "sync")
    }

    /// Bounded poll: syncs repeatedly (each a long-poll of at most one
    /// second, carrying `since` forward) until `done` accepts a response or
    /// `within` has passed. Returns the accepted response.
    pub async fn sync_until(
        &self,
        since: Option<&str>,
        filter: Option<&str>,
        within: Duration,
        mut done: impl FnMut(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + within;
        let mut since = since.map(str::to_owned);
        loop {
            let response = self.sync(since.as_deref(), Some(1000), filter).await?;
            if done(&response) {
                return Ok(response);
            }
            if Instant::now() > deadline {
                bail!("sync_until: condition not met within {within:?}; last response {response}");
            }
            since = response["next_batch"].as_str().map(str::to_owned);
        }
    }

    /// `GET /rooms/{room}/messages` with the given query parameters;
    /// requires 200.
    pub async fn messages(&self, room_id: &str, params: &[(&str, &str)]) -> anyhow::Result<Value> {
        let path = format!("/rooms/{}/messages{}", enc(room_id), query(params));
        success(self.get(&path).await?, "messages")
    }

    /// The IDs of the newest `limit` events in the room, newest first (from
    /// `/messages?dir=b`). Handy for asserting a rejected request changed
    /// nothing.
    pub async fn recent_event_ids(&self, room_id: &str, limit: u32) -> anyhow::Result<Vec<String>> {
        let limit = limit.to_string();
        let body = self
            .messages(room_id, &[("dir", "b"), ("limit", &limit)])
            .await?;
        Ok(body["chunk"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["event_id"].as_str().map(str::to_owned))
            .collect())
    }
}

/// `/rooms/{room}/state/{type}/{key}` with every part encoded.
pub fn state_path(room_id: &str, event_type: &str, state_key: &str) -> String {
    format!(
        "/rooms/{}/state/{}/{}",
        enc(room_id),
        enc(event_type),
        enc(state_key)
    )
}

/// The body of a 200 response, or an error naming `what`, the status and the
/// body.
pub fn success(response: Response, what: &str) -> anyhow::Result<Value> {
    if response.status == 200 {
        Ok(response.body)
    } else {
        bail!(
            "{what}: expected 200, got {} {}",
            response.status,
            response.body
        )
    }
}

/// The string `name` of a response body, or an error naming it.
pub fn string_field(body: &Value, name: &str) -> anyhow::Result<String> {
    body[name]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("response lacks string `{name}`: {body}"))
}

/// Helpers to pick apart `/sync` responses.
pub mod sync {
    use serde_json::Value;

    /// `rooms.join.<room>.timeline.events`, or empty.
    pub fn timeline<'a>(sync: &'a Value, room_id: &str) -> &'a [Value] {
        sync["rooms"]["join"][room_id]["timeline"]["events"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Event IDs in `rooms.join.<room>.timeline.events`.
    pub fn timeline_ids(sync: &Value, room_id: &str) -> Vec<String> {
        timeline(sync, room_id)
            .iter()
            .filter_map(|e| e["event_id"].as_str().map(str::to_owned))
            .collect()
    }

    /// Whether `rooms.join.<room>.timeline` holds `event_id`.
    pub fn timeline_has(sync: &Value, room_id: &str, event_id: &str) -> bool {
        timeline(sync, room_id)
            .iter()
            .any(|e| e["event_id"] == event_id)
    }

    /// Bodies of the `m.room.message` events in the room's timeline.
    pub fn message_bodies(sync: &Value, room_id: &str) -> Vec<String> {
        timeline(sync, room_id)
            .iter()
            .filter(|e| e["type"] == "m.room.message")
            .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
            .collect()
    }
}
