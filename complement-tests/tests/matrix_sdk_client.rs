//! End-to-end with a real client library: two `matrix-sdk` 0.18 clients
//! (in-memory stores, plain HTTP) log in to accounts made over HTTP; Alice
//! creates a room and invites Bob, Bob joins, Alice sends a text message, and
//! Bob's SDK sync loop delivers it to an event handler.

// matrix-sdk's sync future is deep enough to need a higher limit for the
// `Send` check of `tokio::spawn`.
#![recursion_limit = "256"]

use complement_tests::{backend_tests, TestServer};
use matrix_sdk::config::SyncSettings;
use matrix_sdk::ruma::api::client::room::create_room;
use matrix_sdk::ruma::events::room::message::{
    OriginalSyncRoomMessageEvent, RoomMessageEventContent,
};
use matrix_sdk::ruma::{OwnedRoomId, OwnedUserId};
use matrix_sdk::{Client, Room};
use std::time::Duration;
use tokio::sync::mpsc;

/// An SDK client logged in as `user` on `server`.
async fn sdk_client(server: &TestServer, user: &str, password: &str) -> anyhow::Result<Client> {
    let client = Client::builder()
        .homeserver_url(server.base_url())
        .respect_login_well_known(false)
        .build()
        .await?;
    client
        .matrix_auth()
        .login_username(user, password)
        .initial_device_display_name("matrix-sdk test")
        .send()
        .await?;
    Ok(client)
}

/// Syncs `client` once at a time until `done` holds, for at most `within`.
async fn sync_until(
    client: &Client,
    what: &str,
    within: Duration,
    mut done: impl FnMut(&Client) -> bool,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        client
            .sync_once(SyncSettings::default().timeout(Duration::from_millis(500)))
            .await?;
        if done(client) {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("{what}: not reached within {within:?}");
        }
    }
}

/// Create, invite, join, send and receive through matrix-sdk.
async fn sdk_message_round_trip(server: TestServer) -> anyhow::Result<()> {
    server.register("alice", "alice-password").await?;
    server.register("bob", "bob-password").await?;
    let alice = sdk_client(&server, "alice", "alice-password").await?;
    let bob = sdk_client(&server, "bob", "bob-password").await?;
    let bob_id: OwnedUserId = server.user_id("bob").try_into()?;
    assert_eq!(bob.user_id(), Some(bob_id.as_ref()));

    let mut request = create_room::v3::Request::new();
    request.name = Some("SDK room".to_owned());
    request.invite = vec![bob_id.clone()];
    let room = alice.create_room(request).await?;
    let room_id: OwnedRoomId = room.room_id().to_owned();

    // Bob sees the invite through his sync and joins.
    sync_until(&bob, "bob sees the invite", Duration::from_secs(20), |c| {
        !c.invited_rooms().is_empty()
    })
    .await?;
    assert!(bob.invited_rooms().iter().any(|r| r.room_id() == room_id));
    bob.join_room_by_id(&room_id).await?;

    let (tx, mut rx) = mpsc::unbounded_channel::<(OwnedRoomId, String, String)>();
    bob.add_event_handler(move |event: OriginalSyncRoomMessageEvent, room: Room| {
        let tx = tx.clone();
        async move {
            let _ = tx.send((
                room.room_id().to_owned(),
                event.sender.to_string(),
                event.content.body().to_owned(),
            ));
        }
    });
    let syncing_bob = bob.clone();
    let bob_loop = tokio::spawn(async move {
        syncing_bob
            .sync(SyncSettings::default().timeout(Duration::from_secs(2)))
            .await
    });

    // Bob's join has completed on the server, so Alice can send now.
    let alice_room = alice
        .get_room(&room_id)
        .ok_or_else(|| anyhow::anyhow!("alice does not know the room"))?;
    alice_room
        .send(RoomMessageEventContent::text_plain("hello from the SDK"))
        .await?;

    let received = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(message) = rx.recv().await {
            if message.2 == "hello from the SDK" {
                return Some(message);
            }
        }
        None
    })
    .await;
    bob_loop.abort();
    let (in_room, sender, body) = received
        .map_err(|_| anyhow::anyhow!("Bob's SDK sync loop never delivered the message"))?
        .ok_or_else(|| anyhow::anyhow!("the event handler channel closed"))?;
    assert_eq!(in_room, room_id);
    assert_eq!(sender, server.user_id("alice"));
    assert_eq!(body, "hello from the SDK");
    Ok(())
}

backend_tests!(sdk_message_round_trip);
