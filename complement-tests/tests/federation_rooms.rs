//! Room features across two Myelin servers (TLS on loopback): another server's public room
//! directory (search and paging), a space hierarchy with children on both servers seen from
//! both sides (and through the federation endpoint, with an inaccessible child),
//! `createRoom` inviting a user of the other server, and redactions that arrive before the
//! event they redact (the test acting as the peer servers with their own keys): applied once
//! the target arrives when they qualify, never when they do not.

use std::time::Duration;

use complement_tests::federation::{
    event_id, event_on, latest, membership, message_event, redaction_event, start,
    wait_for_message, wait_membership, WAIT,
};
use complement_tests::{assert_error, enc, ok, pair_tests, Backend, Client, Peer, TestServer};
use serde_json::{json, Value};

/// The `name` of each entry of a `chunk` or `rooms` list.
fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .into_iter()
        .flatten()
        .map(|r| r["name"].as_str().unwrap_or("?").to_owned())
        .collect()
}

fn owned(list: &[&String]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn ids(list: &Value) -> Vec<String> {
    list.as_array()
        .into_iter()
        .flatten()
        .map(|r| r["room_id"].as_str().unwrap_or("?").to_owned())
        .collect()
}

// Public room directory ------------------------------------------------------------------------

async fn public_rooms_of_another_server(a: TestServer, b: TestServer) -> anyhow::Result<()> {
    let alice = a.register("alice", "alice-password").await?;
    let bob = b.register("bob", "bob-password").await?;
    for (name, topic) in [
        ("Cheese Lovers", "All about Brie"),
        ("Wine Club", "Reds and whites"),
        ("Cheese and Wine", "Pairings"),
    ] {
        alice
            .create_room(&json!({"visibility": "public", "preset": "public_chat",
                                 "name": name, "topic": topic}))
            .await?;
    }
    alice
        .create_room(&json!({"preset": "public_chat", "name": "Cheese (unlisted)"}))
        .await?;
    let bob_only = bob
        .create_room(&json!({"visibility": "public", "preset": "public_chat", "name": "Bob's"}))
        .await?;
    let server = enc(a.server_name());

    // The whole directory of A, asked from B.
    let all = ok(bob.get(&format!("/publicRooms?server={server}")).await?);
    let mut got = names(&all["chunk"]);
    got.sort();
    assert_eq!(
        got,
        ["Cheese Lovers", "Cheese and Wine", "Wine Club"],
        "{all}"
    );
    assert_eq!(all["total_room_count_estimate"], 3);
    assert!(!ids(&all["chunk"]).contains(&bob_only));
    // Anonymous GET works too; our own name means our own directory.
    let anon = ok(b
        .anonymous()
        .get(&format!("/publicRooms?server={server}"))
        .await?);
    assert_eq!(anon["chunk"], all["chunk"]);
    let own = ok(bob
        .get(&format!("/publicRooms?server={}", enc(b.server_name())))
        .await?);
    assert_eq!(ids(&own["chunk"]), owned(&[&bob_only]));

    // A search term (name, topic, alias; case-insensitive), through POST.
    let cheese = ok(bob
        .post(
            &format!("/publicRooms?server={server}"),
            &json!({"filter": {"generic_search_term": "CHEESE"}}),
        )
        .await?);
    let mut got = names(&cheese["chunk"]);
    got.sort();
    assert_eq!(got, ["Cheese Lovers", "Cheese and Wine"], "{cheese}");
    let brie = ok(bob
        .post(
            &format!("/publicRooms?server={server}"),
            &json!({"filter": {"generic_search_term": "brie"}}),
        )
        .await?);
    assert_eq!(names(&brie["chunk"]), ["Cheese Lovers"]);

    // Paging with GET: 2 + 1, each room once, tokens both ways.
    let first = ok(bob
        .get(&format!("/publicRooms?server={server}&limit=2"))
        .await?);
    assert_eq!(first["chunk"].as_array().map(Vec::len), Some(2), "{first}");
    assert!(first.get("prev_batch").is_none());
    let next = first["next_batch"]
        .as_str()
        .expect("a next page")
        .to_owned();
    let second = ok(bob
        .get(&format!(
            "/publicRooms?server={server}&limit=2&since={}",
            enc(&next)
        ))
        .await?);
    assert_eq!(
        second["chunk"].as_array().map(Vec::len),
        Some(1),
        "{second}"
    );
    assert!(second.get("next_batch").is_none());
    let back = second["prev_batch"].as_str().expect("a previous page");
    let again = ok(bob
        .get(&format!(
            "/publicRooms?server={server}&limit=2&since={}",
            enc(back)
        ))
        .await?);
    assert_eq!(again["chunk"], first["chunk"]);
    let mut paged = ids(&first["chunk"]);
    paged.extend(ids(&second["chunk"]));
    let mut whole = ids(&all["chunk"]);
    paged.sort();
    whole.sort();
    assert_eq!(paged, whole);

    // Paging a filtered list with POST.
    let wine1 = ok(bob
        .post(
            &format!("/publicRooms?server={server}"),
            &json!({"limit": 1, "filter": {"generic_search_term": "wine"}}),
        )
        .await?);
    assert_eq!(wine1["total_room_count_estimate"], 2);
    let since = wine1["next_batch"].as_str().expect("a next page");
    let wine2 = ok(bob
        .post(
            &format!("/publicRooms?server={server}"),
            &json!({"limit": 1, "since": since, "filter": {"generic_search_term": "wine"}}),
        )
        .await?);
    let mut got = names(&wine1["chunk"]);
    got.extend(names(&wine2["chunk"]));
    got.sort();
    assert_eq!(got, ["Cheese and Wine", "Wine Club"]);
    assert!(wine2.get("next_batch").is_none());

    // A third-party network Myelin does not bridge is empty; a bad token is refused by A.
    let tp = ok(bob
        .post(
            &format!("/publicRooms?server={server}"),
            &json!({"third_party_instance_id": "irc-somewhere"}),
        )
        .await?);
    assert_eq!(tp["chunk"], json!([]));
    let bad = bob
        .get(&format!("/publicRooms?server={server}&since=garbage"))
        .await?;
    assert_error(&bad, 400, "M_INVALID_PARAM");
    let bad_name = bob.get("/publicRooms?server=not%20a%20server").await?;
    assert_error(&bad_name, 400, "M_INVALID_PARAM");
    Ok(())
}

// Space hierarchy ------------------------------------------------------------------------------

/// `m.space.child` content linking a room through `server`.
fn link(server: &str, order: &str, suggested: bool) -> Value {
    json!({"via": [server], "order": order, "suggested": suggested})
}

async fn hierarchy(client: &Client, room: &str, params: &str) -> anyhow::Result<Value> {
    Ok(ok(client
        .get(&format!(
            "/_matrix/client/v1/rooms/{}/hierarchy{params}",
            enc(room)
        ))
        .await?))
}

async fn space_hierarchy_across_servers(a: TestServer, b: TestServer) -> anyhow::Result<()> {
    let alice = a.register("alice", "alice-password").await?;
    let carol = a.register("carol", "carol-password").await?;
    let bob = b.register("bob", "bob-password").await?;
    let (an, bn) = (a.server_name().to_owned(), b.server_name().to_owned());
    let space = alice
        .create_room(
            &json!({"preset": "public_chat", "name": "Space", "room_alias_name": "space",
                             "creation_content": {"type": "m.space"}}),
        )
        .await?;
    let a_public = alice
        .create_room(&json!({"preset": "public_chat", "name": "A public"}))
        .await?;
    let a_private = alice
        .create_room(&json!({"preset": "private_chat", "name": "A private"}))
        .await?;
    let sub = alice
        .create_room(&json!({"preset": "public_chat", "name": "Subspace",
                             "creation_content": {"type": "m.space"}}))
        .await?;
    let a_deep = alice
        .create_room(&json!({"preset": "public_chat", "name": "A deep"}))
        .await?;
    let b_public = bob
        .create_room(&json!({"preset": "public_chat", "name": "B public"}))
        .await?;
    for (child, via, order, suggested) in [
        (&a_public, &an, "a", true),
        (&a_private, &an, "b", false),
        (&b_public, &bn, "c", false),
        (&sub, &an, "d", false),
    ] {
        alice
            .send_state(&space, "m.space.child", child, &link(via, order, suggested))
            .await?;
    }
    alice
        .send_state(&sub, "m.space.child", &a_deep, &link(&an, "a", false))
        .await?;
    // A link without `via` is no link.
    alice
        .send_state(&space, "m.space.child", "!gone:nowhere.example", &json!({}))
        .await?;

    // From A: Alice sees everything, B's room described by B over federation.
    let all = hierarchy(&alice, &space, "").await?;
    assert_eq!(
        ids(&all["rooms"]),
        owned(&[&space, &a_public, &a_private, &b_public, &sub, &a_deep]),
        "{all}"
    );
    assert_eq!(
        names(&all["rooms"]),
        [
            "Space",
            "A public",
            "A private",
            "B public",
            "Subspace",
            "A deep"
        ]
    );
    let root = &all["rooms"][0];
    assert_eq!(root["room_type"], "m.space");
    assert_eq!(root["children_state"].as_array().map(Vec::len), Some(4));
    assert_eq!(all["rooms"][1]["children_state"], json!([]));
    assert_eq!(all["rooms"][3]["join_rule"], "public");
    assert!(all.get("next_batch").is_none());
    // Carol is not in the private room: it is left out for her.
    let for_carol = hierarchy(&carol, &space, "").await?;
    assert_eq!(
        ids(&for_carol["rooms"]),
        owned(&[&space, &a_public, &b_public, &sub, &a_deep])
    );
    let r = carol
        .get(&format!(
            "/_matrix/client/v1/rooms/{}/hierarchy",
            enc(&a_private)
        ))
        .await?;
    assert_error(&r, 403, "M_FORBIDDEN");
    // max_depth, suggested_only.
    let shallow = hierarchy(&alice, &space, "?max_depth=1").await?;
    assert_eq!(
        ids(&shallow["rooms"]),
        owned(&[&space, &a_public, &a_private, &b_public, &sub])
    );
    let only_root = hierarchy(&alice, &space, "?max_depth=0").await?;
    assert_eq!(ids(&only_root["rooms"]), owned(&[&space]));
    let suggested = hierarchy(&alice, &space, "?suggested_only=true").await?;
    assert_eq!(ids(&suggested["rooms"]), owned(&[&space, &a_public]));
    // Paging: three pages of two, the same rooms in the same order.
    let mut paged = Vec::new();
    let mut from: Option<String> = None;
    for _ in 0..3 {
        let params = match &from {
            Some(f) => format!("?limit=2&from={}", enc(f)),
            None => "?limit=2".to_owned(),
        };
        let page = hierarchy(&alice, &space, &params).await?;
        assert_eq!(page["rooms"].as_array().map(Vec::len), Some(2), "{page}");
        paged.extend(ids(&page["rooms"]));
        from = page["next_batch"].as_str().map(str::to_owned);
    }
    assert!(from.is_none(), "no fourth page");
    assert_eq!(paged, ids(&all["rooms"]));
    let first = hierarchy(&alice, &space, "?limit=2").await?;
    let token = first["next_batch"].as_str().unwrap_or_default();
    let changed = alice
        .get(&format!(
            "/_matrix/client/v1/rooms/{}/hierarchy?from={}&max_depth=1",
            enc(&space),
            enc(token)
        ))
        .await?;
    assert_error(&changed, 400, "M_INVALID_PARAM");
    let zero = alice
        .get(&format!(
            "/_matrix/client/v1/rooms/{}/hierarchy?limit=0",
            enc(&space)
        ))
        .await?;
    assert_error(&zero, 400, "M_INVALID_PARAM");

    // From B, after Bob joins the space: A's rooms come from A, except the private one,
    // which A will not describe to B.
    bob.join(&format!("#space:{an}")).await?;
    let from_b = hierarchy(&bob, &space, "").await?;
    assert_eq!(
        ids(&from_b["rooms"]),
        owned(&[&space, &a_public, &b_public, &sub, &a_deep]),
        "{from_b}"
    );
    assert_eq!(names(&from_b["rooms"])[1], "A public");
    assert_eq!(
        from_b["rooms"][3]["children_state"]
            .as_array()
            .map(Vec::len),
        Some(1),
        "the subspace's links, from A"
    );

    // The federation endpoint itself, asked as B: the private child is inaccessible, B's
    // room (which A is not in) is left out.
    let peer = Peer::new(&b)?;
    let (status, fed) = peer
        .get(
            &a,
            &format!("/_matrix/federation/v1/hierarchy/{}", enc(&space)),
        )
        .await?;
    assert_eq!(status, 200, "{fed}");
    assert_eq!(fed["room"]["room_id"], space.as_str());
    assert_eq!(
        fed["room"]["children_state"].as_array().map(Vec::len),
        Some(4)
    );
    let mut children = ids(&fed["children"]);
    children.sort();
    let mut want = vec![a_public.clone(), sub.clone()];
    want.sort();
    assert_eq!(children, want, "{fed}");
    assert_eq!(fed["inaccessible_children"], json!([a_private]));
    let (_, fed_suggested) = peer
        .get(
            &a,
            &format!(
                "/_matrix/federation/v1/hierarchy/{}?suggested_only=true",
                enc(&space)
            ),
        )
        .await?;
    assert_eq!(ids(&fed_suggested["children"]), owned(&[&a_public]));
    assert_eq!(fed_suggested["inaccessible_children"], json!([]));
    let (status, body) = peer
        .get(
            &a,
            &format!("/_matrix/federation/v1/hierarchy/{}", enc(&a_private)),
        )
        .await?;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (404, Some("M_NOT_FOUND"))
    );
    let (status, _) = peer
        .get(
            &a,
            &format!("/_matrix/federation/v1/hierarchy/{}", enc("!unknown:x")),
        )
        .await?;
    assert_eq!(status, 404);
    Ok(())
}

