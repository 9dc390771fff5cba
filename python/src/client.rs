//! The XZepr REST client. Every call returns an awaitable: the request runs on
//! the shared tokio runtime, and the result is converted on the asyncio loop.

use std::collections::HashMap;
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::PyDict;
use serde_json::Value;
use xzepr_consumer::client::{
    ClientError, CreateEvent, ReceiverQuery, XzeprClient, XzeprClientConfig,
};

use crate::bridge::awaitable;
use crate::convert::{py_to_value, Json};
use crate::errors::client_error;

/// A JSON argument (`dict` or `None`; `None` is `{}`).
fn json_arg(obj: Option<&Bound<'_, PyAny>>) -> PyResult<Value> {
    match obj {
        Some(o) if !o.is_none() => py_to_value(o),
        _ => Ok(Value::Object(Default::default())),
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<Json, ClientError> {
    serde_json::to_value(v)
        .map(Json)
        .map_err(|e| ClientError::Decode {
            reason: "not representable as JSON".into(),
            source: Some(Box::new(e)),
        })
}

/// The native client: a pooled keep-alive connection shared by clones (the
/// consumer's lifecycle reporter uses a clone of it).
#[pyclass(frozen, module = "xzepr_consumer._native")]
#[derive(Debug, Clone)]
pub(crate) struct Client {
    pub(crate) inner: XzeprClient,
}

#[pymethods]
impl Client {
    #[new]
    #[pyo3(signature = (base_url, token, timeout_s = 30.0))]
    fn new(base_url: String, token: String, timeout_s: f64) -> PyResult<Self> {
        let timeout = Duration::try_from_secs_f64(timeout_s).map_err(|_| {
            Python::attach(|py| {
                crate::errors::config_error(py, format!("timeout must be positive: {timeout_s}"))
            })
        })?;
        // hyper-util's pool spawns on the current runtime: build inside it.
        let _rt = crate::runtime().enter();
        let config = XzeprClientConfig::new(base_url, token).with_request_timeout(timeout);
        XzeprClient::new(config)
            .map(|inner| Client { inner })
            .map_err(client_error)
    }

    fn create_event_receiver<'py>(
        &self,
        py: Python<'py>,
        name: String,
        receiver_type: String,
        version: String,
        description: String,
        schema: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let schema = json_arg(schema.as_ref())?;
        let c = self.inner.clone();
        awaitable(py, async move {
            c.create_event_receiver(&name, &receiver_type, &version, &description, schema)
                .await
                .map_err(client_error)
        })
    }

    #[pyo3(signature = (name = None, receiver_type = None, limit = 50, offset = 0))]
    fn list_event_receivers<'py>(
        &self,
        py: Python<'py>,
        name: Option<String>,
        receiver_type: Option<String>,
        limit: u32,
        offset: u64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let c = self.inner.clone();
        awaitable(py, async move {
            let mut q = ReceiverQuery::new().with_limit(limit).with_offset(offset);
            if let Some(n) = name {
                q = q.with_name(n);
            }
            if let Some(t) = receiver_type {
                q = q.with_type(t);
            }
            let page = c.list_event_receivers(&q).await.map_err(client_error)?;
            to_json(&page.data).map_err(client_error)
        })
    }

    fn get_event_receiver<'py>(
        &self,
        py: Python<'py>,
        receiver_id: String,
    ) -> PyResult<Bound<'py, PyAny>> {
        let c = self.inner.clone();
        awaitable(py, async move {
            let r = c
                .get_event_receiver(&receiver_id)
                .await
                .map_err(client_error)?;
            to_json(&r).map_err(client_error)
        })
    }

    fn discover_or_create_event_receiver<'py>(
        &self,
        py: Python<'py>,
        name: String,
        receiver_type: String,
        version: String,
        description: String,
        schema: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let schema = json_arg(schema.as_ref())?;
        let c = self.inner.clone();
        awaitable(py, async move {
            c.discover_or_create_event_receiver(
                &name,
                &receiver_type,
                &version,
                &description,
                schema,
            )
            .await
            .map_err(client_error)
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn create_event<'py>(
        &self,
        py: Python<'py>,
        name: String,
        version: String,
        release: String,
        platform_id: String,
        package: String,
        description: String,
        payload: Option<Bound<'py, PyAny>>,
        success: bool,
        event_receiver_id: String,
    ) -> PyResult<Bound<'py, PyAny>> {
        let event = CreateEvent::new(name, event_receiver_id)
            .with_version(version)
            .with_release(release)
            .with_platform_id(platform_id)
            .with_package(package)
            .with_description(description)
            .with_payload(json_arg(payload.as_ref())?)
            .with_success(success);
        let c = self.inner.clone();
        awaitable(py, async move {
            c.create_event(&event).await.map_err(client_error)
        })
    }

    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (receiver_id, work_id, work_name, version, platform_id, package, payload = None))]
    fn post_work_started<'py>(
        &self,
        py: Python<'py>,
        receiver_id: String,
        work_id: String,
        work_name: String,
        version: String,
        platform_id: String,
        package: String,
        payload: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let details = json_arg(payload.as_ref())?;
        let c = self.inner.clone();
        awaitable(py, async move {
            c.post_work_started(
                &receiver_id,
                &work_id,
                &work_name,
                &version,
                &platform_id,
                &package,
                details,
            )
            .await
            .map_err(client_error)
        })
    }

    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (receiver_id, work_id, work_name, version, platform_id, package, success, payload = None))]
    fn post_work_completed<'py>(
        &self,
        py: Python<'py>,
        receiver_id: String,
        work_id: String,
        work_name: String,
        version: String,
        platform_id: String,
        package: String,
        success: bool,
        payload: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let details = json_arg(payload.as_ref())?;
        let c = self.inner.clone();
        awaitable(py, async move {
            c.post_work_completed(
                &receiver_id,
                &work_id,
                &work_name,
                &version,
                &platform_id,
                &package,
                success,
                details,
            )
            .await
            .map_err(client_error)
        })
    }

    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (receiver_id, work_id, work_name, version, platform_id, package, error, error_code, payload = None))]
    fn post_work_failed<'py>(
        &self,
        py: Python<'py>,
        receiver_id: String,
        work_id: String,
        work_name: String,
        version: String,
        platform_id: String,
        package: String,
        error: String,
        error_code: String,
        payload: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let details = json_arg(payload.as_ref())?;
        let c = self.inner.clone();
        awaitable(py, async move {
            c.post_work_failed(
                &receiver_id,
                &work_id,
                &work_name,
                &version,
                &platform_id,
                &package,
                &error,
                &error_code,
                details,
            )
            .await
            .map_err(client_error)
        })
    }
}

/// `XZEPR_API_URL` and `XZEPR_API_TOKEN` from `env`, read by the core's `from_env`.
#[pyfunction]
pub(crate) fn client_config_from_env<'py>(
    py: Python<'py>,
    env: HashMap<String, String>,
) -> PyResult<Bound<'py, PyDict>> {
    let c = XzeprClientConfig::from_env_with(|k| env.get(k).cloned()).map_err(client_error)?;
    let d = PyDict::new(py);
    d.set_item("base_url", &c.base_url)?;
    d.set_item("token", &c.token)?;
    d.set_item("timeout", c.request_timeout.as_secs())?;
    Ok(d)
}
