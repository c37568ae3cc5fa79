//! Receipts and read markers (spec § "Receipts", "Fully read markers"):
//! `POST /rooms/{roomId}/receipt/{receiptType}/{eventId}` and `POST /rooms/{roomId}/read_markers`.

use std::sync::Arc;

use axum::{
    extract::{Path, State},
    Json,
};
use myelin_core::{
    receipts::{check_thread_id, NewReceipt, FULLY_READ, READ, READ_PRIVATE},
    store::now_ms,
    Error, Server,
};
use ruma::{OwnedEventId, OwnedRoomId, RoomId};
use serde_json::{json, Map, Value};

use crate::{
    account_data::write_account_data,
    error::ApiResult,
    extract::{parse_id, Auth, JsonBody},
};

/// `POST /rooms/{roomId}/receipt/{receiptType}/{eventId}` with `{thread_id?}`.
pub async fn post_receipt(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path((room_id, receipt_type, event_id)): Path<(String, String, String)>,
    JsonBody(body): JsonBody<Map<String, Value>>,
) -> ApiResult<Json<Value>> {
    let room: OwnedRoomId = parse_id(&room_id, "room ID")?;
    let event: OwnedEventId = parse_id(&event_id, "event ID")?;
    let thread = check_thread_id(body.get("thread_id"))?;
    match receipt_type.as_str() {
        READ | READ_PRIVATE => {
            server
                .post_receipt(NewReceipt {
                    room_id: &room,
                    receipt_type: &receipt_type,
                    user_id: auth.user_id.as_str(),
                    event_id: event.as_str(),
                    thread_id: thread.as_deref(),
                    ts: now_ms(),
                })
                .await?;
        }
        FULLY_READ => {
            if thread.is_some() {
                return Err(Error::invalid_param("m.fully_read takes no thread_id").into());
            }
            fully_read(&server, &auth, &room, &event).await?;
        }
        other => {
            return Err(Error::invalid_param(format!(
                "Receipt type must be m.read, m.read.private or m.fully_read, not {other}"
            ))
            .into())
        }
    }
    Ok(Json(json!({})))
}

/// `POST /rooms/{roomId}/read_markers` with `m.fully_read`, `m.read`, `m.read.private`
/// (each an event ID, each optional).
pub async fn read_markers(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path(room_id): Path<String>,
    JsonBody(body): JsonBody<Map<String, Value>>,
) -> ApiResult<Json<Value>> {
    let room: OwnedRoomId = parse_id(&room_id, "room ID")?;
    let field = |name: &str| -> ApiResult<Option<OwnedEventId>> {
        match body.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => parse_id(s, "event ID").map(Some),
            Some(_) => Err(Error::bad_json(format!("{name} must be an event ID")).into()),
        }
    };
    let (fully, read, private) = (field(FULLY_READ)?, field(READ)?, field(READ_PRIVATE)?);
    if let Some(ev) = &fully {
        fully_read(&server, &auth, &room, ev).await?;
    }
    for (ty, ev) in [(READ, &read), (READ_PRIVATE, &private)] {
        if let Some(ev) = ev {
            server
                .post_receipt(NewReceipt {
                    room_id: &room,
                    receipt_type: ty,
                    user_id: auth.user_id.as_str(),
                    event_id: ev.as_str(),
                    thread_id: None,
                    ts: now_ms(),
                })
                .await?;
        }
    }
    Ok(Json(json!({})))
}

/// Moves the user's `m.fully_read` marker (room account data) to `event`, which must be in
/// the room they are joined to.
async fn fully_read(
    server: &Server,
    auth: &Auth,
    room: &RoomId,
    event: &OwnedEventId,
) -> ApiResult<()> {
    server
        .check_receipt_target(auth.user_id.as_str(), room, event.as_str())
        .await?;
    write_account_data(
        server,
        auth.user_id.as_str(),
        room.as_str(),
        FULLY_READ,
        &json!({ "event_id": event }),
    )
    .await
}
