//! Liveness and readiness of one service, as seen by `/healthz`, `/readyz` and the gRPC health
//! service.

use std::sync::Arc;

use tokio::sync::watch;

/// Shared readiness state. A service starts not ready ("starting"), becomes ready once it can
/// serve, and goes not ready again when it drains or loses a dependency it cannot work without.
/// Observers (the gRPC health service) follow changes through [`Health::subscribe`].
#[derive(Debug, Clone)]
pub struct Health {
    state: Arc<watch::Sender<Readiness>>,
}

/// `Ok(())` when ready, else why not.
pub type Readiness = Result<(), String>;

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    pub fn new() -> Self {
        let (state, _) = watch::channel(Err("starting".to_string()));
        Self {
            state: Arc::new(state),
        }
    }

    pub fn set_ready(&self) {
        let _previous = self.state.send_replace(Ok(()));
    }

    pub fn set_not_ready(&self, reason: impl Into<String>) {
        let _previous = self.state.send_replace(Err(reason.into()));
    }

    pub fn readiness(&self) -> Readiness {
        self.state.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Readiness> {
        self.state.subscribe()
    }
}
