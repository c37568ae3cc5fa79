//! Bad input from a peer server. The test acts as server B (signing with B's own key, read from
//! B's data directory) towards server A, which hosts a room B's user is in: unsigned, forged and
//! misdirected requests, malformed bodies, oversized transactions, events with forged
//! signatures, a wrong content hash, an event that fails the auth rules, and requests from a
//! server the room's server ACL denies. Each is refused as the spec says, nothing that should
//! not be stored is visible, and A keeps serving.

use std::time::{Duration, Instant};

use complement_tests::{enc, insecure_https_client, ok, Backend, Client, TestServer};
use myelin_core::{
    keys::SigningKey,
    pdu::{build_pdu, rules_for, EventFrame, NewEvent},
    ruma::{
        signatures::Ed25519KeyPair, MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId,
        OwnedServerName, OwnedUserId, RoomVersionId,
    },
};
use serde_json::{json, Value};

struct Peer {
    a: TestServer,
    b: TestServer,
    key: SigningKey,
    http: reqwest::Client,
    room: String,
    alice: Client,
}

impl Peer {
    fn a_name(&self) -> OwnedServerName {
        OwnedServerName::try_from(self.a.server_name()).unwrap()
    }
    fn b_name(&self) -> OwnedServerName {
        OwnedServerName::try_from(self.b.server_name()).unwrap()
    }

