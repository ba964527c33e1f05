//! Bearer-token checks. The token is compared in constant time and never
//! logged; a token in the query string is refused outright (URLs end up in
//! access logs, browser history and proxies).

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::Shared;

/// Query parameters that look like a credential.
const TOKEN_PARAMS: &[&str] = &["token", "access_token", "api_token", "api_key", "apikey", "key", "bearer", "auth", "authorization"];

/// Guard for mutating endpoints: the token, always.
pub(crate) async fn writes(State(s): State<Shared>, req: Request, next: Next) -> Response {
    match check(&s.opts.token, &req) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// Guard for read endpoints: the token when `protect_reads` is set.
pub(crate) async fn reads(State(s): State<Shared>, req: Request, next: Next) -> Response {
    if !s.opts.protect_reads {
        return next.run(req).await;
    }
    match check(&s.opts.token, &req) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// Refuse any request that carries a credential-like query parameter.
pub(crate) async fn no_token_in_query(req: Request, next: Next) -> Response {
    if let Some(q) = req.uri().query() {
        for pair in q.split('&') {
            let name = pair.split('=').next().unwrap_or("").to_ascii_lowercase();
            if TOKEN_PARAMS.contains(&name.as_str()) {
                return ApiError::token_in_query(&name).into_response();
            }
        }
    }
    next.run(req).await
}

fn check(expected: &str, req: &Request) -> Result<(), ApiError> {
    if expected.is_empty() {
        return Err(ApiError::unauthorized(
            "this API has no token configured, so it accepts no run; set KILN_API_TOKEN (or --token-file) and restart `kiln serve`",
        ));
    }
    let Some(value) = req.headers().get(AUTHORIZATION) else {
        return Err(ApiError::unauthorized("missing `Authorization: Bearer <token>` header"));
    };
    let value = value.as_bytes();
    let token = match value.get(..7) {
        Some(scheme) if scheme.eq_ignore_ascii_case(b"bearer ") => &value[7..],
        _ => return Err(ApiError::unauthorized("the Authorization header must be `Bearer <token>`")),
    };
    if constant_time_eq(token.trim_ascii(), expected.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::unauthorized("wrong token"))
    }
}

/// Equality whose time depends only on the lengths, not on where the first
/// difference is.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u64;
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= u64::from(x ^ y);
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn compares() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }
}
