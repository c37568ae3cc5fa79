//! End-to-end encryption with a real E2EE client: `matrix-sdk` 0.18 clients
//! (in-memory stores, plain HTTP to the client API) against Myelin, the way
//! Element X's engine talks to a homeserver.
//!
//! What is proved, each on a fresh server (or pair of servers):
//!
//! - [`encrypted_conversation`]: Alice creates a room with `m.room.encryption`
//!   (`m.megolm.v1.aes-sha2`) in its initial state and invites Bob; Bob joins;
//!   each side's SDK decrypts the other's message. Every message goes through
//!   `/keys/upload`, `/keys/query`, `/keys/claim`, `/sendToDevice` (the Olm
//!   pre-key message carrying the Megolm room key) and `/sync`'s
//!   `to_device` before the event handler sees the plaintext.
//! - [`two_devices_of_one_user`]: Bob logs in a second device after Alice has
//!   already shared a session with his first; Alice's SDK learns of the new
//!   device from `device_lists.changed` in her `/sync`, and both of Bob's
//!   devices decrypt her next message.
//! - [`cross_signing_bootstrap`]: `bootstrap_cross_signing` uploads Bob's
//!   master, self-signing and user-signing keys and his device's signature
//!   (answering a password UIA stage if the server asks for one); Alice's SDK
//!   sees Bob's master key and his device as cross-signed, through
//!   `device_lists.changed` and `/keys/query`. Then `reset_cross_signing`
//!   replaces the keys, which the server must refuse without the password
//!   (UIA); Alice's SDK sees the new master key.
//! - [`key_backup_restores_history`]: `recovery().enable()` creates a
//!   server-side key backup and secret storage; a device of Bob's logged in
//!   only afterwards recovers with the recovery key, downloads the room keys
//!   from `/room_keys/keys` and decrypts a message sent before it existed.
//! - [`federated_conversation`]: Alice on server A, Bob on server B
//!   (`/user/keys/query`, `/user/keys/claim`, `m.direct_to_device` and
//!   `m.device_list_update` over federation).
//! - [`synapse_conversation`]: a Myelin user and a Synapse user, in a room
//!   hosted by each server in turn.
//!
//! Every wait is bounded ([`WAIT`]); a test fails within about a minute
//! rather than hanging. On failure the servers' whole logs are kept under the
//! target directory's `tmp/` (the harness prints only a tail; set
//! `MYELIN_SDK_TEST_KEEP_LOGS` to keep them after a pass too). The Myelin
//! servers log each request and its status (`tower_http=debug`); set
//! `MYELIN_SDK_TEST_LOG` to a `MYELIN_LOG` filter to change that.

// matrix-sdk's futures are deep enough to need a higher limit for their
// `Send` checks.
#![recursion_limit = "256"]

use std::collections::BTreeSet;
use std::future::{Future, IntoFuture};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::Context;
use complement_tests::{backend_tests, federation, Backend, Synapse, TestServer};
use matrix_sdk::config::{RequestConfig, SyncSettings};
use matrix_sdk::deserialized_responses::{EncryptionInfo, TimelineEventKind};
use matrix_sdk::encryption::vodozemac::Ed25519PublicKey;
use matrix_sdk::encryption::{
    BackupDownloadStrategy, CrossSigningResetAuthType, EncryptionSettings,
};
use matrix_sdk::ruma::api::client::room::create_room;
use matrix_sdk::ruma::api::client::uiaa;
use matrix_sdk::ruma::events::room::encrypted::{
    EncryptedEventScheme, OriginalSyncRoomEncryptedEvent,
};
use matrix_sdk::ruma::events::room::encryption::RoomEncryptionEventContent;
use matrix_sdk::ruma::events::room::member::MembershipState;
use matrix_sdk::ruma::events::room::message::{
    OriginalSyncRoomMessageEvent, RoomMessageEventContent,
};
use matrix_sdk::ruma::events::{AnySyncMessageLikeEvent, AnySyncTimelineEvent, InitialStateEvent};
use matrix_sdk::ruma::{EventEncryptionAlgorithm, OwnedEventId, OwnedRoomId, OwnedUserId, RoomId};
use matrix_sdk::{Client, Room};

/// How long any one wait (for an invite, a join, a message, a key) may take.
const WAIT: Duration = Duration::from_secs(30);

/// The long-poll timeout of each `/sync` the tests make.
const SYNC_TIMEOUT: Duration = Duration::from_millis(500);

