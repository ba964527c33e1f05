//! Errors as HTTP responses: `{"error": ErrorReport}` with the stable codes of
//! the library (the same words the CLI's `--json` prints), and a status that
//! says whose move it is.
//!
//! | code | status |
//! |---|---|
//! | `unauthorized` | 401 |
//! | `token_in_query`, `bad_request` | 400 |
//! | `unknown_group`, `not_found` | 404 |
//! | `method_not_allowed` | 405 |
//! | `lock_timeout` (another run holds the lock), `plan_refused` | 409 |
//! | `payload_too_large` | 413 |
//! | `connect_failed`, `connection_lost` (database down) | 503 |
//! | anything else (`migration_failed`, `schema_invalid`, `config`, bad files…) | 500 |

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_core::report::ErrorReport;
use serde::Serialize;

use crate::Error;

/// An error response: an HTTP status and the [`ErrorReport`] sent as
/// `{"error": …}`.
#[derive(Clone, Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The body's `error`.
    pub report: ErrorReport,
}

/// The JSON body of every error response.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong, with its stable `code`.
    pub error: ErrorReport,
}

impl ApiError {
    /// An error of the API itself (not of a run).
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        let exit_code = if status.is_client_error() { 2 } else { 1 };
        ApiError { status, report: ErrorReport { code: code.into(), message: message.into(), exit_code, problems: vec![], failure: None } }
    }

    pub(crate) fn unauthorized(why: &str) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", format!("{why}; nothing was run"))
    }

    pub(crate) fn token_in_query(name: &str) -> Self {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "token_in_query",
            format!("refused: a credential in the query string (`{name}=`) ends up in logs; send it as `Authorization: Bearer <token>`"),
        )
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let report = match &e {
            Error::Run(r) => ErrorReport::from(r),
            Error::Config(c) => {
                ErrorReport { code: e.code().into(), message: c.to_string(), exit_code: e.exit_code(), problems: vec![], failure: None }
            }
        };
        let status = match report.code.as_str() {
            "lock_timeout" | "plan_refused" => StatusCode::CONFLICT,
            "connect_failed" | "connection_lost" => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let mut err = ApiError { status, report };
        if status == StatusCode::SERVICE_UNAVAILABLE {
            err.report.message = format!("the database is down or unreachable: {}", err.report.message);
        }
        err
    }
}

impl From<kiln_core::RunError> for ApiError {
    fn from(e: kiln_core::RunError) -> Self {
        Error::Run(e).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(ErrorBody { error: self.report })).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        }
        r
    }
}

pub(crate) async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no endpoint at {}; see /openapi.json for the endpoints", uri.path()))
}

pub(crate) async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", format!("{method} is not allowed on {}; see /openapi.json", uri.path()))
}

/// Errors made outside kiln's handlers (the body limit's 413, axum's
/// rejections) turned into the same JSON shape.
pub(crate) async fn json_errors(r: Response) -> Response {
    let status = r.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return r;
    }
    let is_json = r.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return r;
    }
    let (code, message) = match status {
        StatusCode::PAYLOAD_TOO_LARGE => ("payload_too_large", "the request body is larger than this API accepts".to_string()),
        s if s.is_client_error() => ("bad_request", format!("the request was refused ({s})")),
        s => ("internal", format!("the server failed ({s})")),
    };
    ApiError::new(status, code, message).into_response()
}
