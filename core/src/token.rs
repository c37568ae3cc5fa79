//! Sync and pagination tokens.
//!
//! A sync token is `s1_<events>_<account_data>_<to_device>_<device_lists>_<receipts>_<typing>_<presence>`:
//! a version tag and one position per stream (later streams append fields; missing trailing
//! fields read as 0). A topological pagination
//! token is `t<depth>_<stream>`: the boundary just after the event at (depth, stream) in
//! (depth, stream_ordering) order.

use crate::{Error, Result};

/// Positions of every stream at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SyncToken {
    pub events: i64,
    pub account_data: i64,
    pub to_device: i64,
    pub device_lists: i64,
    pub receipts: i64,
    pub typing: i64,
    pub presence: i64,
}

impl SyncToken {
    pub fn encode(&self) -> String {
        format!(
            "s1_{}_{}_{}_{}_{}_{}_{}",
            self.events,
            self.account_data,
            self.to_device,
            self.device_lists,
            self.receipts,
            self.typing,
            self.presence
        )
    }

    pub fn parse(s: &str) -> Result<Self> {
        let bad = || Error::invalid_param(format!("Invalid sync token: {s}"));
        let rest = s.strip_prefix("s1_").ok_or_else(bad)?;
        let mut nums = rest.split('_').map(|p| p.parse::<i64>().map_err(|_| bad()));
        let events = nums.next().ok_or_else(bad)??;
        let mut next = || nums.next().transpose().map(|n| n.unwrap_or(0));
        let (account_data, to_device, device_lists) = (next()?, next()?, next()?);
        let (receipts, typing, presence) = (next()?, next()?, next()?);
        let t = SyncToken {
            events,
            account_data,
            to_device,
            device_lists,
            receipts,
            typing,
            presence,
        };
        if nums.next().is_some() || t.fields().iter().any(|n| *n < 0) {
            return Err(bad());
        }
        Ok(t)
    }

    /// Every position, in token order.
    pub fn fields(&self) -> [i64; 7] {
        [
            self.events,
            self.account_data,
            self.to_device,
            self.device_lists,
            self.receipts,
            self.typing,
            self.presence,
        ]
    }

    /// Whether every stream of `self` is at or past `other`'s position.
    pub fn covers(&self, other: &SyncToken) -> bool {
        self.fields()
            .iter()
            .zip(other.fields().iter())
            .all(|(a, b)| a >= b)
    }
}

/// A position in a room's timeline for `/messages`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageToken {
    /// Just after (depth, stream) in topological order.
    Topological { depth: i64, stream: i64 },
    /// A sync token's events position: everything with stream_ordering ≤ it.
    Stream(i64),
}

impl PageToken {
    pub fn encode(&self) -> String {
        match self {
            PageToken::Topological { depth, stream } => format!("t{depth}_{stream}"),
            PageToken::Stream(s) => SyncToken {
                events: *s,
                ..SyncToken::default()
            }
            .encode(),
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        if let Some(rest) = s.strip_prefix('t') {
            let bad = || Error::invalid_param(format!("Invalid pagination token: {s}"));
            let (d, st) = rest.split_once('_').ok_or_else(bad)?;
            return Ok(PageToken::Topological {
                depth: d.parse().map_err(|_| bad())?,
                stream: st.parse().map_err(|_| bad())?,
            });
        }
        // A sliding-sync `pos` (`<sync token>.<connection>.<seq>`) counts as its sync token.
        let sync = s.split_once('.').map_or(s, |(t, _)| t);
        Ok(PageToken::Stream(SyncToken::parse(sync)?.events))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_tokens_round_trip() {
        let t = SyncToken {
            events: 42,
            account_data: 7,
            to_device: 3,
            device_lists: 9,
            receipts: 4,
            typing: 2,
            presence: 11,
        };
        assert_eq!(SyncToken::parse(&t.encode()).unwrap(), t);
        assert_eq!(
            SyncToken::parse("s1_5").unwrap(),
            SyncToken {
                events: 5,
                ..SyncToken::default()
            }
        );
        assert_eq!(SyncToken::parse("s1_5_2").unwrap().account_data, 2);
        for bad in [
            "",
            "s1_",
            "s1_x_1",
            "s2_1_1",
            "s1_-1_0",
            "t1_2",
            "s1_1_1_1_1_1_1_1_1",
        ] {
            assert!(SyncToken::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn page_tokens_round_trip() {
        let t = PageToken::Topological {
            depth: 3,
            stream: 9,
        };
        assert_eq!(PageToken::parse(&t.encode()).unwrap(), t);
        assert_eq!(PageToken::parse("s1_12_3").unwrap(), PageToken::Stream(12));
        assert!(PageToken::parse("tx_1").is_err());
        assert_eq!(
            PageToken::parse("s1_12_3_0_0_0_0_0.abcd.4").unwrap(),
            PageToken::Stream(12)
        );
    }
}
