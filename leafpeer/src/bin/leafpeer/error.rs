//! Errors that choose the exit code, and the exit code of a failed command.

use std::process::ExitCode;

use vesper_leafpeer::PeerId;

/// Exit code for bad usage (EX_USAGE).
const EXIT_USAGE: u8 = 64;
/// Exit code when the thing asked for does not exist.
const EXIT_NOT_FOUND: u8 = 2;

/// Errors that choose the exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad usage: exit code 64.
    #[error("{0}")]
    Usage(String),
    /// The thing asked for does not exist: exit code 2.
    #[error("{0}")]
    NotFound(String),
}

/// The exit code for `error`: chosen by a [`CliError`] in it, else plain failure.
pub fn exit_code(error: &anyhow::Error) -> ExitCode {
    match error.downcast_ref::<CliError>() {
        Some(CliError::Usage(_)) => ExitCode::from(EXIT_USAGE),
        Some(CliError::NotFound(_)) => ExitCode::from(EXIT_NOT_FOUND),
        None => ExitCode::FAILURE,
    }
}

/// The PeerId a peer argument names; a bad one is a usage error.
pub fn parse_peer(text: &str) -> Result<PeerId, CliError> {
    text.parse()
        .map_err(|error| CliError::Usage(format!("peer {text:?}: {error}")))
}
