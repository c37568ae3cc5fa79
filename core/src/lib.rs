//! `myelin-core`: the domain of the Myelin homeserver — identifiers, PDUs (hashing, signing,
//! redaction), room state and authorization (ruma's auth rules), timelines and stream positions,
//! the notifier, sync, and the store over PostgreSQL and SQLite. It knows nothing of HTTP routing.

pub mod accounts;
pub mod backup;
pub mod config;
pub mod directory;
pub mod e2ee;
pub mod error;
pub mod keys;
pub mod pdu;
pub mod store;

pub use error::{Error, ErrorKind, Result};
pub use ruma;
pub mod power;
pub mod presence;
pub mod push;
pub mod receipts;
pub mod resolution;
pub mod retry;
pub mod server;
pub mod spaces;
pub mod state;
pub mod streams;

pub use server::{Append, RoomInfo, Server, StoredEvent};
pub mod filter;
pub mod sliding_sync;
pub mod sqlx_support;
pub mod sync;
pub mod token;
pub mod typing;
pub mod unread;
pub mod visibility;