/// The Myelin log filter: each request and its status, without state
/// resolution noise.
const DEFAULT_LOG: &str = "info,tower_http=debug,ruma_state_res=warn";

/// `MYELIN_LOG` for the servers these tests start: `$MYELIN_SDK_TEST_LOG`, else
/// [`DEFAULT_LOG`].
fn log_filter() -> &'static str {
    static FILTER: OnceLock<String> = OnceLock::new();
    FILTER.get_or_init(|| {
        std::env::var("MYELIN_SDK_TEST_LOG").unwrap_or_else(|_| DEFAULT_LOG.to_owned())
    })
}

// What an SDK client saw ---------------------------------------------------------------------

/// A room message as an SDK event handler received it in `/sync`.
#[derive(Clone, Debug)]
struct Seen {
    room_id: OwnedRoomId,
    event_id: OwnedEventId,
    sender: OwnedUserId,
    what: SeenKind,
}

#[derive(Clone, Debug)]
enum SeenKind {
    /// An `m.room.message` (after decryption, when `encrypted`).
    Text { body: String, encrypted: bool },
    /// An `m.room.encrypted` the SDK could not decrypt (a UTD).
    Undecryptable { session_id: Option<String> },
}

/// One `matrix-sdk` client, logged in, with handlers recording every room
/// message and every undecryptable event its syncs deliver.
#[derive(Clone)]
struct Sdk {
    /// For messages: `alice`, `bob (second device)`, …
    name: String,
    client: Client,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Sdk {
    /// Logs `user` in on the client API at `base_url` with `password`, then
    /// syncs once, which uploads the new device's identity and one-time keys
    /// (`/keys/upload`), and waits for the SDK's E2EE set-up tasks.
    async fn login(name: &str, base_url: &str, user: &str, password: &str) -> anyhow::Result<Sdk> {
        let client = Client::builder()
            .homeserver_url(base_url)
            .respect_login_well_known(false)
            .request_config(RequestConfig::short_retry().timeout(Duration::from_secs(20)))
            .with_encryption_settings(EncryptionSettings {
                auto_enable_cross_signing: false,
                backup_download_strategy: BackupDownloadStrategy::Manual,
                auto_enable_backups: false,
            })
            .build()
            .await?;
        bounded(
            &format!("{name}: login"),
            client
                .matrix_auth()
                .login_username(user, password)
                .initial_device_display_name(&format!("matrix-sdk e2ee test ({name})")),
        )
        .await??;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let on_message = seen.clone();
        client.add_event_handler(
            move |event: OriginalSyncRoomMessageEvent,
                  room: Room,
                  encryption: Option<EncryptionInfo>| {
                let on_message = on_message.clone();
                async move {
                    if let Ok(mut seen) = on_message.lock() {
                        seen.push(Seen {
                            room_id: room.room_id().to_owned(),
                            event_id: event.event_id,
                            sender: event.sender,
                            what: SeenKind::Text {
                                body: event.content.body().to_owned(),
                                encrypted: encryption.is_some(),
                            },
                        });
                    }
                }
            },
        );
        let on_utd = seen.clone();
        client.add_event_handler(move |event: OriginalSyncRoomEncryptedEvent, room: Room| {
            let on_utd = on_utd.clone();
            async move {
                let session_id = match &event.content.scheme {
                    EncryptedEventScheme::MegolmV1AesSha2(c) => Some(c.session_id.clone()),
                    _ => None,
                };
                if let Ok(mut seen) = on_utd.lock() {
                    seen.push(Seen {
                        room_id: room.room_id().to_owned(),
                        event_id: event.event_id,
                        sender: event.sender,
                        what: SeenKind::Undecryptable { session_id },
                    });
                }
            }
        });
        let sdk = Sdk {
            name: name.to_owned(),
            client,
            seen,
        };
        sdk.sync().await?;
        bounded(
            &format!("{name}: E2EE initialisation"),
            sdk.client.encryption().wait_for_e2ee_initialization_tasks(),
        )
        .await?;
        Ok(sdk)
    }

    fn user_id(&self) -> anyhow::Result<OwnedUserId> {
        self.client
            .user_id()
            .map(ToOwned::to_owned)
            .ok_or_else(|| anyhow::anyhow!("{} is not logged in", self.name))
    }

    fn device_id(&self) -> anyhow::Result<String> {
        self.client
            .device_id()
            .map(|d| d.to_string())
            .ok_or_else(|| anyhow::anyhow!("{} has no device", self.name))
    }

    /// One `/sync` (long-polling [`SYNC_TIMEOUT`]), with the E2EE requests the
    /// SDK sends before and after it, bounded by 20 s.
    async fn sync(&self) -> anyhow::Result<()> {
        bounded(
            &format!("{}: sync", self.name),
            self.client
                .sync_once(SyncSettings::default().timeout(SYNC_TIMEOUT)),
        )
        .await?
        .map_err(|e| anyhow::anyhow!("{}: sync failed: {e:?}", self.name))?;
        Ok(())
    }

    fn room(&self, room_id: &RoomId) -> anyhow::Result<Room> {
        self.client
            .get_room(room_id)
            .ok_or_else(|| anyhow::anyhow!("{} does not know room {room_id}", self.name))
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Syncs until an event handler has seen the decrypted text `body` in
    /// `room_id`, and returns it. Fails (listing what was seen, undecryptable
    /// events with their Megolm session IDs included) after [`WAIT`], or if
    /// the text arrives unencrypted.
    ///
    /// If the event first arrived undecryptable (its room key came in a later
    /// sync than the event, which federation may do), the event is fetched
    /// again (`/rooms/{roomId}/event/{eventId}`) after each sync and decrypted
    /// then: what a real client's re-decryption does. That is reported on
    /// stderr, so a late key is visible.
    async fn wait_for_text(&self, room_id: &RoomId, body: &str) -> anyhow::Result<Seen> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            self.sync()
                .await
                .with_context(|| format!("waiting to decrypt {body:?} in {room_id}"))?;
            let seen = self.seen();
            if let Some(hit) = seen.iter().find(|s| {
                s.room_id == room_id
                    && matches!(&s.what, SeenKind::Text { body: b, .. } if b == body)
            }) {
                anyhow::ensure!(
                    matches!(
                        hit.what,
                        SeenKind::Text {
                            encrypted: true,
                            ..
                        }
                    ),
                    "{}: {body:?} arrived in plaintext in an encrypted room: {hit:?}",
                    self.name
                );
                return Ok(hit.clone());
            }
            // Undecryptable events in this room: try them again now.
            for utd in seen.iter().filter(|s| {
                s.room_id == room_id && matches!(s.what, SeenKind::Undecryptable { .. })
            }) {
                if let Some(text) = self.refetch_decrypted(room_id, &utd.event_id).await? {
                    if text == body {
                        eprintln!(
                            "note: {} decrypted {body:?} ({}) only when fetched again: its \
                             room key arrived after the event",
                            self.name, utd.event_id
                        );
                        return Ok(Seen {
                            what: SeenKind::Text {
                                body: text,
                                encrypted: true,
                            },
                            ..utd.clone()
                        });
                    }
                }
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!(
                    "{} did not decrypt {body:?} in {room_id} within {WAIT:?}; its event handlers \
                     saw:\n{}",
                    self.name,
                    describe(&seen)
                );
            }
        }
    }

