//! Federation between Myelin and a real Synapse (1.163, on loopback with self-signed TLS):
//! a Synapse user joins a Myelin-hosted room and a Myelin user joins a Synapse-hosted room;
//! messages, state changes and membership changes (invites, kicks, bans, leaves) flow both
//! ways, knocks and restricted joins included, in every room version from 6 to 12; history
//! from before the join is backfilled both ways; room directories and space hierarchies are
//! read across servers; and both servers agree on the room's current state.

use std::time::{Duration, Instant};

use complement_tests::federation::{
    eventually, same_state, start, state_event, wait_for_message, wait_membership, wait_state, WAIT,
};
use complement_tests::{enc, ok, Backend, Client, Synapse, TestServer};
use serde_json::{json, Value};

async fn kick(client: &Client, room: &str, user: &str) -> anyhow::Result<()> {
    ok(client
        .post(
            &format!("/rooms/{}/kick", enc(room)),
            &json!({"user_id": user, "reason": "test"}),
        )
        .await?);
    Ok(())
}

async fn ban(client: &Client, room: &str, user: &str) -> anyhow::Result<()> {
    ok(client
        .post(
            &format!("/rooms/{}/ban", enc(room)),
            &json!({"user_id": user}),
        )
        .await?);
    Ok(())
}

async fn redact(client: &Client, room: &str, event_id: &str) -> anyhow::Result<()> {
    ok(client
        .put(
            &format!(
                "/rooms/{}/redact/{}/{}",
                enc(room),
                enc(event_id),
                complement_tests::unique_txn_id()
            ),
            &json!({"reason": "test"}),
        )
        .await?);
    Ok(())
}

async fn join_via(client: &Client, room: &str, via: &str) -> anyhow::Result<Value> {
    let r = client
        .post(
            &format!("/join/{}?server_name={}", enc(room), enc(via)),
            &json!({}),
        )
        .await?;
    Ok(json!({"status": r.status, "body": r.body}))
}

/// The two sides of one test: which server hosts the room and which joins it.
struct Sides {
    /// The user on the server that creates (hosts) the room.
    host: Client,
    host_id: String,
    host_name: String,
    /// The user on the other server.
    guest: Client,
    guest_id: String,
    guest_name: String,
}

