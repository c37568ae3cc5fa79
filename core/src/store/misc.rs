//! Per-user data: account data (global and per room, with its stream position) and filters.

use sqlx::Row;

use super::Store;
use crate::Result;

/// One account-data entry; `room_id` is empty for global data.
#[derive(Debug, Clone)]
pub struct AccountDataRow {
    pub room_id: String,
    pub data_type: String,
    pub content: String,
    pub stream_id: i64,
}

impl Store {
    /// Sets account data at stream position `stream_id`.
    pub async fn put_account_data(
        &self,
        user_id: &str,
        room_id: &str,
        data_type: &str,
        content: &str,
        stream_id: i64,
    ) -> Result<()> {
        let mut w = self.write().await?;
        sqlx::query(
            "INSERT INTO account_data (user_id, room_id, data_type, content, stream_id) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (user_id, room_id, data_type) \
             DO UPDATE SET content = $4, stream_id = $5",
        )
        .bind(user_id)
        .bind(room_id)
        .bind(data_type)
        .bind(content)
        .bind(stream_id)
        .execute(&mut *w.tx)
        .await?;
        w.commit().await
    }

    pub async fn account_data(
        &self,
        user_id: &str,
        room_id: &str,
        data_type: &str,
    ) -> Result<Option<String>> {
        Ok(sqlx::query_scalar(
            "SELECT content FROM account_data WHERE user_id = $1 AND room_id = $2 AND data_type = $3",
        )
        .bind(user_id)
        .bind(room_id)
        .bind(data_type)
        .fetch_optional(self.pool())
        .await?)
    }

    /// Account data of a user changed in `(from, to]` (all of it when `from` is 0).
    pub async fn account_data_since(
        &self,
        user_id: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<AccountDataRow>> {
        Ok(sqlx::query(
            "SELECT room_id, data_type, content, stream_id FROM account_data \
             WHERE user_id = $1 AND stream_id > $2 AND stream_id <= $3 ORDER BY stream_id",
        )
        .bind(user_id)
        .bind(from)
        .bind(to)
        .fetch_all(self.pool())
        .await?
        .into_iter()
        .map(|r| AccountDataRow {
            room_id: r.get(0),
            data_type: r.get(1),
            content: r.get(2),
            stream_id: r.get(3),
        })
        .collect())
    }

    pub async fn max_account_data_stream(&self) -> Result<i64> {
        let v: Option<i64> = sqlx::query_scalar("SELECT MAX(stream_id) FROM account_data")
            .fetch_one(self.pool())
            .await?;
        Ok(v.unwrap_or(0))
    }

    pub async fn create_filter(&self, user_id: &str, json: &str) -> Result<i64> {
        let mut w = self.write().await?;
        let next: Option<i64> =
            sqlx::query_scalar("SELECT MAX(filter_id) FROM filters WHERE user_id = $1")
                .bind(user_id)
                .fetch_one(&mut *w.tx)
                .await?;
        let id = next.unwrap_or(-1) + 1;
        sqlx::query("INSERT INTO filters (user_id, filter_id, filter_json) VALUES ($1, $2, $3)")
            .bind(user_id)
            .bind(id)
            .bind(json)
            .execute(&mut *w.tx)
            .await?;
        w.commit().await?;
        Ok(id)
    }

    pub async fn filter(&self, user_id: &str, filter_id: i64) -> Result<Option<String>> {
        Ok(sqlx::query_scalar(
            "SELECT filter_json FROM filters WHERE user_id = $1 AND filter_id = $2",
        )
        .bind(user_id)
        .bind(filter_id)
        .fetch_optional(self.pool())
        .await?)
    }
}
