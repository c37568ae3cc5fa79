//! `dev.myelin.ws_sync` v1: `/sync` over a WebSocket, with acknowledged batches, tunnelled
//! REST calls and a heartbeat (docs/websocket-sync.md is the protocol).
//!
//! One socket = one task ([`run`]) that reads client frames, writes queued frames (a bounded
//! queue of [`QUEUE`] frames) and keeps the timers; a `sync` frame spawns a producer task
//! ([`produce`]) that computes batches with [`Server::sync_batch`], the function behind
//! `GET /sync`, so the tokens are the same. The producer takes a window slot (a semaphore of
//! `window` permits) before computing; an `ack` gives the slots back. To-device messages are
//! deleted on `ack` only: batches are computed from the last *sent* token, with
//! `ack_to_device` unset.
//!
//! Tunnelled `request` frames run through the finished client router itself (`oneshot` with
//! the socket's token), which the [`Hub`] holds once it is built.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::Duration,
};

use axum::{
    body::Body,
    extract::{
        ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade},
        State,
    },
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    Router,
};
use myelin_core::{
    accounts::Session, presence::SyncingGuard, sync::SyncRequest, token::SyncToken, Error,
    ErrorKind, Server,
};
use serde_json::{json, Value};
use tokio::{
    sync::{mpsc, oneshot, Semaphore},
    task::JoinHandle,
    time::Instant,
};
use tower::ServiceExt;

use crate::error::{matrix_error, ApiError};

/// The endpoint.
pub const PATH: &str = "/_matrix/client/unstable/dev.myelin.ws_sync/connect";
/// The one subprotocol of v1 (version and encoding).
pub const SUBPROTOCOL: &str = "dev.myelin.ws_sync.v1";
/// Largest `window` a client may ask for.
pub const MAX_WINDOW: usize = 8;
/// Tunnelled requests in flight per socket.
pub const MAX_REQUESTS: usize = 8;
/// Frames queued for writing per socket.
const QUEUE: usize = 16;
/// How long one long-poll of the producer waits before recomputing (nothing is sent then).
const LONG_POLL: Duration = Duration::from_secs(24 * 3600);
/// Largest tunnelled response body read back.
const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// Close codes (RFC 6455 §7.4; 4000–4999 are ours).
mod close {
    pub const GOING_AWAY: u16 = 1001;
    pub const UNSUPPORTED: u16 = 1003;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
    pub const TRY_AGAIN_LATER: u16 = 1013;
    pub const MALFORMED: u16 = 4400;
    pub const UNAUTHORIZED: u16 = 4401;
    pub const AUTH_TIMEOUT: u16 = 4408;
    pub const SUPERSEDED: u16 = 4409;
}

/// Sockets alive in this process (the shutdown waits for them to say goodbye).
static LIVE: AtomicUsize = AtomicUsize::new(0);

/// (user ID, device ID).
type DeviceKey = (String, String);

/// Shared by every socket: the client router (for tunnelled requests) and the sync consumer
/// of each device.
#[derive(Default)]
pub struct Hub {
    router: OnceLock<Router>,
    consumers: Mutex<HashMap<DeviceKey, (u64, oneshot::Sender<()>)>>,
    next_id: AtomicU64,
}

impl Hub {
    /// Hands the finished client router to the sockets. It holds this hub, so the two keep
    /// each other alive: both live as long as the process.
    pub fn set_router(&self, router: Router) {
        let _ = self.router.set(router);
    }

    /// Makes socket `id` the sync consumer of a device, telling the previous one to go.
    fn claim(&self, user: &str, device: &str, id: u64) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let mut map = self.consumers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, old)) = map.insert((user.to_owned(), device.to_owned()), (id, tx)) {
            let _ = old.send(());
        }
        rx
    }

    fn release(&self, user: &str, device: &str, id: u64) {
        let mut map = self.consumers.lock().unwrap_or_else(|e| e.into_inner());
        let key = (user.to_owned(), device.to_owned());
        if map.get(&key).is_some_and(|(owner, _)| *owner == id) {
            map.remove(&key);
        }
    }
}

/// State of the endpoint.
#[derive(Clone)]
pub struct WsState {
    pub server: Arc<Server>,
    pub hub: Arc<Hub>,
}

