//! Accounts and sessions: `/register` (user-interactive auth with
//! `m.login.dummy`), `/register/available`, `/login` (GET flows, POST with
//! an `m.id.user` identifier or the legacy `user` field), `/account/whoami`,
//! `/logout`, `/logout/all`, `/refresh`, `/account/password` and
//! `/account/deactivate`.

use complement_tests::{assert_error, backend_tests, enc, eventually, ok, Client, TestServer};
use reqwest::Method;
use serde_json::json;
use std::time::Duration;

/// A second session for `user` made with `/login`, named `device_id`.
async fn second_session(
    server: &TestServer,
    localpart: &str,
    password: &str,
    device_id: &str,
) -> anyhow::Result<Client> {
    server.login(localpart, password, Some(device_id)).await
}

/// The first `/register` request gets a 401 UIA body (`flows`,
/// `session`, `params`); completing `m.login.dummy` with that session
/// creates the account and logs it in.
async fn register_uia_flow(server: TestServer) -> anyhow::Result<()> {
    let anon = server.anonymous();
    let request = json!({"username": "alice", "password": "sekrit-password"});
    let first = anon.post("/register", &request).await?;
    assert_eq!(
        first.status, 401,
        "first /register must ask for UIA: {:?}",
        first
    );
    let session = first.body["session"]
        .as_str()
        .expect("UIA body has a session")
        .to_owned();
    let flows = first.body["flows"].as_array().expect("UIA body has flows");
    assert!(
        flows
            .iter()
            .any(|f| f["stages"] == json!(["m.login.dummy"])),
        "open registration should offer an m.login.dummy flow: {}",
        first.body
    );
    assert!(
        first.body["params"].is_object(),
        "UIA body has params: {}",
        first.body
    );

    let mut second = request.clone();
    second["auth"] = json!({"type": "m.login.dummy", "session": session});
    second["device_id"] = json!("ALICEPHONE");
    let body = ok(anon.post("/register", &second).await?);
    assert_eq!(body["user_id"], server.user_id("alice"));
    assert_eq!(
        body["device_id"], "ALICEPHONE",
        "the requested device_id is kept"
    );
    let token = body["access_token"].as_str().expect("access_token");

    let alice = anon.with_access_token(Some(token));
    let whoami = ok(alice.get("/account/whoami").await?);
    assert_eq!(whoami["user_id"], server.user_id("alice"));
    assert_eq!(whoami["device_id"], "ALICEPHONE");

    // A taken name is refused before UIA, with 400 M_USER_IN_USE.
    let again = anon
        .post(
            "/register",
            &json!({"username": "alice", "password": "x-password"}),
        )
        .await?;
    assert_error(&again, 400, "M_USER_IN_USE");

    // inhibit_login: the account is made but no session is returned.
    let mut quiet = json!({"username": "bob", "password": "bob-password", "inhibit_login": true});
    let first = anon.post("/register", &quiet).await?;
    assert_eq!(first.status, 401);
    quiet["auth"] = json!({"type": "m.login.dummy", "session": first.body["session"]});
    let body = ok(anon.post("/register", &quiet).await?);
    assert_eq!(body["user_id"], server.user_id("bob"));
    assert!(
        body.get("access_token").is_none(),
        "inhibit_login returned a token: {body}"
    );
    assert!(
        body.get("device_id").is_none(),
        "inhibit_login returned a device: {body}"
    );
    server.login("bob", "bob-password", None).await?;
    Ok(())
}

/// `/register/available`: 200 `{available: true}` for a free name, 400
/// `M_USER_IN_USE` for a taken one and 400 `M_INVALID_USERNAME` for a
/// name that is not a valid localpart; `/register` refuses the invalid
/// name with `M_INVALID_USERNAME` too.
async fn register_available_and_invalid(server: TestServer) -> anyhow::Result<()> {
    let anon = server.anonymous();
    let free = ok(anon.get("/register/available?username=carol").await?);
    assert_eq!(free["available"], true);

    server.register("carol", "carol-password").await?;
    let taken = anon.get("/register/available?username=carol").await?;
    assert_error(&taken, 400, "M_USER_IN_USE");

    for bad in ["bad user", "Ünïcödé", "with:colon", "@at"] {
        let response = anon
            .get(&format!("/register/available?username={}", enc(bad)))
            .await?;
        assert_error(&response, 400, "M_INVALID_USERNAME");
        let response = anon
            .post(
                "/register",
                &json!({"username": bad, "password": "some-password"}),
            )
            .await?;
        assert_error(&response, 400, "M_INVALID_USERNAME");
    }
    Ok(())
}