    /// Fetches an event with `/rooms/{roomId}/event/{eventId}` and returns the
    /// body of the message if the SDK decrypts it now.
    async fn refetch_decrypted(
        &self,
        room_id: &RoomId,
        event_id: &OwnedEventId,
    ) -> anyhow::Result<Option<String>> {
        let room = self.room(room_id)?;
        let event = bounded(
            &format!("{}: fetching {event_id}", self.name),
            room.event(event_id, None),
        )
        .await??;
        Ok(decrypted_body(&event.kind))
    }

    /// Syncs until `user` is joined to `room_id` as this client sees it.
    async fn wait_for_join(&self, room_id: &RoomId, user: &OwnedUserId) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            self.sync()
                .await
                .with_context(|| format!("waiting for {user} to join {room_id}"))?;
            if let Some(room) = self.client.get_room(room_id) {
                if let Some(member) = room.get_member_no_sync(user).await? {
                    if *member.membership() == MembershipState::Join {
                        return Ok(());
                    }
                }
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!(
                    "{} did not see {user} join {room_id} within {WAIT:?}",
                    self.name
                );
            }
        }
    }

    /// Syncs until this client is invited to `room_id`, then joins it.
    async fn accept_invite(&self, room_id: &RoomId) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            self.sync()
                .await
                .with_context(|| format!("waiting for the invite to {room_id}"))?;
            if self
                .client
                .invited_rooms()
                .iter()
                .any(|r| r.room_id() == room_id)
            {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("{} saw no invite to {room_id} within {WAIT:?}", self.name);
            }
        }
        bounded(
            &format!("{}: joining {room_id}", self.name),
            self.client.join_room_by_id(room_id),
        )
        .await??;
        Ok(())
    }

    /// Creates a private room with `m.room.encryption` (`m.megolm.v1.aes-sha2`)
    /// in its initial state, inviting `invite`.
    async fn create_encrypted_room(
        &self,
        name: &str,
        invite: &[OwnedUserId],
    ) -> anyhow::Result<OwnedRoomId> {
        let mut request = create_room::v3::Request::new();
        request.name = Some(name.to_owned());
        request.preset = Some(create_room::v3::RoomPreset::PrivateChat);
        request.invite = invite.to_vec();
        request.initial_state =
            vec![
                InitialStateEvent::with_empty_state_key(RoomEncryptionEventContent::new(
                    EventEncryptionAlgorithm::MegolmV1AesSha2,
                ))
                .to_raw_any(),
            ];
        let room = bounded(
            &format!("{}: creating {name}", self.name),
            self.client.create_room(request),
        )
        .await??;
        Ok(room.room_id().to_owned())
    }

    /// Sends an encrypted text message (the SDK shares the room key with the
    /// members' devices first) and returns its event ID.
    async fn send_text(&self, room_id: &RoomId, body: &str) -> anyhow::Result<OwnedEventId> {
        let room = self.room(room_id)?;
        anyhow::ensure!(
            bounded(
                &format!("{}: encryption state", self.name),
                room.latest_encryption_state()
            )
            .await??
            .is_encrypted(),
            "{}: the SDK does not see {room_id} as encrypted",
            self.name
        );
        let response = bounded(
            &format!("{}: sending {body:?}", self.name),
            room.send(RoomMessageEventContent::text_plain(body)),
        )
        .await?
        .map_err(|e| anyhow::anyhow!("{}: sending {body:?} failed: {e:?}", self.name))?;
        Ok(response.response.event_id)
    }

    /// The device IDs this client's crypto store knows for `user`.
    async fn known_devices(&self, user: &OwnedUserId) -> anyhow::Result<BTreeSet<String>> {
        let devices = self.client.encryption().get_user_devices(user).await?;
        Ok(devices.keys().map(|d| d.to_string()).collect())
    }
}

