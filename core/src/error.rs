//! The one error type of `myelin-core`: a Matrix error (status, errcode, message) or an internal
//! failure. The HTTP layers turn it into a Matrix error response in exactly one place.

use std::fmt;

/// A Matrix error code with the HTTP status the spec pairs it with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Forbidden,
    UnknownToken {
        soft_logout: bool,
    },
    MissingToken,
    BadJson,
    NotJson,
    NotFound,
    LimitExceeded,
    Unrecognized,
    MethodNotAllowed,
    Unknown,
    UserInUse,
    InvalidUsername,
    RoomInUse,
    InvalidRoomState,
    UnsupportedRoomVersion,
    InvalidParam,
    TooLarge,
    Exclusive,
    UserDeactivated,
    BadState,
    GuestAccessForbidden,
    MissingParam,
    Unauthorized,
    IncompatibleRoomVersion,
    /// A restricted join that this server cannot judge (it is in none of the allowed rooms).
    UnableToAuthoriseJoin,
    /// A restricted join the user qualifies for, but no user of ours may invite.
    UnableToGrantJoin,
    /// Another server we had to ask could not be reached or failed (502, `M_UNKNOWN`).
    RemoteUnavailable,
    /// A key or signature that does not verify (E2EE key uploads).
    InvalidSignature,
    /// A key backup request for a version that is not the current one (403; the handler adds
    /// `current_version`).
    WrongRoomKeysVersion,
    /// A sliding-sync `pos` the server does not know (any more), or of another device (400).
    UnknownPos,
}

impl ErrorKind {
    pub fn errcode(self) -> &'static str {
        use ErrorKind::*;
        match self {
            Forbidden => "M_FORBIDDEN",
            UnknownToken { .. } => "M_UNKNOWN_TOKEN",
            MissingToken => "M_MISSING_TOKEN",
            BadJson => "M_BAD_JSON",
            NotJson => "M_NOT_JSON",
            NotFound => "M_NOT_FOUND",
            LimitExceeded => "M_LIMIT_EXCEEDED",
            Unrecognized | MethodNotAllowed => "M_UNRECOGNIZED",
            Unknown => "M_UNKNOWN",
            UserInUse => "M_USER_IN_USE",
            InvalidUsername => "M_INVALID_USERNAME",
            RoomInUse => "M_ROOM_IN_USE",
            InvalidRoomState => "M_INVALID_ROOM_STATE",
            UnsupportedRoomVersion => "M_UNSUPPORTED_ROOM_VERSION",
            InvalidParam => "M_INVALID_PARAM",
            TooLarge => "M_TOO_LARGE",
            Exclusive => "M_EXCLUSIVE",
            UserDeactivated => "M_USER_DEACTIVATED",
            BadState => "M_BAD_STATE",
            GuestAccessForbidden => "M_GUEST_ACCESS_FORBIDDEN",
            MissingParam => "M_MISSING_PARAM",
            Unauthorized => "M_UNAUTHORIZED",
            IncompatibleRoomVersion => "M_INCOMPATIBLE_ROOM_VERSION",
            UnableToAuthoriseJoin => "M_UNABLE_TO_AUTHORISE_JOIN",
            UnableToGrantJoin => "M_UNABLE_TO_GRANT_JOIN",
            RemoteUnavailable => "M_UNKNOWN",
            InvalidSignature => "M_INVALID_SIGNATURE",
            WrongRoomKeysVersion => "M_WRONG_ROOM_KEYS_VERSION",
            UnknownPos => "M_UNKNOWN_POS",
        }
    }

    pub fn status(self) -> u16 {
        use ErrorKind::*;
        match self {
            Forbidden | UserDeactivated | GuestAccessForbidden | WrongRoomKeysVersion => 403,
            UnknownToken { .. } | MissingToken | Unauthorized => 401,
            NotFound | Unrecognized => 404,
            MethodNotAllowed => 405,
            LimitExceeded => 429,
            TooLarge => 413,
            Unknown => 500,
            RemoteUnavailable => 502,
            _ => 400,
        }
    }
}

impl ErrorKind {
    /// The kind of an error another server answered with, when passing it on to our client
    /// keeps its meaning: refusals about the request itself (a bad room version, a restricted
    /// join that cannot be authorised, bad JSON, rate limits). Errors about the server-to-server
    /// exchange (signatures, tokens) are not among them; they mean the other server failed us.
    pub fn from_remote_errcode(errcode: &str) -> Option<ErrorKind> {
        use ErrorKind::*;
        Some(match errcode {
            "M_INCOMPATIBLE_ROOM_VERSION" => IncompatibleRoomVersion,
            "M_UNSUPPORTED_ROOM_VERSION" => UnsupportedRoomVersion,
            "M_UNABLE_TO_AUTHORISE_JOIN" => UnableToAuthoriseJoin,
            "M_UNABLE_TO_GRANT_JOIN" => UnableToGrantJoin,
            "M_BAD_JSON" => BadJson,
            "M_NOT_JSON" => NotJson,
            "M_INVALID_PARAM" => InvalidParam,
            "M_MISSING_PARAM" => MissingParam,
            "M_LIMIT_EXCEEDED" => LimitExceeded,
            "M_TOO_LARGE" => TooLarge,
            "M_BAD_STATE" => BadState,
            _ => return None,
        })
    }
}

/// Errors of core operations.
#[derive(Debug)]
pub enum Error {
    /// A failure the client (or peer) caused, reported with its Matrix errcode.
    Matrix { kind: ErrorKind, message: String },
    /// A database failure.
    Database(sqlx::Error),
    /// Anything else that should not happen; logged, reported as 500 `M_UNKNOWN`.
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error::Matrix {
            kind,
            message: message.into(),
        }
    }
    pub fn forbidden(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Forbidden, m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, m)
    }
    pub fn bad_json(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadJson, m)
    }
    pub fn invalid_param(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidParam, m)
    }
    pub fn missing_param(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::MissingParam, m)
    }
    pub fn too_large(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::TooLarge, m)
    }
    pub fn internal(m: impl Into<String>) -> Self {
        Error::Internal(m.into())
    }

    /// The Matrix errcode kind this error is reported with.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Matrix { kind, .. } => *kind,
            _ => ErrorKind::Unknown,
        }
    }

    pub fn message(&self) -> String {
        match self {
            Error::Matrix { message, .. } => message.clone(),
            Error::Database(_) | Error::Internal(_) => "Internal server error".to_owned(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Matrix { kind, message } => write!(f, "{}: {message}", kind.errcode()),
            Error::Database(e) => write!(f, "database error: {e}"),
            Error::Internal(m) => write!(f, "internal error: {m}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        Error::Database(e)
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::Internal(format!("json: {e}"))
    }
}
