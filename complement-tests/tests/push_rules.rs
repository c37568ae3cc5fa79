//! Push rules: `GET /pushrules/` and `/pushrules/global/` return the spec's
//! server-default rule set; single rules can be fetched, enabled and
//! disabled; a user-defined room rule can be added and removed.

use complement_tests::{assert_error, backend_tests, enc, ok, TestServer};
use serde_json::{json, Value};

const OVERRIDE_DEFAULTS: [&str; 10] = [
    ".m.rule.master",
    ".m.rule.suppress_notices",
    ".m.rule.invite_for_me",
    ".m.rule.member_event",
    ".m.rule.is_user_mention",
    ".m.rule.is_room_mention",
    ".m.rule.tombstone",
    ".m.rule.reaction",
    ".m.rule.room.server_acl",
    ".m.rule.suppress_edits",
];

const UNDERRIDE_DEFAULTS: [&str; 5] = [
    ".m.rule.call",
    ".m.rule.encrypted_room_one_to_one",
    ".m.rule.room_one_to_one",
    ".m.rule.message",
    ".m.rule.encrypted",
];

fn rule_ids(rules: &Value) -> Vec<&str> {
    rules
        .as_array()
        .unwrap_or_else(|| panic!("rule list is not an array: {rules}"))
        .iter()
        .map(|r| r["rule_id"].as_str().expect("rule_id"))
        .collect()
}

/// Asserts `expected` appear in `ids` in this relative order.
fn assert_in_order(ids: &[&str], expected: &[&str]) {
    let positions: Vec<usize> = expected
        .iter()
        .map(|id| {
            ids.iter()
                .position(|x| x == id)
                .unwrap_or_else(|| panic!("default rule {id} missing from {ids:?}"))
        })
        .collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "default rules out of order: {ids:?}"
    );
}

/// The full default rule set, in spec order, with the master rule
/// disabled.
async fn default_push_rules(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "alice-password").await?;
    let body = ok(alice.get("/pushrules/").await?);
    let global = &body["global"];
    for kind in ["override", "content", "room", "sender", "underride"] {
        assert!(
            global[kind].is_array(),
            "global.{kind} must be an array: {body}"
        );
    }
    let overrides = rule_ids(&global["override"]);
    assert_in_order(&overrides, &OVERRIDE_DEFAULTS);
    assert_eq!(overrides[0], ".m.rule.master", "master comes first");
    assert_in_order(&rule_ids(&global["underride"]), &UNDERRIDE_DEFAULTS);

    let master = &global["override"][0];
    assert_eq!(master["default"], true);
    assert_eq!(master["enabled"], false);
    assert_eq!(master["conditions"], json!([]));
    assert_eq!(master["actions"], json!([]));
    for kind in ["override", "content", "room", "sender", "underride"] {
        for rule in global[kind].as_array().into_iter().flatten() {
            assert!(
                rule["enabled"].is_boolean() && rule["default"].is_boolean(),
                "{rule}"
            );
            assert!(rule["actions"].is_array(), "{rule}");
            if rule["default"] == true {
                assert!(
                    rule["rule_id"]
                        .as_str()
                        .is_some_and(|id| id.starts_with('.')),
                    "{rule}"
                );
            }
        }
    }
    let message = global["underride"]
        .as_array()
        .expect("underride")
        .iter()
        .find(|r| r["rule_id"] == ".m.rule.message")
        .expect(".m.rule.message");
    assert_eq!(message["actions"], json!(["notify"]));
    assert_eq!(
        message["conditions"],
        json!([{"kind": "event_match", "key": "type", "pattern": "m.room.message"}])
    );

    let same = ok(alice.get("/pushrules/global/").await?);
    assert_eq!(&same, global);
    Ok(())
}

/// Single-rule reads, the `enabled` toggle, and a user-defined room
/// rule.
async fn push_rule_updates(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "alice-password").await?;
    let master = ok(alice
        .get("/pushrules/global/override/.m.rule.master")
        .await?);
    assert_eq!(master["rule_id"], ".m.rule.master");
    assert_eq!(master["enabled"], false);

    ok(alice
        .put(
            "/pushrules/global/override/.m.rule.master/enabled",
            &json!({"enabled": true}),
        )
        .await?);
    assert_eq!(
        ok(alice
            .get("/pushrules/global/override/.m.rule.master/enabled")
            .await?),
        json!({"enabled": true})
    );
    ok(alice
        .put(
            "/pushrules/global/override/.m.rule.master/enabled",
            &json!({"enabled": false}),
        )
        .await?);
    assert_eq!(
        ok(alice
            .get("/pushrules/global/override/.m.rule.master")
            .await?)["enabled"],
        false
    );

    let missing = alice
        .get("/pushrules/global/override/nonexistent.rule")
        .await?;
    assert_error(&missing, 404, "M_NOT_FOUND");

    let room = alice.create_room(&json!({})).await?;
    let path = format!("/pushrules/global/room/{}", enc(&room));
    ok(alice.put(&path, &json!({"actions": []})).await?);
    let rule = ok(alice.get(&path).await?);
    assert_eq!(rule["rule_id"], room);
    assert_eq!(rule["default"], false);
    assert_eq!(rule["enabled"], true);
    let all = ok(alice.get("/pushrules/").await?);
    assert!(
        rule_ids(&all["global"]["room"]).contains(&room.as_str()),
        "{all}"
    );

    ok(alice.delete(&path).await?);
    assert_error(&alice.get(&path).await?, 404, "M_NOT_FOUND");
    Ok(())
}

backend_tests!(default_push_rules, push_rule_updates);