/// `GET /login` lists `m.login.password`; `POST /login` works with an
/// `m.id.user` identifier (localpart or full ID) and with the deprecated
/// top-level `user` field; a wrong password is 403 `M_FORBIDDEN`.
async fn login_variants(server: TestServer) -> anyhow::Result<()> {
    server.register("dave", "dave-password").await?;
    let anon = server.anonymous();

    let flows = ok(anon.get("/login").await?);
    assert!(
        flows["flows"]
            .as_array()
            .expect("flows array")
            .iter()
            .any(|f| f["type"] == "m.login.password"),
        "GET /login must list m.login.password: {flows}"
    );

    let by_identifier = ok(anon
        .post(
            "/login",
            &json!({
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": "dave"},
                "password": "dave-password",
                "initial_device_display_name": "laptop",
            }),
        )
        .await?);
    assert_eq!(by_identifier["user_id"], server.user_id("dave"));
    assert!(by_identifier["access_token"].is_string());
    assert!(by_identifier["device_id"].is_string());

    let by_full_id = ok(anon
        .post(
            "/login",
            &json!({
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": server.user_id("dave")},
                "password": "dave-password",
            }),
        )
        .await?);
    assert_eq!(by_full_id["user_id"], server.user_id("dave"));
    assert_ne!(
        by_full_id["device_id"], by_identifier["device_id"],
        "each login is a new device"
    );

    let legacy = ok(anon
        .post(
            "/login",
            &json!({
                "type": "m.login.password",
                "user": "dave",
                "password": "dave-password",
                "device_id": "LEGACYDEV",
            }),
        )
        .await?);
    assert_eq!(legacy["user_id"], server.user_id("dave"));
    assert_eq!(legacy["device_id"], "LEGACYDEV");

    let wrong = anon
        .post(
            "/login",
            &json!({
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": "dave"},
                "password": "not-the-password",
            }),
        )
        .await?;
    assert_error(&wrong, 403, "M_FORBIDDEN");

    let nobody = anon
        .post(
            "/login",
            &json!({
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": "nobody"},
                "password": "whatever",
            }),
        )
        .await?;
    assert_error(&nobody, 403, "M_FORBIDDEN");
    Ok(())
}

/// whoami reports the session; `/logout` kills exactly that token
/// (401 `M_UNKNOWN_TOKEN` after); `/logout/all` kills every token of the
/// user.
async fn whoami_logout_and_logout_all(server: TestServer) -> anyhow::Result<()> {
    let first = server.register("erin", "erin-password").await?;
    let whoami = ok(first.get("/account/whoami").await?);
    assert_eq!(whoami["user_id"], server.user_id("erin"));
    assert_eq!(whoami["device_id"], first.device_id);

    let second = second_session(&server, "erin", "erin-password", "SECOND").await?;
    let third = second_session(&server, "erin", "erin-password", "THIRD").await?;

    ok(second.post("/logout", &json!({})).await?);
    assert_error(
        &second.get("/account/whoami").await?,
        401,
        "M_UNKNOWN_TOKEN",
    );
    ok(first.get("/account/whoami").await?);
    ok(third.get("/account/whoami").await?);

    ok(third.post("/logout/all", &json!({})).await?);
    assert_error(&first.get("/account/whoami").await?, 401, "M_UNKNOWN_TOKEN");
    assert_error(&third.get("/account/whoami").await?, 401, "M_UNKNOWN_TOKEN");

    // Logging in again still works.
    let again = server.login("erin", "erin-password", None).await?;
    assert_eq!(again.whoami().await?, server.user_id("erin"));
    Ok(())
}

