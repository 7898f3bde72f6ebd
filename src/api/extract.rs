//! What the API's handlers share: extractors (a JSON body that names the bad field, a
//! path parameter, the query string as a map) and small helpers (JSON parsing with the
//! field's path, query-value percent-decoding, the index header). The JSON endpoints are
//! in `handlers`, blocking queries and event streams in `watch`, the Consul-compatible
//! listener in `consul`; each takes these from here.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::state::ApiState;

/// Header carrying the catalog index of a response (for blocking queries).
pub const INDEX_HEADER: &str = "x-netsel-index";
/// Header carrying an instance secret on heartbeat and deregister.
pub const SECRET_HEADER: &str = "x-netsel-secret";

/// A JSON body of type `T`: 415 unless `application/json`, 413 past the size limit, and
/// 400 naming the offending field.
pub(crate) struct JsonBody<T>(pub T);

impl<T: DeserializeOwned + Default> FromRequest<ApiState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &ApiState) -> Result<Self, ApiError> {
        let json_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                let mime = v.split(';').next().unwrap_or("").trim();
                mime.eq_ignore_ascii_case("application/json")
            });
        let limit = state.inner.settings.max_body_bytes;
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::TooLarge(limit)
            } else {
                ApiError::BadRequest(format!("cannot read the request body: {e}"))
            }
        })?;
        if bytes.is_empty() {
            return Ok(JsonBody(T::default()));
        }
        if json_type == Some(false) {
            return Err(ApiError::UnsupportedMediaType);
        }
        parse_json(&bytes).map(JsonBody)
    }
}

/// A path parameter; a bad one is a JSON 400 like every other error.
pub(crate) struct PathParam(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(p)| PathParam(p))
            .map_err(|e| ApiError::BadRequest(format!("invalid path: {e}")))
    }
}

/// The query string as a map; a malformed one is a JSON 400.
pub(crate) struct QueryMap(pub BTreeMap<String, String>);

impl<S: Send + Sync> FromRequestParts<S> for QueryMap {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<BTreeMap<String, String>>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| QueryMap(q))
            .map_err(|e| ApiError::BadRequest(format!("invalid query string: {e}")))
    }
}

/// Parses JSON, naming the field that is wrong.
pub(crate) fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = inner.to_string();
        if inner.is_syntax() || inner.is_eof() {
            return ApiError::BadRequest(format!("request body is not valid JSON: {message}"));
        }
        // Missing and unknown fields are reported at the parent: name them from the message.
        let named = message.split('`').nth(1).filter(|_| {
            message.starts_with("missing field") || message.starts_with("unknown field")
        });
        let field = match (named, path.as_str()) {
            (Some(f), ".") => f.to_string(),
            (Some(f), p) if p == f || p.ends_with(&format!(".{f}")) => p.to_string(),
            (Some(f), p) => format!("{p}.{f}"),
            (None, ".") => "body".to_string(),
            (None, p) => p.to_string(),
        };
        ApiError::invalid(field, message)
    })?;
    de.end()
        .map_err(|e| ApiError::BadRequest(format!("trailing data after the JSON body: {e}")))?;
    Ok(value)
}

/// Decodes `%XX` and `+` in a query value.
pub(crate) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(crate) fn index_header(index: u64) -> [(header::HeaderName, HeaderValue); 1] {
    [(
        header::HeaderName::from_static(INDEX_HEADER),
        HeaderValue::from(index),
    )]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        assert_eq!(percent_decode("%zz%"), "%zz%");
        assert_eq!(percent_decode("%41"), "A");
    }

    #[test]
    fn json_errors_name_the_field() {
        #[derive(serde::Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct T {
            name: String,
            weight: Option<u32>,
        }
        let e = parse_json::<T>(br#"{"name":"a","weight":"x"}"#).unwrap_err();
        assert!(
            matches!(&e, ApiError::Invalid { field, .. } if field == "weight"),
            "{e}"
        );
        let e = parse_json::<T>(br#"{"weight":1}"#).unwrap_err();
        assert!(
            matches!(&e, ApiError::Invalid { field, .. } if field == "name"),
            "{e}"
        );
        let e = parse_json::<T>(br#"{"name":"a","bogus":1}"#).unwrap_err();
        assert!(
            matches!(&e, ApiError::Invalid { field, .. } if field == "bogus"),
            "{e}"
        );
        let e = parse_json::<T>(br#"{"name":"a""#).unwrap_err();
        assert!(matches!(e, ApiError::BadRequest(_)));
        let e = parse_json::<T>(br#""str""#).unwrap_err();
        assert!(
            matches!(&e, ApiError::Invalid { field, .. } if field == "body"),
            "{e}"
        );
    }
}