/// One line per event an [`Sdk`]'s handlers saw.
fn describe(seen: &[Seen]) -> String {
    let lines: Vec<String> = seen
        .iter()
        .map(|s| {
            let what = match &s.what {
                SeenKind::Text { body, encrypted } => {
                    format!("text {body:?} (encrypted: {encrypted})")
                }
                SeenKind::Undecryptable { session_id } => {
                    format!("UNDECRYPTABLE, Megolm session {session_id:?}")
                }
            };
            format!("  {} {} from {}: {what}", s.room_id, s.event_id, s.sender)
        })
        .collect();
    if lines.is_empty() {
        "  (nothing)".to_owned()
    } else {
        lines.join("\n")
    }
}

/// The body of a decrypted `m.room.message`, if `kind` is one.
fn decrypted_body(kind: &TimelineEventKind) -> Option<String> {
    let TimelineEventKind::Decrypted(decrypted) = kind else {
        return None;
    };
    match decrypted.event.deserialize_as::<AnySyncTimelineEvent>() {
        Ok(AnySyncTimelineEvent::MessageLike(AnySyncMessageLikeEvent::RoomMessage(m))) => {
            m.as_original().map(|o| o.content.body().to_owned())
        }
        _ => None,
    }
}

/// `future`, or an error naming `what` after [`WAIT`].
async fn bounded<F: IntoFuture>(what: &str, future: F) -> anyhow::Result<F::Output> {
    tokio::time::timeout(WAIT, future)
        .await
        .map_err(|_| anyhow::anyhow!("{what}: no answer within {WAIT:?}"))
}

// Logs ---------------------------------------------------------------------------------------

/// Runs `body`; on failure (or always, with `MYELIN_SDK_TEST_KEEP_LOGS` set)
/// copies each named log whole to the target directory's `tmp/` and says
/// where.
async fn keep_logs_on_failure(
    test: &str,
    logs: &[(&str, PathBuf)],
    body: impl Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let result = body.await;
    if result.is_err() || std::env::var_os("MYELIN_SDK_TEST_KEEP_LOGS").is_some() {
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
        for (what, from) in logs {
            let to = dir.join(format!("sdk-e2ee-{test}-{what}.log"));
            match std::fs::copy(from, &to) {
                Ok(_) => eprintln!("{what} log kept at {}", to.display()),
                Err(e) => eprintln!("could not keep {}: {e}", from.display()),
            }
        }
    }
    result
}