/// `refresh_token: true` on login yields `refresh_token` and
/// `expires_in_ms`; `/refresh` swaps it for a new pair; once the new
/// access token has been used, the old refresh token is revoked (401
/// `M_UNKNOWN_TOKEN`).
async fn refresh_tokens(server: TestServer) -> anyhow::Result<()> {
    server.register("frank", "frank-password").await?;
    let anon = server.anonymous();
    let login = ok(anon
        .post(
            "/login",
            &json!({
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": "frank"},
                "password": "frank-password",
                "refresh_token": true,
            }),
        )
        .await?);
    let refresh = login["refresh_token"]
        .as_str()
        .unwrap_or_else(|| panic!("login with refresh_token: true gave no refresh_token: {login}"))
        .to_owned();
    let expires = login["expires_in_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("login with a refresh token lacks expires_in_ms: {login}"));
    assert!(expires > 0);
    let device_id = login["device_id"].as_str().expect("device_id").to_owned();

    let refreshed = ok(anon
        .post("/refresh", &json!({"refresh_token": refresh}))
        .await?);
    let new_access = refreshed["access_token"]
        .as_str()
        .expect("new access_token")
        .to_owned();
    let new_refresh = refreshed["refresh_token"]
        .as_str()
        .unwrap_or_else(|| panic!("/refresh gave no new refresh_token: {refreshed}"))
        .to_owned();
    assert_ne!(new_refresh, refresh);
    assert_ne!(
        new_access,
        login["access_token"].as_str().unwrap_or_default()
    );

    let frank = anon.with_access_token(Some(&new_access));
    let whoami = ok(frank.get("/account/whoami").await?);
    assert_eq!(whoami["user_id"], server.user_id("frank"));
    assert_eq!(
        whoami["device_id"], device_id,
        "refreshed tokens stay on the same device"
    );

    // The new access token has been used, so the old refresh token is gone.
    let stale = anon
        .post("/refresh", &json!({"refresh_token": refresh}))
        .await?;
    assert_error(&stale, 401, "M_UNKNOWN_TOKEN");

    let unknown = anon
        .post("/refresh", &json!({"refresh_token": "not-a-refresh-token"}))
        .await?;
    assert_error(&unknown, 401, "M_UNKNOWN_TOKEN");

    // The new refresh token still works.
    ok(anon
        .post("/refresh", &json!({"refresh_token": new_refresh}))
        .await?);
    Ok(())
}

/// `/account/password` is protected by UIA (`m.login.password`); a
/// wrong current password is a 401 with `M_FORBIDDEN`; on success the
/// other sessions are logged out but not the one making the request;
/// with `logout_devices: false` other sessions survive.
async fn change_password(server: TestServer) -> anyhow::Result<()> {
    let main = server.register("gina", "old-password").await?;
    let other = second_session(&server, "gina", "old-password", "OTHER").await?;

    // Wrong current password.
    let first = main
        .post(
            "/account/password",
            &json!({"new_password": "new-password"}),
        )
        .await?;
    assert_eq!(
        first.status, 401,
        "password change must ask for UIA: {:?}",
        first
    );
    let session = first.body["session"].as_str().expect("session");
    let bad = main
        .post(
            "/account/password",
            &json!({
                "new_password": "new-password",
                "auth": main.password_auth(session, "wrong-password"),
            }),
        )
        .await?;
    assert_error(&bad, 401, "M_FORBIDDEN");
    assert!(
        bad.body["flows"].is_array(),
        "a failed UIA stage still lists flows: {}",
        bad.body
    );
    ok(other.get("/account/whoami").await?);

    let changed = main
        .with_password_auth(
            Method::POST,
            "/account/password",
            &json!({"new_password": "new-password"}),
            "old-password",
        )
        .await?;
    ok(changed);
    ok(main.get("/account/whoami").await?);
    assert_error(&other.get("/account/whoami").await?, 401, "M_UNKNOWN_TOKEN");

    let old = server.login("gina", "old-password", None).await;
    assert!(old.is_err(), "the old password must no longer log in");
    let third = server.login("gina", "new-password", Some("THIRD")).await?;

    // logout_devices: false keeps the other sessions.
    ok(main
        .with_password_auth(
            Method::POST,
            "/account/password",
            &json!({"new_password": "newer-password", "logout_devices": false}),
            "new-password",
        )
        .await?);
    ok(main.get("/account/whoami").await?);
    ok(third.get("/account/whoami").await?);
    let devices = ok(main.get("/devices").await?);
    assert!(
        devices["devices"]
            .as_array()
            .expect("devices")
            .iter()
            .any(|d| d["device_id"] == "THIRD"),
        "logout_devices: false must keep the other devices: {devices}"
    );
    server.login("gina", "newer-password", None).await?;
    Ok(())
}

/// `/account/deactivate` is protected by UIA; afterwards the token is
/// dead, the password no longer logs in, the user has left the rooms
/// they were in, and the user ID cannot be registered again.
async fn deactivate_account(server: TestServer) -> anyhow::Result<()> {
    let harry = server.register("harry", "harry-password").await?;
    let owner = server.register("owner", "owner-password").await?;
    let room = owner.create_room(&json!({"preset": "public_chat"})).await?;
    harry.join(&room).await?;

    let done = ok(harry
        .with_password_auth(
            Method::POST,
            "/account/deactivate",
            &json!({}),
            "harry-password",
        )
        .await?);
    assert_eq!(
        done["id_server_unbind_result"], "success",
        "with no 3PIDs to unbind the result must be `success`: {done}"
    );

    assert_error(&harry.get("/account/whoami").await?, 401, "M_UNKNOWN_TOKEN");
    let login = server
        .anonymous()
        .post(
            "/login",
            &json!({
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": "harry"},
                "password": "harry-password",
            }),
        )
        .await?;
    assert_eq!(
        login.status, 403,
        "a deactivated account cannot log in: {:?}",
        login
    );
    assert!(
        ["M_USER_DEACTIVATED", "M_FORBIDDEN"].contains(&login.errcode()),
        "unexpected errcode {:?}",
        login
    );

    // Deactivation leaves joined rooms (possibly in the background).
    let harry_id = server.user_id("harry");
    eventually(
        "deactivated user has left the room",
        Duration::from_secs(10),
        || async {
            let member = ok(owner.get_state(&room, "m.room.member", &harry_id).await?);
            Ok((member["membership"] == "leave").then_some(()))
        },
    )
    .await?;

    let reuse = server
        .anonymous()
        .get("/register/available?username=harry")
        .await?;
    assert_error(&reuse, 400, "M_USER_IN_USE");
    Ok(())
}

backend_tests!(
    register_uia_flow,
    register_available_and_invalid,
    login_variants,
    whoami_logout_and_logout_all,
    refresh_tokens,
    change_password,
    deactivate_account
);
