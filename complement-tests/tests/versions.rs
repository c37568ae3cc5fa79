//! Server discovery: `GET /_matrix/client/versions`,
//! `GET /.well-known/matrix/client` and `GET /_matrix/client/v3/capabilities`.

use complement_tests::{assert_error, backend_tests, ok, TestServer};

/// `/versions` needs no token and lists every supported spec version
/// individually ("v1.1", "v1.2", ...), plus an `unstable_features` map of
/// booleans.
async fn versions_lists_each_version(server: TestServer) -> anyhow::Result<()> {
    let body = ok(server.anonymous().get("/_matrix/client/versions").await?);
    let versions: Vec<&str> = body["versions"]
        .as_array()
        .expect("`versions` must be an array")
        .iter()
        .map(|v| v.as_str().expect("each version is a string"))
        .collect();
    for required in ["v1.1", "v1.2", "v1.3"] {
        assert!(
            versions.contains(&required),
            "/versions must list {required} individually: {versions:?}"
        );
    }
    for version in &versions {
        let rest = version
            .strip_prefix("v1.")
            .or_else(|| version.strip_prefix("r0."))
            .unwrap_or_else(|| panic!("unexpected version string {version}"));
        assert!(
            rest.split('.').all(|part| part.parse::<u32>().is_ok()),
            "malformed version {version}"
        );
    }
    if let Some(features) = body.get("unstable_features") {
        let features = features
            .as_object()
            .expect("`unstable_features` must be an object");
        for (name, enabled) in features {
            assert!(
                enabled.is_boolean(),
                "unstable feature {name} is not a bool"
            );
        }
    }
    // The same answer with a token.
    let alice = server.register("alice", "password-a").await?;
    let authed = ok(alice.get("/_matrix/client/versions").await?);
    assert_eq!(authed["versions"], body["versions"]);
    Ok(())
}

/// `/.well-known/matrix/client` names the homeserver's base URL.
async fn well_known_client(server: TestServer) -> anyhow::Result<()> {
    let body = ok(server.anonymous().get("/.well-known/matrix/client").await?);
    let base_url = body["m.homeserver"]["base_url"]
        .as_str()
        .unwrap_or_else(|| panic!("well-known lacks m.homeserver.base_url: {body}"));
    assert!(
        base_url.starts_with("http://") || base_url.starts_with("https://"),
        "base_url is not an http(s) URL: {base_url}"
    );
    Ok(())
}

/// `/capabilities` needs a token, and advertises room versions 6 to 12
/// as stable with "12" the default, plus `m.change_password`.
async fn capabilities(server: TestServer) -> anyhow::Result<()> {
    let anonymous = server.anonymous().get("/capabilities").await?;
    assert_error(&anonymous, 401, "M_MISSING_TOKEN");

    let alice = server.register("alice", "password-a").await?;
    let body = ok(alice.get("/capabilities").await?);
    let capabilities = &body["capabilities"];
    assert!(capabilities.is_object(), "no `capabilities` object: {body}");

    let room_versions = &capabilities["m.room_versions"];
    assert_eq!(
        room_versions["default"], "12",
        "default room version: {body}"
    );
    let available = room_versions["available"]
        .as_object()
        .unwrap_or_else(|| panic!("m.room_versions.available missing: {body}"));
    for version in 6..=12 {
        assert_eq!(
            available.get(&version.to_string()).and_then(|s| s.as_str()),
            Some("stable"),
            "room version {version} should be available and stable: {body}"
        );
    }
    for stability in available.values() {
        assert!(
            stability == "stable" || stability == "unstable",
            "bad stability value {stability}"
        );
    }

    let change_password = &capabilities["m.change_password"];
    assert_eq!(
        change_password["enabled"], true,
        "m.change_password should be enabled: {body}"
    );
    Ok(())
}

backend_tests!(versions_lists_each_version, well_known_client, capabilities);