fn myelin_log_path(server: &TestServer) -> PathBuf {
    server.data_dir().join("myelin.log")
}

fn test_name(name: &str, backend: Backend) -> String {
    format!("{name}-{backend:?}").to_lowercase()
}

// Scenarios ----------------------------------------------------------------------------------

/// Alice (`alice`) creates an encrypted room and invites Bob (`bob`), who
/// joins; Alice's message is decrypted by Bob and Bob's reply by Alice.
/// Returns the room.
async fn converse(alice: &Sdk, bob: &Sdk, room_name: &str) -> anyhow::Result<OwnedRoomId> {
    let alice_id = alice.user_id()?;
    let bob_id = bob.user_id()?;
    let room_id = alice
        .create_encrypted_room(room_name, std::slice::from_ref(&bob_id))
        .await?;
    bob.accept_invite(&room_id).await?;
    alice.wait_for_join(&room_id, &bob_id).await?;

    let hello = format!("hello Bob, this is {room_name}");
    let sent = alice.send_text(&room_id, &hello).await?;
    let got = bob.wait_for_text(&room_id, &hello).await?;
    assert_eq!(got.event_id, sent);
    assert_eq!(got.sender, alice_id);

    let reply = format!("hello Alice, Bob here in {room_name}");
    let sent = bob.send_text(&room_id, &reply).await?;
    let got = alice.wait_for_text(&room_id, &reply).await?;
    assert_eq!(got.event_id, sent);
    assert_eq!(got.sender, bob_id);
    Ok(room_id)
}

/// Two accounts on one homeserver's client API, already registered, each
/// with the password `<localpart>-password`: the cast of the one-server
/// scenarios, so that each runs against Myelin and, as a check of the test
/// itself, against Synapse.
#[derive(Clone)]
struct Cast {
    base_url: String,
    alice: String,
    bob: String,
}

impl Cast {
    async fn login(&self, name: &str, localpart: &str) -> anyhow::Result<Sdk> {
        Sdk::login(
            name,
            &self.base_url,
            localpart,
            &format!("{localpart}-password"),
        )
        .await
    }

    async fn alice(&self) -> anyhow::Result<Sdk> {
        self.login("alice", &self.alice).await
    }

    async fn bob(&self, name: &str) -> anyhow::Result<Sdk> {
        self.login(name, &self.bob).await
    }
}

/// Registers `alice` and `bob` on a Myelin and runs `scenario` with them,
/// keeping the server's whole log if it fails.
async fn on_myelin<F, Fut>(server: TestServer, name: &str, scenario: F) -> anyhow::Result<()>
where
    F: FnOnce(Cast) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let name = test_name(name, server.backend());
    let logs = [("myelin", myelin_log_path(&server))];
    keep_logs_on_failure(&name, &logs, async {
        server.register("alice", "alice-password").await?;
        server.register("bob", "bob-password").await?;
        scenario(Cast {
            base_url: server.base_url().to_owned(),
            alice: "alice".to_owned(),
            bob: "bob".to_owned(),
        })
        .await
    })
    .await
}

/// Test 1: Alice and Bob on one server, each decrypts the other.
async fn conversation_scenario(cast: Cast) -> anyhow::Result<()> {
    let alice = cast.alice().await?;
    let bob = cast.bob("bob").await?;
    converse(&alice, &bob, "Secret room").await?;
    Ok(())
}

/// Test 2: Bob with two devices. The second logs in after Alice has shared a
/// session with the first, so Alice must learn of it from
/// `device_lists.changed`; both devices decrypt Alice's next message.
async fn two_devices_scenario(cast: Cast) -> anyhow::Result<()> {
    let alice = cast.alice().await?;
    let bob1 = cast.bob("bob").await?;
    let bob_id = bob1.user_id()?;
    let room_id = converse(&alice, &bob1, "Two devices").await?;

    // Bob's second device appears; Alice's SDK is told through her sync.
    let bob2 = cast.bob("bob (second device)").await?;
    let bob2_device = bob2.device_id()?;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        alice.sync().await?;
        let known = alice.known_devices(&bob_id).await?;
        if known.contains(&bob2_device) {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!(
                "Alice's SDK never learnt of Bob's new device {bob2_device} (knows {known:?}): \
                 no device_lists.changed for {bob_id} in her /sync, or /keys/query without it"
            );
        }
    }
    bob2.sync().await?;

    let text = "for both of Bob's devices";
    let sent = alice.send_text(&room_id, text).await?;
    for bob in [&bob1, &bob2] {
        let got = bob.wait_for_text(&room_id, text).await?;
        assert_eq!(got.event_id, sent, "{}", bob.name);
    }
    // And the second device can talk back.
    let reply = "from Bob's second device";
    bob2.send_text(&room_id, reply).await?;
    alice.wait_for_text(&room_id, reply).await?;
    Ok(())
}