/// The whole exchange, whichever server hosts the room: a public room joined by alias,
/// messages and state changes both ways, a second room that the guest is invited to,
/// leave and rejoin, kick, ban (the banned user's join refused), and identical current
/// state on both servers after every round.
async fn exchange(s: Sides, alias_localpart: &str, room_version: &str) -> anyhow::Result<()> {
    let Sides {
        host,
        host_id,
        host_name,
        guest,
        guest_id,
        guest_name,
    } = s;
    let room = host
        .create_room(&json!({
            "preset": "public_chat",
            "room_version": room_version,
            "room_alias_name": alias_localpart,
            "name": "Interop",
            "topic": "first topic",
        }))
        .await?;
    host.send_message(&room, "before the guest").await?;

    // Join by alias, through the host.
    let started = Instant::now();
    let joined = guest
        .join(&format!("#{alias_localpart}:{host_name}"))
        .await?;
    anyhow::ensure!(joined == room, "joined {joined}, expected {room}");
    eprintln!("remote join took {:?}", started.elapsed());
    wait_membership(&host, &room, &guest_id, "join").await?;
    anyhow::ensure!(state_event(&guest, &room, "m.room.name", "").await?["name"] == "Interop");

    // Messages both ways.
    host.send_message(&room, "hello from the host").await?;
    wait_for_message(&guest, &room, "hello from the host").await?;
    guest.send_message(&room, "hello from the guest").await?;
    wait_for_message(&host, &room, "hello from the guest").await?;

    // State both ways: the guest cannot change the topic until the host gives it power.
    let refused = guest
        .send_state(&room, "m.room.topic", "", &json!({"topic": "no power"}))
        .await;
    anyhow::ensure!(
        refused.is_err(),
        "the guest changed the topic without power"
    );
    let mut pl = state_event(&host, &room, "m.room.power_levels", "").await?;
    pl["users"][&guest_id] = json!(50);
    host.send_state(&room, "m.room.power_levels", "", &pl)
        .await?;
    wait_state(&guest, &room, "m.room.power_levels", "", |c| {
        c["users"][&guest_id] == 50
    })
    .await?;
    guest
        .send_state(
            &room,
            "m.room.topic",
            "",
            &json!({"topic": "the guest's topic"}),
        )
        .await?;
    wait_state(&host, &room, "m.room.topic", "", |c| {
        c["topic"] == "the guest's topic"
    })
    .await?;
    host.send_state(&room, "m.room.name", "", &json!({"name": "Renamed"}))
        .await?;
    wait_state(&guest, &room, "m.room.name", "", |c| c["name"] == "Renamed").await?;
    same_state(&host, &guest, &room).await?;

    // Redactions both ways: the host (a moderator) redacts the guest's message, the guest
    // redacts its own; each side sees the content gone.
    let guest_msg = guest
        .send_message(&room, "to be redacted by the host")
        .await?;
    let own_msg = guest
        .send_message(&room, "to be redacted by the guest")
        .await?;
    wait_for_message(&host, &room, "to be redacted by the guest").await?;
    redact(&host, &room, &guest_msg).await?;
    redact(&guest, &room, &own_msg).await?;
    for (client, event) in [
        (&guest, &guest_msg),
        (&host, &own_msg),
        (&host, &guest_msg),
        (&guest, &own_msg),
    ] {
        eventually(
            &format!("{event} redacted at {}", client.base_url()),
            || async {
                let r = client
                    .get(&format!("/rooms/{}/event/{}", enc(&room), enc(event)))
                    .await?;
                Ok((r.status == 200 && r.body["content"] == json!({})).then_some(()))
            },
        )
        .await?;
    }

    // Leave and rejoin (by room ID, through the host).
    guest.leave(&room).await?;
    wait_membership(&host, &room, &guest_id, "leave").await?;
    let r = join_via(&guest, &room, &host_name).await?;
    anyhow::ensure!(r["status"] == 200, "rejoin: {r}");
    wait_membership(&host, &room, &guest_id, "join").await?;
    guest.send_message(&room, "back again").await?;
    wait_for_message(&host, &room, "back again").await?;

    // Kick, then ban: the banned guest cannot come back.
    kick(&host, &room, &guest_id).await?;
    wait_membership(&guest, &room, &guest_id, "leave").await?;
    let r = join_via(&guest, &room, &host_name).await?;
    anyhow::ensure!(r["status"] == 200, "join after the kick: {r}");
    wait_membership(&host, &room, &guest_id, "join").await?;
    let since = guest.sync(None, Some(0), None).await?["next_batch"]
        .as_str()
        .map(str::to_owned);
    ban(&host, &room, &guest_id).await?;
    // Synapse does not show a room's state to a banned user; the guest's incremental sync
    // does show the ban, under `leave`.
    guest
        .sync_until(since.as_deref(), None, WAIT, |sync| {
            sync["rooms"]["leave"][&room]["timeline"]["events"]
                .as_array()
                .is_some_and(|events| {
                    events.iter().any(|e| {
                        e["type"] == "m.room.member"
                            && e["state_key"] == guest_id.as_str()
                            && e["content"]["membership"] == "ban"
                    })
                })
        })
        .await?;
    let r = join_via(&guest, &room, &host_name).await?;
    anyhow::ensure!(
        r["status"] == 403,
        "a banned user's join must be refused: {r}"
    );
    wait_membership(&host, &room, &guest_id, "ban").await?;

    // A private room: the guest is invited across servers, sees the invite, joins and
    // talks, and both agree on the state.
    let private = host
        .create_room(&json!({"preset": "private_chat", "name": "Private"}))
        .await?;
    host.invite(&private, &guest_id).await?;
    guest
        .sync_until(None, None, WAIT, |sync| {
            sync["rooms"]["invite"][&private].is_object()
        })
        .await?;
    let r = join_via(&guest, &private, &host_name).await?;
    anyhow::ensure!(r["status"] == 200, "joining the private room: {r}");
    wait_membership(&host, &private, &guest_id, "join").await?;
    guest
        .send_message(&private, "thanks for the invite")
        .await?;
    wait_for_message(&host, &private, "thanks for the invite").await?;
    host.send_message(&private, "you are welcome").await?;
    wait_for_message(&guest, &private, "you are welcome").await?;
    same_state(&host, &guest, &private).await?;

    // A room the guest's server hosts, to which the guest invites the host user.
    let theirs = guest
        .create_room(&json!({"preset": "private_chat", "name": "Guest's room"}))
        .await?;
    guest.invite(&theirs, &host_id).await?;
    host.sync_until(None, None, WAIT, |sync| {
        sync["rooms"]["invite"][&theirs].is_object()
    })
    .await?;
    let r = join_via(&host, &theirs, &guest_name).await?;
    anyhow::ensure!(r["status"] == 200, "joining the guest's room: {r}");
    wait_membership(&guest, &theirs, &host_id, "join").await?;
    host.send_message(&theirs, "hello in your room").await?;
    wait_for_message(&guest, &theirs, "hello in your room").await?;
    guest
        .send_state(
            &theirs,
            "m.room.topic",
            "",
            &json!({"topic": "set by the guest"}),
        )
        .await?;
    wait_state(&host, &theirs, "m.room.topic", "", |c| {
        c["topic"] == "set by the guest"
    })
    .await?;
    same_state(&host, &guest, &theirs).await?;
    host.leave(&theirs).await?;
    wait_membership(&guest, &theirs, &host_id, "leave").await?;
    Ok(())
}

