//! What the federation tests share (`tests/federation*.rs`, `tests/synapse_federation.rs`):
//! starting federating servers two at a time and running a scenario on them with both logs
//! printed on failure ([`run`], [`pair_tests!`](crate::pair_tests)); bounded waits for what
//! another server delivers in the background (messages, memberships, state, one agreed
//! state); and [`Peer`], which acts as a test server towards another one with the first
//! server's own signing key: signed X-Matrix requests, `/send` transactions, and signed v12
//! events built the way the server builds its own.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use futures::FutureExt;
use myelin_core::{
    keys::SigningKey,
    pdu::{build_pdu, rules_for, EventFrame, NewEvent},
    ruma::{
        signatures::Ed25519KeyPair, CanonicalJsonValue, MilliSecondsSinceUnixEpoch, OwnedEventId,
        OwnedRoomId, OwnedServerName, OwnedUserId, RoomVersionId,
    },
};
use serde_json::{json, Value};

use crate::{enc, insecure_https_client, Backend, Client, TestServer};

/// How long the federation tests wait for what another server delivers in the background.
pub const WAIT: Duration = Duration::from_secs(30);

/// The log filter federating test servers start with: `info`, without the state resolution
/// and HTTP tracing noise.
pub const LOG: (&str, &str) = ("MYELIN_LOG", "info,ruma_state_res=warn,tower_http=warn");

/// Polls `check` until it gives `Some`, or fails after [`WAIT`] (see [`crate::eventually`]).
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    crate::eventually(what, WAIT, check).await
}

// Servers and scenarios --------------------------------------------------------------------------

/// A federating Myelin on `backend`, logging at [`LOG`].
pub async fn start(backend: Backend) -> anyhow::Result<TestServer> {
    start_with(backend, &[]).await
}

/// [`start`] with more environment variables.
pub async fn start_with(backend: Backend, env: &[(&str, &str)]) -> anyhow::Result<TestServer> {
    let mut all = vec![LOG];
    all.extend_from_slice(env);
    TestServer::start_federating(backend, &all).await
}

/// Two federating Myelins on `backend`.
pub async fn pair(backend: Backend) -> anyhow::Result<(TestServer, TestServer)> {
    let a = start(backend).await?;
    let b = start(backend).await?;
    Ok((a, b))
}

/// Runs a two-server scenario on a fresh [`pair`]; on failure (an error or a failed
/// assertion) both servers' logs are printed.
pub async fn run<F, Fut>(backend: Backend, scenario: F) -> anyhow::Result<()>
where
    F: FnOnce(TestServer, TestServer) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let (a, b) = pair(backend).await?;
    let result = AssertUnwindSafe(scenario(a.clone(), b.clone()))
        .catch_unwind()
        .await;
    if !matches!(result, Ok(Ok(()))) {
        eprintln!("---- server A ----");
        a.print_log_tail();
        eprintln!("---- server B ----");
        b.print_log_tail();
    }
    match result {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Declares two-server federation tests, one per storage backend.
///
/// Write each scenario as `async fn name(a: TestServer, b: TestServer) -> anyhow::Result<()>`
/// and list them; each becomes `sqlite::name` and `postgres::name`, a `#[tokio::test]` that
/// calls [`federation::run`](crate::federation::run) with the scenario. Scenarios that start
/// their own servers, `async fn name(backend: Backend) -> anyhow::Result<()>`, follow
/// `per_backend:` and are called with the backend:
///
/// ```ignore
/// pair_tests!(join_and_talk, invite_and_kick; per_backend: three_servers);
/// ```
#[macro_export]
macro_rules! pair_tests {
    ($($name:ident),+ $(,)? $(; per_backend: $($own:ident),+ $(,)?)?) => {
        mod sqlite {
            $(#[tokio::test] async fn $name() -> anyhow::Result<()> {
                $crate::federation::run($crate::Backend::Sqlite, super::$name).await
            })+
            $($(#[tokio::test] async fn $own() -> anyhow::Result<()> {
                super::$own($crate::Backend::Sqlite).await
            })+)?
        }
        mod postgres {
            $(#[tokio::test] async fn $name() -> anyhow::Result<()> {
                $crate::federation::run($crate::Backend::Postgres, super::$name).await
            })+
            $($(#[tokio::test] async fn $own() -> anyhow::Result<()> {
                super::$own($crate::Backend::Postgres).await
            })+)?
        }
    };
}

