//! Group commit: many rooms' new events written in one transaction with multi-row statements.
//!
//! Each statement is a round trip to the database (for SQLite, a hop to its worker thread), so
//! the writer sends a handful of statements per batch rather than several per event. Everything
//! a batch changes commits or rolls back together.

use sqlx::{Any, AssertSqlSafe, Transaction};

use super::Store;
use crate::Result;

/// One event to write, with every numeric ID already allocated.
#[derive(Debug, Clone)]
pub struct EventWrite {
    pub event_nid: i64,
    pub event_id: String,
    pub event_type: String,
    pub state_key: Option<String>,
    pub sender: String,
    pub depth: i64,
    pub origin_server_ts: i64,
    pub stream_ordering: i64,
    pub json: String,
    pub state_before: i64,
    pub state_after: i64,
    /// A new state group (for a state event).
    pub new_group: Option<GroupWrite>,
    /// `(target user, membership)` of a member event.
    pub membership: Option<(String, String)>,
    /// `(user, device, scope, txn_id)` of a client send.
    pub txn: Option<(String, String, String, String)>,
}

/// A new state group: its parent (none for a full snapshot) and its own entries.
#[derive(Debug, Clone)]
pub struct GroupWrite {
    pub group: i64,
    pub parent: Option<i64>,
    pub chain_len: i64,
    pub state_key_nid: i64,
    pub edits: Vec<(i64, i64)>,
}

/// An event stored outside the room's timeline graph: an auth-chain or state event learnt from
/// another server, a rejected or soft-failed event, or an invite to a room we are not in.
#[derive(Debug, Clone)]
pub struct OutlierWrite {
    pub event_nid: i64,
    pub event_id: String,
    pub event_type: String,
    pub state_key: Option<String>,
    pub sender: String,
    pub depth: i64,
    pub origin_server_ts: i64,
    pub json: String,
    pub rejected: bool,
    /// Set for an invite from another server, so the invitee's sync sees it.
    pub stream_ordering: Option<i64>,
}

/// A room's current state set explicitly (after state resolution or a remote join) rather than
/// derived from its new events.
#[derive(Debug, Clone, Default)]
pub struct CurrentWrite {
    pub group: i64,
    /// Replace every row (a join from another server brings the whole state).
    pub replace_all: bool,
    pub upserts: Vec<(i64, i64)>,
    pub removes: Vec<i64>,
    /// `(user, membership, member event nid)` changed by this state.
    pub memberships: Vec<(String, String, i64)>,
    /// The stream position the membership changes are recorded at.
    pub position: i64,
}

/// One room's share of a batch.
#[derive(Debug, Clone, Default)]
pub struct RoomWrite {
    pub room_nid: i64,
    /// `(room_id, room_version)` when the room is new.
    pub new_room: Option<(String, String)>,
    pub events: Vec<EventWrite>,
    /// The room's forward extremities after these events (`None`: unchanged).
    pub extremities: Option<Vec<i64>>,
    /// Redactions applied: `(target event_nid, redacted JSON, redaction event ID)`.
    pub redactions: Vec<(i64, String, String)>,
    /// Redactions accepted before their target arrived.
    pub pending_redactions: Vec<super::PendingRedaction>,
    /// Targets now stored: the redactions waiting for them are settled (applied or not).
    pub settled_redactions: Vec<String>,
    /// Events stored outside the timeline.
    pub outliers: Vec<OutlierWrite>,
    /// State groups not tied to one new event (resolved states, a joined room's state).
    pub extra_groups: Vec<GroupWrite>,
    /// The current state when it is not simply the last new event's state.
    pub current: Option<CurrentWrite>,
    /// `(destination, event_nid)`: events to send to other servers.
    pub outbox: Vec<(String, i64)>,
    /// `(user, membership, event nid, stream position, stripped state JSON)` of an invite from
    /// another server (or its rejection through another server).
    pub remote_invite: Option<(String, String, i64, i64, String)>,
    /// `(event ID, depth of the event naming it)`: parents these events name that the timeline
    /// does not hold (see [`super::history`]).
    pub backward_add: Vec<(String, i64)>,
    /// Event IDs now held that were backward extremities.
    pub backward_remove: Vec<String>,
    /// Push actions of these events for local users (see `crate::push`).
    pub push_actions: Vec<super::PushActionWrite>,
    /// Notifications for push gateways caused by them.
    pub push_queue: Vec<super::PushQueueWrite>,
}

/// A value bound into a multi-row statement.
pub(super) enum V {
    I(i64),
    OI(Option<i64>),
    S(String),
    OS(Option<String>),
}

const MEMBERSHIP_INSERT: &str = "INSERT INTO room_memberships (room_nid, user_id, membership, \
                                 event_nid, stream_ordering, forgotten)";
