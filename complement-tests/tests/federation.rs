//! Federation between two Myelin servers on loopback (TLS with self-signed certificates,
//! verification off): joins by alias, messages and state both ways, invites, kicks and bans
//! across servers, leave and rejoin, a server that was down catching up, both servers
//! agreeing on the room's state, and a server's keys fetched through a notary while it is down.

use std::time::Duration;

use complement_tests::federation::{
    event_id, eventually, latest, membership, message_event, messages, same_state, start,
    start_with, state_ids, wait_for_message, wait_membership, WAIT,
};
use complement_tests::{ok, pair_tests, Peer, TestServer};
use myelin_core::{pdu::NewEvent, ruma::OwnedEventId};
use serde_json::{json, Value};

async fn join_by_alias_and_talk(a: TestServer, b: TestServer) -> anyhow::Result<()> {
    let alice = a.register("alice", "alice-password").await?;
    let bob = b.register("bob", "bob-password").await?;
    let bob_id = b.user_id("bob");
    let room = alice
        .create_room(&json!({"preset": "public_chat", "room_alias_name": "lobby", "name": "Lobby"}))
        .await?;
    alice.send_message(&room, "before bob").await?;
    let alias = format!("#lobby:{}", a.server_name());
    // Another server's alias and profiles are looked up over federation.
    let looked_up = ok(bob
        .get(&format!(
            "/directory/room/{}",
            complement_tests::enc(&alias)
        ))
        .await?);
    assert_eq!(looked_up["room_id"], room.as_str());
    ok(alice
        .put(
            &format!(
                "/profile/{}/displayname",
                complement_tests::enc(&a.user_id("alice"))
            ),
            &json!({"displayname": "Alice A."}),
        )
        .await?);
    let profile = ok(bob
        .get(&format!(
            "/profile/{}",
            complement_tests::enc(&a.user_id("alice"))
        ))
        .await?);
    assert_eq!(profile["displayname"], "Alice A.");
    let joined = bob.join(&alias).await?;
    assert_eq!(joined, room);
    // Bob's server has the room's state; Alice's server sees Bob join.
    assert_eq!(
        ok(bob.get_state(&room, "m.room.name", "").await?)["name"],
        "Lobby"
    );
    wait_membership(&alice, &room, bob_id.as_str(), "join").await?;

    alice.send_message(&room, "hello bob").await?;
    wait_for_message(&bob, &room, "hello bob").await?;
    bob.send_message(&room, "hello alice").await?;
    wait_for_message(&alice, &room, "hello alice").await?;
    // State both ways.
    bob.send_state(&room, "m.room.topic", "", &json!({"topic": "from bob"}))
        .await
        .expect_err("bob has no power to change the topic");
    alice
        .send_state(&room, "m.room.topic", "", &json!({"topic": "from alice"}))
        .await?;
    eventually("topic on B", || async {
        let r = bob.get_state(&room, "m.room.topic", "").await?;
        Ok((r.status == 200 && r.body["topic"] == "from alice").then_some(()))
    })
    .await?;
    // Bob's sync shows the room with Alice's messages.
    let sync = bob
        .sync_until(None, None, WAIT, |s| {
            s["rooms"]["join"][&room]["timeline"]["events"]
                .as_array()
                .is_some_and(|ev| {
                    ev.iter().any(|e| {
                        e["content"]["body"] == "from alice"
                            || e["content"]["topic"] == "from alice"
                    })
                })
        })
        .await?;
    assert!(sync["rooms"]["join"][&room].is_object());
    // Both servers agree on the state.
    same_state(&alice, &bob, &room).await?;
    Ok(())
}