/// Bootstraps cross-signing for `sdk`, answering the password UIA stage if
/// the server asks for one.
async fn bootstrap_cross_signing(sdk: &Sdk, user: &str, password: &str) -> anyhow::Result<()> {
    let encryption = sdk.client.encryption();
    let first = bounded(
        &format!("{}: bootstrap_cross_signing", sdk.name),
        encryption.bootstrap_cross_signing(None),
    )
    .await?;
    if let Err(err) = first {
        let Some(uiaa_info) = err.as_uiaa_response() else {
            anyhow::bail!(
                "{}: bootstrap_cross_signing failed without a UIA challenge: {err:?}",
                sdk.name
            );
        };
        let mut auth = uiaa::Password::new(
            uiaa::UserIdentifier::Matrix(uiaa::MatrixUserIdentifier::new(user.to_owned())),
            password.to_owned(),
        );
        auth.session = uiaa_info.session.clone();
        bounded(
            &format!("{}: bootstrap_cross_signing with the password", sdk.name),
            encryption.bootstrap_cross_signing(Some(uiaa::AuthData::Password(auth))),
        )
        .await?
        .map_err(|e| {
            anyhow::anyhow!(
                "{}: bootstrap_cross_signing with the password failed: {e:?}",
                sdk.name
            )
        })?;
    }
    let status = encryption
        .cross_signing_status()
        .await
        .ok_or_else(|| anyhow::anyhow!("{}: no cross-signing status", sdk.name))?;
    anyhow::ensure!(
        status.is_complete(),
        "{}: cross-signing incomplete after bootstrap: {status:?}",
        sdk.name
    );
    Ok(())
}

/// Bob's master key as his own SDK holds it.
async fn own_master_key(bob: &Sdk) -> anyhow::Result<Ed25519PublicKey> {
    bob.client
        .encryption()
        .get_user_identity(&bob.user_id()?)
        .await?
        .and_then(|own| own.master_key().get_first_key())
        .ok_or_else(|| anyhow::anyhow!("{} has no master key of its own", bob.name))
}

/// Syncs `alice` until her SDK holds `master` as `bob`'s master key and sees
/// `bob`'s device as signed by his self-signing key: what `device_lists.changed`
/// and `/keys/query` (master and self-signing keys, the device's signatures)
/// must deliver.
async fn wait_for_identity(alice: &Sdk, bob: &Sdk, master: Ed25519PublicKey) -> anyhow::Result<()> {
    let bob_id = bob.user_id()?;
    let bob_device = bob.device_id()?;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        alice.sync().await?;
        let encryption = alice.client.encryption();
        let identity = encryption.get_user_identity(&bob_id).await?;
        let device = encryption
            .get_device(&bob_id, bob_device.as_str().into())
            .await?;
        let seen_master = identity
            .as_ref()
            .and_then(|i| i.master_key().get_first_key());
        let cross_signed = device
            .as_ref()
            .is_some_and(|d| d.is_cross_signed_by_owner());
        if seen_master == Some(master) && cross_signed {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            // Tell a missing device_lists entry from a /keys/query without the keys.
            let requested = encryption.request_user_identity(&bob_id).await;
            anyhow::bail!(
                "{} did not see {}'s cross-signing within {WAIT:?}: master key {seen_master:?} \
                 (the one to see is {master:?}), device {bob_device} cross-signed: \
                 {cross_signed}; an explicit /keys/query then gives master key {:?}",
                alice.name,
                bob.name,
                requested.map(|i| i.and_then(|i| i.master_key().get_first_key()))
            );
        }
    }
}

