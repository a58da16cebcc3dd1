//! The shop's web page: `/` and its assets under `/web/`, compiled into the
//! binary (nothing is fetched from elsewhere, no build step), and
//! `/web/config.json`, what the page is told about its surroundings.
//!
//! Every asset is answered with a strong ETag and `no-cache`, so a
//! browser revalidates with one small request and gets a 304 when nothing
//! changed; and with a Content-Security-Policy that lets the page reach
//! only this gateway.

use std::sync::{Arc, OnceLock};

use axum::extract::{Path, State};
use axum::response::{IntoResponse as _, Response};
use http::{HeaderMap, HeaderValue, StatusCode, header};

use crate::cache;
use crate::errors::{GatewayError, json_response};
use crate::state::Gateway;

/// One compiled-in file.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const INDEX: Asset = Asset {
    name: "index.html",
    content_type: "text/html; charset=utf-8",
    body: include_str!("../web/index.html"),
};

/// The files under `/web/`.
const ASSETS: &[Asset] = &[
    Asset {
        name: "style.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("../web/style.css"),
    },
    js("app.js", include_str!("../web/app.js")),
    js("api.js", include_str!("../web/api.js")),
    js("order.js", include_str!("../web/order.js")),
    js("orders.js", include_str!("../web/orders.js")),
    js("mesh.js", include_str!("../web/mesh.js")),
    js("serve.js", include_str!("../web/serve.js")),
    Asset {
        name: "icon.svg",
        content_type: "image/svg+xml",
        body: include_str!("../web/icon.svg"),
    },
];

const fn js(name: &'static str, body: &'static str) -> Asset {
    Asset {
        name,
        content_type: "text/javascript; charset=utf-8",
        body,
    }
}

/// Scripts, styles and requests from this origin only; no frames, no
/// plugins, no inline script.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'self'; \
    frame-ancestors 'none'";

/// `GET /`.
pub async fn index(headers: HeaderMap) -> Response {
    answer(&INDEX, &headers)
}

/// `GET /web/{file}`.
pub async fn asset(Path(name): Path<String>, headers: HeaderMap) -> Response {
    match ASSETS.iter().find(|a| a.name == name) {
        Some(asset) => answer(asset, &headers),
        None => GatewayError::NoRoute {
            method: http::Method::GET,
            path: format!("/web/{name}"),
        }
        .into_response(),
    }
}

/// `GET /web/config.json`.
pub async fn config(State(gateway): State<Arc<Gateway>>) -> Response {
    let body = serde_json::to_vec(&gateway.web).unwrap_or_default();
    let mut response = json_response(StatusCode::OK, body);
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// The total size of the page and everything it loads before data.
pub fn page_bytes() -> usize {
    INDEX.body.len() + ASSETS.iter().map(|a| a.body.len()).sum::<usize>()
}

fn answer(asset: &Asset, headers: &HeaderMap) -> Response {
    let etag = etag(asset);
    let fresh = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| cache::none_match(v, etag));
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let mut response = asset.body.into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(asset.content_type),
        );
        response
    };
    let h = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, value);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// The file's strong validator, computed once per file.
fn etag(asset: &Asset) -> &'static str {
    static TAGS: OnceLock<Vec<(&'static str, String)>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        std::iter::once(&INDEX)
            .chain(ASSETS)
            .map(|a| (a.name, cache::etag(a.body.as_bytes())))
            .collect()
    });
    tags.iter()
        .find(|(name, _)| *name == asset.name)
        .map_or("", |(_, tag)| tag.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_whole_page_stays_under_100_kb() {
        assert!(page_bytes() < 100 * 1024, "{} bytes", page_bytes());
    }

    #[test]
    fn every_module_the_page_imports_is_served() {
        for asset in std::iter::once(&INDEX).chain(ASSETS) {
            for quoted in asset.body.split(['"', '\'']) {
                let Some(name) = quoted
                    .strip_prefix("./")
                    .or_else(|| quoted.strip_prefix("/web/"))
                else {
                    continue;
                };
                if name.ends_with(".js") || name.ends_with(".css") || name.ends_with(".svg") {
                    assert!(
                        ASSETS.iter().any(|a| a.name == name),
                        "{} refers to {name}, which is not served",
                        asset.name
                    );
                }
            }
        }
    }
}
