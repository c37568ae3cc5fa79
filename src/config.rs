//! Loading the configuration: defaults, then the TOML file (`--config`), then `MYELIN_*`
//! environment variables. Any problem is one line naming the option.

use std::{path::Path, str::FromStr};

use myelin_core::config::Config;

/// `MYELIN_*` variables and the option each overrides.
pub const ENV_OPTIONS: &[(&str, &str)] = &[
    ("MYELIN_SERVER_NAME", "server_name"),
    ("MYELIN_CLIENT_LISTEN", "client_listen"),
    ("MYELIN_PUBLIC_BASE_URL", "public_base_url"),
    ("MYELIN_DATA_DIR", "data_dir"),
    ("MYELIN_DATABASE_URL", "database_url"),
    (
        "MYELIN_DATABASE_MAX_CONNECTIONS",
        "database_max_connections",
    ),
    ("MYELIN_REGISTRATION", "registration"),
    ("MYELIN_MAX_REQUEST_BODY_BYTES", "max_request_body_bytes"),
    ("MYELIN_MAX_EVENT_BYTES", "max_event_bytes"),
    (
        "MYELIN_ACCESS_TOKEN_LIFETIME_MS",
        "access_token_lifetime_ms",
    ),
    ("MYELIN_LOG_FORMAT", "log_format"),
    ("MYELIN_LOG", "log_filter"),
    ("MYELIN_FEDERATION_LISTEN", "federation_listen"),
    ("MYELIN_TLS_CERTIFICATE", "tls_certificate"),
    ("MYELIN_TLS_PRIVATE_KEY", "tls_private_key"),
    ("MYELIN_FEDERATION_VERIFY_TLS", "federation_verify_tls"),
    ("MYELIN_FEDERATION_CA_FILE", "federation_ca_file"),
    (
        "MYELIN_FEDERATION_ALLOW_PRIVATE_ADDRESSES",
        "federation_allow_private_addresses",
    ),
    ("MYELIN_TRUSTED_KEY_SERVERS", "trusted_key_servers"),
    ("MYELIN_PRESENCE_ENABLED", "presence.enabled"),
    ("MYELIN_PRESENCE_GRACE_MS", "presence.grace_ms"),
    ("MYELIN_PRESENCE_IDLE_MS", "presence.idle_ms"),
    ("MYELIN_WS_SYNC_MAX_FRAME_BYTES", "ws_sync_max_frame_bytes"),
    ("MYELIN_WS_SYNC_AUTH_TIMEOUT_MS", "ws_sync_auth_timeout_ms"),
    (
        "MYELIN_WS_SYNC_HEARTBEAT_INTERVAL_MS",
        "ws_sync_heartbeat_interval_ms",
    ),
    (
        "MYELIN_WS_SYNC_WRITE_TIMEOUT_MS",
        "ws_sync_write_timeout_ms",
    ),
];

fn parse<T: FromStr>(option: &str, value: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    value
        .parse()
        .map_err(|e| format!("option `{option}`: {e} (got {value:?})"))
}

/// An optional value: empty means unset.
fn optional<T: FromStr>(option: &str, value: &str) -> Result<Option<T>, String>
where
    T::Err: std::fmt::Display,
{
    if value.is_empty() {
        Ok(None)
    } else {
        parse(option, value).map(Some)
    }
}

/// Loads the configuration from an optional file and the environment.
pub fn load(file: Option<&Path>) -> Result<Config, String> {
    let mut config = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
            from_toml(&text).map_err(|e| format!("config file {}: {e}", path.display()))?
        }
        None => Config::default(),
    };
    for (var, option) in ENV_OPTIONS {
        let Ok(value) = std::env::var(var) else {
            continue;
        };
        let c = &mut config;
        match *option {
            "server_name" => c.server_name = value,
            "client_listen" => c.client_listen = parse(option, &value)?,
            "public_base_url" => c.public_base_url = Some(value),
            "data_dir" => c.data_dir = value.into(),
            "database_url" => c.database_url = Some(value),
            "database_max_connections" => c.database_max_connections = parse(option, &value)?,
            "registration" => c.registration = parse(option, &value)?,
            "max_request_body_bytes" => c.max_request_body_bytes = parse(option, &value)?,
            "max_event_bytes" => c.max_event_bytes = parse(option, &value)?,
            "access_token_lifetime_ms" => c.access_token_lifetime_ms = parse(option, &value)?,
            "log_format" => c.log_format = parse(option, &value)?,
            "log_filter" => c.log_filter = value,
            "federation_listen" => c.federation_listen = optional(option, &value)?,
            "tls_certificate" => c.tls_certificate = optional(option, &value)?,
            "tls_private_key" => c.tls_private_key = optional(option, &value)?,
            "federation_verify_tls" => c.federation_verify_tls = parse(option, &value)?,
            "federation_ca_file" => c.federation_ca_file = optional(option, &value)?,
            "federation_allow_private_addresses" => {
                c.federation_allow_private_addresses = parse(option, &value)?
            }
            // Comma-separated server names.
            "trusted_key_servers" => {
                c.trusted_key_servers = value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            }
            "presence.enabled" => c.presence.enabled = parse(option, &value)?,
            "presence.grace_ms" => c.presence.grace_ms = parse(option, &value)?,
            "presence.idle_ms" => c.presence.idle_ms = parse(option, &value)?,
            "ws_sync_max_frame_bytes" => c.ws_sync_max_frame_bytes = parse(option, &value)?,
            "ws_sync_auth_timeout_ms" => c.ws_sync_auth_timeout_ms = parse(option, &value)?,
            "ws_sync_heartbeat_interval_ms" => {
                c.ws_sync_heartbeat_interval_ms = parse(option, &value)?
            }
            "ws_sync_write_timeout_ms" => c.ws_sync_write_timeout_ms = parse(option, &value)?,
            _ => {}
        }
    }
    validate(&config)?;
    Ok(config)
}