/// Knocking across servers: the guest knocks on a `knock` room by alias, the host sees the
/// knock and lets the guest in with an invite, the guest joins and talks; then the guest
/// leaves, knocks again and withdraws the knock (a leave through the host), and the host
/// sees it withdrawn (unless the guest is Synapse, which withdraws knocks only locally).
async fn knock_exchange(
    s: &Sides,
    alias_localpart: &str,
    room_version: &str,
    guest_is_synapse: bool,
) -> anyhow::Result<()> {
    let (host, guest, guest_id) = (&s.host, &s.guest, &s.guest_id);
    let room = host
        .create_room(&json!({
            "preset": "private_chat",
            "room_version": room_version,
            "room_alias_name": alias_localpart,
            "name": "Knock knock",
            "initial_state": [{
                "type": "m.room.join_rules",
                "state_key": "",
                "content": {"join_rule": "knock"},
            }],
        }))
        .await?;
    // Not invited: a plain join is refused.
    let r = join_via(guest, &room, &s.host_name).await?;
    anyhow::ensure!(r["status"] == 403, "joining a knock room uninvited: {r}");

    let alias = format!("#{alias_localpart}:{}", s.host_name);
    let since = guest.sync(None, Some(0), None).await?["next_batch"]
        .as_str()
        .map(str::to_owned);
    let r = guest
        .post(
            &format!("/knock/{}", enc(&alias)),
            &json!({"reason": "let me in"}),
        )
        .await?;
    anyhow::ensure!(
        r.status == 200 && r.body["room_id"] == room.as_str(),
        "knock: {} {}",
        r.status,
        r.body
    );
    wait_state(host, &room, "m.room.member", guest_id, |c| {
        c["membership"] == "knock" && c["reason"] == "let me in"
    })
    .await?;
    // The knocker's sync shows the room under `knock`, with the room's name.
    guest
        .sync_until(since.as_deref(), None, WAIT, |sync| {
            sync["rooms"]["knock"][&room]["knock_state"]["events"]
                .as_array()
                .is_some_and(|events| {
                    events.iter().any(|e| {
                        e["type"] == "m.room.name" && e["content"]["name"] == "Knock knock"
                    })
                })
        })
        .await?;

    // Accepted: invited, then joined.
    host.invite(&room, guest_id).await?;
    guest
        .sync_until(None, None, WAIT, |sync| {
            sync["rooms"]["invite"][&room].is_object()
        })
        .await?;
    let r = join_via(guest, &room, &s.host_name).await?;
    anyhow::ensure!(
        r["status"] == 200,
        "joining after the knock was accepted: {r}"
    );
    wait_membership(host, &room, guest_id, "join").await?;
    guest.send_message(&room, "knocked and came in").await?;
    wait_for_message(host, &room, "knocked and came in").await?;

    // Knock again after leaving, then withdraw the knock.
    guest.leave(&room).await?;
    wait_membership(host, &room, guest_id, "leave").await?;
    let r = guest
        .post(&format!("/knock/{}", enc(&alias)), &json!({}))
        .await?;
    anyhow::ensure!(r.status == 200, "second knock: {} {}", r.status, r.body);
    wait_membership(host, &room, guest_id, "knock").await?;
    guest.leave(&room).await?;
    if guest_is_synapse {
        // Synapse 1.163 withdraws a knock only locally (an out-of-band leave); it has no
        // federation call for it, so the host keeps seeing the knock.
        return Ok(());
    }
    wait_membership(host, &room, guest_id, "leave").await?;
    Ok(())
}