const MEMBERSHIP_UPSERT: &str = "ON CONFLICT (room_nid, user_id) DO UPDATE SET membership = \
     excluded.membership, event_nid = excluded.event_nid, stream_ordering = \
     excluded.stream_ordering, forgotten = 0";
const CURRENT_INSERT: &str = "INSERT INTO current_state (room_nid, state_key_nid, event_nid)";
const CURRENT_UPSERT: &str =
    "ON CONFLICT (room_nid, state_key_nid) DO UPDATE SET event_nid = excluded.event_nid";

/// Largest number of bound values in one statement (SQLite allows 32,766).
const MAX_BINDS: usize = 30_000;

/// `INSERT INTO … VALUES (…), (…) [suffix]`, chunked to the bind limit.
pub(super) async fn insert_rows(
    tx: &mut Transaction<'static, Any>,
    head: &str,
    cols: usize,
    rows: Vec<Vec<V>>,
    suffix: &str,
) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let per = (MAX_BINDS / cols).max(1);
    // SQLite looks a named parameter (`$N`) up by scanning every name, so binding thousands
    // of them is quadratic; anonymous `?` bind in order. PostgreSQL needs `$N`.
    let anonymous = tx.backend_name() == "SQLite";
    let mut rows = rows.into_iter().peekable();
    while rows.peek().is_some() {
        let chunk: Vec<Vec<V>> = rows.by_ref().take(per).collect();
        let mut sql = String::with_capacity(head.len() + chunk.len() * cols * 5 + suffix.len());
        sql.push_str(head);
        sql.push_str(" VALUES ");
        let mut n = 0;
        for (i, _) in chunk.iter().enumerate() {
            if i > 0 {
                sql.push(',');
            }
            sql.push('(');
            for c in 0..cols {
                if c > 0 {
                    sql.push(',');
                }
                n += 1;
                if anonymous {
                    sql.push('?');
                } else {
                    sql.push('$');
                    sql.push_str(&n.to_string());
                }
            }
            sql.push(')');
        }
        sql.push(' ');
        sql.push_str(suffix);
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for row in chunk {
            for v in row {
                q = match v {
                    V::I(x) => q.bind(x),
                    V::OI(x) => q.bind(x),
                    V::S(x) => q.bind(x),
                    V::OS(x) => q.bind(x),
                };
            }
        }
        q.execute(&mut **tx).await?;
    }
    Ok(())
}

/// Inserts state groups (`(room_nid, group)`) and their edits.
pub(super) async fn insert_groups(
    tx: &mut Transaction<'static, Any>,
    groups: &[(i64, &GroupWrite)],
) -> Result<()> {
    let rows = groups
        .iter()
        .map(|(room, g)| {
            vec![
                V::I(g.group),
                V::I(*room),
                V::OI(g.parent),
                V::I(g.chain_len),
            ]
        })
        .collect();
    insert_rows(
        tx,
        "INSERT INTO state_groups (state_group, room_nid, parent_group, chain_len)",
        4,
        rows,
        "",
    )
    .await?;
    let edits = groups
        .iter()
        .flat_map(|(_, g)| {
            g.edits
                .iter()
                .map(move |(k, ev)| vec![V::I(g.group), V::I(*k), V::I(*ev)])
        })
        .collect();
    insert_rows(
        tx,
        "INSERT INTO state_group_edits (state_group, state_key_nid, event_nid)",
        3,
        edits,
        "",
    )
    .await
}

