//! Push rules (spec § "Push Notifications", "Push Rules: API"): `GET /pushrules/` serving the
//! spec's predefined rule set for the caller. User-defined rules are not stored yet, so the
//! set is always the server default (ruma's `Ruleset::server_default`).

use axum::Json;
use ruma::{push::Ruleset, UserId};
use serde_json::{json, Value};

use crate::extract::Auth;

/// The five rule kinds of a ruleset, in the spec's priority order.
const RULE_KINDS: [&str; 5] = ["override", "content", "room", "sender", "underride"];

/// The default ruleset of `user_id` as JSON, with every rule kind present (empty kinds as
/// `[]`; some clients index the arrays without checking).
pub fn default_ruleset(user_id: &UserId) -> Value {
    let mut v =
        serde_json::to_value(Ruleset::server_default(user_id)).unwrap_or_else(|_| json!({}));
    if let Value::Object(m) = &mut v {
        for kind in RULE_KINDS {
            m.entry(kind).or_insert_with(|| json!([]));
        }
    }
    v
}

/// The content of the user's `m.push_rules` account data: `{"global": ruleset}`.
pub fn push_rules_content(user_id: &UserId) -> Value {
    json!({ "global": default_ruleset(user_id) })
}

/// `GET /pushrules/`.
pub async fn get_rules(auth: Auth) -> Json<Value> {
    Json(push_rules_content(&auth.user_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_rules_have_every_kind_and_the_master_rule() {
        let user = <&UserId>::try_from("@alice:example.org").unwrap();
        let v = push_rules_content(user);
        for kind in RULE_KINDS {
            assert!(v["global"][kind].is_array(), "{kind} missing");
        }
        let first = &v["global"]["override"][0];
        assert_eq!(first["rule_id"], ".m.rule.master");
        assert_eq!(first["enabled"], false);
        let underride: Vec<&str> = v["global"]["underride"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|r| r["rule_id"].as_str())
            .collect();
        assert!(underride.contains(&".m.rule.message"));
        // The mention rule is bound to the user.
        let mention = v["global"]["override"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["rule_id"] == ".m.rule.is_user_mention")
            .unwrap();
        assert!(mention.to_string().contains("@alice:example.org"));
    }
}