/// Waits (at most `within`) until every socket has closed; the shutdown calls it after
/// setting `Server::shutting_down`, which makes the sockets close with 1001.
pub async fn drain(within: Duration) {
    let deadline = Instant::now() + within;
    while LIVE.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn error_response(kind: ErrorKind, message: &str) -> Response {
    ApiError(Error::new(kind, message)).into_response()
}

/// `GET` (HTTP/1.1 Upgrade) or `CONNECT` (HTTP/2, RFC 8441) on [`PATH`].
pub async fn connect(
    State(st): State<WsState>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    // 400 `M_UNRECOGNIZED` (not the errcode's usual 404): the endpoint exists, the request
    // does not speak a version of it.
    let Ok(ws) = ws else {
        return matrix_error(
            StatusCode::BAD_REQUEST,
            "M_UNRECOGNIZED",
            "This endpoint needs a WebSocket upgrade",
        );
    };
    let ws = ws.protocols([SUBPROTOCOL]);
    if ws.selected_protocol().is_none() {
        return matrix_error(
            StatusCode::BAD_REQUEST,
            "M_UNRECOGNIZED",
            "No supported subprotocol offered (dev.myelin.ws_sync.v1)",
        );
    }
    // Only the header: never `?access_token=` (spec v1.20, MSC4127).
    let session = match headers.get(header::AUTHORIZATION) {
        None => None,
        Some(h) => {
            let token = h
                .to_str()
                .ok()
                .and_then(|h| h.strip_prefix("Bearer "))
                .map(|t| t.trim().to_owned());
            let Some(token) = token else {
                return error_response(ErrorKind::MissingToken, "Missing access token");
            };
            match st.server.authenticate(&token).await {
                Ok(s) => Some((s, token)),
                Err(e) => return ApiError(e).into_response(),
            }
        }
    };
    let max = st.server.config.ws_sync_max_frame_bytes;
    ws
        // Idle sockets are many: small buffers, grown only while a large frame passes.
        .read_buffer_size(1024)
        .write_buffer_size(0)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| run(st, socket, session))
}

/// A frame waiting to be written.
enum Out {
    Text(String),
    /// A sync batch of stream `generation`; dropped when a newer stream replaced it.
    Batch {
        generation: u64,
        text: String,
    },
}

/// The window of one sync stream.
struct Window {
    slots: Semaphore,
    /// Tokens sent and not acknowledged, oldest first.
    unacked: Mutex<VecDeque<SyncToken>>,
}

/// The sync stream running on a socket.
struct Stream {
    producer: JoinHandle<()>,
    window: Arc<Window>,
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.producer.abort();
    }
}

/// Why a socket ends.
struct Ending {
    code: u16,
    reason: &'static str,
    /// An `error` frame sent before the close.
    error: Option<Value>,
}

impl Ending {
    fn new(code: u16, reason: &'static str) -> Self {
        Ending {
            code,
            reason,
            error: None,
        }
    }
    fn with_error(code: u16, reason: &'static str, error: Value) -> Self {
        Ending {
            code,
            reason,
            error: Some(error),
        }
    }
}

/// An `error` frame.
fn error_frame(errcode: &str, message: &str, fatal: bool) -> Value {
    json!({"type": "error", "errcode": errcode, "error": message, "fatal": fatal})
}

fn error_frame_of(e: &Error, fatal: bool) -> Value {
    let kind = e.kind();
    let mut f = error_frame(kind.errcode(), &e.message(), fatal);
    if let ErrorKind::UnknownToken { soft_logout } = kind {
        f["soft_logout"] = json!(soft_logout);
    }
    f
}

/// Everything one socket holds besides the socket itself.
struct Conn {
    st: WsState,
    id: u64,
    out_tx: mpsc::Sender<Out>,
    session: Option<Arc<Session>>,
    token: String,
    stream: Option<Stream>,
    /// Generation of the running stream (batches of older ones are not written).
    generation: u64,
    /// Frames this task answers with itself, written after the frame that caused them (not
    /// through the queue, which only this task empties).
    replies: Vec<String>,
    superseded: Option<oneshot::Receiver<()>>,
    presence: Option<SyncingGuard>,
    /// `set_presence` of the latest `ping` or `sync` frame.
    set_presence: Option<String>,
    /// Created with the first tunnelled request.
    requests: Option<Arc<Semaphore>>,
    /// The highest to-device position acknowledged so far.
    acked_to_device: i64,
}

