//! Calls between engram's services carry the cluster's credential, and internal ports refuse
//! calls without it.
//!
//! The credential is a key derived from the cluster secret (`ENGRAM_CLUSTER_SECRET`, see
//! [`engram_domain::ClusterSecret`]), sent as the [`HEADER`] metadata of every internal call
//! ([`Outgoing`]) and compared in constant time by [`ClusterAuthLayer`] before a request reaches
//! anything else but the metrics layer. The gRPC health service stays open, for the kubelet's
//! probes; reflection and every engram method need the credential. The gateway's public port
//! does not check it (its callers carry API keys).
//!
//! The credential travels in clear text, like the API keys: the deployment provides TLS (a mesh)
//! where the network between the pods is not trusted.

use std::pin::Pin;
use std::task::{Context, Poll};

use engram_domain::ClusterSecret;
use engram_domain::error::{Error, Result};
use engram_proto::tonic::body::Body;
use engram_proto::tonic::metadata::AsciiMetadataValue;
use engram_proto::tonic::{Request, Status};

/// The metadata an internal call carries its credential in.
pub const HEADER: &str = "x-engram-cluster-credential";

/// Paths an internal port serves without the credential: the health service.
const OPEN_PREFIX: &str = "/grpc.health.v1.Health/";

/// A client interceptor for every internal call: the caller's remaining deadline
/// ([`crate::deadline::propagate`]) and, when the cluster has a secret, its credential.
#[derive(Debug, Clone, Default)]
pub struct Outgoing {
    credential: Option<AsciiMetadataValue>,
}

impl Outgoing {
    pub fn new(secret: Option<&ClusterSecret>) -> Result<Self> {
        let credential = secret
            .map(|secret| {
                secret
                    .call_credential()
                    .parse()
                    .map_err(|_| Error::internal("a hex credential is valid metadata"))
            })
            .transpose()?;
        Ok(Self { credential })
    }
}

impl engram_proto::tonic::service::Interceptor for Outgoing {
    fn call(&mut self, request: Request<()>) -> std::result::Result<Request<()>, Status> {
        let mut request = crate::deadline::propagate(request)?;
        if let Some(credential) = &self.credential {
            request.metadata_mut().insert(HEADER, credential.clone());
        }
        Ok(request)
    }
}

/// Server layer of an internal port: refuses (UNAUTHENTICATED) every call but a health check
/// that does not carry the cluster's credential.
#[derive(Debug, Clone)]
pub struct ClusterAuthLayer {
    credential: Option<std::sync::Arc<[u8]>>,
}

impl ClusterAuthLayer {
    /// `None`: every call passes (a port that serves public callers, or a cluster without a
    /// secret in one test process).
    pub fn new(secret: Option<&ClusterSecret>) -> Self {
        Self {
            credential: secret.map(|s| s.call_credential().into_bytes().into()),
        }
    }
}

impl<S> tower::Layer<S> for ClusterAuthLayer {
    type Service = ClusterAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ClusterAuth {
            inner,
            credential: self.credential.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ClusterAuth<S> {
    inner: S,
    credential: Option<std::sync::Arc<[u8]>>,
}

impl<S> ClusterAuth<S> {
    fn admits<B>(&self, request: &http::Request<B>) -> bool {
        let Some(expected) = &self.credential else {
            return true;
        };
        request.uri().path().starts_with(OPEN_PREFIX)
            || request.headers().get(HEADER).is_some_and(|sent| {
                engram_domain::secret::constant_time_eq(sent.as_bytes(), expected)
            })
    }
}

impl<S> tower::Service<http::Request<Body>> for ClusterAuth<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = std::result::Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if self.admits(&request) {
            return Box::pin(self.inner.call(request));
        }
        let refused = Status::unauthenticated(
            "an internal engram port: calls need the cluster's credential (every service must share ENGRAM_CLUSTER_SECRET)",
        );
        Box::pin(std::future::ready(Ok(refused.into_http())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use engram_proto::tonic::service::Interceptor as _;

    fn secret(s: &str) -> ClusterSecret {
        format!("{s:0<32}").parse().unwrap()
    }

    #[test]
    fn only_calls_carrying_this_cluster_s_credential_pass() {
        let ours = secret("ours");
        let layer = ClusterAuthLayer::new(Some(&ours));
        let auth = tower::Layer::layer(&layer, ());
        let call = |path: &str, sent: Option<&ClusterSecret>| {
            let mut outgoing = Outgoing::new(sent).unwrap();
            let request = outgoing.call(Request::new(())).unwrap();
            let mut http = http::Request::builder().uri(path);
            for (name, value) in request.metadata().clone().into_headers().iter() {
                http = http.header(name, value);
            }
            auth.admits(&http.body(()).unwrap())
        };
        let method = "/engram.internal.v1.Index/Search";
        assert!(call(method, Some(&ours)));
        assert!(!call(method, None));
        assert!(!call(method, Some(&secret("theirs"))));
        assert!(!call(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            None
        ));
        assert!(call("/grpc.health.v1.Health/Check", None));
        let open = tower::Layer::layer(&ClusterAuthLayer::new(None), ());
        assert!(open.admits(&http::Request::builder().uri(method).body(()).unwrap()));
    }
}