/// Restricted joins across servers (room versions 8+): the host has a public room and a
/// room whose join rule lets in only members of it. The guest is refused until it has joined
/// the public room; then its join through the host is authorised by the host's user (named in
/// `join_authorised_via_users_server` and signed by the host's server) and both servers accept
/// it.
async fn restricted_exchange(s: &Sides, room_version: &str) -> anyhow::Result<()> {
    let (host, guest, guest_id) = (&s.host, &s.guest, &s.guest_id);
    let lobby = host
        .create_room(&json!({"preset": "public_chat", "room_version": room_version}))
        .await?;
    let inner = host
        .create_room(&json!({
            "preset": "private_chat",
            "room_version": room_version,
            "name": "Members of the lobby only",
            "initial_state": [{
                "type": "m.room.join_rules",
                "state_key": "",
                "content": {
                    "join_rule": "restricted",
                    "allow": [{"type": "m.room_membership", "room_id": lobby}],
                },
            }],
        }))
        .await?;
    let r = join_via(guest, &inner, &s.host_name).await?;
    anyhow::ensure!(r["status"] == 403, "joining before being in the lobby: {r}");
    let r = join_via(guest, &lobby, &s.host_name).await?;
    anyhow::ensure!(r["status"] == 200, "joining the lobby: {r}");
    wait_membership(host, &lobby, guest_id, "join").await?;
    let r = join_via(guest, &inner, &s.host_name).await?;
    anyhow::ensure!(r["status"] == 200, "joining the restricted room: {r}");
    wait_state(host, &inner, "m.room.member", guest_id, |c| {
        c["membership"] == "join" && c["join_authorised_via_users_server"] == s.host_id.as_str()
    })
    .await?;
    guest.send_message(&inner, "let in by the lobby").await?;
    wait_for_message(host, &inner, "let in by the lobby").await?;
    host.send_message(&inner, "welcome").await?;
    wait_for_message(guest, &inner, "welcome").await?;
    same_state(host, guest, &inner).await?;
    Ok(())
}

/// History from before the join: the host's room has more messages than a join brings;
/// the guest pages `/messages` backwards to the start and gets every one of them in order
/// (its server backfills them from the host's `/backfill`).
async fn history_exchange(s: &Sides, room_version: &str) -> anyhow::Result<()> {
    let (host, guest, guest_id) = (&s.host, &s.guest, &s.guest_id);
    let room = host
        .create_room(&json!({"preset": "public_chat", "room_version": room_version}))
        .await?;
    let sent: Vec<String> = (0..60).map(|i| format!("history {i}")).collect();
    for text in &sent {
        host.send_message(&room, text).await?;
    }
    let r = join_via(guest, &room, &s.host_name).await?;
    anyhow::ensure!(r["status"] == 200, "joining the room with history: {r}");
    wait_membership(host, &room, guest_id, "join").await?;
    let mut seen = Vec::new();
    let mut from: Option<String> = None;
    for _ in 0..40 {
        let mut path = format!("/rooms/{}/messages?dir=b&limit=20", enc(&room));
        if let Some(f) = &from {
            path.push_str(&format!("&from={}", enc(f)));
        }
        let page = ok(guest.get(&path).await?);
        seen.extend(
            page["chunk"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|e| e["type"] == "m.room.message")
                .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned)),
        );
        match page["end"].as_str() {
            Some(end) => from = Some(end.to_owned()),
            None => break,
        }
    }
    seen.reverse();
    anyhow::ensure!(
        seen == sent,
        "the guest's history differs from the host's: {seen:?}"
    );
    Ok(())
}