struct LiveGuard;
impl LiveGuard {
    fn new() -> Self {
        LIVE.fetch_add(1, Ordering::Relaxed);
        LiveGuard
    }
}
impl Drop for LiveGuard {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn run(st: WsState, mut socket: WebSocket, session: Option<(Arc<Session>, String)>) {
    let _live = LiveGuard::new();
    let cfg = &st.server.config;
    let heartbeat = Duration::from_millis(cfg.ws_sync_heartbeat_interval_ms);
    let idle = heartbeat * 5 / 2;
    let write_timeout = Duration::from_millis(cfg.ws_sync_write_timeout_ms);
    let auth_deadline = Instant::now() + Duration::from_millis(cfg.ws_sync_auth_timeout_ms);
    let (out_tx, mut out_rx) = mpsc::channel::<Out>(QUEUE);
    let mut conn = Conn {
        id: st.hub.next_id.fetch_add(1, Ordering::Relaxed),
        st: st.clone(),
        out_tx,
        session: None,
        token: String::new(),
        stream: None,
        generation: 0,
        replies: Vec::new(),
        superseded: None,
        presence: None,
        set_presence: None,
        requests: None,
        acked_to_device: 0,
    };
    let mut wake = None;
    if let Some((s, token)) = session {
        wake = Some(st.server.notifier.subscribe(s.user_id.as_str()));
        conn.session = Some(s);
        conn.token = token;
        if send_text(&mut socket, conn.hello(), write_timeout)
            .await
            .is_err()
        {
            return;
        }
    }
    let mut last_rx = Instant::now();
    let mut next_ping = Instant::now() + heartbeat;
    let ending: Ending = loop {
        let authed = conn.session.is_some();
        let timer = if authed {
            next_ping.min(last_rx + idle)
        } else {
            auth_deadline
        };
        tokio::select! {
            msg = socket.recv() => {
                last_rx = Instant::now();
                let msg = match msg {
                    None => break Ending::new(0, ""),
                    Some(Err(e)) => {
                        if too_big(&e) {
                            break Ending::new(close::TOO_BIG, "frame too large");
                        }
                        break Ending::new(0, "");
                    }
                    Some(Ok(m)) => m,
                };
                let text = match msg {
                    Message::Text(t) => t,
                    Message::Binary(_) => {
                        break Ending::new(close::UNSUPPORTED, "binary frames are not supported")
                    }
                    Message::Close(_) => break Ending::new(0, ""),
                    Message::Ping(_) | Message::Pong(_) => continue,
                };
                let handled = conn.frame(text.as_str()).await;
                let mut failed = None;
                for reply in std::mem::take(&mut conn.replies) {
                    if let Err(end) = send_text(&mut socket, reply, write_timeout).await {
                        failed = Some(end);
                        break;
                    }
                }
                if let Some(end) = failed {
                    break end;
                }
                if let Err(end) = handled {
                    break end;
                }
                if wake.is_none() {
                    if let Some(s) = &conn.session {
                        wake = Some(st.server.notifier.subscribe(s.user_id.as_str()));
                    }
                }
            }
            Some(out) = out_rx.recv() => {
                let text = match out {
                    Out::Text(t) => t,
                    Out::Batch { generation, text } => {
                        if generation != conn.generation {
                            continue;
                        }
                        text
                    }
                };
                if let Err(end) = send_text(&mut socket, text, write_timeout).await {
                    break end;
                }
            }
            _ = tokio::time::sleep_until(timer) => {
                if !authed {
                    break Ending::new(close::AUTH_TIMEOUT, "no auth frame in time");
                }
                let now = Instant::now();
                if now >= last_rx + idle {
                    break Ending::new(close::GOING_AWAY, "idle");
                }
                if now >= next_ping {
                    next_ping = now + heartbeat;
                    if let Err(end) = conn.check_token().await {
                        break end;
                    }
                    if let Err(end) = send(&mut socket, Message::Ping(Default::default()), write_timeout).await {
                        break end;
                    }
                }
            }
            changed = async {
                match wake.as_mut() {
                    Some(w) => w.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            } => {
                if !changed || st.server.shutting_down.load(Ordering::Relaxed) {
                    break Ending::new(close::GOING_AWAY, "server shutting down");
                }
                if let Some(w) = wake.as_mut() {
                    w.borrow_and_update();
                }
                if let Err(end) = conn.check_token().await {
                    break end;
                }
            }
            _ = async {
                match conn.superseded.as_mut() {
                    Some(rx) => { let _ = rx.await; }
                    None => std::future::pending().await,
                }
            } => {
                break Ending::new(close::SUPERSEDED, "superseded by a newer sync stream of this device");
            }
        }
    };
    conn.stream = None;
    if let Some(s) = &conn.session {
        st.hub.release(s.user_id.as_str(), &s.device_id, conn.id);
    }
    drop(conn.presence.take());
    if ending.code != 0 {
        if let Some(err) = ending.error {
            let _ = send_text(&mut socket, err.to_string(), write_timeout).await;
        }
        let frame = CloseFrame {
            code: ending.code,
            reason: ending.reason.into(),
        };
        let closing = async {
            if socket.send(Message::Close(Some(frame))).await.is_ok() {
                // The peer's Close (or the end of the stream) completes the handshake.
                while let Some(Ok(m)) = socket.recv().await {
                    if matches!(m, Message::Close(_)) {
                        break;
                    }
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), closing).await;
    }
}

/// Whether a read error is the frame size limit.
fn too_big(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(t) = s.downcast_ref::<tungstenite::Error>() {
            return matches!(t, tungstenite::Error::Capacity(_));
        }
        source = s.source();
    }
    false
}

async fn send(socket: &mut WebSocket, msg: Message, within: Duration) -> Result<(), Ending> {
    match tokio::time::timeout(within, socket.send(msg)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Ending::new(0, "")),
        Err(_) => Err(Ending::new(close::TRY_AGAIN_LATER, "slow consumer")),
    }
}

async fn send_text(socket: &mut WebSocket, text: String, within: Duration) -> Result<(), Ending> {
    send(socket, Message::Text(text.into()), within).await
}

fn malformed(message: &str) -> Ending {
    Ending::with_error(
        close::MALFORMED,
        "malformed frame",
        error_frame("M_BAD_JSON", message, true),
    )
}

/// `set_presence` must be one of the spec's three values.
fn presence_value(v: Option<&Value>) -> Result<Option<String>, Ending> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(malformed("`set_presence` must be a string")),
    }
}

