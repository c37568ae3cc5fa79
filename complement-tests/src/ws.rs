//! A client of the WebSocket sync extension `dev.myelin.ws_sync` v1 (docs/websocket-sync.md)
//! for the tests and `ws-bench`: connecting (with or without the `Authorization` header and
//! the subprotocol), sending JSON frames, and reading the server's frames and close code.

use std::time::Duration;

use anyhow::{bail, Context};
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::{
    tungstenite::{self, client::IntoClientRequest, http::HeaderValue, Message},
    MaybeTlsStream, WebSocketStream,
};

/// The endpoint path.
pub const WS_PATH: &str = "/_matrix/client/unstable/dev.myelin.ws_sync/connect";
/// The v1 subprotocol.
pub const SUBPROTOCOL: &str = "dev.myelin.ws_sync.v1";
/// How long [`WsClient::next`] waits for a frame before failing.
pub const FRAME_WAIT: Duration = Duration::from_secs(20);

/// One open socket.
pub struct WsClient {
    pub socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// How a connection attempt ended.
pub enum Connected {
    Open(Box<WsClient>),
    /// The server answered the upgrade with an HTTP error: status and JSON body.
    Refused(u16, Value),
}

/// Options of [`connect`].
#[derive(Default, Clone, Copy)]
pub struct ConnectOptions<'a> {
    /// Sent as `Authorization: Bearer`.
    pub token: Option<&'a str>,
    /// Offered in `Sec-WebSocket-Protocol` (default: [`SUBPROTOCOL`]).
    pub protocol: Option<&'a str>,
    /// Offer no subprotocol at all.
    pub no_protocol: bool,
}

/// Opens a socket to the server at `base_url` (`http://host:port`).
pub async fn connect(base_url: &str, opts: ConnectOptions<'_>) -> anyhow::Result<Connected> {
    let url = format!("{}{WS_PATH}", base_url.replacen("http", "ws", 1));
    let mut req = url.into_client_request()?;
    if !opts.no_protocol {
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_str(opts.protocol.unwrap_or(SUBPROTOCOL))?,
        );
    }
    if let Some(t) = opts.token {
        req.headers_mut().insert(
            "Authorization",
            HeaderValue::from_str(&format!("Bearer {t}"))?,
        );
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((socket, _)) => Ok(Connected::Open(Box::new(WsClient { socket }))),
        Err(tungstenite::Error::Http(res)) => {
            let status = res.status().as_u16();
            let body = res
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or(Value::Null);
            Ok(Connected::Refused(status, body))
        }
        Err(e) => Err(e).context("WebSocket connect"),
    }
}

/// Opens an authenticated socket (header) and reads its `hello`.
pub async fn open(base_url: &str, token: &str) -> anyhow::Result<(WsClient, Value)> {
    let opts = ConnectOptions {
        token: Some(token),
        ..Default::default()
    };
    match connect(base_url, opts).await? {
        Connected::Open(ws) => {
            let mut ws = *ws;
            let hello = ws.next().await?;
            if hello["type"] != "hello" {
                bail!("expected hello, got {hello}");
            }
            Ok((ws, hello))
        }
        Connected::Refused(status, body) => bail!("upgrade refused: {status} {body}"),
    }
}

/// What the server sent next.
#[derive(Debug)]
pub enum Frame {
    Json(Value),
    /// A Close frame (code; 1005 when none) or the end of the stream (`None`).
    Closed(Option<u16>),
}

impl WsClient {
    /// Sends one JSON text frame.
    pub async fn send(&mut self, frame: &Value) -> anyhow::Result<()> {
        self.socket
            .send(Message::Text(frame.to_string().into()))
            .await
            .context("send frame")
    }

    /// Sends a raw message (binary, oversized text...).
    pub async fn send_raw(&mut self, msg: Message) -> anyhow::Result<()> {
        self.socket.send(msg).await.context("send frame")
    }

    /// The next text frame as JSON or the close (control frames skipped), waiting at most
    /// `within`.
    pub async fn next_frame_within(&mut self, within: Duration) -> anyhow::Result<Frame> {
        let read = async {
            loop {
                match self.socket.next().await {
                    None => return Ok(Frame::Closed(None)),
                    Some(Err(tungstenite::Error::ConnectionClosed))
                    | Some(Err(tungstenite::Error::AlreadyClosed)) => {
                        return Ok(Frame::Closed(None))
                    }
                    Some(Err(e)) => return Err(anyhow::Error::from(e)),
                    Some(Ok(Message::Text(t))) => {
                        return serde_json::from_str(t.as_str())
                            .map(Frame::Json)
                            .context("server frame is not JSON")
                    }
                    Some(Ok(Message::Close(c))) => {
                        return Ok(Frame::Closed(Some(
                            c.map(|c| u16::from(c.code)).unwrap_or(1005),
                        )))
                    }
                    Some(Ok(_)) => continue,
                }
            }
        };
        tokio::time::timeout(within, read)
            .await
            .with_context(|| format!("no frame from the server within {within:?}"))?
    }

    /// The next JSON frame (an error if the socket closes instead).
    pub async fn next(&mut self) -> anyhow::Result<Value> {
        match self.next_frame_within(FRAME_WAIT).await? {
            Frame::Json(v) => Ok(v),
            Frame::Closed(c) => bail!("socket closed ({c:?}) while a frame was expected"),
        }
    }

    /// The next frame of type `ty`, skipping the other types in `skip`; any other frame is an
    /// error.
    pub async fn next_of(&mut self, ty: &str, skip: &[&str]) -> anyhow::Result<Value> {
        loop {
            let f = self.next().await?;
            if f["type"] == ty {
                return Ok(f);
            }
            if !skip.iter().any(|s| f["type"] == *s) {
                bail!("expected a {ty:?} frame, got {f}");
            }
        }
    }

    /// The next `sync` frame's body.
    pub async fn next_batch(&mut self) -> anyhow::Result<Value> {
        let f = self.next_of("sync", &[]).await?;
        Ok(f["body"].clone())
    }

    /// Reads until the server closes; returns the close code (`None`: no Close frame).
    /// Text frames before the close are returned too.
    pub async fn closed(&mut self) -> anyhow::Result<(Option<u16>, Vec<Value>)> {
        let mut seen = Vec::new();
        loop {
            match self.next_frame_within(FRAME_WAIT).await? {
                Frame::Json(v) => seen.push(v),
                Frame::Closed(c) => return Ok((c, seen)),
            }
        }
    }
}

/// `next_batch` of a sync body.
pub fn next_batch(body: &Value) -> anyhow::Result<String> {
    body["next_batch"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("sync body without next_batch: {body}"))
}