// createRoom with a remote invitee ---------------------------------------------------------------

async fn create_room_inviting_a_remote_user(a: TestServer, b: TestServer) -> anyhow::Result<()> {
    let alice = a.register("alice", "alice-password").await?;
    let bob = b.register("bob", "bob-password").await?;
    let alice_id = a.user_id("alice");
    let room = bob
        .create_room(
            &json!({"preset": "trusted_private_chat", "name": "Bob and Alice",
                             "invite": [alice_id], "is_direct": true}),
        )
        .await?;
    assert_eq!(
        membership(&bob, &room, &alice_id).await?.as_deref(),
        Some("invite"),
        "the invite is in the room when createRoom answers"
    );
    let sync = alice
        .sync_until(None, None, WAIT, |s| {
            s["rooms"]["invite"][&room].is_object()
        })
        .await?;
    let invite_state = &sync["rooms"]["invite"][&room]["invite_state"]["events"];
    let has = |ty: &str| {
        invite_state
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["type"] == ty)
            .cloned()
    };
    assert_eq!(
        has("m.room.name").map(|e| e["content"]["name"].clone()),
        Some(json!("Bob and Alice")),
        "{invite_state}"
    );
    let own = invite_state
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["type"] == "m.room.member" && e["state_key"] == alice_id.as_str());
    if let Some(own) = own {
        assert_eq!(own["content"]["is_direct"], true, "{own}");
    }
    // Alice accepts; both servers agree she is joined; messages flow.
    alice.join(&room).await?;
    wait_membership(&bob, &room, &alice_id, "join").await?;
    bob.send_message(&room, "welcome").await?;
    wait_for_message(&alice, &room, "welcome").await?;
    // A remote invitee whose server cannot be reached does not stop the room being made.
    let lonely = bob
        .create_room(&json!({"preset": "private_chat", "invite": ["@nobody:127.0.0.1:1"]}))
        .await?;
    assert_eq!(
        membership(&bob, &lonely, "@nobody:127.0.0.1:1").await?,
        None
    );
    Ok(())
}