/// Test 3a: cross-signing through the SDK, seen by another user: the first
/// bootstrap, then a reset, which replaces existing keys and so needs the
/// password (user-interactive authentication).
async fn cross_signing_scenario(cast: Cast) -> anyhow::Result<()> {
    let alice = cast.alice().await?;
    let bob = cast.bob("bob").await?;
    let password = format!("{}-password", cast.bob);
    // A shared encrypted room, so that Alice's SDK tracks Bob's keys.
    converse(&alice, &bob, "Cross-signing").await?;

    bootstrap_cross_signing(&bob, &cast.bob, &password).await?;
    let master = own_master_key(&bob).await?;
    // Alice learns of Bob's new identity from her sync (device_lists.changed).
    wait_for_identity(&alice, &bob, master).await?;

    // A reset: new keys replace the old ones, which needs the password.
    let handle = bounded(
        "bob: reset_cross_signing",
        bob.client.encryption().reset_cross_signing(),
    )
    .await?
    .map_err(|e| anyhow::anyhow!("bob: reset_cross_signing failed: {e:?}"))?
    .ok_or_else(|| {
        anyhow::anyhow!(
            "the server let Bob replace his cross-signing keys without user-interactive \
             authentication"
        )
    })?;
    let CrossSigningResetAuthType::Uiaa(uiaa_info) = handle.auth_type() else {
        anyhow::bail!("bob: the reset asks for OAuth, not UIA");
    };
    let mut auth = uiaa::Password::new(
        uiaa::UserIdentifier::Matrix(uiaa::MatrixUserIdentifier::new(cast.bob.clone())),
        password,
    );
    auth.session = uiaa_info.session.clone();
    bounded(
        "bob: reset_cross_signing with the password",
        handle.auth(Some(uiaa::AuthData::Password(auth))),
    )
    .await?
    .map_err(|e| anyhow::anyhow!("bob: reset_cross_signing with the password failed: {e:?}"))?;
    let new_master = own_master_key(&bob).await?;
    anyhow::ensure!(new_master != master, "the reset kept Bob's master key");
    wait_for_identity(&alice, &bob, new_master).await?;
    Ok(())
}

/// Test 3b: key backup. Bob's first device enables recovery (a backup and
/// secret storage), receives a message and backs its key up; a device of
/// Bob's logged in only afterwards recovers with the recovery key, downloads
/// the room's keys and decrypts the message sent before it existed.
async fn key_backup_scenario(cast: Cast) -> anyhow::Result<()> {
    let alice = cast.alice().await?;
    let bob1 = cast.bob("bob").await?;
    let room_id = converse(&alice, &bob1, "Backed up").await?;
    bootstrap_cross_signing(&bob1, &cast.bob, &format!("{}-password", cast.bob)).await?;

    let recovery_key = bounded(
        "bob: recovery().enable()",
        bob1.client
            .encryption()
            .recovery()
            .enable()
            .wait_for_backups_to_upload(),
    )
    .await?
    .map_err(|e| anyhow::anyhow!("bob: recovery().enable() failed: {e:?}"))?;
    let backups = bob1.client.encryption().backups();
    anyhow::ensure!(
        backups.are_enabled().await,
        "bob: backups not enabled after recovery().enable(): {:?}",
        backups.state()
    );
    anyhow::ensure!(
        backups.fetch_exists_on_server().await?,
        "bob: no backup version on the server after recovery().enable()"
    );

    let text = "sent before Bob's second device existed";
    let sent = alice.send_text(&room_id, text).await?;
    bob1.wait_for_text(&room_id, text).await?;
    bounded(
        "bob: uploading room keys to the backup",
        backups.wait_for_steady_state(),
    )
    .await?
    .map_err(|e| anyhow::anyhow!("bob: backing the room keys up failed: {e:?}"))?;

    // A new device of Bob's: Alice never shared the session with it.
    let bob2 = cast.bob("bob (new device)").await?;
    bob2.sync().await?;
    let before = bob2.refetch_decrypted(&room_id, &sent).await?;
    anyhow::ensure!(
        before.is_none(),
        "the new device decrypted the old message before recovering: {before:?}"
    );
    bounded(
        "bob (new device): recovery().recover()",
        bob2.client.encryption().recovery().recover(&recovery_key),
    )
    .await?
    .map_err(|e| anyhow::anyhow!("bob (new device): recover failed: {e:?}"))?;
    let status = bob2.client.encryption().cross_signing_status().await;
    anyhow::ensure!(
        status.as_ref().is_some_and(|s| s.is_complete()),
        "bob (new device): cross-signing keys not recovered from secret storage: {status:?}"
    );
    let backups2 = bob2.client.encryption().backups();
    anyhow::ensure!(
        backups2.are_enabled().await,
        "bob (new device): backups not enabled after recovering: {:?}",
        backups2.state()
    );
    bounded(
        "bob (new device): downloading the room's keys",
        backups2.download_room_keys_for_room(&room_id),
    )
    .await?
    .map_err(|e| anyhow::anyhow!("bob (new device): downloading room keys failed: {e:?}"))?;
    let after = bob2.refetch_decrypted(&room_id, &sent).await?;
    anyhow::ensure!(
        after.as_deref() == Some(text),
        "bob (new device) could not decrypt the old message with the backed-up key: {after:?}"
    );
    Ok(())
}