/// Parses the file; an error names the option at fault.
fn from_toml(text: &str) -> Result<Config, String> {
    use serde::Deserialize;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| e.message().to_owned())?;
    Config::deserialize(toml::Value::Table(table.clone())).map_err(|e| {
        // Find the option at fault by reading each one alone.
        for (key, value) in &table {
            let one = toml::Table::from_iter([(key.clone(), value.clone())]);
            if let Err(e) = Config::deserialize(toml::Value::Table(one)) {
                return format!("option `{key}`: {}", e.message());
            }
        }
        e.message().to_owned()
    })
}

fn validate(c: &Config) -> Result<(), String> {
    if myelin_core::ruma::ServerName::parse(&c.server_name).is_err() {
        return Err(format!(
            "option `server_name`: {:?} is not a valid server name",
            c.server_name
        ));
    }
    for notary in &c.trusted_key_servers {
        if myelin_core::ruma::ServerName::parse(notary).is_err() {
            return Err(format!(
                "option `trusted_key_servers`: {notary:?} is not a valid server name"
            ));
        }
    }
    let url = c.database_url();
    if !(url.starts_with("sqlite:")
        || url.starts_with("postgres:")
        || url.starts_with("postgresql:"))
    {
        return Err("option `database_url`: must start with sqlite:// or postgres://".to_owned());
    }
    if c.max_event_bytes == 0 || c.max_event_bytes > 65_536 {
        return Err("option `max_event_bytes`: must be between 1 and 65536".to_owned());
    }
    if c.ws_sync_max_frame_bytes < 1024 {
        return Err("option `ws_sync_max_frame_bytes`: must be at least 1024".to_owned());
    }
    if c.ws_sync_heartbeat_interval_ms < 100 || c.ws_sync_write_timeout_ms < 100 {
        return Err(
            "option `ws_sync_heartbeat_interval_ms` / `ws_sync_write_timeout_ms`: must be at least 100"
                .to_owned(),
        );
    }
    if c.max_request_body_bytes < 1024 {
        return Err("option `max_request_body_bytes`: must be at least 1024".to_owned());
    }
    if c.presence.grace_ms == 0 || c.presence.idle_ms == 0 {
        return Err("option `presence`: grace_ms and idle_ms must be positive".to_owned());
    }
    if c.tls_certificate.is_some() != c.tls_private_key.is_some() {
        return Err(
            "option `tls_certificate`: tls_certificate and tls_private_key go together".to_owned(),
        );
    }
    for (option, path) in [
        ("tls_certificate", &c.tls_certificate),
        ("tls_private_key", &c.tls_private_key),
        ("federation_ca_file", &c.federation_ca_file),
    ] {
        if let Some(path) = path {
            if !path.is_file() {
                return Err(format!(
                    "option `{option}`: {} is not a readable file",
                    path.display()
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_option_names_the_option() {
        let dir = std::env::temp_dir().join(format!("myelin-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.toml");
        std::fs::write(&f, "registration = \"sometimes\"\n").unwrap();
        let e = load(Some(&f)).unwrap_err();
        assert!(e.contains("registration") || e.contains("sometimes"), "{e}");
        std::fs::write(&f, "nonsense_option = 1\n").unwrap();
        assert!(load(Some(&f)).unwrap_err().contains("nonsense_option"));
        std::fs::write(
            &f,
            "server_name = \"example.org:8448\"\nregistration = \"open\"\n",
        )
        .unwrap();
        let c = load(Some(&f)).unwrap();
        assert_eq!(c.server_name, "example.org:8448");
        assert!(c.federation_verify_tls && c.federation_listen.is_none());
        std::fs::write(&f, "federation_listen = \"0.0.0.0:8448\"\nfederation_verify_tls = false\nfederation_allow_private_addresses = true\n").unwrap();
        let c = load(Some(&f)).unwrap();
        assert_eq!(c.federation_listen, Some(([0, 0, 0, 0], 8448).into()));
        assert!(!c.federation_verify_tls && c.federation_allow_private_addresses);
        std::fs::write(
            &f,
            "trusted_key_servers = [\"notary.example\", \"n2.example:8448\"]\n",
        )
        .unwrap();
        let c = load(Some(&f)).unwrap();
        assert_eq!(c.trusted_key_servers, ["notary.example", "n2.example:8448"]);
        std::fs::write(&f, "trusted_key_servers = [\"not a name\"]\n").unwrap();
        assert!(load(Some(&f)).unwrap_err().contains("trusted_key_servers"));
        std::fs::write(&f, "federation_listen = \"nowhere\"\n").unwrap();
        assert!(load(Some(&f)).unwrap_err().contains("federation_listen"));
        std::fs::write(&f, "tls_certificate = \"/nonexistent/cert.pem\"\ntls_private_key = \"/nonexistent/key.pem\"\n").unwrap();
        assert!(load(Some(&f)).unwrap_err().contains("tls_certificate"));
        std::fs::write(&f, "[presence]\nenabled = false\ngrace_ms = 500\n").unwrap();
        let c = load(Some(&f)).unwrap();
        assert!(!c.presence.enabled && c.presence.grace_ms == 500);
        assert_eq!(c.presence.idle_ms, 300_000);
        std::fs::write(&f, "[presence]\nidle = 5\n").unwrap();
        assert!(load(Some(&f)).unwrap_err().contains("presence"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