fn valid_presence(p: &Option<String>) -> bool {
    myelin_core::presence::check_set_presence(p.as_deref()).is_ok()
}

impl Conn {
    fn hello(&self) -> String {
        let s = self.session.as_ref();
        json!({
            "type": "hello",
            "version": "v1",
            "user_id": s.map(|s| s.user_id.to_string()),
            "device_id": s.map(|s| s.device_id.clone()),
            "max_window": MAX_WINDOW,
            "heartbeat_interval_ms": self.st.server.config.ws_sync_heartbeat_interval_ms,
        })
        .to_string()
    }

    fn reply(&mut self, frame: Value) {
        self.replies.push(frame.to_string());
    }

    /// A non-fatal `error` frame.
    fn notify(&mut self, errcode: &str, message: &str) {
        self.reply(error_frame(errcode, message, false));
    }

    /// The socket's token is still good (logout, device deletion, expiry end it).
    async fn check_token(&self) -> Result<(), Ending> {
        if self.session.is_none() {
            return Ok(());
        }
        match self.st.server.authenticate(&self.token).await {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.kind(), ErrorKind::UnknownToken { .. }) => {
                Err(Ending::with_error(
                    close::UNAUTHORIZED,
                    "access token no longer valid",
                    error_frame_of(&e, true),
                ))
            }
            // A store hiccup is not the token's death; the next check decides.
            Err(_) => Ok(()),
        }
    }

    /// Handles one client text frame.
    async fn frame(&mut self, text: &str) -> Result<(), Ending> {
        let value: Value = serde_json::from_str(text).map_err(|e| {
            Ending::with_error(
                close::MALFORMED,
                "malformed frame",
                error_frame("M_NOT_JSON", &format!("Frame is not JSON: {e}"), true),
            )
        })?;
        let Some(obj) = value.as_object() else {
            return Err(malformed("A frame must be a JSON object"));
        };
        let Some(ty) = obj.get("type").and_then(Value::as_str) else {
            return Err(malformed("A frame needs a string `type`"));
        };
        if self.session.is_none() {
            if ty != "auth" {
                return Err(Ending::with_error(
                    close::UNAUTHORIZED,
                    "authentication required",
                    error_frame("M_MISSING_TOKEN", "The first frame must be `auth`", true),
                ));
            }
            let Some(token) = obj.get("access_token").and_then(Value::as_str) else {
                return Err(malformed("`auth` needs a string `access_token`"));
            };
            return match self.st.server.authenticate(token).await {
                Ok(s) => {
                    self.session = Some(s);
                    self.token = token.to_owned();
                    let hello = self.hello();
                    self.replies.push(hello);
                    Ok(())
                }
                Err(e) if matches!(e.kind(), ErrorKind::UnknownToken { .. }) => {
                    Err(Ending::with_error(
                        close::UNAUTHORIZED,
                        "unknown access token",
                        error_frame_of(&e, true),
                    ))
                }
                Err(e) => Err(Ending::with_error(
                    close::INTERNAL,
                    "internal error",
                    error_frame_of(&e, true),
                )),
            };
        }
        match ty {
            "auth" => {
                self.notify("M_INVALID_PARAM", "Already authenticated");
                Ok(())
            }
            "sync" => self.sync_frame(obj).await,
            "ack" => {
                let Some(token) = obj.get("next_batch").and_then(Value::as_str) else {
                    return Err(malformed("`ack` needs a string `next_batch`"));
                };
                self.ack(token).await;
                Ok(())
            }
            "ping" => {
                let id = match obj.get("id") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(s)) => Some(s.clone()),
                    Some(_) => return Err(malformed("`id` must be a string")),
                };
                let presence = presence_value(obj.get("set_presence"))?;
                if presence.is_some() {
                    if !valid_presence(&presence) {
                        self.notify("M_INVALID_PARAM", "Invalid set_presence");
                    } else {
                        if let Some(g) = &self.presence {
                            g.set_presence(presence.as_deref());
                        }
                        self.set_presence = presence;
                    }
                }
                self.reply(json!({"type": "pong", "id": id}));
                Ok(())
            }
            "request" => self.request(obj).await,
            other => {
                self.notify("M_UNRECOGNIZED", &format!("Unknown frame type {other:?}"));
                Ok(())
            }
        }
    }

    /// `sync`: starts (or restarts) the stream.
    async fn sync_frame(&mut self, obj: &serde_json::Map<String, Value>) -> Result<(), Ending> {
        let Some(session) = self.session.clone() else {
            return Ok(());
        };
        let since = match obj.get("since") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => match SyncToken::parse(s) {
                Ok(t) => Some(t),
                Err(_) => {
                    self.notify("M_INVALID_PARAM", "Invalid since token");
                    return Ok(());
                }
            },
            Some(_) => return Err(malformed("`since` must be a string")),
        };
        let filter = match obj.get("filter") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(f @ Value::Object(_)) => Some(f.to_string()),
            Some(_) => return Err(malformed("`filter` must be a filter ID or a filter object")),
        };
        let flag = |name: &str| -> Result<bool, Ending> {
            match obj.get(name) {
                None | Some(Value::Null) => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(_) => Err(malformed(&format!("`{name}` must be a boolean"))),
            }
        };
        let full_state = flag("full_state")?;
        let use_state_after = flag("use_state_after")?;
        let set_presence = presence_value(obj.get("set_presence"))?;
        if !valid_presence(&set_presence) {
            self.notify("M_INVALID_PARAM", "Invalid set_presence");
            return Ok(());
        }
        let window = match obj.get("window") {
            None | Some(Value::Null) => 1,
            Some(v) => match v.as_u64() {
                Some(w) if (1..=MAX_WINDOW as u64).contains(&w) => w as usize,
                Some(_) => {
                    self.notify("M_INVALID_PARAM", "`window` must be between 1 and 8");
                    return Ok(());
                }
                None => return Err(malformed("`window` must be an integer")),
            },
        };
        let server = &self.st.server;
        let filter =
            match crate::sync::load_filter(server, session.user_id.as_str(), filter.as_deref())
                .await
            {
                Ok(f) => f,
                Err(e) => {
                    self.reply(error_frame_of(&e, false));
                    return Ok(());
                }
            };
        if set_presence.is_some() {
            self.set_presence = set_presence;
        }
        let user = session.user_id.as_str();
        match &self.presence {
            Some(g) => g.set_presence(self.set_presence.as_deref()),
            None => {
                self.presence = Some(server.presence.syncing(
                    user,
                    &session.device_id,
                    self.set_presence.as_deref(),
                ))
            }
        }
        if self.superseded.is_none() {
            self.superseded = Some(self.st.hub.claim(user, &session.device_id, self.id));
        }
        let req = SyncRequest {
            user_id: user.to_owned(),
            device_id: session.device_id.clone(),
            since,
            full_state,
            filter,
            use_state_after,
            timeout: Duration::ZERO,
            set_presence: self.set_presence.clone(),
            holds_presence: false,
            // Resuming from `since` acknowledges what came before it, as over HTTP.
            ack_to_device: since.map(|s| s.to_device),
        };
        if let Some(s) = since {
            self.acked_to_device = self.acked_to_device.max(s.to_device);
        }
        self.generation += 1;
        let generation = self.generation;
        let window = Arc::new(Window {
            slots: Semaphore::new(window),
            unacked: Mutex::new(VecDeque::new()),
        });
        // Replacing the stream aborts the old producer.
        self.stream = None;
        let producer = tokio::spawn(produce(
            server.clone(),
            req,
            window.clone(),
            self.out_tx.clone(),
            generation,
        ));
        self.stream = Some(Stream { producer, window });
        Ok(())
    }

    /// `ack`: frees the window up to this batch and deletes the to-device messages it carried.
    async fn ack(&mut self, token: &str) {
        let Some(window) = self.stream.as_ref().map(|s| s.window.clone()) else {
            self.notify("M_INVALID_PARAM", "No sync stream is running");
            return;
        };
        let parsed = SyncToken::parse(token).ok();
        let freed = {
            let mut unacked = window.unacked.lock().unwrap_or_else(|e| e.into_inner());
            match parsed.and_then(|t| unacked.iter().position(|u| *u == t)) {
                Some(i) => {
                    unacked.drain(..=i);
                    Some(i + 1)
                }
                None => None,
            }
        };
        let (Some(freed), Some(t)) = (freed, parsed) else {
            self.notify(
                "M_INVALID_PARAM",
                "Not an unacknowledged next_batch of this stream",
            );
            return;
        };
        if t.to_device > self.acked_to_device {
            if let Some(s) = &self.session {
                if let Err(e) = self
                    .st
                    .server
                    .ack_to_device(s.user_id.as_str(), &s.device_id, t.to_device)
                    .await
                {
                    tracing::warn!(error = %e, "ws_sync: to-device acknowledgement failed");
                    self.notify("M_UNKNOWN", "Acknowledgement failed; ack again");
                    // The slots are freed all the same; the next ack or resume deletes them.
                }
            }
            self.acked_to_device = t.to_device;
        }
        window.slots.add_permits(freed);
    }

    /// `request`: one allowlisted REST call through the client router.
    async fn request(&mut self, obj: &serde_json::Map<String, Value>) -> Result<(), Ending> {
        let Some(id) = obj.get("id").and_then(Value::as_str) else {
            return Err(malformed("`request` needs a string `id`"));
        };
        let (Some(method), Some(path)) = (
            obj.get("method").and_then(Value::as_str),
            obj.get("path").and_then(Value::as_str),
        ) else {
            return Err(malformed("`request` needs string `method` and `path`"));
        };
        let body = obj.get("body").cloned().unwrap_or_else(|| json!({}));
        let id = id.to_owned();
        let respond = move |status: u16, body: Value| json!({"type": "response", "id": id, "status": status, "body": body});
        if !allowed(method, path) {
            let e = json!({"errcode": "M_UNRECOGNIZED", "error": "Not available over the socket"});
            self.reply(respond(404, e));
            return Ok(());
        }
        let slots = self
            .requests
            .get_or_insert_with(|| Arc::new(Semaphore::new(MAX_REQUESTS)))
            .clone();
        let Ok(permit) = slots.try_acquire_owned() else {
            let e = json!({"errcode": "M_LIMIT_EXCEEDED", "error": "Too many requests in flight"});
            self.reply(respond(429, e));
            return Ok(());
        };
        let Some(router) = self.st.hub.router.get().cloned() else {
            let e = json!({"errcode": "M_UNKNOWN", "error": "Not ready"});
            self.reply(respond(503, e));
            return Ok(());
        };
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()));
        let Ok(req) = req else {
            let e = json!({"errcode": "M_INVALID_PARAM", "error": "Invalid method or path"});
            self.reply(respond(400, e));
            return Ok(());
        };
        let out = self.out_tx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let (status, body) = match router.oneshot(req).await {
                Ok(res) => {
                    let status = res.status().as_u16();
                    let bytes = axum::body::to_bytes(res.into_body(), MAX_RESPONSE_BYTES).await;
                    let body = bytes
                        .ok()
                        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                        .unwrap_or(Value::Null);
                    (status, body)
                }
                Err(never) => match never {},
            };
            let _ = out.send(Out::Text(respond(status, body).to_string())).await;
        });
        Ok(())
    }
}