impl Store {
    /// Writes a batch of rooms' events in one transaction.
    pub async fn write_rooms(&self, rooms: &[&RoomWrite]) -> Result<()> {
        if rooms.is_empty() {
            return Ok(());
        }
        let mut w = self.write().await?;
        let tx = &mut w.tx;
        let new_rooms: Vec<Vec<V>> = rooms
            .iter()
            .filter_map(|r| {
                r.new_room.as_ref().map(|(id, v)| {
                    vec![
                        V::I(r.room_nid),
                        V::S(id.clone()),
                        V::S(v.clone()),
                        V::I(super::now_ms()),
                    ]
                })
            })
            .collect();
        insert_rows(
            tx,
            "INSERT INTO rooms (room_nid, room_id, room_version, created_ts)",
            4,
            new_rooms,
            "",
        )
        .await?;

        let events = || {
            rooms
                .iter()
                .flat_map(|r| r.events.iter().map(move |e| (r.room_nid, e)))
        };
        let groups: Vec<(i64, &GroupWrite)> = rooms
            .iter()
            .flat_map(|r| {
                r.extra_groups
                    .iter()
                    .chain(r.events.iter().filter_map(|e| e.new_group.as_ref()))
                    .map(move |g| (r.room_nid, g))
            })
            .collect();
        insert_groups(tx, &groups).await?;

        let rows: Vec<Vec<V>> = events()
            .map(|(room, e)| {
                let (device, scope, txn) = match &e.txn {
                    Some((_, d, s, t)) => (Some(d.clone()), Some(s.clone()), Some(t.clone())),
                    None => (None, None, None),
                };
                vec![
                    V::OS(device),
                    V::OS(scope),
                    V::OS(txn),
                    V::I(e.event_nid),
                    V::S(e.event_id.clone()),
                    V::I(room),
                    V::I(e.stream_ordering),
                    V::I(e.depth),
                    V::S(e.event_type.clone()),
                    V::OS(e.state_key.clone()),
                    V::S(e.sender.clone()),
                    V::I(e.origin_server_ts),
                    V::I(e.state_before),
                    V::I(e.state_after),
                    V::S(e.json.clone()),
                ]
            })
            .collect();
        insert_rows(
            tx,
            "INSERT INTO events (txn_device, txn_scope, txn_id, event_nid, event_id, room_nid, \
             stream_ordering, depth, event_type, state_key, sender, origin_server_ts, state_before, \
             state_after, json)",
            15,
            rows,
            "",
        )
        .await?;
        let outliers: Vec<Vec<V>> = rooms
            .iter()
            .flat_map(|r| r.outliers.iter().map(move |o| (r.room_nid, o)))
            .map(|(room, o)| {
                vec![
                    V::I(o.event_nid),
                    V::S(o.event_id.clone()),
                    V::I(room),
                    V::OI(o.stream_ordering),
                    V::I(o.depth),
                    V::S(o.event_type.clone()),
                    V::OS(o.state_key.clone()),
                    V::S(o.sender.clone()),
                    V::I(o.origin_server_ts),
                    V::I(1),
                    V::I(i64::from(o.rejected)),
                    V::S(o.json.clone()),
                ]
            })
            .collect();
        insert_rows(
            tx,
            "INSERT INTO events (event_nid, event_id, room_nid, stream_ordering, depth, event_type, \
             state_key, sender, origin_server_ts, outlier, rejected, json)",
            12,
            outliers,
            "ON CONFLICT (event_id) DO NOTHING",
        )
        .await?;
        for r in rooms {
            super::history::write_backward(tx, r.room_nid, &r.backward_add, &r.backward_remove)
                .await?;
        }
        // Forward extremities: each room's set is replaced by the one computed in memory.
        let room_list = rooms
            .iter()
            .filter(|r| r.extremities.is_some())
            .map(|r| r.room_nid.to_string())
            .collect::<Vec<_>>()
            .join(",");
        if !room_list.is_empty() {
            sqlx::query(AssertSqlSafe(format!(
                "DELETE FROM forward_extremities WHERE room_nid IN ({room_list})"
            )))
            .execute(&mut **tx)
            .await?;
        }
        let ext: Vec<Vec<V>> = rooms
            .iter()
            .flat_map(|r| {
                r.extremities
                    .iter()
                    .flatten()
                    .map(move |e| vec![V::I(r.room_nid), V::I(*e)])
            })
            .collect();
        insert_rows(
            tx,
            "INSERT INTO forward_extremities (room_nid, event_nid)",
            2,
            ext,
            "",
        )
        .await?;

        // Current state and memberships: the last write per key wins (one row per key per
        // statement, as an upsert may touch a row only once).
        let mut current: std::collections::HashMap<(i64, i64), i64> = Default::default();
        let mut members: std::collections::HashMap<(i64, String), (String, i64, i64)> =
            Default::default();
        let mut room_groups: Vec<(i64, i64)> = Vec::new();
        // (A room whose current state is given explicitly is written by `write_current`.)
        for r in rooms.iter().filter(|r| r.current.is_none()) {
            let mut last_group = None;
            for e in &r.events {
                if let Some(g) = &e.new_group {
                    current.insert((r.room_nid, g.state_key_nid), e.event_nid);
                    last_group = Some(g.group);
                }
                if let Some((user, m)) = &e.membership {
                    members.insert(
                        (r.room_nid, user.clone()),
                        (m.clone(), e.event_nid, e.stream_ordering),
                    );
                }
            }
            if let Some(g) = last_group {
                room_groups.push((r.room_nid, g));
            }
        }
        let cs: Vec<Vec<V>> = current
            .into_iter()
            .map(|((room, k), ev)| vec![V::I(room), V::I(k), V::I(ev)])
            .collect();
        insert_rows(tx, CURRENT_INSERT, 3, cs, CURRENT_UPSERT).await?;
        let ms: Vec<Vec<V>> = members
            .into_iter()
            .map(|((room, user), (m, ev, pos))| {
                vec![
                    V::I(room),
                    V::S(user),
                    V::S(m),
                    V::I(ev),
                    V::I(pos),
                    V::I(0),
                ]
            })
            .collect();
        insert_rows(tx, MEMBERSHIP_INSERT, 6, ms, MEMBERSHIP_UPSERT).await?;
        for (room, group) in room_groups {
            sqlx::query("UPDATE rooms SET state_group = $2 WHERE room_nid = $1")
                .bind(room)
                .bind(group)
                .execute(&mut **tx)
                .await?;
        }
        for r in rooms {
            if let Some(c) = &r.current {
                write_current(tx, r.room_nid, c).await?;
            }
            if let Some((user, membership, event_nid, position, stripped)) = &r.remote_invite {
                let row = vec![
                    V::I(r.room_nid),
                    V::S(user.clone()),
                    V::S(membership.clone()),
                    V::I(*event_nid),
                    V::I(*position),
                    V::I(0),
                ];
                insert_rows(tx, MEMBERSHIP_INSERT, 6, vec![row], MEMBERSHIP_UPSERT).await?;
                sqlx::query(
                    "INSERT INTO remote_invites (room_nid, user_id, event_nid, stripped_state) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (room_nid, user_id) DO UPDATE SET \
                     event_nid = excluded.event_nid, stripped_state = excluded.stripped_state",
                )
                .bind(r.room_nid)
                .bind(user)
                .bind(event_nid)
                .bind(stripped)
                .execute(&mut **tx)
                .await?;
            }
        }
        let now = super::now_ms();
        let outbox: Vec<Vec<V>> = rooms
            .iter()
            .flat_map(|r| r.outbox.iter())
            .map(|(dest, nid)| vec![V::S(dest.clone()), V::I(*nid), V::I(now)])
            .collect();
        insert_rows(
            tx,
            "INSERT INTO federation_outbox (destination, event_nid, created_ts)",
            3,
            outbox,
            "",
        )
        .await?;
        for r in rooms {
            for (target, json, by) in &r.redactions {
                sqlx::query("UPDATE events SET json = $2, redacted_by = $3 WHERE event_nid = $1")
                    .bind(target)
                    .bind(json)
                    .bind(by)
                    .execute(&mut **tx)
                    .await?;
            }
        }
        let pending: Vec<Vec<V>> = rooms
            .iter()
            .flat_map(|r| r.pending_redactions.iter())
            .map(|p| {
                vec![
                    V::S(p.target_event_id.clone()),
                    V::S(p.redaction_event_id.clone()),
                    V::I(p.room_nid),
                    V::S(p.sender_server.clone()),
                    V::I(i64::from(p.power_ok)),
                ]
            })
            .collect();
        insert_rows(
            tx,
            "INSERT INTO pending_redactions (target_event_id, redaction_event_id, room_nid, \
             sender_server, power_ok)",
            5,
            pending,
            "ON CONFLICT (target_event_id, redaction_event_id) DO NOTHING",
        )
        .await?;
        // After the inserts: a redaction and its target may share a batch.
        for target in rooms.iter().flat_map(|r| r.settled_redactions.iter()) {
            sqlx::query("DELETE FROM pending_redactions WHERE target_event_id = $1")
                .bind(target)
                .execute(&mut **tx)
                .await?;
        }
        Store::write_push(tx, rooms).await?;
        w.commit().await
    }
}

