//! Operating the server, black-box: graceful shutdown on SIGTERM (waiting
//! syncs are answered, exit status 0), the admin CLI (`myelin user ...`,
//! `myelin registration-token ...`) on the configured database while the
//! server runs, the three registration modes, restarting on the same data,
//! and how a bad configuration is reported (exit code 2, one line on
//! stderr naming the option).

use complement_tests::client::sync::{message_bodies, timeline_ids};
use complement_tests::server::myelin_binary;
use complement_tests::{
    assert_error, assert_status, backend_tests, enc, ok, query, Backend, TestServer,
};
use serde_json::{json, Value};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a stopped server may take to exit.
const EXIT_WITHIN: Duration = Duration::from_secs(5);

/// The captured output of a CLI run, for failure messages.
fn describe(output: &Output) -> String {
    format!(
        "{}; stdout: {:?}; stderr: {:?}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs the admin CLI and requires exit status 0; returns stdout.
async fn cli_ok(server: &TestServer, args: &[&str]) -> anyhow::Result<String> {
    let output = server.run_cli(args).await?;
    assert!(
        output.status.success(),
        "myelin {args:?} failed: {}",
        describe(&output)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs the admin CLI and requires it to fail cleanly: a non-zero exit,
/// a message on stderr, and no panic.
async fn cli_fails(server: &TestServer, args: &[&str]) -> anyhow::Result<String> {
    let output = server.run_cli(args).await?;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        !output.status.success() && output.status.code().is_some(),
        "myelin {args:?} should exit non-zero: {}",
        describe(&output)
    );
    assert!(
        !stderr.trim().is_empty() && !stderr.contains("panicked"),
        "myelin {args:?} should explain the failure without panicking: {}",
        describe(&output)
    );
    Ok(stderr)
}

/// `POST /login` with `m.login.password`, returning the raw response.
async fn try_login(
    server: &TestServer,
    user: &str,
    password: &str,
) -> anyhow::Result<complement_tests::Response> {
    server
        .anonymous()
        .post(
            "/login",
            &json!({
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": user},
                "password": password,
            }),
        )
        .await
}

/// The stage lists of a UIA 401 body's `flows`.
fn flow_stages(body: &Value) -> Vec<Value> {
    body["flows"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|flow| flow["stages"].clone())
        .collect()
}

/// `GET /_matrix/client/v1/register/m.login.registration_token/validity`.
async fn token_validity(
    server: &TestServer,
    token: &str,
) -> anyhow::Result<complement_tests::Response> {
    server
        .anonymous()
        .get(&format!(
            "/_matrix/client/v1/register/m.login.registration_token/validity{}",
            query(&[("token", token)])
        ))
        .await
}

// ---------------------------------------------------------------------------
// Graceful shutdown
// ---------------------------------------------------------------------------

/// SIGTERM answers a waiting `/sync` long-poll at once (200 with a
/// `next_batch`, long before its 30 s timeout) and the process then exits
/// with status 0.
async fn sigterm_answers_waiting_syncs_and_exits_zero(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "password-a").await?;
    let initial = alice.sync(None, Some(0), None).await?;
    let since = initial["next_batch"]
        .as_str()
        .unwrap_or_else(|| panic!("initial sync lacks next_batch: {initial}"))
        .to_owned();

    let poller = alice.clone();
    let path = format!(
        "/sync{}",
        query(&[("since", since.as_str()), ("timeout", "30000")])
    );
    let started = Instant::now();
    let long_poll = tokio::spawn(async move { poller.get(&path).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !long_poll.is_finished(),
        "the long-poll returned before the server was told to stop: {:?}",
        long_poll.await
    );

    server.terminate()?;
    let response = tokio::time::timeout(Duration::from_secs(5), long_poll)
        .await
        .map_err(|_| anyhow::anyhow!("the waiting sync was not answered within 5 s of SIGTERM"))?
        .map_err(|err| anyhow::anyhow!("the long-poll task failed: {err}"))??;
    let elapsed = started.elapsed();
    let body = ok(response);
    assert!(
        body["next_batch"].is_string(),
        "the sync answered at shutdown lacks next_batch: {body}"
    );
    assert!(
        elapsed < Duration::from_secs(10),
        "the waiting sync took {elapsed:?}; it should end promptly at shutdown"
    );

    let status = server.wait_for_exit(EXIT_WITHIN).await?;
    assert_eq!(
        status.code(),
        Some(0),
        "myelin should exit 0 after SIGTERM, got {status}"
    );
    assert!(server.pid().is_none());
    // Nothing listens any more.
    assert!(
        server
            .anonymous()
            .get("/_matrix/client/versions")
            .await
            .is_err(),
        "the server still answers after it exited"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Admin CLI: users
// ---------------------------------------------------------------------------

/// `myelin user create` and `myelin user reset-password` work on the
/// configured database while the server runs, and the running server sees
/// the results at once.
async fn cli_creates_users_and_resets_passwords(server: TestServer) -> anyhow::Result<()> {
    let stdout = cli_ok(
        &server,
        &["user", "create", "carol", "--password", "secret"],
    )
    .await?;
    assert!(
        stdout.contains(&server.user_id("carol")),
        "`user create` should print the new user ID: {stdout:?}"
    );

    let carol = server.login("carol", "secret", None).await?;
    assert_eq!(carol.whoami().await?, server.user_id("carol"));

    cli_ok(
        &server,
        &["user", "reset-password", "carol", "--password", "other"],
    )
    .await?;
    let old = try_login(&server, "carol", "secret").await?;
    assert_error(&old, 403, "M_FORBIDDEN");
    let new = server.login("carol", "other", None).await?;
    assert_eq!(new.whoami().await?, server.user_id("carol"));

    // The full user ID is accepted too.
    let carol_id = server.user_id("carol");
    cli_ok(
        &server,
        &["user", "reset-password", &carol_id, "--password", "third"],
    )
    .await?;
    server.login("carol", "third", None).await?;

    // A name that is taken, and a user that does not exist.
    cli_fails(&server, &["user", "create", "carol", "--password", "again"]).await?;
    server.login("carol", "third", None).await?;
    cli_fails(
        &server,
        &["user", "reset-password", "nobody", "--password", "x"],
    )
    .await?;
    let nobody = try_login(&server, "nobody", "x").await?;
    assert_error(&nobody, 403, "M_FORBIDDEN");

    // An admin account.
    let stdout = cli_ok(
        &server,
        &["user", "create", "dana", "--password", "pw-d", "--admin"],
    )
    .await?;
    assert!(stdout.contains(&server.user_id("dana")), "{stdout:?}");
    server.login("dana", "pw-d", None).await?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Registration modes
// ---------------------------------------------------------------------------

/// `registration = "token"`: the 401 offers only the
/// `m.login.registration_token` flow, a token from the CLI completes it, a
/// used-up token is refused as a failed UIA stage (401 with `errcode`, per
/// the spec's "User-interactive authentication API"), and `/validity`
/// tracks it.
async fn token_registration(server: TestServer) -> anyhow::Result<()> {
    let stdout = cli_ok(
        &server,
        &[
            "registration-token",
            "create",
            "--token",
            "abc",
            "--uses",
            "1",
        ],
    )
    .await?;
    assert_eq!(stdout.trim(), "abc", "`create` prints the token");
    let listed = cli_ok(&server, &["registration-token", "list"]).await?;
    assert!(
        listed.lines().any(|l| l.starts_with("abc\t")),
        "the new token is listed: {listed:?}"
    );
    cli_fails(&server, &["registration-token", "create", "--token", "abc"]).await?;

    let valid = ok(token_validity(&server, "abc").await?);
    assert_eq!(valid["valid"], true, "{valid}");
    let unknown = ok(token_validity(&server, "not-a-token").await?);
    assert_eq!(unknown["valid"], false, "{unknown}");

    // No auth: the challenge names the token flow, and only that.
    let anon = server.anonymous();
    let request = json!({"username": "dave", "password": "password-d"});
    let first = anon.post("/register", &request).await?;
    assert_status(&first, 401);
    let stages = flow_stages(&first.body);
    assert!(
        stages.contains(&json!(["m.login.registration_token"])),
        "token registration should offer m.login.registration_token: {}",
        first.body
    );
    assert!(
        !stages.iter().any(|s| s == &json!(["m.login.dummy"])),
        "token registration must not offer m.login.dummy: {}",
        first.body
    );
    let session = first.body["session"]
        .as_str()
        .unwrap_or_else(|| panic!("401 without session: {}", first.body))
        .to_owned();

    // m.login.dummy is not one of the flows.
    let mut dummy = request.clone();
    dummy["auth"] = json!({"type": "m.login.dummy", "session": session});
    let refused = anon.post("/register", &dummy).await?;
    assert_status(&refused, 401);

    // A wrong token is a failed stage: 401 with errcode and the flows again.
    let mut wrong = request.clone();
    wrong["auth"] = json!({
        "type": "m.login.registration_token", "token": "wrong", "session": session,
    });
    let refused = anon.post("/register", &wrong).await?;
    assert_status(&refused, 401);
    assert!(
        refused.body["errcode"].is_string() && refused.body["error"].is_string(),
        "a failed stage carries errcode and error: {}",
        refused.body
    );
    assert!(!flow_stages(&refused.body).is_empty(), "{}", refused.body);
    let session = refused.body["session"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or(session);

    let mut right = request.clone();
    right["auth"] = json!({
        "type": "m.login.registration_token", "token": "abc", "session": session,
    });
    let body = ok(anon.post("/register", &right).await?);
    assert_eq!(body["user_id"], server.user_id("dave"));
    let dave = anon.with_access_token(body["access_token"].as_str());
    assert_eq!(dave.whoami().await?, server.user_id("dave"));

    // The single use is spent.
    let spent = ok(token_validity(&server, "abc").await?);
    assert_eq!(spent["valid"], false, "a used-up token is invalid: {spent}");
    let request = json!({"username": "erin", "password": "password-e"});
    let first = anon.post("/register", &request).await?;
    assert_status(&first, 401);
    let mut again = request.clone();
    again["auth"] = json!({
        "type": "m.login.registration_token",
        "token": "abc",
        "session": first.body["session"],
    });
    let refused = anon.post("/register", &again).await?;
    assert_status(&refused, 401);
    assert!(
        refused.body["errcode"].is_string() && refused.body["error"].is_string(),
        "a refused token carries errcode and error: {}",
        refused.body
    );
    let available = ok(anon
        .get(&format!("/register/available?username={}", enc("erin")))
        .await?);
    assert_eq!(available["available"], true, "erin was not created");

    let listed = cli_ok(&server, &["registration-token", "list"]).await?;
    let line = listed
        .lines()
        .find(|l| l.starts_with("abc\t"))
        .unwrap_or_else(|| panic!("abc is still listed: {listed:?}"));
    assert!(line.contains("1/1"), "one of one use spent: {line:?}");

    cli_ok(&server, &["registration-token", "delete", "abc"]).await?;
    cli_fails(&server, &["registration-token", "delete", "abc"]).await?;
    let listed = cli_ok(&server, &["registration-token", "list"]).await?;
    assert!(!listed.contains("abc"), "deleted: {listed:?}");

    // A token made with neither a use limit nor an expiry, random name.
    let token = cli_ok(&server, &["registration-token", "create"]).await?;
    let token = token.trim();
    assert!(!token.is_empty());
    let valid = ok(token_validity(&server, token).await?);
    assert_eq!(valid["valid"], true, "{valid}");
    Ok(())
}

/// `registration = "closed"`: `/register` is 403 `M_FORBIDDEN`, token
/// validity is 403 too (the spec's "does not permit registration"), and the
/// admin CLI is the way to make accounts.
async fn closed_registration(server: TestServer) -> anyhow::Result<()> {
    let anon = server.anonymous();
    let request = json!({"username": "frank", "password": "password-f"});
    let refused = anon.post("/register", &request).await?;
    assert_error(&refused, 403, "M_FORBIDDEN");
    let mut with_auth = request.clone();
    with_auth["auth"] = json!({"type": "m.login.dummy"});
    let refused = anon.post("/register", &with_auth).await?;
    assert_error(&refused, 403, "M_FORBIDDEN");

    let validity = token_validity(&server, "anything").await?;
    assert_error(&validity, 403, "M_FORBIDDEN");

    cli_ok(
        &server,
        &["user", "create", "frank", "--password", "password-f"],
    )
    .await?;
    let frank = server.login("frank", "password-f", None).await?;
    assert_eq!(frank.whoami().await?, server.user_id("frank"));
    Ok(())
}

// ---------------------------------------------------------------------------
// Restart on the same data
// ---------------------------------------------------------------------------

/// The stored PDU of `event_id`, read from the database (a white-box peek:
/// the client API hides `prev_events` and `depth`). `None` if the SQLite
/// variant cannot run the `sqlite3` shell.
async fn stored_pdu(server: &TestServer, event_id: &str) -> anyhow::Result<Option<Value>> {
    const SQL: &str = "SELECT json FROM events WHERE event_id = ";
    let text = match server.backend() {
        Backend::Postgres => {
            let (client, connection) =
                tokio_postgres::connect(server.database_url(), tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            let row = client.query_one(&format!("{SQL}$1"), &[&event_id]).await?;
            row.get::<_, String>(0)
        }
        Backend::Sqlite => {
            let path = server
                .database_url()
                .strip_prefix("sqlite://")
                .expect("a sqlite:// URL");
            let sql = format!("{SQL}'{}'", event_id.replace('\'', "''"));
            let output = match tokio::process::Command::new("sqlite3")
                .arg(path)
                .arg(&sql)
                .stdin(Stdio::null())
                .output()
                .await
            {
                Ok(output) if output.status.success() => output,
                Ok(output) => anyhow::bail!("sqlite3 failed: {}", describe(&output)),
                Err(err) => {
                    eprintln!("skipping the prev_events check: cannot run sqlite3: {err}");
                    return Ok(None);
                }
            };
            String::from_utf8(output.stdout)?
        }
    };
    Ok(Some(serde_json::from_str(text.trim())?))
}

/// After SIGTERM and a new process on the same data directory and
/// database: sessions, rooms, messages, sync positions and transaction IDs
/// survive, and new events continue the room's DAG.
async fn restart_keeps_rooms_and_messages(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "password-a").await?;
    let room = alice
        .create_room(&json!({"name": "Before the restart", "topic": "persistence"}))
        .await?;
    let mut sent = Vec::new();
    for i in 0..3 {
        sent.push(alice.send_message(&room, &format!("before {i}")).await?);
    }
    let txn_path = format!("/rooms/{}/send/m.room.message/restart-txn", enc(&room));
    let retried = ok(alice
        .put(&txn_path, &json!({"msgtype": "m.text", "body": "once"}))
        .await?);
    let txn_event = retried["event_id"].as_str().expect("event_id").to_owned();
    let before = alice.sync(None, Some(0), None).await?;
    let since = before["next_batch"]
        .as_str()
        .expect("next_batch")
        .to_owned();

    server.restart().await?;

    // The old session still works; so does the password.
    assert_eq!(alice.whoami().await?, server.user_id("alice"));
    server.login("alice", "password-a", None).await?;

    // History via /messages, newest first.
    let history = alice.recent_event_ids(&room, 10).await?;
    let expected: Vec<&String> = std::iter::once(&txn_event)
        .chain(sent.iter().rev())
        .collect();
    assert_eq!(
        history.iter().take(4).collect::<Vec<_>>(),
        expected,
        "the newest events after the restart: {history:?}"
    );
    let name = ok(alice.get_state(&room, "m.room.name", "").await?);
    assert_eq!(name["name"], "Before the restart");
    let topic = ok(alice.get_state(&room, "m.room.topic", "").await?);
    assert_eq!(topic["topic"], "persistence");

    // An initial sync shows the room and its messages.
    let initial = alice.sync(None, Some(0), None).await?;
    let bodies = message_bodies(&initial, &room);
    assert!(
        bodies.ends_with(&[
            "before 0".to_owned(),
            "before 1".to_owned(),
            "before 2".to_owned(),
            "once".to_owned()
        ]),
        "initial sync timeline after the restart: {bodies:?}"
    );

    // A since token from before the restart is still a valid position:
    // nothing new yet, and the next message is delivered against it.
    let nothing = alice.sync(Some(&since), Some(0), None).await?;
    let ids = timeline_ids(&nothing, &room);
    assert!(
        ids.is_empty(),
        "nothing happened since the pre-restart token, yet the sync returned {ids:?}"
    );

    // The same transaction ID still names the same event.
    let again = ok(alice
        .put(&txn_path, &json!({"msgtype": "m.text", "body": "once"}))
        .await?);
    assert_eq!(
        again["event_id"], txn_event,
        "a retried transaction after a restart must return the original event"
    );

    let after = alice.send_message(&room, "after").await?;
    let incremental = alice.sync(Some(&since), Some(0), None).await?;
    assert_eq!(
        timeline_ids(&incremental, &room),
        vec![after.clone()],
        "sync since the pre-restart token: {incremental}"
    );
    let history = alice.recent_event_ids(&room, 2).await?;
    assert_eq!(history, vec![after.clone(), txn_event.clone()]);

    // The new event's prev_events point at the last event before the restart.
    if let (Some(new), Some(last)) = (
        stored_pdu(&server, &after).await?,
        stored_pdu(&server, &txn_event).await?,
    ) {
        assert_eq!(
            new["prev_events"],
            json!([txn_event]),
            "the first event after the restart must follow the last one before it: {new}"
        );
        assert_eq!(
            new["depth"].as_i64(),
            last["depth"].as_i64().map(|d| d + 1),
            "depth continues: {new} after {last}"
        );
    }

    // State changes still resolve against the old state.
    alice
        .send_state(&room, "m.room.name", "", &json!({"name": "After"}))
        .await?;
    let name = ok(alice.get_state(&room, "m.room.name", "").await?);
    assert_eq!(name["name"], "After");
    let topic = ok(alice.get_state(&room, "m.room.topic", "").await?);
    assert_eq!(topic["topic"], "persistence");
    Ok(())
}

// Presence off: the user's own "now online" would answer the long-poll before the SIGTERM.
backend_tests!(
    env = [("MYELIN_PRESENCE_ENABLED", "false")];
    sigterm_answers_waiting_syncs_and_exits_zero
);
backend_tests!(
    cli_creates_users_and_resets_passwords,
    restart_keeps_rooms_and_messages,
);
backend_tests!(env = [("MYELIN_REGISTRATION", "token")]; token_registration);
backend_tests!(env = [("MYELIN_REGISTRATION", "closed")]; closed_registration);

// ---------------------------------------------------------------------------
// Bad configuration
// ---------------------------------------------------------------------------

/// Runs the binary with `args` and `env` (inherited `MYELIN_*` variables
/// removed, a throwaway data directory and port 0 unless `env` says
/// otherwise); kills it if it is still running after 15 s, since a server
/// that accepted the bad configuration would serve forever.
fn run_myelin(args: &[&str], env: &[(&str, &str)]) -> Output {
    let binary = myelin_binary().expect("the myelin binary");
    let data_dir = tempfile::tempdir().expect("a temp dir");
    let mut command = Command::new(binary);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("MYELIN_") {
            command.env_remove(name);
        }
    }
    command
        .env("MYELIN_DATA_DIR", data_dir.path())
        .env("MYELIN_CLIENT_LISTEN", "127.0.0.1:0")
        .env("MYELIN_LOG", "warn")
        .envs(env.iter().copied())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("spawning myelin");
    let deadline = Instant::now() + Duration::from_secs(15);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().expect("collecting output");
            panic!(
                "myelin {args:?} with {env:?} kept running: {}",
                describe(&output)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("collecting output")
}

/// Exit code 2 and exactly one line on stderr that mentions `mentions`,
/// starts with `myelin: ` and shows no panic or backtrace.
#[track_caller]
fn assert_config_error(output: &Output, mentions: &str) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(
        output.status.code(),
        Some(2),
        "a bad configuration exits with code 2: {}",
        describe(output)
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "a bad configuration is reported on one line: {stderr:?}"
    );
    assert!(
        lines[0].starts_with("myelin: "),
        "the line starts with `myelin: `: {stderr:?}"
    );
    assert!(
        lines[0].contains(mentions),
        "the line should mention {mentions:?}: {stderr:?}"
    );
    for bad in ["panicked", "backtrace", "RUST_BACKTRACE"] {
        assert!(!stderr.contains(bad), "no {bad} on stderr: {stderr:?}");
    }
    assert!(
        output.stdout.is_empty(),
        "nothing on stdout: {}",
        describe(output)
    );
    stderr
}

/// A bad value in an environment variable names the option.
#[test]
fn bad_env_value_is_one_line_and_exit_2() {
    let output = run_myelin(&[], &[("MYELIN_REGISTRATION", "sometimes")]);
    let stderr = assert_config_error(&output, "registration");
    assert!(
        stderr.contains("option `registration`"),
        "the option is named as `registration`: {stderr:?}"
    );

    let output = run_myelin(&[], &[("MYELIN_CLIENT_LISTEN", "not an address")]);
    assert_config_error(&output, "client_listen");

    // The admin subcommands check the configuration the same way.
    let output = run_myelin(
        &["user", "create", "x", "--password", "y"],
        &[("MYELIN_REGISTRATION", "sometimes")],
    );
    assert_config_error(&output, "registration");
}

/// An unknown option in the configuration file is named.
#[test]
fn unknown_option_in_config_file_is_one_line_and_exit_2() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let file = dir.path().join("myelin.toml");
    std::fs::write(&file, "nonsense = 1\n").expect("writing the config");
    let path = file.to_str().expect("a UTF-8 path");
    let output = run_myelin(&["--config", path], &[]);
    assert_config_error(&output, "nonsense");
    let output = run_myelin(&["--config", path, "serve"], &[]);
    assert_config_error(&output, "nonsense");
}

/// A bad value in the configuration file names the option, like the same
/// value in the environment does ("Any problem is one line naming the
/// option").
#[test]
fn bad_value_in_config_file_names_the_option() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let file = dir.path().join("myelin.toml");
    std::fs::write(&file, "registration = \"sometimes\"\n").expect("writing the config");
    let output = run_myelin(&["--config", file.to_str().expect("a UTF-8 path")], &[]);
    assert_config_error(&output, "registration");
}