/// The room directory and space hierarchies across servers: the guest finds the host's
/// published room through `publicRooms?server=` (GET and a filtered POST), and, having
/// joined only the host's space, sees the space's child room through `/hierarchy` (its server
/// asks the host's federation `/hierarchy`).
async fn directory_exchange(s: &Sides, room_version: &str) -> anyhow::Result<()> {
    let (host, guest) = (&s.host, &s.guest);
    let findable = host
        .create_room(&json!({
            "preset": "public_chat",
            "room_version": room_version,
            "visibility": "public",
            "name": "Findable across servers",
            "topic": "listed in the directory",
        }))
        .await?;
    let server = enc(&s.host_name);
    let listed = |body: &Value| {
        body["chunk"]
            .as_array()
            .is_some_and(|rooms| rooms.iter().any(|r| r["room_id"] == findable.as_str()))
    };
    let page = ok(guest.get(&format!("/publicRooms?server={server}")).await?);
    anyhow::ensure!(listed(&page), "GET publicRooms from the host: {page}");
    let found = ok(guest
        .post(
            &format!("/publicRooms?server={server}"),
            &json!({"filter": {"generic_search_term": "findable"}, "limit": 5}),
        )
        .await?);
    anyhow::ensure!(
        listed(&found),
        "POST publicRooms with a search term: {found}"
    );
    let none = ok(guest
        .post(
            &format!("/publicRooms?server={server}"),
            &json!({"filter": {"generic_search_term": "no room is called this"}}),
        )
        .await?);
    anyhow::ensure!(!listed(&none), "a search term that matches nothing: {none}");

    let space = host
        .create_room(&json!({
            "preset": "public_chat",
            "room_version": room_version,
            "name": "A space",
            "creation_content": {"type": "m.space"},
        }))
        .await?;
    let child = host
        .create_room(&json!({
            "preset": "public_chat",
            "room_version": room_version,
            "name": "A child of the space",
        }))
        .await?;
    host.send_state(
        &space,
        "m.space.child",
        &child,
        &json!({"via": [s.host_name], "suggested": true}),
    )
    .await?;
    let r = join_via(guest, &space, &s.host_name).await?;
    anyhow::ensure!(r["status"] == 200, "joining the space: {r}");
    let hierarchy = ok(guest
        .get(&format!(
            "/_matrix/client/v1/rooms/{}/hierarchy",
            enc(&space)
        ))
        .await?);
    let rooms: Vec<&Value> = hierarchy["rooms"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    anyhow::ensure!(
        rooms
            .iter()
            .any(|r| r["room_id"] == space.as_str() && r["room_type"] == "m.space"),
        "the space itself: {hierarchy}"
    );
    anyhow::ensure!(
        rooms
            .iter()
            .any(|r| r["room_id"] == child.as_str() && r["name"] == "A child of the space"),
        "the child room, known only to the host: {hierarchy}"
    );
    Ok(())
}

/// Whether `version` (a numeric room version) is `min` or later.
fn room_version_at_least(version: &str, min: u32) -> bool {
    version.parse::<u32>().is_ok_and(|v| v >= min)
}

async fn start_pair(backend: Backend) -> anyhow::Result<(TestServer, Synapse)> {
    let (myelin, synapse) = tokio::try_join!(start(backend), Synapse::start())?;
    Ok((myelin, synapse))
}

/// Runs `body`; on failure keeps both servers' whole logs under the target directory's
/// `tmp/` (Synapse's INFO log is too long to print) and prints where, with a short tail.
async fn with_logs<Fut>(
    name: &str,
    myelin: &TestServer,
    synapse: &Synapse,
    body: Fut,
) -> anyhow::Result<()>
where
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let result = body.await;
    if result.is_err() {
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
        for (what, from) in [
            ("myelin", myelin.data_dir().join("myelin.log")),
            ("synapse", synapse.data_dir().join("synapse.log")),
        ] {
            let to = dir.join(format!("{name}-{what}.log"));
            match std::fs::copy(&from, &to) {
                Ok(_) => eprintln!("{what} log kept at {}", to.display()),
                Err(e) => eprintln!("could not keep {}: {e}", from.display()),
            }
        }
        eprintln!("---- myelin (tail) ----\n{}", myelin.log_tail(40));
        eprintln!("---- synapse (tail) ----\n{}", synapse.log_tail(40));
    }
    result
}