async fn invite_kick_ban_leave_rejoin(a: TestServer, b: TestServer) -> anyhow::Result<()> {
    let alice = a.register("alice", "alice-password").await?;
    let bob = b.register("bob", "bob-password").await?;
    let bob_id = b.user_id("bob");
    let room = alice
        .create_room(&json!({"preset": "private_chat"}))
        .await?;
    // Invite across servers; Bob sees the invite, joins through Alice's server.
    alice.invite(&room, bob_id.as_str()).await?;
    bob.sync_until(None, None, WAIT, |s| {
        s["rooms"]["invite"][&room].is_object()
    })
    .await?;
    bob.join(&room).await?;
    wait_membership(&alice, &room, bob_id.as_str(), "join").await?;
    bob.send_message(&room, "thanks for the invite").await?;
    wait_for_message(&alice, &room, "thanks for the invite").await?;

    // Leave and rejoin (after a fresh invite: the room is private).
    bob.leave(&room).await?;
    wait_membership(&alice, &room, bob_id.as_str(), "leave").await?;
    let since = bob.sync(None, Some(0), None).await?["next_batch"]
        .as_str()
        .map(str::to_owned);
    alice.invite(&room, bob_id.as_str()).await?;
    // A former member sees the new invite in its sync (the room's state is the one it left).
    bob.sync_until(since.as_deref(), None, WAIT, |s| {
        s["rooms"]["invite"][&room].is_object()
    })
    .await?;
    bob.join(&room).await?;
    wait_membership(&alice, &room, bob_id.as_str(), "join").await?;

    // Kick across servers.
    ok(alice
        .post(
            &format!("/rooms/{}/kick", complement_tests::enc(&room)),
            &json!({"user_id": bob_id.as_str(), "reason": "out"}),
        )
        .await?);
    wait_membership(&bob, &room, bob_id.as_str(), "leave").await?;
    // Ban across servers: Bob cannot come back.
    ok(alice
        .post(
            &format!("/rooms/{}/ban", complement_tests::enc(&room)),
            &json!({"user_id": bob_id.as_str()}),
        )
        .await?);
    let r = bob
        .post(
            &format!(
                "/join/{}?server_name={}",
                complement_tests::enc(&room),
                complement_tests::enc(a.server_name())
            ),
            &json!({}),
        )
        .await?;
    assert_eq!(r.status, 403, "a banned user's join is refused");
    Ok(())
}

async fn catch_up_after_restart(a: TestServer, b: TestServer) -> anyhow::Result<()> {
    let alice = a.register("alice", "alice-password").await?;
    let bob = b.register("bob", "bob-password").await?;
    let bob_id = b.user_id("bob");
    let room = alice
        .create_room(&json!({"preset": "public_chat", "room_alias_name": "up"}))
        .await?;
    bob.join(&format!("#up:{}", a.server_name())).await?;
    wait_membership(&alice, &room, bob_id.as_str(), "join").await?;
    b.stop(Duration::from_secs(10)).await?;
    for i in 0..5 {
        alice
            .send_message(&room, &format!("while away {i}"))
            .await?;
    }
    b.restart().await?;
    let bob = b.login("bob", "bob-password", None).await?;
    wait_for_message(&bob, &room, "while away 4").await?;
    let (ma, mb) = (messages(&alice, &room).await?, messages(&bob, &room).await?);
    assert_eq!(ma, mb, "both servers list the same timeline");
    Ok(())
}

