//! `myelin-client-api`: the axum router for `/_matrix/client/*` and `/.well-known/matrix/*`.
//!
//! Handlers are thin: extract and validate (ids → `M_INVALID_PARAM`, bodies → `M_NOT_JSON` /
//! `M_BAD_JSON`), authorise the caller, call into `myelin-core`, render JSON. One file per area
//! of the Client-Server API, named after its spec section.

use std::sync::Arc;

use axum::{
    extract::DefaultBodyLimit,
    http::{header, Method, StatusCode},
    response::{IntoResponse, Response},
    routing::{any, get, post, put},
    Router,
};
use myelin_core::{ErrorKind, Server};
use tower_http::cors::{Any, CorsLayer};

mod account;
mod account_data;
mod devices;
mod directory;
mod discovery;
pub mod error;
pub mod extract;
mod filter;
mod hierarchy;
mod keys;
mod membership;
mod message;
mod presence;
mod profile;
mod push;
pub mod push_sender;
mod pushers;
mod receipts;
mod room;
mod room_keys;
mod sliding_sync;
mod sync;
mod typing;
mod uia;
pub mod ws_sync;

use error::err;

/// Routes served under each version prefix (`v3`, and the legacy `r0`).
fn versioned() -> Router<Arc<Server>> {
    Router::new()
        // Accounts
        .route("/register", post(account::register))
        .route("/register/available", get(account::register_available))
        .route("/login", get(account::login_flows).post(account::login))
        .route("/refresh", post(account::refresh))
        .route("/logout", post(account::logout))
        .route("/logout/all", post(account::logout_all))
        .route("/account/whoami", get(account::whoami))
        .route("/account/password", post(account::change_password))
        .route("/account/deactivate", post(account::deactivate))
        .route("/capabilities", get(discovery::capabilities))
        // Devices
        .route("/devices", get(devices::list))
        .route(
            "/devices/{device_id}",
            get(devices::get_one)
                .put(devices::rename)
                .delete(devices::delete_one),
        )
        .route("/delete_devices", post(devices::delete_many))
        // End-to-end encryption
        .route("/keys/upload", post(keys::upload))
        .route("/keys/query", post(keys::query))
        .route("/keys/claim", post(keys::claim))
        .route("/keys/changes", get(keys::changes))
        .route(
            "/keys/device_signing/upload",
            post(keys::device_signing_upload),
        )
        .route("/keys/signatures/upload", post(keys::signatures_upload))
        .route(
            "/sendToDevice/{event_type}/{txn_id}",
            put(keys::send_to_device),
        )
        // Rooms
        .route("/createRoom", post(room::create_room))
        .route("/joined_rooms", get(membership::joined_rooms))
        .route(
            "/join/{room_id_or_alias}",
            post(membership::join_by_id_or_alias),
        )
        .route("/rooms/{room_id}/join", post(membership::join))
        .route("/knock/{room_id_or_alias}", post(membership::knock))
        .route("/rooms/{room_id}/invite", post(membership::invite))
        .route("/rooms/{room_id}/leave", post(membership::leave))
        .route("/rooms/{room_id}/forget", post(membership::forget))
        .route("/rooms/{room_id}/kick", post(membership::kick))
        .route("/rooms/{room_id}/ban", post(membership::ban))
        .route("/rooms/{room_id}/unban", post(membership::unban))
        .route("/rooms/{room_id}/members", get(membership::members))
        .route(
            "/rooms/{room_id}/joined_members",
            get(membership::joined_members),
        )
        .route("/rooms/{room_id}/state", get(message::get_state))
        .route(
            "/rooms/{room_id}/state/{event_type}",
            get(message::get_state_event_empty_key).put(message::put_state_empty_key),
        )
        .route(
            "/rooms/{room_id}/state/{event_type}/",
            get(message::get_state_event_empty_key).put(message::put_state_empty_key),
        )
        .route(
            "/rooms/{room_id}/state/{event_type}/{*state_key}",
            get(message::get_state_event).put(message::put_state),
        )
        .route(
            "/rooms/{room_id}/send/{event_type}/{txn_id}",
            put(message::send),
        )
        .route("/rooms/{room_id}/event/{event_id}", get(message::get_event))
        .route("/rooms/{room_id}/messages", get(message::messages))
        .route("/rooms/{room_id}/context/{event_id}", get(message::context))
        .route(
            "/rooms/{room_id}/redact/{event_id}/{txn_id}",
            put(message::redact),
        )
        .route("/rooms/{room_id}/aliases", get(directory::room_aliases))
        .route(
            "/rooms/{room_id}/receipt/{receipt_type}/{event_id}",
            post(receipts::post_receipt),
        )
        .route(
            "/rooms/{room_id}/read_markers",
            post(receipts::read_markers),
        )
        // Directory
        .route(
            "/directory/room/{alias}",
            get(directory::get_alias)
                .put(directory::put_alias)
                .delete(directory::delete_alias),
        )
        .route(
            "/publicRooms",
            get(directory::public_rooms_get).post(directory::public_rooms_post),
        )
        .route(
            "/directory/list/room/{room_id}",
            get(directory::get_visibility).put(directory::put_visibility),
        )
        // Profile
        .route("/profile/{user_id}", get(profile::get_profile))
        .route(
            "/profile/{user_id}/{field}",
            get(profile::get_field).put(profile::put_field),
        )
        // Account data, tags, filters, push rules
        .route(
            "/user/{user_id}/account_data/{event_type}",
            get(account_data::get_global).put(account_data::put_global),
        )
        .route(
            "/user/{user_id}/rooms/{room_id}/account_data/{event_type}",
            get(account_data::get_room).put(account_data::put_room),
        )
        .route(
            "/user/{user_id}/rooms/{room_id}/tags",
            get(account_data::get_tags),
        )
        .route(
            "/user/{user_id}/rooms/{room_id}/tags/{tag}",
            put(account_data::put_tag).delete(account_data::delete_tag),
        )
        .route("/user/{user_id}/filter", post(filter::create))
        .route("/user/{user_id}/filter/{filter_id}", get(filter::get))
        .route("/pushrules/", get(push::get_rules))
        .route("/pushrules/global/", get(push::get_global))
        .route(
            "/pushrules/global/{kind}/{rule_id}",
            get(push::get_rule)
                .put(push::put_rule)
                .delete(push::delete_rule),
        )
        .route(
            "/pushrules/global/{kind}/{rule_id}/enabled",
            get(push::get_enabled).put(push::put_enabled),
        )
        .route(
            "/pushrules/global/{kind}/{rule_id}/actions",
            get(push::get_actions).put(push::put_actions),
        )
        .route("/pushrules", get(push::get_rules))
        .route("/pushers", get(pushers::get_pushers))
        .route("/pushers/set", post(pushers::set_pusher))
        .route("/notifications", get(pushers::notifications))
        // Server-side key backups
        .route(
            "/room_keys/version",
            get(room_keys::get_current_version).post(room_keys::create_version),
        )
        .route(
            "/room_keys/version/{version}",
            get(room_keys::get_version)
                .put(room_keys::update_version)
                .delete(room_keys::delete_version),
        )
        .route(
            "/room_keys/keys",
            get(room_keys::get_all)
                .put(room_keys::put_all)
                .delete(room_keys::delete_all),
        )
        .route(
            "/room_keys/keys/{room_id}",
            get(room_keys::get_room)
                .put(room_keys::put_room)
                .delete(room_keys::delete_room),
        )
        .route(
            "/room_keys/keys/{room_id}/{session_id}",
            get(room_keys::get_session)
                .put(room_keys::put_session)
                .delete(room_keys::delete_session),
        )
        // Typing, presence
        .route("/rooms/{room_id}/typing/{user_id}", put(typing::put_typing))
        .route(
            "/presence/{user_id}/status",
            get(presence::get_status).put(presence::put_status),
        )
        // Sync
        .route("/sync", get(sync::sync))
}