/// A Synapse user joins a room that Myelin hosts.
async fn synapse_joins_myelin_room(backend: Backend, room_version: &str) -> anyhow::Result<()> {
    let (myelin, synapse) = start_pair(backend).await?;
    let body = async {
        let sides = Sides {
            host: myelin.register("alice", "alice-password").await?,
            host_id: myelin.user_id("alice"),
            host_name: myelin.server_name().to_owned(),
            guest: synapse.register("bob", "bob-password").await?,
            guest_id: synapse.user_id("bob"),
            guest_name: synapse.server_name().to_owned(),
        };
        history_exchange(&sides, room_version).await?;
        directory_exchange(&sides, room_version).await?;
        if room_version_at_least(room_version, 8) {
            restricted_exchange(&sides, room_version).await?;
        }
        if room_version_at_least(room_version, 7) {
            knock_exchange(&sides, "knock-on-myelin", room_version, true).await?;
        }
        exchange(sides, "hosted-by-myelin", room_version).await
    };
    with_logs("synapse-joins-myelin", &myelin, &synapse, body).await
}

/// A Myelin user joins a room that Synapse hosts.
async fn myelin_joins_synapse_room(backend: Backend, room_version: &str) -> anyhow::Result<()> {
    let (myelin, synapse) = start_pair(backend).await?;
    let body = async {
        let sides = Sides {
            host: synapse.register("carol", "carol-password").await?,
            host_id: synapse.user_id("carol"),
            host_name: synapse.server_name().to_owned(),
            guest: myelin.register("dave", "dave-password").await?,
            guest_id: myelin.user_id("dave"),
            guest_name: myelin.server_name().to_owned(),
        };
        history_exchange(&sides, room_version).await?;
        directory_exchange(&sides, room_version).await?;
        if room_version_at_least(room_version, 8) {
            restricted_exchange(&sides, room_version).await?;
        }
        if room_version_at_least(room_version, 7) {
            knock_exchange(&sides, "knock-on-synapse", room_version, false).await?;
        }
        exchange(sides, "hosted-by-synapse", room_version).await
    };
    with_logs("myelin-joins-synapse", &myelin, &synapse, body).await
}

