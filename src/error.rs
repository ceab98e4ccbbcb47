//! The crate-level error: every module's error, converted at the module boundary, with the
//! predicates callers match on.

use std::time::Duration;

use crate::connector::{ConnectorError, ErrorKind};
use crate::engine::EngineError;
use crate::rules::ruleset::RuleErrors;
use crate::state::StateError;

/// Any error of this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A connector failed.
    #[error(transparent)]
    Connector(#[from] ConnectorError),
    /// The state store failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// Rules did not compile.
    #[error(transparent)]
    Rules(#[from] RuleErrors),
    /// A run could not do what was asked.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl Error {
    /// The connector error inside, if any (directly or through the engine).
    pub fn connector(&self) -> Option<&ConnectorError> {
        match self {
            Error::Connector(e) | Error::Engine(EngineError::Connector(e)) => Some(e),
            _ => None,
        }
    }

    /// The kind of connector failure, if this is one.
    pub fn kind(&self) -> Option<ErrorKind> {
        self.connector().map(ConnectorError::kind)
    }

    /// Whether retrying later may succeed.
    pub fn is_retryable(&self) -> bool {
        self.connector().is_some_and(ConnectorError::is_retryable)
    }

    /// Whether a server asked to slow down.
    pub fn is_throttled(&self) -> bool {
        self.connector().is_some_and(ConnectorError::is_throttled)
    }

    /// How long a server asked to wait, if it said.
    pub fn retry_after(&self) -> Option<Duration> {
        self.connector().and_then(ConnectorError::retry_after)
    }

    /// The object (anchor, id or DN) the error concerns, if known.
    pub fn object(&self) -> Option<&str> {
        self.connector().and_then(ConnectorError::object)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predicates_see_through_the_engine() {
        let e: Error = EngineError::Connector(
            ConnectorError::new(ErrorKind::Throttled, "slow down")
                .with_retry_after(Duration::from_secs(2))
                .with_object("u1"),
        )
        .into();
        assert!(e.is_retryable() && e.is_throttled());
        assert_eq!(e.retry_after(), Some(Duration::from_secs(2)));
        assert_eq!(e.object(), Some("u1"));
        assert_eq!(e.kind(), Some(ErrorKind::Throttled));
        let r: Error = EngineError::UnknownObject("x".into()).into();
        assert!(!r.is_retryable() && r.kind().is_none());
    }
}
