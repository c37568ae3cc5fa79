//! Test support for PostgreSQL: creating and dropping throwaway databases (used by the store
//! tests and the black-box tests' harness).

use sqlx::{AnyConnection, Connection, Executor};

/// Creates database `name` on the server of `admin_url`; returns the new database's URL.
pub async fn create_test_database(admin_url: &str, name: &str) -> Result<String, sqlx::Error> {
    sqlx::any::install_default_drivers();
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(sqlx::Error::Protocol(format!("bad database name {name}")));
    }
    let mut conn = AnyConnection::connect(admin_url).await?;
    conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .await?;
    conn.close().await?;
    // Replace the admin URL's database path by the new name.
    let scheme_end = admin_url.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match admin_url[scheme_end..].find('/') {
        Some(i) => &admin_url[..scheme_end + i],
        None => admin_url,
    };
    Ok(format!("{base}/{name}"))
}

/// Drops database `name` (closing other sessions on it).
pub async fn drop_test_database(admin_url: &str, name: &str) -> Result<(), sqlx::Error> {
    let mut conn = AnyConnection::connect(admin_url).await?;
    conn.execute(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .await?;
    conn.close().await?;
    Ok(())
}
