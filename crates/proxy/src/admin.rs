//! The admin listener: readiness now; metrics and the replica API arrive with their issues.

use std::sync::Arc;

use async_trait::async_trait;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::json;

use crate::meter::Meter;
use crate::router::Router;

/// Serves `GET /health` (readiness), `GET /metrics` (Prometheus) and `GET /admin/replicas`
/// (read-only state).
#[derive(Debug)]
pub struct AdminApp {
    router: Arc<Router>,
    meter: Arc<Meter>,
}

impl AdminApp {
    /// An admin app over `router` and `meter`.
    pub fn new(router: Arc<Router>, meter: Arc<Meter>) -> Self {
        AdminApp { router, meter }
    }

    fn replicas(&self) -> serde_json::Value {
        let snapshot = self.router.snapshot();
        let replicas: Vec<_> = snapshot
            .selector
            .replicas()
            .iter()
            .zip(&snapshot.live)
            .map(|(r, live)| {
                json!({
                    "id": &*r.id,
                    "region": snapshot.selector.region_name(r.region),
                    "weight": r.weight,
                    "state": format!("{:?}", r.admission).to_lowercase(),
                    "inflight": live.inflight(),
                })
            })
            .collect();
        json!({ "replicas": replicas, "override_entries": self.router.overrides().len() })
    }
}

fn response(status: u16, body: String) -> http::Response<Vec<u8>> {
    with_type(status, body, "application/json")
}

fn with_type(status: u16, body: String, content_type: &'static str) -> http::Response<Vec<u8>> {
    let body = body.into_bytes();
    let mut res = http::Response::new(Vec::new());
    *res.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
    let headers = res.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    // Without a length the reply would be close-delimited.
    headers.insert(
        http::header::CONTENT_LENGTH,
        http::HeaderValue::from(body.len()),
    );
    *res.body_mut() = body;
    res
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> http::Response<Vec<u8>> {
        let req = session.req_header();
        match (req.method.as_str(), req.uri.path()) {
            ("GET", "/health") => response(200, json!({"status": "ok"}).to_string()),
            ("GET", "/admin/replicas") => response(200, self.replicas().to_string()),
            ("GET", "/metrics") => with_type(
                200,
                self.meter.render(&self.router),
                "text/plain; version=0.0.4",
            ),
            _ => response(
                404,
                json!({"error": {"message": "not found", "type": "invalid_request_error", "code": "not_found"}})
                    .to_string(),
            ),
        }
    }
}