/// The whole Client-Server API router.
///
/// The cross-cutting layers (CORS, body limit, the 405 rewrite) wrap the routed service once,
/// rather than each route: axum clones a route's service stack for every request, and a long
/// poll keeps that clone for its whole wait.
pub fn router(server: Arc<Server>, federation: Arc<myelin_federation::Federation>) -> Router {
    let body_limit = server.config.max_request_body_bytes;
    let ws_hub = Arc::new(ws_sync::Hub::default());
    let ws = ws_sync::WsState {
        server: server.clone(),
        hub: ws_hub.clone(),
    };
    let v = versioned();
    let routes = Router::new()
        .route("/_matrix/client/versions", get(discovery::versions))
        .route(
            "/.well-known/matrix/client",
            get(discovery::well_known_client),
        )
        .route(
            "/.well-known/matrix/server",
            get(discovery::well_known_server),
        )
        .nest("/_matrix/client/v3", v.clone())
        .nest("/_matrix/client/r0", v)
        .route(
            "/_matrix/client/v1/register/m.login.registration_token/validity",
            get(discovery::token_validity),
        )
        .route(
            "/_matrix/client/v1/rooms/{room_id}/hierarchy",
            get(hierarchy::hierarchy),
        )
        .route(
            "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync",
            post(sliding_sync::sync),
        )
        // `any`: an HTTP/2 extended CONNECT reaches it as well as an HTTP/1.1 GET.
        .route(ws_sync::PATH, any(ws_sync::connect).with_state(ws))
        .fallback(unrecognized)
        .with_state(server)
        .layer(axum::Extension(federation));
    let cors = CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::ACCEPT,
            header::HeaderName::from_static("x-requested-with"),
        ]);
    let layered = tower::ServiceBuilder::new()
        .layer(cors)
        .layer(axum::middleware::map_response(method_not_allowed))
        .layer(DefaultBodyLimit::max(body_limit))
        .service(routes);
    let app = Router::new().fallback_service(layered);
    // Tunnelled WebSocket requests run through this same router.
    ws_hub.set_router(app.clone());
    app
}

async fn unrecognized() -> Response {
    err::<()>(ErrorKind::Unrecognized, "Unrecognized request").into_response()
}

/// axum answers a known path with the wrong method by an empty 405; the spec wants
/// `M_UNRECOGNIZED` in a JSON body.
async fn method_not_allowed(res: Response) -> Response {
    // Only axum's own (empty) 405s; a handler's 405 (e.g. `M_BAD_JSON`) passes through.
    if res.status() == StatusCode::METHOD_NOT_ALLOWED
        && res.headers().get(header::CONTENT_TYPE).is_none()
    {
        return err::<()>(ErrorKind::MethodNotAllowed, "Unsupported method").into_response();
    }
    res
}