// What a client sees ----------------------------------------------------------------------------

/// The bodies of the latest 100 `m.room.message` events in the room, oldest first.
pub async fn messages(client: &Client, room: &str) -> anyhow::Result<Vec<String>> {
    let body = client
        .messages(room, &[("dir", "b"), ("limit", "100")])
        .await?;
    let mut out: Vec<String> = body["chunk"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["type"] == "m.room.message")
        .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
        .collect();
    out.reverse();
    Ok(out)
}

/// Waits until [`messages`] lists `text`.
pub async fn wait_for_message(client: &Client, room: &str, text: &str) -> anyhow::Result<()> {
    eventually(
        &format!("message {text:?} at {}", client.base_url()),
        || async {
            Ok(messages(client, room)
                .await?
                .iter()
                .any(|m| m == text)
                .then_some(()))
        },
    )
    .await
}

/// The ID of the room's latest event as `client` sees it.
pub async fn latest(client: &Client, room: &str) -> anyhow::Result<String> {
    let m = client
        .messages(room, &[("dir", "b"), ("limit", "1")])
        .await?;
    m["chunk"][0]["event_id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("no events: {m}"))
}

/// The event as `client` gets it from `/rooms/{room}/event/{id}`; `None` unless 200.
pub async fn event_on(client: &Client, room: &str, id: &str) -> anyhow::Result<Option<Value>> {
    let r = client
        .get(&format!("/rooms/{}/event/{}", enc(room), enc(id)))
        .await?;
    Ok((r.status == 200).then_some(r.body))
}

/// The content of a current state event; `null` when there is none (or it cannot be read).
pub async fn state_event(
    client: &Client,
    room: &str,
    ty: &str,
    key: &str,
) -> anyhow::Result<Value> {
    let r = client.get_state(room, ty, key).await?;
    Ok(if r.status == 200 { r.body } else { Value::Null })
}

/// Waits until the content of a state event (`null` when there is none) passes `want`.
pub async fn wait_state(
    client: &Client,
    room: &str,
    ty: &str,
    key: &str,
    want: impl Fn(&Value) -> bool,
) -> anyhow::Result<()> {
    eventually(&format!("{ty}/{key} at {}", client.base_url()), || async {
        Ok(want(&state_event(client, room, ty, key).await?).then_some(()))
    })
    .await
}

/// `user`'s current membership in the room, if `client` can read it.
pub async fn membership(client: &Client, room: &str, user: &str) -> anyhow::Result<Option<String>> {
    Ok(
        state_event(client, room, "m.room.member", user).await?["membership"]
            .as_str()
            .map(str::to_owned),
    )
}

/// Waits until `user`'s membership is `want`.
pub async fn wait_membership(
    client: &Client,
    room: &str,
    user: &str,
    want: &str,
) -> anyhow::Result<()> {
    wait_state(client, room, "m.room.member", user, |c| {
        c["membership"] == want
    })
    .await
}

/// The room's current state as `(type, state_key, event_id)`, sorted.
pub async fn state_ids(
    client: &Client,
    room: &str,
) -> anyhow::Result<Vec<(String, String, String)>> {
    let mut out: Vec<(String, String, String)> = client
        .room_state(room)
        .await?
        .into_iter()
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap_or_default().to_owned();
            (s("type"), s("state_key"), s("event_id"))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// Waits until both servers report the same current state (the same event for every key);
/// on failure shows both.
pub async fn same_state(x: &Client, y: &Client, room: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let (sx, sy) = (state_ids(x, room).await?, state_ids(y, room).await?);
        if sx == sy {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "the servers disagree on the state:\n{}: {sx:#?}\n{}: {sy:#?}",
                x.base_url(),
                y.base_url()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// Acting as a peer server -----------------------------------------------------------------------

/// Acts as a server towards others: signs requests (X-Matrix) and events with a signing key
/// under the server's name, the key read from a test server's data directory unless made
/// otherwise. Events are built for room version 12.
pub struct Peer {
    name: String,
    key: SigningKey,
    http: reqwest::Client,
}

impl Peer {
    /// Acts as `server`, with its own key.
    pub fn new(server: &TestServer) -> anyhow::Result<Peer> {
        let key = SigningKey::load_or_generate(&server.data_dir().join("signing.key"))?;
        Peer::with_key(server.server_name(), key)
    }

    /// Acts as `name`, signing with `key`.
    pub fn with_key(name: &str, key: SigningKey) -> anyhow::Result<Peer> {
        Ok(Peer {
            name: name.to_owned(),
            key,
            http: insecure_https_client()?,
        })
    }

    /// The same server name with a new key under a new key ID: what this one signs, the
    /// server did not.
    pub fn with_new_key(&self) -> anyhow::Result<Peer> {
        let dir = tempfile::tempdir()?;
        let key = SigningKey::load_or_generate(&dir.path().join("other.key"))?;
        Peer::with_key(&self.name, key)
    }

    /// A new key under this peer's key ID: a signature with it looks like the server's and
    /// is not.
    pub fn impostor_key(&self) -> anyhow::Result<Ed25519KeyPair> {
        Ok(Ed25519KeyPair::from_der(
            &Ed25519KeyPair::generate(),
            self.key.pair.version().to_owned(),
        )?)
    }

    /// The server name this peer signs as.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key this peer signs with.
    pub fn key(&self) -> &SigningKey {
        &self.key
    }

    /// A federation request to `to` with `body` as it is; `signed` gives the key and the
    /// destination named in the `Authorization` header (none: no header). A body that is
    /// not JSON cannot be signed: it is signed as if there were none.
    pub async fn raw_request(
        &self,
        to: &TestServer,
        method: http::Method,
        path: &str,
        body: Option<&[u8]>,
        signed: Option<(&Ed25519KeyPair, &str)>,
    ) -> anyhow::Result<(u16, Value)> {
        let url = format!(
            "{}{path}",
            to.federation_url()
                .ok_or_else(|| anyhow::anyhow!("not federating"))?
        );
        let mut req = self.http.request(
            reqwest::Method::from_bytes(method.as_str().as_bytes())?,
            url,
        );
        if let Some((key, destination)) = signed {
            let header = myelin_federation::client::x_matrix_header(
                &OwnedServerName::try_from(self.name.as_str())?,
                &OwnedServerName::try_from(destination)?,
                key,
                &method,
                path,
                body.filter(|b| serde_json::from_slice::<Value>(b).is_ok())
                    .unwrap_or_default(),
            )?;
            req = req.header("Authorization", header);
        }
        if let Some(b) = body {
            req = req
                .header("Content-Type", "application/json")
                .body(b.to_vec());
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    /// A federation request to `to`, signed with this peer's key; the status and the body
    /// (a JSON string when it is not JSON).
    pub async fn request(
        &self,
        to: &TestServer,
        method: http::Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let bytes = body.map(serde_json::to_vec).transpose()?;
        self.raw_request(
            to,
            method,
            path,
            bytes.as_deref(),
            Some((&self.key.pair, to.server_name())),
        )
        .await
    }

    /// A signed `GET` to `to`.
    pub async fn get(&self, to: &TestServer, path: &str) -> anyhow::Result<(u16, Value)> {
        self.request(to, http::Method::GET, path, None).await
    }

    /// Sends `pdus` to `to` in transaction `txn`; the status and the answer.
    pub async fn send_txn(
        &self,
        to: &TestServer,
        txn: &str,
        pdus: &[Value],
    ) -> anyhow::Result<(u16, Value)> {
        let body = json!({
            "origin": self.name,
            "origin_server_ts": MilliSecondsSinceUnixEpoch::now().0,
            "pdus": pdus,
        });
        self.request(
            to,
            http::Method::PUT,
            &format!("/_matrix/federation/v1/send/{txn}"),
            Some(&body),
        )
        .await
    }

    /// Sends one PDU to `to` in a transaction of its own; the per-PDU result.
    pub async fn send(&self, to: &TestServer, pdu: &Value) -> anyhow::Result<Value> {
        let id = event_id(pdu)?;
        let (status, answer) = self
            .send_txn(to, &enc(&id), std::slice::from_ref(pdu))
            .await?;
        anyhow::ensure!(status == 200, "send answered {status}: {answer}");
        Ok(answer["pdus"][&id].clone())
    }

    /// An event of `sender` (a user of this server) in a v12 room, on top of `prev`, with
    /// the power levels and the sender's membership as auth events (read from `reader`'s
    /// view of the room), at depth 1000.
    pub async fn event(
        &self,
        reader: &Client,
        room: &str,
        sender: &str,
        prev: &str,
        event: NewEvent,
    ) -> anyhow::Result<Value> {
        let state = reader.room_state(room).await?;
        let id_of = |ty: &str, sk: &str| -> Option<OwnedEventId> {
            state
                .iter()
                .find(|e| e["type"] == ty && e["state_key"] == sk)
                .and_then(|e| e["event_id"].as_str())
                .and_then(|i| OwnedEventId::try_from(i).ok())
        };
        let mut auth: Vec<OwnedEventId> = [
            id_of("m.room.power_levels", ""),
            id_of("m.room.member", sender),
        ]
        .into_iter()
        .flatten()
        .collect();
        auth.sort();
        self.build(room, sender, prev, &auth, 1000, event)
    }

    /// [`Peer::event`] on top of the room's [`latest`] event.
    pub async fn event_on_latest(
        &self,
        reader: &Client,
        room: &str,
        sender: &str,
        event: NewEvent,
    ) -> anyhow::Result<Value> {
        let prev = latest(reader, room).await?;
        self.event(reader, room, sender, &prev, event).await
    }

    /// An event in a v12 room with the given parent, auth events and depth, hashed and
    /// signed by this peer.
    pub fn build(
        &self,
        room: &str,
        sender: &str,
        prev: &str,
        auth: &[OwnedEventId],
        depth: i64,
        event: NewEvent,
    ) -> anyhow::Result<Value> {
        let version = RoomVersionId::V12;
        let rules = rules_for(&version)?;
        let room_id = OwnedRoomId::try_from(room)?;
        let sender = OwnedUserId::try_from(sender)?;
        let frame = EventFrame {
            room_id: &room_id,
            version: &version,
            rules: &rules,
            sender: &sender,
            prev_events: &[OwnedEventId::try_from(prev)?],
            auth_events: auth,
            depth,
            origin_server_ts: MilliSecondsSinceUnixEpoch::now(),
        };
        let pdu = build_pdu(event, &frame, &self.name, &self.key)?;
        Ok(serde_json::from_str(pdu.json.get())?)
    }
}

/// The event ID of a signed v12 event (its reference hash), as the server computes it.
pub fn event_id(event: &Value) -> anyhow::Result<String> {
    let CanonicalJsonValue::Object(obj) = CanonicalJsonValue::try_from(event.clone())? else {
        anyhow::bail!("not an object");
    };
    let pdu = myelin_core::server::pdu_from_federation(&obj, &RoomVersionId::V12)?;
    Ok(pdu.event_id.to_string())
}

/// An `m.room.message` text event.
pub fn message_event(body: &str) -> anyhow::Result<NewEvent> {
    Ok(NewEvent::message(
        "m.room.message",
        json!({"msgtype": "m.text", "body": body}),
    )?)
}

/// A redaction of `target`.
pub fn redaction_event(target: &str) -> anyhow::Result<NewEvent> {
    let mut e = NewEvent::message("m.room.redaction", json!({"reason": "late"}))?;
    e.redacts = Some(OwnedEventId::try_from(target)?);
    Ok(e)
}
