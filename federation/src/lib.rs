//! `myelin-federation`: the Server-Server API.
//!
//! - [`client`], [`discovery`]: outbound requests (X-Matrix signed, server discovery, SSRF
//!   guard); [`keyring`]: other servers' keys; [`auth`]: inbound request signatures;
//!   [`key_server`]: our keys and the notary.
//! - [`inbound`]: checking events from other servers and fetching what they lack;
//!   [`history`]: backfill and the state at events we lack;
//!   [`endpoints`]: the `/_matrix/federation/*` handlers; [`sender`]: the durable outbox, one
//!   queue per destination; [`outbound`]: what our users do in other servers' rooms (joins,
//!   invites, leaves, directory and profile look-ups); [`rooms`]: room directories and space
//!   hierarchies, served and asked for; [`e2ee`]: keys, device lists and to-device messages
//!   across servers.

pub mod auth;
pub mod client;
pub mod discovery;
pub mod e2ee;
mod endpoints;
pub mod history;
pub mod inbound;
pub mod key_server;
pub mod keyring;
pub mod outbound;
pub mod rooms;
pub mod sender;

use std::sync::Arc;

use axum::{
    extract::FromRef,
    http::StatusCode,
    response::{IntoResponse, Response},
    Json, Router,
};
use myelin_core::{Error, Server};
use serde_json::json;

pub use key_server::server_keys_json;

use crate::{client::FederationClient, keyring::KeyRing};

/// Everything federation needs, shared by the handlers, the sender and the client API.
pub struct Federation {
    pub server: Arc<Server>,
    pub client: Arc<FederationClient>,
    pub keys: Arc<KeyRing>,
    /// One backfill per room at a time (see [`history`]).
    backfill_locks: std::sync::Mutex<std::collections::HashMap<i64, Arc<tokio::sync::Mutex<()>>>>,
    /// Other servers' `/hierarchy` answers, reused for a minute.
    pub hierarchy: rooms::HierarchyCache,
    /// Device-list resyncs in flight, by user, and whether another was asked for meanwhile
    /// (see [`e2ee`]).
    resyncs: e2ee::Resyncs,
}

impl Federation {
    pub fn new(server: Arc<Server>) -> Result<Arc<Self>, String> {
        let client = Arc::new(FederationClient::new(server.clone())?);
        let keys = Arc::new(KeyRing::new(server.clone(), client.clone()));
        Ok(Arc::new(Federation {
            server,
            client,
            keys,
            backfill_locks: Default::default(),
            hierarchy: rooms::HierarchyCache::default(),
            resyncs: Default::default(),
        }))
    }
}

/// The router state.
#[derive(Clone)]
pub struct FedState(pub Arc<Federation>);

impl FromRef<FedState> for Arc<KeyRing> {
    fn from_ref(s: &FedState) -> Self {
        s.0.keys.clone()
    }
}

impl FromRef<FedState> for Arc<Server> {
    fn from_ref(s: &FedState) -> Self {
        s.0.server.clone()
    }
}

/// The federation router: the key server, the notary and `/_matrix/federation/*`.
pub fn router(fed: Arc<Federation>) -> Router {
    Router::new()
        .merge(key_server::key_routes())
        .merge(endpoints::routes())
        .fallback(|| async {
            FedError(Error::new(
                myelin_core::ErrorKind::Unrecognized,
                "Unrecognized request",
            ))
        })
        .with_state(FedState(fed))
}

/// Only `GET /_matrix/key/v2/server`, for the client listener (clients and tools look keys
/// up there; the rest of federation is on the TLS listener).
pub fn key_router(server: Arc<Server>) -> Router {
    Router::new()
        .merge(key_server::server_key_routes())
        .with_state(server)
}

/// A handler error as a Matrix error response.
#[derive(Debug)]
pub struct FedError(pub Error);

impl From<Error> for FedError {
    fn from(e: Error) -> Self {
        FedError(e)
    }
}

impl From<serde_json::Error> for FedError {
    fn from(e: serde_json::Error) -> Self {
        FedError(Error::from(e))
    }
}

impl IntoResponse for FedError {
    fn into_response(self) -> Response {
        let kind = self.0.kind();
        let status =
            StatusCode::from_u16(kind.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::warn!(error = %self.0, "federation request failed");
        }
        (
            status,
            Json(json!({ "errcode": kind.errcode(), "error": self.0.message() })),
        )
            .into_response()
    }
}

/// Handler result.
pub type FedResult<T> = Result<T, FedError>;
