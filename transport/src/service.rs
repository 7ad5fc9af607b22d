//! The seam the gateway and the roles plug into: one request in, one response out, per stream.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use super::Peer;

/// A boxed, sendable future (what `futures::future::BoxFuture` is, without the dependency).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a service could not answer. The box sees a stream reset with
/// [`AppCode::ServiceFailed`](super::AppCode::ServiceFailed); refusals a box should read (an
/// unknown merchant, a bad amount) belong in the response payload instead.
pub type ServiceError = Box<dyn std::error::Error + Send + Sync>;

/// Answers one request from an authenticated peer.
pub trait Service: Send + Sync + 'static {
    fn call(
        &self,
        peer: Arc<Peer>,
        request: Vec<u8>,
    ) -> BoxFuture<'_, Result<Vec<u8>, ServiceError>>;
}

/// Any `Fn(peer, request) -> future` is a service.
impl<F, Fut> Service for F
where
    F: Fn(Arc<Peer>, Vec<u8>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<u8>, ServiceError>> + Send + 'static,
{
    fn call(
        &self,
        peer: Arc<Peer>,
        request: Vec<u8>,
    ) -> BoxFuture<'_, Result<Vec<u8>, ServiceError>> {
        Box::pin(self(peer, request))
    }
}
