//! The `myelin` binary: command line, configuration, start-up, graceful shutdown and the admin
//! subcommands (users, registration tokens).

mod config;
mod tls;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::{path::PathBuf, sync::Arc};

use clap::{Parser, Subcommand};
use myelin_core::{config::LogFormat, Server};

#[derive(Parser)]
#[command(name = "myelin", version, about = "Myelin, a Matrix homeserver")]
struct Cli {
    /// Configuration file (TOML); `MYELIN_*` environment variables override it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default).
    Serve,
    /// Manage user accounts.
    #[command(subcommand)]
    User(UserCommand),
    /// Manage registration tokens (for `registration = "token"`).
    #[command(subcommand)]
    RegistrationToken(TokenCommand),
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create an account.
    Create {
        name: String,
        #[arg(long)]
        password: Option<String>,
        #[arg(long)]
        admin: bool,
    },
    /// Set a new password for an account.
    ResetPassword {
        name: String,
        #[arg(long)]
        password: Option<String>,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token (random unless given).
    Create {
        #[arg(long)]
        token: Option<String>,
        /// How many registrations it allows (unlimited if absent).
        #[arg(long)]
        uses: Option<i64>,
        /// Days until it expires (never if absent).
        #[arg(long)]
        expires_in_days: Option<i64>,
    },
    /// List tokens.
    List,
    /// Delete a token.
    Delete { token: String },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let config = match config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("myelin: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    init_tracing(&config);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("myelin: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => serve(config).await,
            Command::User(cmd) => user_command(config, cmd).await,
            Command::RegistrationToken(cmd) => token_command(config, cmd).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("myelin: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_tracing(config: &myelin_core::config::Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Pretty => builder.init(),
    }
}

async fn open(config: myelin_core::config::Config) -> anyhow::Result<Arc<Server>> {
    Server::open(config)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
}

async fn serve(config: myelin_core::config::Config) -> anyhow::Result<()> {
    let addr = config.client_listen;
    let server = open(config).await?;
    let schema = server.store.schema_version().await.unwrap_or(0);
    let federation =
        myelin_federation::Federation::new(server.clone()).map_err(|e| anyhow::anyhow!("{e}"))?;
    myelin_federation::sender::start(federation.clone());
    myelin_client_api::push_sender::start(server.clone());
    let app = myelin_client_api::router(server.clone(), federation.clone())
        .merge(myelin_federation::key_router(server.clone()))
        .layer(tower_http::trace::TraceLayer::new_for_http());
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("option `client_listen`: cannot listen on {addr}: {e}"))?;
    tracing::info!(%addr, server_name = server.server_name(), schema, "Myelin is listening");
    // One shutdown signal for both listeners.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let shutdown_server = server.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down: answering waiting syncs, finishing requests");
        shutdown_server
            .shutting_down
            .store(true, std::sync::atomic::Ordering::Relaxed);
        shutdown_server.notifier.wake_all();
        let _ = stop_tx.send(true);
    });
    let federation = async {
        match server.config.federation_listen {
            Some(addr) => {
                let router = myelin_federation::router(federation.clone())
                    .layer(tower_http::trace::TraceLayer::new_for_http());
                tls::serve(addr, router, &server.config, stopped()).await
            }
            None => Ok(()),
        }
    };
    // `into_make_service` clones the router per connection; serving the `Router` itself would
    // rebuild its route table for every connection (measured: ~2 KiB held per connection).
    let client = async {
        axum::serve(listener, app.into_make_service())
            .with_graceful_shutdown(stopped())
            .await
            .map_err(anyhow::Error::from)
    };
    tokio::try_join!(client, federation)?;
    // Upgraded WebSocket connections outlive the HTTP server: let them send their 1001.
    myelin_client_api::ws_sync::drain(std::time::Duration::from_secs(3)).await;
    server.store.close().await;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

fn password_or_prompt(password: Option<String>) -> anyhow::Result<String> {
    match password {
        Some(p) => Ok(p),
        None => {
            let p = rpassword::prompt_password("Password: ")?;
            let again = rpassword::prompt_password("Again: ")?;
            if p != again {
                anyhow::bail!("passwords differ");
            }
            Ok(p)
        }
    }
}

fn localpart(name: &str) -> &str {
    name.trim_start_matches('@')
        .split(':')
        .next()
        .unwrap_or(name)
}

async fn user_command(config: myelin_core::config::Config, cmd: UserCommand) -> anyhow::Result<()> {
    match cmd {
        UserCommand::Create {
            name,
            password,
            admin,
        } => {
            let password = password_or_prompt(password)?;
            let server = open(config).await?;
            let uid = server
                .create_account(localpart(&name), Some(&password), admin)
                .await
                .map_err(|e| anyhow::anyhow!("{}", e.message()))?;
            println!("created {uid}{}", if admin { " (admin)" } else { "" });
            server.store.close().await;
        }
        UserCommand::ResetPassword { name, password } => {
            let password = password_or_prompt(password)?;
            let server = open(config).await?;
            let uid = format!("@{}:{}", localpart(&name), server.server_name());
            if !server
                .set_password(&uid, &password)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?
            {
                anyhow::bail!("no such user {uid}");
            }
            println!("password of {uid} changed");
            server.store.close().await;
        }
    }
    Ok(())
}

async fn token_command(
    config: myelin_core::config::Config,
    cmd: TokenCommand,
) -> anyhow::Result<()> {
    let server = open(config).await?;
    let e = |e: myelin_core::Error| anyhow::anyhow!("{e}");
    match cmd {
        TokenCommand::Create {
            token,
            uses,
            expires_in_days,
        } => {
            let token = token.unwrap_or_else(|| myelin_core::server::random_string(16));
            let expiry = expires_in_days.map(|d| myelin_core::store::now_ms() + d * 86_400_000);
            if !server
                .store
                .create_registration_token(&token, uses, expiry)
                .await
                .map_err(e)?
            {
                anyhow::bail!("token {token} exists already");
            }
            println!("{token}");
        }
        TokenCommand::List => {
            for t in server.store.registration_tokens().await.map_err(e)? {
                println!(
                    "{}\tused {}/{}\texpires {}",
                    t.token,
                    t.completed,
                    t.uses_allowed
                        .map(|u| u.to_string())
                        .unwrap_or_else(|| "unlimited".into()),
                    t.expiry_ts
                        .map(|x| x.to_string())
                        .unwrap_or_else(|| "never".into())
                );
            }
        }
        TokenCommand::Delete { token } => {
            if !server
                .store
                .delete_registration_token(&token)
                .await
                .map_err(e)?
            {
                anyhow::bail!("no such token {token}");
            }
            println!("deleted {token}");
        }
    }
    server.store.close().await;
    Ok(())
}
