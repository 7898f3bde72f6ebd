//! The web UI: four static files compiled into the binary (no CDN, no build step).

use axum::extract::Path;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;

const INDEX_HTML: &str = include_str!("index.html");
const APP_JS: &str = include_str!("app.js");
const STYLE_CSS: &str = include_str!("style.css");
const FAVICON_SVG: &str = include_str!("favicon.svg");

/// Everything the page may load comes from NetSel itself.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

fn page(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CSP),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        body,
    )
        .into_response()
}

/// `GET /ui/`.
pub(crate) async fn index() -> Response {
    page("text/html; charset=utf-8", INDEX_HTML)
}

/// `GET /ui/{file}`.
pub(crate) async fn asset(Path(file): Path<String>) -> Response {
    match file.as_str() {
        "app.js" => page("text/javascript; charset=utf-8", APP_JS),
        "style.css" => page("text/css; charset=utf-8", STYLE_CSS),
        "index.html" => page("text/html; charset=utf-8", INDEX_HTML),
        "favicon.svg" => page("image/svg+xml", FAVICON_SVG),
        _ => ApiError::NotFound(format!("no UI asset {file}")).into_response(),
    }
}

/// `GET /favicon.ico` (browsers ask for it whatever the page says).
pub(crate) async fn favicon() -> Response {
    page("image/svg+xml", FAVICON_SVG)
}