async fn encrypted_conversation(server: TestServer) -> anyhow::Result<()> {
    on_myelin(server, "conversation", conversation_scenario).await
}

async fn two_devices_of_one_user(server: TestServer) -> anyhow::Result<()> {
    on_myelin(server, "two-devices", two_devices_scenario).await
}

async fn cross_signing_bootstrap(server: TestServer) -> anyhow::Result<()> {
    on_myelin(server, "cross-signing", cross_signing_scenario).await
}

async fn key_backup_restores_history(server: TestServer) -> anyhow::Result<()> {
    on_myelin(server, "key-backup", key_backup_scenario).await
}

backend_tests!(
    env = [("MYELIN_LOG", super::log_filter())];
    encrypted_conversation,
    two_devices_of_one_user,
    cross_signing_bootstrap,
    key_backup_restores_history,
);

/// Test 4: Alice on server A, Bob on server B.
async fn federated_conversation(backend: Backend) -> anyhow::Result<()> {
    let env = [("MYELIN_LOG", log_filter())];
    let (a, b) = tokio::try_join!(
        federation::start_with(backend, &env),
        federation::start_with(backend, &env)
    )?;
    let logs = [("a", myelin_log_path(&a)), ("b", myelin_log_path(&b))];
    keep_logs_on_failure(&test_name("federation", backend), &logs, async {
        a.register("alice", "alice-password").await?;
        b.register("bob", "bob-password").await?;
        let alice = Sdk::login("alice (server A)", a.base_url(), "alice", "alice-password").await?;
        let bob = Sdk::login("bob (server B)", b.base_url(), "bob", "bob-password").await?;
        assert_eq!(bob.user_id()?.as_str(), b.user_id("bob"));
        converse(&alice, &bob, "Across servers").await?;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_conversation_sqlite() -> anyhow::Result<()> {
    federated_conversation(Backend::Sqlite).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_conversation_postgres() -> anyhow::Result<()> {
    federated_conversation(Backend::Postgres).await
}

/// Test 5: a Myelin user and a Synapse user (both through matrix-sdk), in a
/// room hosted by Myelin and then in one hosted by Synapse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synapse_conversation() -> anyhow::Result<()> {
    let env = [("MYELIN_LOG", log_filter())];
    let (myelin, synapse) = tokio::try_join!(
        federation::start_with(Backend::Sqlite, &env),
        Synapse::start()
    )?;
    let logs = [
        ("myelin", myelin_log_path(&myelin)),
        ("synapse", synapse.data_dir().join("synapse.log")),
    ];
    keep_logs_on_failure("synapse", &logs, async {
        myelin.register("mia", "mia-password").await?;
        synapse.register("sam", "sam-password").await?;
        let mia = Sdk::login("mia (Myelin)", myelin.base_url(), "mia", "mia-password").await?;
        let sam = Sdk::login("sam (Synapse)", synapse.client_url(), "sam", "sam-password").await?;
        converse(&mia, &sam, "Hosted by Myelin").await?;
        converse(&sam, &mia, "Hosted by Synapse").await?;
        Ok(())
    })
    .await
}

/// The one-server scenarios against Synapse alone: a check of the tests
/// themselves (and of this matrix-sdk against the reference server), so that
/// a scenario failing on Myelin points at Myelin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synapse_baseline() -> anyhow::Result<()> {
    let synapse = Synapse::start().await?;
    let logs = [("synapse", synapse.data_dir().join("synapse.log"))];
    keep_logs_on_failure("synapse-baseline", &logs, async {
        let mut casts = Vec::new();
        for i in 0..4 {
            let (alice, bob) = (format!("alice{i}"), format!("bob{i}"));
            synapse
                .register(&alice, &format!("{alice}-password"))
                .await?;
            synapse.register(&bob, &format!("{bob}-password")).await?;
            casts.push(Cast {
                base_url: synapse.client_url().to_owned(),
                alice,
                bob,
            });
        }
        let mut casts = casts.into_iter();
        let mut next = || casts.next().ok_or_else(|| anyhow::anyhow!("no cast left"));
        conversation_scenario(next()?).await?;
        two_devices_scenario(next()?).await?;
        cross_signing_scenario(next()?).await?;
        key_backup_scenario(next()?).await?;
        Ok(())
    })
    .await
}
