//! The OpenAPI document, generated from the handlers' annotations and the
//! report types' `ToSchema` derives (utoipa): it cannot drift from the code.

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::error::ErrorBody;
use super::handlers::{self, Health, JobsResponse, RunRequest, StatusResponse, Summary, TenantsResponse, TenantsRunRequest};

#[derive(OpenApi)]
#[openapi(
    info(title = "kiln", description = "Database migrations: status, runs, readiness. Mutating endpoints need `Authorization: Bearer <token>`."),
    paths(handlers::health, handlers::status, handlers::run_all, handlers::run_group, handlers::ready, handlers::jobs, handlers::job_action, handlers::tenants, handlers::run_tenants, handlers::dashboard, serve_document),
    components(schemas(Health, Summary, StatusResponse, RunRequest, JobsResponse, TenantsResponse, TenantsRunRequest, ErrorBody)),
    modifiers(&Bearer)
)]
struct ApiDoc;

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme("bearer", SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()));
    }
}

/// The API's OpenAPI document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc
}

#[utoipa::path(get, path = "/openapi.json", tag = "kiln", responses((status = 200, description = "This document")))]
pub(crate) async fn serve_document() -> Json<utoipa::openapi::OpenApi> {
    Json(openapi())
}
