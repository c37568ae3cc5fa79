//! End-to-end with matrix-sdk-ui 0.18: its `SyncService` and `RoomListService` (what Element X
//! runs) against Myelin's simplified sliding sync (MSC4186).
//!
//! The SDK client discovers sliding sync from `/versions` (`DiscoverNative`, which needs
//! `org.matrix.simplified_msc3575`), then the room list shows the rooms made before and after
//! the service started, most recently active first; an invite appears; a message another user
//! sends shows in the room's timeline and moves the room to the top.

// matrix-sdk's futures are deep enough to need a higher limit for the `Send` checks.
#![recursion_limit = "256"]

use std::time::Duration;

use complement_tests::{backend_tests, TestServer};
use eyeball_im::Vector;
use futures::{pin_mut, StreamExt};
use matrix_sdk::sliding_sync::{Version, VersionBuilder};
use matrix_sdk::{Client, RoomState};
use matrix_sdk_ui::room_list_service::RoomListItem;
use matrix_sdk_ui::sync_service::SyncService;
use matrix_sdk_ui::timeline::RoomExt;
use serde_json::json;

/// How long the SDK may take to show an effect.
const WITHIN: Duration = Duration::from_secs(30);

/// An SDK client logged in as `user`, with sliding sync discovered from `/versions`.
async fn sdk_client(server: &TestServer, user: &str, password: &str) -> anyhow::Result<Client> {
    let client = Client::builder()
        .homeserver_url(server.base_url())
        .respect_login_well_known(false)
        .sliding_sync_version_builder(VersionBuilder::DiscoverNative)
        .build()
        .await?;
    client
        .matrix_auth()
        .login_username(user, password)
        .initial_device_display_name("matrix-sdk-ui test")
        .send()
        .await?;
    Ok(client)
}

fn ids(rooms: &Vector<RoomListItem>) -> Vec<String> {
    rooms.iter().map(|r| r.room_id().to_string()).collect()
}

/// The room list service follows rooms, invites and messages.
async fn sdk_room_list_over_sliding_sync(server: TestServer) -> anyhow::Result<()> {
    let alice_http = server.register("alice", "alice-password").await?;
    let bob = server.register("bob", "bob-password").await?;
    let old_two = alice_http
        .create_room(&json!({"name": "Old two", "preset": "public_chat"}))
        .await?;
    let old_one = alice_http.create_room(&json!({"name": "Old one"})).await?;
    alice_http
        .send_message(&old_one, "before the start")
        .await?;

    let alice = sdk_client(&server, "alice", "alice-password").await?;
    assert!(
        matches!(alice.sliding_sync_version(), Version::Native),
        "the SDK must pick simplified sliding sync from /versions"
    );
    let sync = SyncService::builder(alice.clone()).build().await?;
    sync.start().await;
    let service = sync.room_list_service();
    let all = service.all_rooms().await?;
    let (stream, controller) = all.entries_with_dynamic_adapters(50);
    pin_mut!(stream);
    controller.set_filter(Box::new(|_: &RoomListItem| true));
    let mut rooms: Vector<RoomListItem> = Vector::new();

    // Waits until the list satisfies `done`.
    macro_rules! wait_for {
        ($what:expr, $done:expr) => {{
            let deadline = tokio::time::Instant::now() + WITHIN;
            loop {
                if $done(&rooms) {
                    break;
                }
                match tokio::time::timeout_at(deadline, stream.next()).await {
                    Ok(Some(diffs)) => {
                        for diff in diffs {
                            diff.apply(&mut rooms);
                        }
                    }
                    Ok(None) => anyhow::bail!("{}: the room list stream ended", $what),
                    Err(_) => anyhow::bail!(
                        "{}: not reached within {WITHIN:?}; the list is {:?}",
                        $what,
                        ids(&rooms)
                    ),
                }
            }
        }};
    }

    wait_for!(
        "the rooms made before the start, newest first",
        |r: &Vector<RoomListItem>| ids(r) == vec![old_one.clone(), old_two.clone()]
    );

    // The SDK ranks rooms with a latest event (a message, an invite) above rooms without one,
    // then by that event's time; so the new room gets a message.
    let new = alice_http.create_room(&json!({"name": "New"})).await?;
    alice_http.send_message(&new, "first in new").await?;
    eprintln!("new {new}");
    wait_for!("a room made after the start, on top", |r: &Vector<
        RoomListItem,
    >| ids(r)
        == vec![new.clone(), old_one.clone(), old_two.clone()]);

    let invited = bob.create_room(&json!({"name": "Bob's"})).await?;
    bob.invite(&invited, &alice_http.user_id).await?;
    eprintln!("invited {invited}");
    wait_for!("the invite, on top", |r: &Vector<RoomListItem>| ids(r)
        .first()
        == Some(&invited));
    let invite = alice
        .get_room(invited.as_str().try_into()?)
        .ok_or_else(|| anyhow::anyhow!("the SDK does not know the invited room"))?;
    assert_eq!(invite.state(), RoomState::Invited);

    // Bob joins Alice's public room and speaks: the room moves to the top and the message
    // shows in its timeline.
    bob.join(&old_two).await?;
    bob.send_message(&old_two, "hello from bob").await?;
    wait_for!("the room bob spoke in, on top", |r: &Vector<
        RoomListItem,
    >| ids(r).first()
        == Some(&old_two));
    let room = alice
        .get_room(old_two.as_str().try_into()?)
        .ok_or_else(|| anyhow::anyhow!("the SDK does not know the room"))?;
    let timeline = room.timeline().await?;
    let deadline = tokio::time::Instant::now() + WITHIN;
    loop {
        let seen = timeline.items().await.iter().any(|item| {
            item.as_event().is_some_and(|e| {
                e.sender().as_str() == bob.user_id
                    && e.content()
                        .as_message()
                        .is_some_and(|m| m.body() == "hello from bob")
            })
        });
        if seen {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("bob's message never reached the room's timeline");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sync.stop().await;
    Ok(())
}

backend_tests!(sdk_room_list_over_sliding_sync);