async fn conflicting_state_converges(a: TestServer, b: TestServer) -> anyhow::Result<()> {
    let alice = a.register("alice", "alice-password").await?;
    let bob = b.register("bob", "bob-password").await?;
    let bob_id = b.user_id("bob");
    let room = alice
        .create_room(&json!({"preset": "public_chat", "room_alias_name": "split"}))
        .await?;
    bob.join(&format!("#split:{}", a.server_name())).await?;
    wait_membership(&alice, &room, bob_id.as_str(), "join").await?;
    // Make Bob a moderator so both may change the topic.
    let mut pl = ok(alice.get_state(&room, "m.room.power_levels", "").await?);
    pl["users"][bob_id.as_str()] = json!(100);
    alice
        .send_state(&room, "m.room.power_levels", "", &pl)
        .await?;
    eventually("bob's power on B", || async {
        let pl = ok(bob.get_state(&room, "m.room.power_levels", "").await?);
        Ok((pl["users"][bob_id.as_str()] == 100).then_some(()))
    })
    .await?;
    // Partition: B is down while A changes the topic; then B (cut off from A by being
    // restarted right after its own change) changes it too.
    b.stop(Duration::from_secs(10)).await?;
    alice
        .send_state(&room, "m.room.topic", "", &json!({"topic": "topic from A"}))
        .await?;
    a.stop(Duration::from_secs(10)).await?;
    b.restart().await?;
    let bob = b.login("bob", "bob-password", None).await?;
    bob.send_state(&room, "m.room.topic", "", &json!({"topic": "topic from B"}))
        .await?;
    a.restart().await?;
    let alice = a.login("alice", "alice-password", None).await?;
    // Each server's queue delivers the other's change; both resolve the fork the same way.
    eventually("identical state", || async {
        let (sa, sb) = (
            state_ids(&alice, &room).await?,
            state_ids(&bob, &room).await?,
        );
        let topic_a = ok(alice.get_state(&room, "m.room.topic", "").await?);
        let topic_b = ok(bob.get_state(&room, "m.room.topic", "").await?);
        Ok((sa == sb && topic_a == topic_b).then_some(()))
    })
    .await?;
    Ok(())
}

/// Keys through a notary: B's user joins a room on N; B goes down; a user of A (which trusts N
/// as a key server) joins the room through N and needs B's key to accept B's member event
/// from the room state: A gets it from N, countersigned. C, trusting no notary, cannot check
/// that event and leaves it out of its state.
async fn keys_through_a_notary(n: TestServer, b: TestServer) -> anyhow::Result<()> {
    let a = start_with(
        n.backend(),
        &[("MYELIN_TRUSTED_KEY_SERVERS", n.server_name())],
    )
    .await?;
    let c = start(n.backend()).await?;
    let result = async {
        let nina = n.register("nina", "nina-password").await?;
        let bob = b.register("bob", "bob-password").await?;
        let bob_id = b.user_id("bob");
        let room = nina
            .create_room(&json!({"preset": "public_chat", "room_alias_name": "keys"}))
            .await?;
        bob.join(&format!("#keys:{}", n.server_name())).await?;
        wait_membership(&nina, &room, bob_id.as_str(), "join").await?;
        nina.send_message(&room, "bob is here").await?;
        b.stop(Duration::from_secs(10)).await?;

        let alice = a.register("alice", "alice-password").await?;
        alice.join(&format!("#keys:{}", n.server_name())).await?;
        assert_eq!(
            membership(&alice, &room, bob_id.as_str()).await?.as_deref(),
            Some("join"),
            "A accepted B's member event with B's key from the notary"
        );
        let carol = c.register("carol", "carol-password").await?;
        carol.join(&format!("#keys:{}", n.server_name())).await?;
        assert_eq!(
            membership(&carol, &room, bob_id.as_str()).await?,
            None,
            "C could not check B's member event without B or a notary"
        );
        Ok(())
    }
    .await;
    if result.is_err() {
        for (name, s) in [("A", &a), ("C", &c)] {
            eprintln!("---- server {name} ----");
            s.print_log_tail();
        }
    }
    result
}

