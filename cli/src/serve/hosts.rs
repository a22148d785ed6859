//! Without an API key, the server answers loopback names only: a `Host` or an `Origin` naming another
//! host is refused (403), so that a web page cannot reach it through DNS rebinding or a cross-site form.

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, AppState};

/// Whether `host` (a `Host` header or an authority: a name or address, and maybe a port) is loopback:
/// `localhost`, an address of 127.0.0.0/8, or `[::1]`.
pub(crate) fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        // `[::1]` or `[::1]:8080`
        Some(rest) => match rest.split_once(']') {
            Some((address, port)) if port.is_empty() || port.strip_prefix(':').is_some_and(is_port) => address,
            _ => return false,
        },
        None => match host.rsplit_once(':') {
            Some((name, port)) if is_port(port) => name,
            Some(_) => return false,
            None => host,
        },
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn is_port(port: &str) -> bool {
    port.parse::<u16>().is_ok()
}

/// Whether `origin` (`scheme://host[:port]`) is a page served from loopback. `null` (a sandboxed frame,
/// a file) is not.
fn is_loopback_origin(origin: &str) -> bool {
    origin.split_once("://").is_some_and(|(scheme, host)| {
        matches!(scheme.to_ascii_lowercase().as_str(), "http" | "https") && is_loopback_host(host)
    })
}

/// Refuses a foreign `Host` or `Origin` when no API key is set (with a key, the key is the guard).
pub(crate) async fn loopback_only(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if state.loaded.config.api_key.is_some() {
        return next.run(request).await;
    }
    let headers = request.headers();
    // HTTP/2 names the host in the URI; HTTP/1.1 in `Host`. A request with neither comes from no browser.
    let host = request
        .uri()
        .authority()
        .map(|authority| authority.as_str().to_owned())
        .or_else(|| headers.get(header::HOST).map(|host| String::from_utf8_lossy(host.as_bytes()).into_owned()));
    if let Some(host) = host.filter(|host| !is_loopback_host(host)) {
        let message = format!(
            "host `{}` is not loopback: without an API key this server answers only localhost, 127.0.0.1 and \
             [::1] (set `api_key` to serve other names)",
            host.chars().take(64).collect::<String>()
        );
        return ApiError::new(StatusCode::FORBIDDEN, message, "forbidden_host").into_response();
    }
    let origins = headers.get_all(header::ORIGIN);
    if let Some(origin) = origins.iter().find(|origin| !origin.to_str().is_ok_and(is_loopback_origin)) {
        let message = format!(
            "origin `{}` is not loopback: without an API key this server answers no web page but its own \
             machine's (set `api_key` to serve others)",
            String::from_utf8_lossy(origin.as_bytes()).chars().take(64).collect::<String>()
        );
        return ApiError::new(StatusCode::FORBIDDEN, message, "forbidden_origin").into_response();
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_names_with_any_port_and_nothing_else() {
        for host in
            ["localhost", "LocalHost:8080", "127.0.0.1", "127.0.0.1:1", "127.1.2.3:65535", "[::1]", "[::1]:8080"]
        {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "10.0.0.1",
            "[::2]:80",
            "[::1]x",
            "[::1]8080",
            "localhost:http",
            "localhost:99999",
            "::1",
            "",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
        assert!(is_loopback_origin("http://localhost:3000") && is_loopback_origin("https://[::1]"));
        for origin in ["null", "http://evil.example", "file://", "ftp://localhost", "localhost"] {
            assert!(!is_loopback_origin(origin), "{origin}");
        }
    }
}
