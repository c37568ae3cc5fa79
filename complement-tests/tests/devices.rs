//! Device management: `GET /devices`, `GET/PUT/DELETE /devices/{deviceId}`
//! and `POST /delete_devices`, including the user-interactive auth that
//! deletion needs and the death of the deleted device's access token.

use complement_tests::{assert_error, backend_tests, enc, ok, TestServer};
use reqwest::Method;
use serde_json::{json, Value};

fn device_ids(body: &Value) -> Vec<String> {
    let mut ids: Vec<String> = body["devices"]
        .as_array()
        .unwrap_or_else(|| panic!("`devices` is not an array: {body}"))
        .iter()
        .map(|d| d["device_id"].as_str().expect("device_id").to_owned())
        .collect();
    ids.sort();
    ids
}

/// Each login makes a device; list, get and rename them; an unknown
/// device is 404.
async fn list_get_rename(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "alice-password").await?;
    let phone = server
        .login("alice", "alice-password", Some("PHONE"))
        .await?;
    assert_ne!(alice.device_id, phone.device_id);

    let mut expected = vec![alice.device_id.clone(), "PHONE".to_owned()];
    expected.sort();
    let listed = ok(alice.get("/devices").await?);
    assert_eq!(device_ids(&listed), expected);
    for device in listed["devices"].as_array().expect("devices") {
        assert!(device["display_name"].is_string() || device["display_name"].is_null());
    }

    let one = ok(phone.get("/devices/PHONE").await?);
    assert_eq!(one["device_id"], "PHONE");

    ok(alice
        .put("/devices/PHONE", &json!({"display_name": "Alice's phone"}))
        .await?);
    let renamed = ok(phone.get("/devices/PHONE").await?);
    assert_eq!(renamed["display_name"], "Alice's phone");
    let listed = ok(alice.get("/devices").await?);
    let entry = listed["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .find(|d| d["device_id"] == "PHONE")
        .cloned()
        .expect("PHONE listed");
    assert_eq!(entry["display_name"], "Alice's phone");

    assert_error(
        &alice.get("/devices/NOSUCHDEVICE").await?,
        404,
        "M_NOT_FOUND",
    );
    let put_unknown = alice
        .put("/devices/NOSUCHDEVICE", &json!({"display_name": "x"}))
        .await?;
    assert_error(&put_unknown, 404, "M_NOT_FOUND");

    // Another user's devices are not visible.
    let bob = server.register("bob", "bob-password").await?;
    assert_error(&bob.get("/devices/PHONE").await?, 404, "M_NOT_FOUND");
    let bobs = ok(bob.get("/devices").await?);
    assert_eq!(device_ids(&bobs), vec![bob.device_id.clone()]);
    Ok(())
}

/// `DELETE /devices/{id}` asks for UIA first (401 with flows and a
/// session), then deletes the device and kills its token; the other
/// session lives on.
async fn delete_device_with_uia(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "alice-password").await?;
    let tablet = server
        .login("alice", "alice-password", Some("TABLET"))
        .await?;

    let first = alice.delete_with("/devices/TABLET", &json!({})).await?;
    assert_eq!(
        first.status, 401,
        "device deletion must ask for UIA: {:?}",
        first
    );
    assert!(first.body["session"].is_string());
    assert!(first.body["flows"].is_array());
    ok(tablet.get("/account/whoami").await?);

    let bad = alice
        .delete_with("/devices/TABLET", &json!({
            "auth": alice.password_auth(first.body["session"].as_str().unwrap_or_default(), "wrong")
        }))
        .await?;
    assert_error(&bad, 401, "M_FORBIDDEN");
    ok(tablet.get("/account/whoami").await?);

    let deleted = alice
        .with_password_auth(
            Method::DELETE,
            "/devices/TABLET",
            &json!({}),
            "alice-password",
        )
        .await?;
    ok(deleted);
    assert_error(
        &tablet.get("/account/whoami").await?,
        401,
        "M_UNKNOWN_TOKEN",
    );
    ok(alice.get("/account/whoami").await?);
    let listed = ok(alice.get("/devices").await?);
    assert_eq!(device_ids(&listed), vec![alice.device_id.clone()]);
    assert_error(&alice.get("/devices/TABLET").await?, 404, "M_NOT_FOUND");
    Ok(())
}

/// `POST /delete_devices` removes several devices at once (after UIA)
/// and kills their tokens.
async fn bulk_delete_devices(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "alice-password").await?;
    let one = server.login("alice", "alice-password", Some("ONE")).await?;
    let two = server.login("alice", "alice-password", Some("TWO")).await?;
    let keep = server
        .login("alice", "alice-password", Some("KEEP"))
        .await?;

    let done = alice
        .with_password_auth(
            Method::POST,
            "/delete_devices",
            &json!({"devices": ["ONE", "TWO"]}),
            "alice-password",
        )
        .await?;
    ok(done);
    assert_error(&one.get("/account/whoami").await?, 401, "M_UNKNOWN_TOKEN");
    assert_error(&two.get("/account/whoami").await?, 401, "M_UNKNOWN_TOKEN");
    ok(keep.get("/account/whoami").await?);

    let mut expected = vec![alice.device_id.clone(), "KEEP".to_owned()];
    expected.sort();
    assert_eq!(device_ids(&ok(alice.get("/devices").await?)), expected);

    // Deleting one's own current device logs this session out.
    let path = format!("/devices/{}", enc(&keep.device_id));
    ok(keep
        .with_password_auth(Method::DELETE, &path, &json!({}), "alice-password")
        .await?);
    assert_error(&keep.get("/account/whoami").await?, 401, "M_UNKNOWN_TOKEN");
    Ok(())
}

backend_tests!(list_get_rename, delete_device_with_uia, bulk_delete_devices);