/// Sets a room's current state, memberships and state group explicitly.
async fn write_current(
    tx: &mut Transaction<'static, Any>,
    room: i64,
    c: &CurrentWrite,
) -> Result<()> {
    if c.replace_all {
        sqlx::query("DELETE FROM current_state WHERE room_nid = $1")
            .bind(room)
            .execute(&mut **tx)
            .await?;
    }
    for k in &c.removes {
        sqlx::query("DELETE FROM current_state WHERE room_nid = $1 AND state_key_nid = $2")
            .bind(room)
            .bind(k)
            .execute(&mut **tx)
            .await?;
    }
    let rows = c
        .upserts
        .iter()
        .map(|(k, ev)| vec![V::I(room), V::I(*k), V::I(*ev)])
        .collect();
    insert_rows(tx, CURRENT_INSERT, 3, rows, CURRENT_UPSERT).await?;
    let rows = c
        .memberships
        .iter()
        .map(|(user, m, ev)| {
            vec![
                V::I(room),
                V::S(user.clone()),
                V::S(m.clone()),
                V::I(*ev),
                V::I(c.position),
                V::I(0),
            ]
        })
        .collect();
    insert_rows(tx, MEMBERSHIP_INSERT, 6, rows, MEMBERSHIP_UPSERT).await?;
    sqlx::query("UPDATE rooms SET state_group = $2 WHERE room_nid = $1")
        .bind(room)
        .bind(c.group)
        .execute(&mut **tx)
        .await?;
    Ok(())
}
