//! `myelin-federation`: the Server-Server API. For now, the key server:
//! `GET /_matrix/key/v2/server` publishes this server's ed25519 verify key, self-signed.
//! (Inbound and outbound federation come with the federation issue.)

pub mod auth;
pub mod client;
pub mod discovery;
pub mod key_server;
pub mod keyring;

use std::sync::Arc;

use axum::Router;
use myelin_core::Server;

pub use key_server::server_keys_json;

/// The federation router (key server only for now).
pub fn router(server: Arc<Server>) -> Router {
    Router::new()
        .merge(key_server::server_key_routes())
        .with_state(server)
}