// Late redactions (the test acts as the peer servers) ------------------------------------------

async fn late_redactions(backend: Backend) -> anyhow::Result<()> {
    let a = start(backend).await?;
    let b = start(Backend::Sqlite).await?;
    let c = start(Backend::Sqlite).await?;
    let result = late_redactions_on(&a, &b, &c).await;
    if result.is_err() {
        eprintln!("---- server A ----");
        a.print_log_tail();
    }
    result
}

async fn late_redactions_on(a: &TestServer, b: &TestServer, c: &TestServer) -> anyhow::Result<()> {
    let alice = a.register("alice", "alice-password").await?;
    let bob = b.register("bob", "bob-password").await?;
    let carol = c.register("carol", "carol-password").await?;
    let (bob_id, carol_id) = (b.user_id("bob"), c.user_id("carol"));
    let room = alice
        .create_room(&json!({"preset": "public_chat", "room_alias_name": "late",
                             "room_version": "12"}))
        .await?;
    bob.join(&format!("#late:{}", a.server_name())).await?;
    carol.join(&format!("#late:{}", a.server_name())).await?;
    wait_membership(&alice, &room, &bob_id, "join").await?;
    wait_membership(&alice, &room, &carol_id, "join").await?;
    let (pb, pc) = (Peer::new(b)?, Peer::new(c)?);

    // Bob (power 0) redacts an event of his own server and one of Carol's, both before A has
    // them.
    let base = latest(&alice, &room).await?;
    let carols = pc
        .event(
            &alice,
            &room,
            &carol_id,
            &base,
            message_event("carol's words")?,
        )
        .await?;
    let bobs = pb
        .event(&alice, &room, &bob_id, &base, message_event("bob's words")?)
        .await?;
    let (carols_id, bobs_id) = (event_id(&carols)?, event_id(&bobs)?);
    let r_carol = pb
        .event(&alice, &room, &bob_id, &base, redaction_event(&carols_id)?)
        .await?;
    let r_bob = pb
        .event(&alice, &room, &bob_id, &base, redaction_event(&bobs_id)?)
        .await?;
    let (r_carol_id, r_bob_id) = (event_id(&r_carol)?, event_id(&r_bob)?);
    assert_eq!(pb.send(a, &r_carol).await?, json!({}), "redaction accepted");
    assert_eq!(pb.send(a, &r_bob).await?, json!({}));
    assert!(event_on(&alice, &room, &r_bob_id).await?.is_some());
    assert!(event_on(&alice, &room, &bobs_id).await?.is_none());

    // The targets arrive: Bob's is stored redacted (same server), Carol's is not (Bob may not
    // redact others' events and is on another server).
    assert_eq!(pb.send(a, &bobs).await?, json!({}));
    assert_eq!(pc.send(a, &carols).await?, json!({}));
    let stored = event_on(&alice, &room, &bobs_id)
        .await?
        .expect("bob's event stored");
    assert_eq!(
        stored["content"],
        json!({}),
        "redacted on arrival: {stored}"
    );
    assert_eq!(
        stored["unsigned"]["redacted_because"]["event_id"],
        r_bob_id.as_str(),
        "{stored}"
    );
    let kept = event_on(&alice, &room, &carols_id)
        .await?
        .expect("carol's event stored");
    assert_eq!(kept["content"]["body"], "carol's words", "{kept}");
    assert!(kept["unsigned"].get("redacted_because").is_none());
    // The timeline shows the same.
    let m = alice
        .messages(&room, &[("dir", "b"), ("limit", "20")])
        .await?;
    let in_timeline = |id: &str| {
        m["chunk"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["event_id"] == id)
            .cloned()
    };
    assert_eq!(
        in_timeline(&bobs_id).map(|e| e["content"].clone()),
        Some(json!({}))
    );
    assert_eq!(
        in_timeline(&carols_id).map(|e| e["content"]["body"].clone()),
        Some(json!("carol's words"))
    );
    let _ = r_carol_id;

    // With the power to redact, Bob's redaction of Carol's next event applies when it comes.
    let mut pl = ok(alice.get_state(&room, "m.room.power_levels", "").await?);
    pl["users"][bob_id.as_str()] = json!(50);
    alice
        .send_state(&room, "m.room.power_levels", "", &pl)
        .await?;
    let base = latest(&alice, &room).await?;
    let carols2 = pc
        .event(
            &alice,
            &room,
            &carol_id,
            &base,
            message_event("carol again")?,
        )
        .await?;
    let carols2_id = event_id(&carols2)?;
    let r2 = pb
        .event(&alice, &room, &bob_id, &base, redaction_event(&carols2_id)?)
        .await?;
    assert_eq!(pb.send(a, &r2).await?, json!({}));
    assert_eq!(pc.send(a, &carols2).await?, json!({}));
    let stored = event_on(&alice, &room, &carols2_id)
        .await?
        .expect("carol's second event stored");
    assert_eq!(stored["content"], json!({}), "{stored}");
    assert_eq!(
        stored["unsigned"]["redacted_because"]["event_id"],
        event_id(&r2)?.as_str()
    );
    // After a restart A still serves them as it stored them.
    a.stop(Duration::from_secs(10)).await?;
    a.restart().await?;
    let alice = a.login("alice", "alice-password", None).await?;
    let after = event_on(&alice, &room, &bobs_id).await?.expect("stored");
    assert_eq!(after["content"], json!({}));
    let after = event_on(&alice, &room, &carols_id).await?.expect("stored");
    assert_eq!(after["content"]["body"], "carol's words");
    Ok(())
}

pair_tests!(
    public_rooms_of_another_server,
    space_hierarchy_across_servers,
    create_room_inviting_a_remote_user;
    per_backend: late_redactions
);