/// One transaction of events that build on each other (A queues each on the one before
/// without awaiting its commit): messages, a join, a message authorised by that join, an
/// event that fails the auth rules in the middle, and one more on top. Each gets its own
/// outcome, and A's timeline holds exactly the accepted ones, in order.
async fn chained_transaction(a: TestServer, b: TestServer) -> anyhow::Result<()> {
    let alice = a.register("alice", "alice-password").await?;
    let bob = b.register("bob", "bob-password").await?;
    let bob_id = b.user_id("bob");
    let room = alice
        .create_room(&json!({"preset": "public_chat", "room_alias_name": "chain"}))
        .await?;
    bob.join(&format!("#chain:{}", a.server_name())).await?;
    let peer = Peer::new(&b)?;
    let state = alice.room_state(&room).await?;
    let id_of = |ty: &str, sk: &str| -> anyhow::Result<OwnedEventId> {
        let e = state
            .iter()
            .find(|e| e["type"] == ty && e["state_key"] == sk)
            .ok_or_else(|| anyhow::anyhow!("no {ty} {sk} in A's state"))?;
        Ok(OwnedEventId::try_from(
            e["event_id"].as_str().unwrap_or_default(),
        )?)
    };
    let pl = id_of("m.room.power_levels", "")?;
    let bob_member = id_of("m.room.member", &bob_id)?;
    let join_rules = id_of("m.room.join_rules", "")?;
    let dave = b.user_id("dave");
    let mallory = b.user_id("mallory");

    let mut prev = latest(&alice, &room).await?;
    let mut depth = 1000;
    let mut next = |sender: &str, auth: Vec<OwnedEventId>, event: NewEvent, prev: &str| {
        depth += 1;
        let mut auth = auth;
        auth.sort();
        peer.build(&room, sender, prev, &auth, depth, event)
    };
    let m1 = next(
        &bob_id,
        vec![pl.clone(), bob_member.clone()],
        message_event("one")?,
        &prev,
    )?;
    prev = event_id(&m1)?;
    let m2 = next(
        &bob_id,
        vec![pl.clone(), bob_member.clone()],
        message_event("two")?,
        &prev,
    )?;
    prev = event_id(&m2)?;
    let join = next(
        &dave,
        vec![pl.clone(), join_rules],
        NewEvent::state("m.room.member", &dave, json!({"membership": "join"}))?,
        &prev,
    )?;
    let join_id = event_id(&join)?;
    let m3 = next(
        &dave,
        vec![pl.clone(), OwnedEventId::try_from(join_id.as_str())?],
        message_event("three")?,
        &join_id,
    )?;
    prev = event_id(&m3)?;
    let refused = next(&mallory, vec![pl.clone()], message_event("refused")?, &prev)?;
    let m4 = next(&bob_id, vec![pl, bob_member], message_event("four")?, &prev)?;
    let pdus: Vec<Value> = vec![m1, m2, join, m3, refused.clone(), m4];
    let ids: Vec<String> = pdus.iter().map(event_id).collect::<Result<_, _>>()?;

    let (status, answer) = peer.send_txn(&a, "chained", &pdus).await?;
    assert_eq!(status, 200, "{answer}");
    let refused_id = event_id(&refused)?;
    for id in &ids {
        let result = &answer["pdus"][id];
        if *id == refused_id {
            assert!(
                result["error"].is_string(),
                "{refused_id} refused: {answer}"
            );
        } else {
            assert_eq!(result, &json!({}), "{id} accepted: {answer}");
        }
    }
    let newest = alice.recent_event_ids(&room, 5).await?;
    let accepted: Vec<String> = ids
        .iter()
        .rev()
        .filter(|id| **id != refused_id)
        .cloned()
        .collect();
    assert_eq!(
        newest, accepted,
        "A's timeline ends with the accepted events, in order"
    );
    assert_eq!(
        membership(&alice, &room, &dave).await?.as_deref(),
        Some("join")
    );
    let bodies = messages(&alice, &room).await?;
    assert!(
        bodies.ends_with(&["one", "two", "three", "four"].map(str::to_owned)),
        "{bodies:?}"
    );
    Ok(())
}

pair_tests!(
    chained_transaction,
    join_by_alias_and_talk,
    invite_kick_ban_leave_rejoin,
    catch_up_after_restart,
    conflicting_state_converges,
    keys_through_a_notary
);