/// Both servers change the same state while cut off from each other, and agree on the
/// result once they talk again: a room hosted by `host_is_myelin ? Myelin : Synapse`
/// in which both users are admins; Synapse is stopped while Myelin sets the topic,
/// then Myelin is stopped while Synapse sets it (so neither has seen the other's
/// change), then both run again and their queues deliver the forked events.
async fn partitioned_state_converges(host_is_myelin: bool) -> anyhow::Result<()> {
    let (myelin, synapse) = start_pair(Backend::Sqlite).await?;
    let body = async {
        let m = myelin.register("mia", "mia-password").await?;
        let s = synapse.register("sam", "sam-password").await?;
        let (m_id, s_id) = (myelin.user_id("mia"), synapse.user_id("sam"));
        let (host, host_name, guest, guest_id) = if host_is_myelin {
            (&m, myelin.server_name(), &s, &s_id)
        } else {
            (&s, synapse.server_name(), &m, &m_id)
        };
        let room = host
            .create_room(&json!({"preset": "public_chat", "room_alias_name": "fork"}))
            .await?;
        guest.join(&format!("#fork:{host_name}")).await?;
        wait_membership(host, &room, guest_id, "join").await?;
        let mut pl = state_event(host, &room, "m.room.power_levels", "").await?;
        pl["users"][guest_id.as_str()] = json!(100);
        host.send_state(&room, "m.room.power_levels", "", &pl)
            .await?;
        wait_state(guest, &room, "m.room.power_levels", "", |c| {
            c["users"][guest_id.as_str()] == 100
        })
        .await?;
        m.send_message(&room, "before the split").await?;
        wait_for_message(&s, &room, "before the split").await?;

        synapse.stop(Duration::from_secs(10)).await?;
        m.send_state(
            &room,
            "m.room.topic",
            "",
            &json!({"topic": "Myelin's topic"}),
        )
        .await?;
        m.send_message(&room, "said on Myelin during the split")
            .await?;
        myelin.stop(Duration::from_secs(10)).await?;
        synapse.restart().await?;
        let s = synapse.login("sam", "sam-password", None).await?;
        s.send_state(
            &room,
            "m.room.topic",
            "",
            &json!({"topic": "Synapse's topic"}),
        )
        .await?;
        s.send_message(&room, "said on Synapse during the split")
            .await?;
        myelin.restart().await?;
        let m = myelin.login("mia", "mia-password", None).await?;

        wait_for_message(&s, &room, "said on Myelin during the split").await?;
        wait_for_message(&m, &room, "said on Synapse during the split").await?;
        // A message after the merge has both branches as ancestors on both servers.
        m.send_message(&room, "after the merge").await?;
        wait_for_message(&s, &room, "after the merge").await?;
        same_state(&m, &s, &room).await?;
        let topic = |c: Value| c["topic"].as_str().map(str::to_owned);
        let (tm, ts) = (
            topic(state_event(&m, &room, "m.room.topic", "").await?),
            topic(state_event(&s, &room, "m.room.topic", "").await?),
        );
        anyhow::ensure!(tm == ts, "topics differ: {tm:?} / {ts:?}");
        anyhow::ensure!(
            matches!(tm.as_deref(), Some("Myelin's topic" | "Synapse's topic")),
            "unexpected topic {tm:?}"
        );
        Ok(())
    };
    let name = if host_is_myelin {
        "partition-myelin-hosts"
    } else {
        "partition-synapse-hosts"
    };
    with_logs(name, &myelin, &synapse, body).await
}

macro_rules! interop_tests {
    ($($name:ident: $scenario:ident($backend:ident, $version:literal);)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() -> anyhow::Result<()> {
            $scenario(Backend::$backend, $version).await
        }
    )*};
}

interop_tests! {
    synapse_user_joins_myelin_room_v12_sqlite: synapse_joins_myelin_room(Sqlite, "12");
    myelin_user_joins_synapse_room_v12_sqlite: myelin_joins_synapse_room(Sqlite, "12");
    synapse_user_joins_myelin_room_v12_postgres: synapse_joins_myelin_room(Postgres, "12");
    myelin_user_joins_synapse_room_v12_postgres: myelin_joins_synapse_room(Postgres, "12");
    synapse_user_joins_myelin_room_v10_sqlite: synapse_joins_myelin_room(Sqlite, "10");
    myelin_user_joins_synapse_room_v10_sqlite: myelin_joins_synapse_room(Sqlite, "10");
    synapse_user_joins_myelin_room_v11_sqlite: synapse_joins_myelin_room(Sqlite, "11");
    myelin_user_joins_synapse_room_v11_sqlite: myelin_joins_synapse_room(Sqlite, "11");
    // Older versions, one direction each: v6 (no knocks), v7 (knocks), v8 and v9 (restricted
    // joins; v9 keeps `join_authorised_via_users_server` through redaction).
    myelin_user_joins_synapse_room_v6_sqlite: myelin_joins_synapse_room(Sqlite, "6");
    synapse_user_joins_myelin_room_v7_sqlite: synapse_joins_myelin_room(Sqlite, "7");
    myelin_user_joins_synapse_room_v8_sqlite: myelin_joins_synapse_room(Sqlite, "8");
    synapse_user_joins_myelin_room_v9_sqlite: synapse_joins_myelin_room(Sqlite, "9");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_in_a_myelin_room_converges() -> anyhow::Result<()> {
    partitioned_state_converges(true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_in_a_synapse_room_converges() -> anyhow::Result<()> {
    partitioned_state_converges(false).await
}