    /// A federation request to A, signed as `origin` with `key` for `destination`.
    async fn request(
        &self,
        method: http::Method,
        path: &str,
        body: Option<&[u8]>,
        key: Option<&Ed25519KeyPair>,
        destination: Option<&OwnedServerName>,
    ) -> anyhow::Result<(u16, Value)> {
        let url = format!("{}{}", self.a.federation_url().unwrap(), path);
        let mut req = self.http.request(
            reqwest::Method::from_bytes(method.as_str().as_bytes())?,
            url,
        );
        if let Some(key) = key {
            let dest = destination.cloned().unwrap_or_else(|| self.a_name());
            let header = myelin_federation::client::x_matrix_header(
                &self.b_name(),
                &dest,
                key,
                &method,
                path,
                // A body that is not JSON cannot be signed; sign as if there were none.
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

    async fn send_txn(&self, txn: &str, pdus: Vec<Value>) -> anyhow::Result<(u16, Value)> {
        let body = serde_json::to_vec(&json!({
            "origin": self.b.server_name(),
            "origin_server_ts": MilliSecondsSinceUnixEpoch::now().0,
            "pdus": pdus,
        }))?;
        self.request(
            http::Method::PUT,
            &format!("/_matrix/federation/v1/send/{txn}"),
            Some(&body),
            Some(&self.key.pair),
            None,
        )
        .await
    }

    /// A message from `sender` (a user of B) built on the room's latest event, signed with
    /// `key` as B.
    async fn message(&self, sender: &str, body: &str, key: &SigningKey) -> anyhow::Result<Value> {
        let state = self.alice.room_state(&self.room).await?;
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
        let latest = self
            .alice
            .messages(&self.room, &[("dir", "b"), ("limit", "1")])
            .await?;
        let prev = OwnedEventId::try_from(latest["chunk"][0]["event_id"].as_str().unwrap())?;
        let version = RoomVersionId::V12;
        let rules = rules_for(&version)?;
        let room_id = OwnedRoomId::try_from(self.room.as_str())?;
        let sender = OwnedUserId::try_from(sender)?;
        let frame = EventFrame {
            room_id: &room_id,
            version: &version,
            rules: &rules,
            sender: &sender,
            prev_events: &[prev],
            auth_events: &auth,
            depth: 1000,
            origin_server_ts: MilliSecondsSinceUnixEpoch::now(),
        };
        let pdu = build_pdu(
            NewEvent::message("m.room.message", json!({"msgtype": "m.text", "body": body}))?,
            &frame,
            self.b.server_name(),
            key,
        )?;
        Ok(serde_json::from_str(pdu.json.get())?)
    }

    async fn timeline_bodies(&self) -> anyhow::Result<Vec<String>> {
        let m = self
            .alice
            .messages(&self.room, &[("dir", "b"), ("limit", "50")])
            .await?;
        Ok(m["chunk"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
            .collect())
    }
}

async fn setup() -> anyhow::Result<Peer> {
    let a = TestServer::start_federating(Backend::Sqlite, &[]).await?;
    let b = TestServer::start_federating(Backend::Sqlite, &[]).await?;
    let alice = a.register("alice", "alice-password").await?;
    let bob = b.register("bob", "bob-password").await?;
    let room = alice
        .create_room(&json!({"preset": "public_chat", "room_alias_name": "bad"}))
        .await?;
    bob.join(&format!("#bad:{}", a.server_name())).await?;
    let key = SigningKey::load_or_generate(&b.data_dir().join("signing.key"))?;
    Ok(Peer {
        a,
        b,
        key,
        http: insecure_https_client()?,
        room,
        alice,
    })
}

#[tokio::test]
async fn bad_requests_and_events_are_refused() -> anyhow::Result<()> {
    let p = setup().await?;
    let bob_id = p.b.user_id("bob");
    let version_path = "/_matrix/federation/v1/query/profile?user_id=%40alice%3Aexample";

    // No signature, a forged signature, a request meant for another server.
    let (status, body) = p
        .request(http::Method::GET, version_path, None, None, None)
        .await?;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (401, Some("M_UNAUTHORIZED"))
    );
    let forged =
        Ed25519KeyPair::from_der(&Ed25519KeyPair::generate(), p.key.pair.version().to_owned())?;
    let (status, body) = p
        .request(http::Method::GET, version_path, None, Some(&forged), None)
        .await?;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (401, Some("M_UNAUTHORIZED"))
    );
    let elsewhere = OwnedServerName::try_from("elsewhere.example")?;
    let (status, body) = p
        .request(
            http::Method::GET,
            version_path,
            None,
            Some(&p.key.pair),
            Some(&elsewhere),
        )
        .await?;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (401, Some("M_UNAUTHORIZED"))
    );

    // A body that is not JSON; a transaction over 50 PDUs.
    let (status, body) = p
        .request(
            http::Method::PUT,
            "/_matrix/federation/v1/send/notjson",
            Some(b"{not json"),
            Some(&p.key.pair),
            None,
        )
        .await?;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (400, Some("M_NOT_JSON"))
    );
    let good = p.message(&bob_id, "one of many", &p.key).await?;
    let (status, body) = p.send_txn("too-many", vec![good.clone(); 51]).await?;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (400, Some("M_BAD_JSON"))
    );
    assert!(!p
        .timeline_bodies()
        .await?
        .contains(&"one of many".to_owned()));

    // An event signed with a key that is not B's: refused, not stored.
    let wrong_key = SigningKey::load_or_generate(&tempfile_dir()?.join("other.key"))?;
    let forged_event = p.message(&bob_id, "forged", &wrong_key).await?;
    let forged_id = event_id_in(&p, &forged_event).await?;
    let (status, body) = p.send_txn("forged", vec![forged_event]).await?;
    assert_eq!(status, 200);
    assert!(
        body["pdus"][&forged_id]["error"].is_string(),
        "forged event refused: {body}"
    );

    // An event whose content was changed after signing: kept in its redacted form.
    let mut tampered = p.message(&bob_id, "original", &p.key).await?;
    let tampered_id = event_id_in(&p, &tampered).await?;
    tampered["content"]["body"] = json!("tampered");
    let (status, _) = p.send_txn("tampered", vec![tampered]).await?;
    assert_eq!(status, 200);
    let ev = eventually_event(&p.alice, &p.room, &tampered_id).await?;
    assert_eq!(ev["content"], json!({}), "stored redacted: {ev}");

    // An event from a user of B who is not in the room: fails the auth rules.
    let mallory = format!("@mallory:{}", p.b.server_name());
    let unauthorised = p.message(&mallory, "let me in", &p.key).await?;
    let unauth_id = event_id_in(&p, &unauthorised).await?;
    let (status, body) = p.send_txn("unauthorised", vec![unauthorised]).await?;
    assert_eq!(status, 200);
    assert!(body["pdus"][&unauth_id]["error"].is_string(), "{body}");
    let r = p
        .alice
        .get(&format!(
            "/rooms/{}/event/{}",
            enc(&p.room),
            enc(&unauth_id)
        ))
        .await?;
    assert_eq!(
        r.status, 404,
        "a rejected event is not served: {:?}",
        r.body
    );

    // The same transaction ID again: answered from memory, not processed twice.
    let (status, again) = p.send_txn("unauthorised", vec![]).await?;
    assert_eq!(status, 200);
    assert!(again["pdus"][&unauth_id]["error"].is_string());

    // A good event still goes through, and the client API still answers.
    let fine = p.message(&bob_id, "all fine", &p.key).await?;
    let (status, body) = p.send_txn("fine", vec![fine]).await?;
    assert_eq!(status, 200, "{body}");
    let bodies = p.timeline_bodies().await?;
    assert!(bodies.contains(&"all fine".to_owned()), "{bodies:?}");
    assert!(!bodies.contains(&"forged".to_owned()));
    assert!(!bodies.contains(&"tampered".to_owned()));
    assert!(!bodies.contains(&"let me in".to_owned()));
    ok(p.alice.get("/_matrix/client/versions").await?);
    Ok(())
}

