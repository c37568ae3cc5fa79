//! Push rules (spec § "Push Notifications", "Push Rules: API"): the user's rule set and its
//! single-rule API (`/pushrules/global/{kind}/{ruleId}` with `/enabled` and `/actions`).
//!
//! The rule set lives in the user's global `m.push_rules` account data (`{"global": ruleset}`),
//! which clients read through `/sync` and may not write directly; loading it (merged with the
//! server defaults) is `myelin_core::push::load_ruleset`, which the rule evaluator shares. A
//! saved change drops the evaluator's cached copy.

use std::sync::Arc;

use axum::{
    extract::{Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use myelin_core::{Error, Server};
use ruma::{
    push::{
        Action, InsertPushRuleError, NewConditionalPushRule, NewPatternedPushRule, NewPushRule,
        NewSimplePushRule, PushCondition, RemovePushRuleError, RuleKind, Ruleset,
    },
    OwnedRoomId, OwnedUserId, UserId,
};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::Mutex;

use crate::{
    account_data::write_account_data,
    error::matrix_error,
    error::{ApiError, ApiResult},
    extract::{Auth, JsonBody},
};

/// The five rule kinds of a ruleset, in the spec's priority order.
const RULE_KINDS: [&str; 5] = ["override", "content", "room", "sender", "underride"];

/// Serialises read-modify-write of rule sets (rule changes are rare; one lock is enough).
static PUSH_LOCK: Mutex<()> = Mutex::const_new(());

/// A ruleset as JSON, with every rule kind present (empty kinds as `[]`; some clients index
/// the arrays without checking).
pub fn ruleset_json(rules: &Ruleset) -> Value {
    let mut v = serde_json::to_value(rules).unwrap_or_else(|_| json!({}));
    if let Value::Object(m) = &mut v {
        for kind in RULE_KINDS {
            m.entry(kind).or_insert_with(|| json!([]));
        }
    }
    v
}

/// The default ruleset of `user_id` as JSON.
pub fn default_ruleset(user_id: &UserId) -> Value {
    ruleset_json(&Ruleset::server_default(user_id))
}

/// The content of a user's `m.push_rules` account data before they change anything:
/// `{"global": <predefined rules>}`. `/sync` should send this when nothing is stored.
pub fn push_rules_content(user_id: &UserId) -> Value {
    json!({ "global": default_ruleset(user_id) })
}

/// The user's current rule set (read afresh, for a change to be made on it).
pub async fn load_ruleset(server: &Server, user_id: &UserId) -> ApiResult<Ruleset> {
    Ok(myelin_core::push::load_ruleset(&server.store, user_id).await?)
}

async fn save_ruleset(server: &Server, user_id: &UserId, rules: &Ruleset) -> ApiResult<()> {
    let content = json!({ "global": ruleset_json(rules) });
    let res = write_account_data(server, user_id.as_str(), "", "m.push_rules", &content).await;
    // The evaluator's cached copy is stale now (also after a failure, to be safe).
    server.push.forget_rules(user_id.as_str());
    res
}

/// Loads, changes and saves the caller's rule set under the lock.
async fn modify<T>(
    server: &Server,
    user_id: &UserId,
    change: impl FnOnce(&mut Ruleset) -> Result<T, ApiError>,
) -> ApiResult<T> {
    let _guard = PUSH_LOCK.lock().await;
    let mut rules = load_ruleset(server, user_id).await?;
    let out = change(&mut rules)?;
    save_ruleset(server, user_id, &rules).await?;
    Ok(out)
}

fn rule_kind(kind: &str) -> ApiResult<RuleKind> {
    Ok(match kind {
        "override" => RuleKind::Override,
        "content" => RuleKind::Content,
        "room" => RuleKind::Room,
        "sender" => RuleKind::Sender,
        "underride" => RuleKind::Underride,
        _ => return Err(Error::invalid_param(format!("Unknown push rule kind {kind:?}")).into()),
    })
}

fn not_found() -> ApiError {
    Error::not_found("The push rule was not found").into()
}

/// The JSON of one rule of a ruleset.
fn rule_json(rules: &Ruleset, kind: &str, rule_id: &str) -> Option<Value> {
    ruleset_json(rules)
        .get(kind)?
        .as_array()?
        .iter()
        .find(|r| r["rule_id"] == rule_id)
        .cloned()
}

/// `GET /pushrules/`.
pub async fn get_rules(State(server): State<Arc<Server>>, auth: Auth) -> ApiResult<Json<Value>> {
    let rules = load_ruleset(&server, &auth.user_id).await?;
    Ok(Json(json!({ "global": ruleset_json(&rules) })))
}

/// `GET /pushrules/global/`.
pub async fn get_global(State(server): State<Arc<Server>>, auth: Auth) -> ApiResult<Json<Value>> {
    let rules = load_ruleset(&server, &auth.user_id).await?;
    Ok(Json(ruleset_json(&rules)))
}

/// `GET /pushrules/global/{kind}/{ruleId}`.
pub async fn get_rule(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path((kind, rule_id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    rule_kind(&kind)?;
    let rules = load_ruleset(&server, &auth.user_id).await?;
    rule_json(&rules, &kind, &rule_id)
        .map(Json)
        .ok_or_else(not_found)
}

/// `DELETE /pushrules/global/{kind}/{ruleId}`: user-defined rules only.
pub async fn delete_rule(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path((kind, rule_id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let k = rule_kind(&kind)?;
    modify(&server, &auth.user_id, |rules| {
        match rules.remove(k, &rule_id) {
            Ok(()) => Ok(()),
            Err(RemovePushRuleError::ServerDefault) => {
                Err(Error::forbidden("Server-default rules cannot be deleted").into())
            }
            Err(_) => Err(not_found()),
        }
    })
    .await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
pub struct PlacementQuery {
    before: Option<String>,
    after: Option<String>,
}

#[derive(Deserialize)]
pub struct RuleBody {
    actions: Vec<Action>,
    #[serde(default)]
    conditions: Vec<PushCondition>,
    pattern: Option<String>,
}

/// The rule a `PUT` describes.
fn new_rule(kind: &str, rule_id: &str, body: RuleBody) -> ApiResult<NewPushRule> {
    let id = rule_id.to_owned();
    Ok(match kind {
        "override" => NewPushRule::Override(NewConditionalPushRule::new(
            id,
            body.conditions,
            body.actions,
        )),
        "underride" => NewPushRule::Underride(NewConditionalPushRule::new(
            id,
            body.conditions,
            body.actions,
        )),
        "content" => {
            let pattern = body
                .pattern
                .ok_or_else(|| Error::missing_param("Content rules need a pattern"))?;
            NewPushRule::Content(NewPatternedPushRule::new(id, pattern, body.actions))
        }
        "room" => {
            let room = OwnedRoomId::try_from(rule_id)
                .map_err(|_| Error::invalid_param("Room rule IDs must be room IDs"))?;
            NewPushRule::Room(NewSimplePushRule::new(room, body.actions))
        }
        "sender" => {
            let user = OwnedUserId::try_from(rule_id)
                .map_err(|_| Error::invalid_param("Sender rule IDs must be user IDs"))?;
            NewPushRule::Sender(NewSimplePushRule::new(user, body.actions))
        }
        _ => return Err(Error::invalid_param(format!("Unknown push rule kind {kind:?}")).into()),
    })
}

/// Why an insertion failed, as the spec's 400 responses.
fn insert_error(e: InsertPushRuleError) -> Response {
    match e {
        InsertPushRuleError::ServerDefaultRuleId | InsertPushRuleError::InvalidRuleId => {
            matrix_error(
                StatusCode::BAD_REQUEST,
                "M_INVALID_PARAM",
                &format!("Invalid rule ID: {e}"),
            )
        }
        other => matrix_error(StatusCode::BAD_REQUEST, "M_UNKNOWN", &other.to_string()),
    }
}

/// `PUT /pushrules/global/{kind}/{ruleId}` (`?before=`/`?after=` place it).
pub async fn put_rule(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path((kind, rule_id)): Path<(String, String)>,
    Query(place): Query<PlacementQuery>,
    JsonBody(body): JsonBody<RuleBody>,
) -> ApiResult<Response> {
    rule_kind(&kind)?;
    let rule = new_rule(&kind, &rule_id, body)?;
    let _guard = PUSH_LOCK.lock().await;
    let mut rules = load_ruleset(&server, &auth.user_id).await?;
    if let Err(e) = rules.insert(rule, place.after.as_deref(), place.before.as_deref()) {
        return Ok(insert_error(e));
    }
    save_ruleset(&server, &auth.user_id, &rules).await?;
    Ok(Json(json!({})).into_response())
}

/// `GET /pushrules/global/{kind}/{ruleId}/enabled`.
pub async fn get_enabled(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path((kind, rule_id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let k = rule_kind(&kind)?;
    let rules = load_ruleset(&server, &auth.user_id).await?;
    let rule = rules.get(k, &rule_id).ok_or_else(not_found)?;
    Ok(Json(json!({ "enabled": rule.enabled() })))
}

#[derive(Deserialize)]
pub struct EnabledBody {
    enabled: bool,
}

/// `PUT /pushrules/global/{kind}/{ruleId}/enabled`.
pub async fn put_enabled(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path((kind, rule_id)): Path<(String, String)>,
    JsonBody(body): JsonBody<EnabledBody>,
) -> ApiResult<Json<Value>> {
    let k = rule_kind(&kind)?;
    modify(&server, &auth.user_id, |rules| {
        rules
            .set_enabled(k, &rule_id, body.enabled)
            .map_err(|_| not_found())
    })
    .await?;
    Ok(Json(json!({})))
}

/// `GET /pushrules/global/{kind}/{ruleId}/actions`.
pub async fn get_actions(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path((kind, rule_id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let k = rule_kind(&kind)?;
    let rules = load_ruleset(&server, &auth.user_id).await?;
    let rule = rules.get(k, &rule_id).ok_or_else(not_found)?;
    Ok(Json(json!({ "actions": rule.actions() })))
}

#[derive(Deserialize)]
pub struct ActionsBody {
    actions: Vec<Action>,
}

/// `PUT /pushrules/global/{kind}/{ruleId}/actions`.
pub async fn put_actions(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path((kind, rule_id)): Path<(String, String)>,
    JsonBody(body): JsonBody<ActionsBody>,
) -> ApiResult<Json<Value>> {
    let k = rule_kind(&kind)?;
    modify(&server, &auth.user_id, |rules| {
        rules
            .set_actions(k, &rule_id, body.actions)
            .map_err(|_| not_found())
    })
    .await?;
    Ok(Json(json!({})))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> &'static UserId {
        <&UserId>::try_from("@alice:example.org").unwrap()
    }

    #[test]
    fn default_rules_have_every_kind_and_the_master_rule() {
        let v = push_rules_content(alice());
        for kind in RULE_KINDS {
            assert!(v["global"][kind].is_array(), "{kind} missing");
        }
        let first = &v["global"]["override"][0];
        assert_eq!(first["rule_id"], ".m.rule.master");
        assert_eq!(first["enabled"], false);
        let rules = Ruleset::server_default(alice());
        assert!(rule_json(&rules, "underride", ".m.rule.message").is_some());
        let mention = rule_json(&rules, "override", ".m.rule.is_user_mention").unwrap();
        assert!(mention.to_string().contains("@alice:example.org"));
        assert!(rule_json(&rules, "override", ".m.rule.message").is_none());
    }

    fn body(v: Value) -> RuleBody {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn user_rules_are_built_per_kind() {
        let room = "!room:example.org";
        let rule = new_rule("room", room, body(json!({"actions": []}))).unwrap();
        let mut rules = Ruleset::server_default(alice());
        rules.insert(rule, None, None).unwrap();
        let got = rule_json(&rules, "room", room).unwrap();
        assert_eq!(got["enabled"], true);
        assert_eq!(got["default"], false);

        assert!(new_rule("room", "not-a-room", body(json!({"actions": []}))).is_err());
        assert!(new_rule(
            "sender",
            "@bob:example.org",
            body(json!({"actions": ["notify"]}))
        )
        .is_ok());
        assert!(
            new_rule("content", "cake", body(json!({"actions": []}))).is_err(),
            "pattern needed"
        );
        let content = new_rule(
            "content",
            "cake",
            body(json!({"actions": [], "pattern": "cake*"})),
        );
        assert!(content.is_ok());

        // Server-default IDs are refused on insertion.
        let dotted = new_rule("override", ".m.rule.mine", body(json!({"actions": []}))).unwrap();
        let err = rules.insert(dotted, None, None).unwrap_err();
        assert_eq!(insert_error(err).status(), StatusCode::BAD_REQUEST);
    }

    /// The rule API end to end on a throwaway SQLite store (handlers called directly).
    #[tokio::test]
    async fn rule_api_changes_the_stored_set() {
        let dir = std::env::temp_dir().join(format!(
            "myelin-push-{}",
            myelin_core::server::random_string(8)
        ));
        let config = myelin_core::config::Config {
            server_name: "example.org".into(),
            data_dir: dir.clone(),
            ..Default::default()
        };
        let server = Server::open(config).await.unwrap();
        let auth = || {
            Auth(Arc::new(myelin_core::accounts::Session {
                user_id: alice().to_owned(),
                device_id: "DEV".into(),
                is_admin: false,
                expires_ts: None,
            }))
        };
        let path = |kind: &str, id: &str| Path((kind.to_owned(), id.to_owned()));
        let st = || State(server.clone());

        let master = get_rule(st(), auth(), path("override", ".m.rule.master"))
            .await
            .unwrap();
        assert_eq!(master.0["enabled"], false);
        let _ = put_enabled(
            st(),
            auth(),
            path("override", ".m.rule.master"),
            JsonBody(EnabledBody { enabled: true }),
        )
        .await
        .unwrap();
        let enabled = get_enabled(st(), auth(), path("override", ".m.rule.master"))
            .await
            .unwrap();
        assert_eq!(enabled.0, json!({"enabled": true}));

        let room = "!room:example.org";
        let place = || {
            Query(PlacementQuery {
                before: None,
                after: None,
            })
        };
        let res = put_rule(
            st(),
            auth(),
            path("room", room),
            place(),
            JsonBody(body(json!({"actions": []}))),
        )
        .await
        .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let all = get_rules(st(), auth()).await.unwrap().0;
        assert!(all["global"]["room"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["rule_id"] == room));
        assert_eq!(
            all["global"]["override"][0]["enabled"], true,
            "the toggle persisted"
        );

        let _ = put_actions(
            st(),
            auth(),
            path("room", room),
            JsonBody(ActionsBody {
                actions: vec![Action::Notify],
            }),
        )
        .await
        .unwrap();
        let actions = get_actions(st(), auth(), path("room", room))
            .await
            .unwrap()
            .0;
        assert_eq!(actions, json!({"actions": ["notify"]}));

        let bad = put_rule(
            st(),
            auth(),
            path("override", ".m.rule.x"),
            place(),
            JsonBody(body(json!({"actions": []}))),
        )
        .await
        .unwrap();
        assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
        let unknown_after = put_rule(
            st(),
            auth(),
            path("override", "mine"),
            Query(PlacementQuery {
                before: None,
                after: Some("nope".into()),
            }),
            JsonBody(body(json!({"actions": []}))),
        )
        .await
        .unwrap();
        assert_eq!(unknown_after.status(), StatusCode::BAD_REQUEST);
        assert!(
            get_rule(st(), auth(), path("override", "mine"))
                .await
                .is_err(),
            "nothing saved"
        );

        assert!(
            delete_rule(st(), auth(), path("override", ".m.rule.master"))
                .await
                .is_err()
        );
        let _ = delete_rule(st(), auth(), path("room", room)).await.unwrap();
        assert!(get_rule(st(), auth(), path("room", room)).await.is_err());
        assert!(delete_rule(st(), auth(), path("room", room)).await.is_err());
        assert!(get_rule(st(), auth(), path("nonsense", "x")).await.is_err());
        let global = get_global(st(), auth()).await.unwrap().0;
        assert!(global["room"].as_array().unwrap().is_empty());

        server.store.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn stored_sets_round_trip_through_json() {
        let mut rules = Ruleset::server_default(alice());
        rules
            .set_enabled(RuleKind::Override, ".m.rule.master", true)
            .unwrap();
        let v = ruleset_json(&rules);
        let back: Ruleset = serde_json::from_value(v).unwrap();
        assert!(back
            .get(RuleKind::Override, ".m.rule.master")
            .unwrap()
            .enabled());
    }
}