/// The v1 allowlist of tunnelled requests (all under `/_matrix/client/v3/`).
pub fn allowed(method: &str, path: &str) -> bool {
    let Some(rest) = path.strip_prefix("/_matrix/client/v3/") else {
        return false;
    };
    if rest.contains(['?', '#']) {
        return false;
    }
    let s: Vec<&str> = rest.split('/').collect();
    matches!(
        (method, s.as_slice()),
        ("PUT", ["rooms", _, "send", _, _])
            | ("PUT", ["rooms", _, "state", _, ..])
            | ("PUT", ["rooms", _, "redact", _, _])
            | ("PUT", ["rooms", _, "typing", _])
            | ("POST", ["rooms", _, "receipt", _, _])
            | ("POST", ["rooms", _, "read_markers"])
            | ("PUT", ["presence", _, "status"])
            | ("PUT", ["sendToDevice", _, _])
    )
}

/// The producer of one sync stream: a batch whenever a window slot is free and there is
/// something to report (the first batch at once, even empty).
async fn produce(
    server: Arc<Server>,
    mut req: SyncRequest,
    window: Arc<Window>,
    out: mpsc::Sender<Out>,
    generation: u64,
) {
    let mut first = true;
    loop {
        let Ok(permit) = window.slots.acquire().await else {
            return;
        };
        let (body, empty) = match server.sync_batch(&req).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "ws_sync: sync failed");
                let frame = error_frame_of(&e, false).to_string();
                let _ = out.send(Out::Text(frame)).await;
                // Try again after a pause rather than spinning on a failing store.
                drop(permit);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if server.shutting_down.load(Ordering::Relaxed) {
            return;
        }
        let Some(next) = body["next_batch"]
            .as_str()
            .and_then(|t| SyncToken::parse(t).ok())
        else {
            return;
        };
        req.since = Some(next);
        req.ack_to_device = None;
        req.full_state = false;
        req.timeout = LONG_POLL;
        if empty && !first {
            // Nothing for this client up to `next`: carry on from there, sending nothing.
            continue;
        }
        first = false;
        permit.forget();
        window
            .unacked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(next);
        let text = json!({"type": "sync", "body": body}).to_string();
        if out.send(Out::Batch { generation, text }).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::allowed;

    #[test]
    fn allowlist() {
        let v3 = "/_matrix/client/v3/";
        assert!(allowed(
            "PUT",
            &format!("{v3}rooms/!r:h/send/m.room.message/t1")
        ));
        assert!(allowed(
            "PUT",
            &format!("{v3}rooms/!r:h/state/m.room.topic")
        ));
        assert!(allowed(
            "PUT",
            &format!("{v3}rooms/!r:h/state/m.room.topic/")
        ));
        assert!(allowed("PUT", &format!("{v3}rooms/!r:h/state/x/a/b")));
        assert!(allowed("PUT", &format!("{v3}rooms/!r:h/redact/$e/t1")));
        assert!(allowed("PUT", &format!("{v3}rooms/!r:h/typing/@a:h")));
        assert!(allowed(
            "POST",
            &format!("{v3}rooms/!r:h/receipt/m.read/$e")
        ));
        assert!(allowed("POST", &format!("{v3}rooms/!r:h/read_markers")));
        assert!(allowed("PUT", &format!("{v3}presence/@a:h/status")));
        assert!(allowed("PUT", &format!("{v3}sendToDevice/m.x/t1")));
        assert!(!allowed(
            "GET",
            &format!("{v3}rooms/!r:h/send/m.room.message/t1")
        ));
        assert!(!allowed("POST", &format!("{v3}createRoom")));
        assert!(!allowed(
            "PUT",
            &format!("{v3}rooms/!r:h/send/m.room.message")
        ));
        assert!(!allowed("PUT", &format!("{v3}sendToDevice/m.x/t1?x=1")));
        assert!(!allowed("PUT", "/_matrix/client/r0/sendToDevice/m.x/t1"));
        assert!(!allowed("GET", &format!("{v3}sync")));
    }
}
