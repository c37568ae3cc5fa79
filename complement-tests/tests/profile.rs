//! Profiles: `PUT/GET /profile/{userId}/displayname|avatar_url`, `GET
//! /profile/{userId}`, `DELETE /profile/{userId}/{keyName}` (v1.16), and the
//! propagation of profile changes into the `m.room.member` state of rooms
//! the user is in.

use complement_tests::{assert_error, backend_tests, enc, eventually, ok, TestServer};
use serde_json::json;
use std::time::Duration;

/// Set and read back a display name and avatar URL; nobody else may set
/// them; unknown users are 404.
async fn set_and_get_profile(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "alice-password").await?;
    let bob = server.register("bob", "bob-password").await?;
    let me = enc(&alice.user_id);

    ok(alice
        .put(
            &format!("/profile/{me}/displayname"),
            &json!({"displayname": "Alice Liddell"}),
        )
        .await?);
    ok(alice
        .put(
            &format!("/profile/{me}/avatar_url"),
            &json!({"avatar_url": "mxc://example.org/rabbit"}),
        )
        .await?);

    let name = ok(bob.get(&format!("/profile/{me}/displayname")).await?);
    assert_eq!(name, json!({"displayname": "Alice Liddell"}));
    let avatar = ok(bob.get(&format!("/profile/{me}/avatar_url")).await?);
    assert_eq!(avatar, json!({"avatar_url": "mxc://example.org/rabbit"}));
    let whole = ok(bob.get(&format!("/profile/{me}")).await?);
    assert_eq!(whole["displayname"], "Alice Liddell");
    assert_eq!(whole["avatar_url"], "mxc://example.org/rabbit");

    let forged = bob
        .put(
            &format!("/profile/{me}/displayname"),
            &json!({"displayname": "Not Alice"}),
        )
        .await?;
    assert_error(&forged, 403, "M_FORBIDDEN");
    assert_eq!(
        ok(alice.get(&format!("/profile/{me}/displayname")).await?)["displayname"],
        "Alice Liddell"
    );

    let nobody = enc(&server.user_id("nobody"));
    assert_error(
        &alice.get(&format!("/profile/{nobody}")).await?,
        404,
        "M_NOT_FOUND",
    );
    assert_error(
        &alice.get(&format!("/profile/{nobody}/displayname")).await?,
        404,
        "M_NOT_FOUND",
    );

    // DELETE of a profile field exists from v1.16 on.
    let versions = ok(server.anonymous().get("/_matrix/client/versions").await?);
    if versions["versions"]
        .as_array()
        .is_some_and(|v| v.contains(&json!("v1.16")))
    {
        ok(alice.delete(&format!("/profile/{me}/avatar_url")).await?);
        assert_error(
            &alice.get(&format!("/profile/{me}/avatar_url")).await?,
            404,
            "M_NOT_FOUND",
        );
        let whole = ok(alice.get(&format!("/profile/{me}")).await?);
        assert!(
            whole.get("avatar_url").is_none(),
            "deleted field still listed: {whole}"
        );
        assert_eq!(whole["displayname"], "Alice Liddell");
    }
    Ok(())
}

/// A profile change shows up as a fresh `m.room.member` event in every
/// room the user has joined.
async fn profile_change_updates_membership(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "alice-password").await?;
    let bob = server.register("bob", "bob-password").await?;
    let room = bob.create_room(&json!({"preset": "public_chat"})).await?;
    alice.join(&room).await?;
    let before = ok(bob
        .get(&format!(
            "{}?format=event",
            complement_tests::state_path(&room, "m.room.member", &alice.user_id)
        ))
        .await?);
    let me = enc(&alice.user_id);

    ok(alice
        .put(
            &format!("/profile/{me}/displayname"),
            &json!({"displayname": "Alice in Wonderland"}),
        )
        .await?);
    ok(alice
        .put(
            &format!("/profile/{me}/avatar_url"),
            &json!({"avatar_url": "mxc://example.org/hat"}),
        )
        .await?);

    // The member event may be sent in the background; wait for it.
    let member = eventually(
        "the member event carries the new profile",
        Duration::from_secs(10),
        || async {
            let member = ok(bob
                .get_state(&room, "m.room.member", &alice.user_id)
                .await?);
            let updated = member["displayname"] == "Alice in Wonderland"
                && member["avatar_url"] == "mxc://example.org/hat";
            Ok(updated.then_some(member))
        },
    )
    .await?;
    assert_eq!(member["membership"], "join");
    assert_eq!(
        member["displayname"], "Alice in Wonderland",
        "member event updated: {member}"
    );
    assert_eq!(member["avatar_url"], "mxc://example.org/hat");
    let after = ok(bob
        .get(&format!(
            "{}?format=event",
            complement_tests::state_path(&room, "m.room.member", &alice.user_id)
        ))
        .await?);
    assert_ne!(
        after["event_id"], before["event_id"],
        "a new member event was sent"
    );
    assert_eq!(after["sender"], alice.user_id);

    let joined = ok(bob
        .get(&format!("/rooms/{}/joined_members", enc(&room)))
        .await?);
    assert_eq!(
        joined["joined"][&alice.user_id]["display_name"],
        "Alice in Wonderland"
    );
    assert_eq!(
        joined["joined"][&alice.user_id]["avatar_url"],
        "mxc://example.org/hat"
    );

    // The change is in the room timeline as a member event.
    let page = bob.messages(&room, &[("dir", "b"), ("limit", "5")]).await?;
    assert!(
        page["chunk"].as_array().expect("chunk").iter().any(|e| {
            e["type"] == "m.room.member"
                && e["state_key"] == alice.user_id
                && e["content"]["displayname"] == "Alice in Wonderland"
        }),
        "profile change missing from the timeline: {page}"
    );
    Ok(())
}

backend_tests!(set_and_get_profile, profile_change_updates_membership);