/// Server ACLs: once A's room denies B's host, B's requests about the room (room reads,
/// membership handshakes) get 403 `M_FORBIDDEN` and B's PDUs are refused one by one, while a
/// server on another host (C, named `localhost:<port>`) still joins and talks.
#[tokio::test]
async fn server_acl_denies_a_server() -> anyhow::Result<()> {
    let p = setup().await?;
    let bob_id = p.b.user_id("bob");
    let state_ids = format!("/_matrix/federation/v1/state_ids/{}", enc(&p.room));
    let latest = p
        .alice
        .messages(&p.room, &[("dir", "b"), ("limit", "1")])
        .await?;
    let latest_id = latest["chunk"][0]["event_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let state_ids = format!("{state_ids}?event_id={}", enc(&latest_id));
    let (status, _) = p
        .request(http::Method::GET, &state_ids, None, Some(&p.key.pair), None)
        .await?;
    assert_eq!(status, 200, "B may read the room before the ACL");

    p.alice
        .send_state(
            &p.room,
            "m.room.server_acl",
            "",
            &json!({"allow": ["*"], "deny": ["127.0.0.1"], "allow_ip_literals": true}),
        )
        .await?;
    let (status, body) = p
        .request(http::Method::GET, &state_ids, None, Some(&p.key.pair), None)
        .await?;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (403, Some("M_FORBIDDEN")),
        "room reads: {body}"
    );
    let make_join = format!(
        "/_matrix/federation/v1/make_join/{}/{}?ver=12",
        enc(&p.room),
        enc(&format!("@newcomer:{}", p.b.server_name()))
    );
    let (status, body) = p
        .request(http::Method::GET, &make_join, None, Some(&p.key.pair), None)
        .await?;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (403, Some("M_FORBIDDEN")),
        "make_join: {body}"
    );
    let denied = p.message(&bob_id, "from a denied server", &p.key).await?;
    let denied_id = event_id_in(&p, &denied).await?;
    let (status, body) = p.send_txn("acl", vec![denied]).await?;
    assert_eq!(status, 200);
    assert!(
        body["pdus"][&denied_id]["error"]
            .as_str()
            .is_some_and(|e| e.contains("ACL")),
        "a PDU from a denied server is refused: {body}"
    );
    let r = p
        .alice
        .get(&format!(
            "/rooms/{}/event/{}",
            enc(&p.room),
            enc(&denied_id)
        ))
        .await?;
    assert_eq!(r.status, 404, "the refused PDU is not stored: {:?}", r.body);

    // Another host is not affected.
    let c = TestServer::start_federating_as(Backend::Sqlite, "localhost", &[]).await?;
    let carol = c.register("carol", "carol-password").await?;
    carol.join(&format!("#bad:{}", p.a.server_name())).await?;
    carol
        .send_message(&p.room, "from an allowed server")
        .await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !p
        .timeline_bodies()
        .await?
        .contains(&"from an allowed server".to_owned())
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "C's message never reached A:\n{}",
            c.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("myelin-peer-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let _ = std::fs::remove_file(dir.join("other.key"));
    Ok(dir)
}

/// The event ID of a signed event (its reference hash), as the server computes it.
async fn event_id_in(_p: &Peer, event: &Value) -> anyhow::Result<String> {
    let obj = match myelin_core::ruma::CanonicalJsonValue::try_from(event.clone())? {
        myelin_core::ruma::CanonicalJsonValue::Object(o) => o,
        _ => anyhow::bail!("not an object"),
    };
    let pdu = myelin_core::server::pdu_from_federation(&obj, &RoomVersionId::V12)?;
    Ok(pdu.event_id.to_string())
}

async fn eventually_event(client: &Client, room: &str, id: &str) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = client
            .get(&format!("/rooms/{}/event/{}", enc(room), enc(id)))
            .await?;
        if r.status == 200 {
            return Ok(r.body);
        }
        if Instant::now() > deadline {
            anyhow::bail!("event {id} never appeared: {:?}", r.body);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
