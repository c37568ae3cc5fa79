//! Bad input from a peer server. The test acts as server B (signing with B's own key, read from
//! B's data directory) towards server A, which hosts a room B's user is in: unsigned, forged and
//! misdirected requests, malformed bodies, oversized transactions, events with forged
//! signatures, a wrong content hash, an event that fails the auth rules, and requests from a
//! server the room's server ACL denies. Each is refused as the spec says, nothing that should
//! not be stored is visible, and A keeps serving.

use complement_tests::federation::{
    event_id, event_on, eventually, latest, message_event, messages, wait_for_message,
};
use complement_tests::{enc, ok, Backend, Client, Peer, TestServer};
use serde_json::{json, Value};

/// Server A, server B with a user in A's room, and the test acting as B.
struct Setup {
    a: TestServer,
    b: TestServer,
    /// Signs as B, with B's own key.
    peer: Peer,
    room: String,
    alice: Client,
}

impl Setup {
    /// A message from `sender` (a user of B) built on the room's latest event, signed by
    /// `signer` as B.
    async fn message(&self, sender: &str, body: &str, signer: &Peer) -> anyhow::Result<Value> {
        signer
            .event_on_latest(&self.alice, &self.room, sender, message_event(body)?)
            .await
    }
}

async fn setup() -> anyhow::Result<Setup> {
    let a = TestServer::start_federating(Backend::Sqlite, &[]).await?;
    let b = TestServer::start_federating(Backend::Sqlite, &[]).await?;
    let alice = a.register("alice", "alice-password").await?;
    let bob = b.register("bob", "bob-password").await?;
    let room = alice
        .create_room(&json!({"preset": "public_chat", "room_alias_name": "bad"}))
        .await?;
    bob.join(&format!("#bad:{}", a.server_name())).await?;
    let peer = Peer::new(&b)?;
    Ok(Setup {
        a,
        b,
        peer,
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
        .peer
        .raw_request(&p.a, http::Method::GET, version_path, None, None)
        .await?;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (401, Some("M_UNAUTHORIZED"))
    );
    let forged = p.peer.impostor_key()?;
    let (status, body) = p
        .peer
        .raw_request(
            &p.a,
            http::Method::GET,
            version_path,
            None,
            Some((&forged, p.a.server_name())),
        )
        .await?;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (401, Some("M_UNAUTHORIZED"))
    );
    let (status, body) = p
        .peer
        .raw_request(
            &p.a,
            http::Method::GET,
            version_path,
            None,
            Some((&p.peer.key().pair, "elsewhere.example")),
        )
        .await?;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (401, Some("M_UNAUTHORIZED"))
    );

    // A body that is not JSON; a transaction over 50 PDUs.
    let (status, body) = p
        .peer
        .raw_request(
            &p.a,
            http::Method::PUT,
            "/_matrix/federation/v1/send/notjson",
            Some(b"{not json"),
            Some((&p.peer.key().pair, p.a.server_name())),
        )
        .await?;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (400, Some("M_NOT_JSON"))
    );
    let good = p.message(&bob_id, "one of many", &p.peer).await?;
    let (status, body) = p
        .peer
        .send_txn(&p.a, "too-many", &vec![good.clone(); 51])
        .await?;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (400, Some("M_BAD_JSON"))
    );
    assert!(!messages(&p.alice, &p.room)
        .await?
        .contains(&"one of many".to_owned()));

    // An event signed with a key that is not B's: refused, not stored.
    let wrong_key = p.peer.with_new_key()?;
    let forged_event = p.message(&bob_id, "forged", &wrong_key).await?;
    let forged_id = event_id(&forged_event)?;
    let (status, body) = p.peer.send_txn(&p.a, "forged", &[forged_event]).await?;
    assert_eq!(status, 200);
    assert!(
        body["pdus"][&forged_id]["error"].is_string(),
        "forged event refused: {body}"
    );

    // An event whose content was changed after signing: kept in its redacted form.
    let mut tampered = p.message(&bob_id, "original", &p.peer).await?;
    let tampered_id = event_id(&tampered)?;
    tampered["content"]["body"] = json!("tampered");
    let (status, _) = p.peer.send_txn(&p.a, "tampered", &[tampered]).await?;
    assert_eq!(status, 200);
    let ev = eventually(&format!("event {tampered_id}"), || {
        event_on(&p.alice, &p.room, &tampered_id)
    })
    .await?;
    assert_eq!(ev["content"], json!({}), "stored redacted: {ev}");

    // An event from a user of B who is not in the room: fails the auth rules.
    let mallory = format!("@mallory:{}", p.b.server_name());
    let unauthorised = p.message(&mallory, "let me in", &p.peer).await?;
    let unauth_id = event_id(&unauthorised)?;
    let (status, body) = p
        .peer
        .send_txn(&p.a, "unauthorised", &[unauthorised])
        .await?;
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
    let (status, again) = p.peer.send_txn(&p.a, "unauthorised", &[]).await?;
    assert_eq!(status, 200);
    assert!(again["pdus"][&unauth_id]["error"].is_string());

    // A good event still goes through, and the client API still answers.
    let fine = p.message(&bob_id, "all fine", &p.peer).await?;
    let (status, body) = p.peer.send_txn(&p.a, "fine", &[fine]).await?;
    assert_eq!(status, 200, "{body}");
    let bodies = messages(&p.alice, &p.room).await?;
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
    let latest_id = latest(&p.alice, &p.room).await?;
    let state_ids = format!("{state_ids}?event_id={}", enc(&latest_id));
    let (status, _) = p.peer.get(&p.a, &state_ids).await?;
    assert_eq!(status, 200, "B may read the room before the ACL");

    p.alice
        .send_state(
            &p.room,
            "m.room.server_acl",
            "",
            &json!({"allow": ["*"], "deny": ["127.0.0.1"], "allow_ip_literals": true}),
        )
        .await?;
    let (status, body) = p.peer.get(&p.a, &state_ids).await?;
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
    let (status, body) = p.peer.get(&p.a, &make_join).await?;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (403, Some("M_FORBIDDEN")),
        "make_join: {body}"
    );
    let denied = p.message(&bob_id, "from a denied server", &p.peer).await?;
    let denied_id = event_id(&denied)?;
    let (status, body) = p.peer.send_txn(&p.a, "acl", &[denied]).await?;
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
    if let Err(e) = wait_for_message(&p.alice, &p.room, "from an allowed server").await {
        anyhow::bail!("C's message never reached A ({e}):\n{}", c.log_tail(40));
    }
    Ok(())
}
