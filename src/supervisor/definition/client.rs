//! What a client may ask for: device launchers, ids and arguments, checked before anything is built from them,
//! and the program a definition runs, resolved once to an absolute path.

use std::path::{Path, PathBuf};

use super::*;
use crate::supervisor::error::ClientCommandError;

/// `cgse` sub-commands a client may never name, whatever the entry points say: the core services, the
/// registry, administration and the CLI's own commands. Only device launchers may be run for a client.
pub const NEVER_LAUNCHERS: &[&str] = &[
    "core", "reg", "log", "nh", "cm", "sm", "pm", "mh", "admin", "init", "show", "top", "check", "clock", "version",
    "explore", "dev-x",
];

/// Longest client-supplied device id or argument.
pub const MAX_CLIENT_TOKEN: usize = 128;

/// Most `device_args` a client may send.
pub const MAX_CLIENT_ARGS: usize = 32;

/// The device launchers a client's `cgse_cmd` may name: `<program> <sub-command>`, where the sub-command is a
/// registered `cgse.service.device_command` entry point of the configured Python (what the PM GUI derives
/// its `cgse_cmd` from) or listed in the table's `device_commands`, and never one of [`NEVER_LAUNCHERS`] or
/// a name another `cgse` command group registers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Launchers {
    /// Permitted sub-commands.
    pub permitted: std::collections::BTreeSet<String>,
    /// Where they came from, for error messages.
    pub source: String,
    /// The `PATH` the launcher program is resolved with; `None`: the daemon's.
    pub search_path: Option<String>,
}

impl Launchers {
    /// The table's explicit list plus the entry points (`device`), minus every name in `other` (the
    /// entry points of the other `cgse` command groups) and in [`NEVER_LAUNCHERS`].
    pub fn new(table: &[String], device: &[String], other: &[String], source: String) -> Launchers {
        let permitted = table
            .iter()
            .chain(device)
            .filter(|n| is_plain_token(n) && !NEVER_LAUNCHERS.contains(&n.as_str()) && !other.contains(n))
            .cloned()
            .collect();
        Launchers {
            permitted,
            source,
            search_path: None,
        }
    }
}

pub(super) fn is_plain_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_CLIENT_TOKEN
        && !s.starts_with('-')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '@' | '+' | ','))
}

/// Validates one client-supplied device argument: at most [`MAX_CLIENT_TOKEN`] characters of
/// `A-Z a-z 0-9 _ - . : @ + ,`, not starting with `-` (no option injection into a launcher).
///
/// # Errors
/// [`ClientCommandError::BadArgument`] naming the argument.
pub fn validate_client_arg(arg: &str) -> Result<(), ClientCommandError> {
    if is_plain_token(arg) {
        Ok(())
    } else {
        Err(ClientCommandError::BadArgument {
            argument: arg.chars().take(MAX_CLIENT_TOKEN + 8).collect(),
        })
    }
}

/// Validates a device id a client wants a new definition for: the same rule as [`validate_client_arg`].
///
/// # Errors
/// [`ClientCommandError::BadArgument`].
pub fn validate_client_id(id: &str) -> Result<(), ClientCommandError> {
    validate_client_arg(id)
}

/// A program that cannot be found where the child would look for it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProgramError {
    /// `argv[0]` is empty.
    #[error("empty program name")]
    Empty,
    /// No executable of that name in the absolute `PATH` directories.
    #[error(
        "{program:?} not found in the absolute PATH directories [{}] (empty and relative PATH elements are ignored)",
        dirs.join(", ")
    )]
    NotFound {
        /// The bare name.
        program: String,
        /// The directories searched.
        dirs: Vec<String>,
    },
}

/// Resolves a bare program name to an absolute path through `path` (a `PATH` value), skipping empty and
/// relative elements (an empty element would mean the daemon's working directory). A name with a `/` is
/// returned as it is. `None` for `path` searches `/usr/local/bin:/usr/bin:/bin`.
///
/// # Errors
/// [`ProgramError`], naming the program and the directories searched.
pub fn resolve_program_in(program: &str, path: Option<&str>) -> Result<PathBuf, ProgramError> {
    use std::os::unix::fs::PermissionsExt;
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    if program.is_empty() {
        return Err(ProgramError::Empty);
    }
    let path = path.unwrap_or("/usr/local/bin:/usr/bin:/bin");
    let dirs: Vec<&str> = path.split(':').filter(|d| d.starts_with('/')).collect();
    for dir in &dirs {
        let candidate = Path::new(dir).join(program);
        if let Ok(m) = std::fs::metadata(&candidate) {
            if m.is_file() && m.permissions().mode() & 0o111 != 0 {
                return Ok(candidate);
            }
        }
    }
    Err(ProgramError::NotFound {
        program: program.to_owned(),
        dirs: dirs.iter().map(|d| (*d).to_owned()).collect(),
    })
}

/// [`resolve_program_in`] with the `PATH` the child will have: the definition's `env.PATH`, else the
/// daemon's (when the environment is inherited).
///
/// # Errors
/// As [`resolve_program_in`].
pub fn resolve_program(program: &str, def: &ProcessDefinition) -> Result<PathBuf, ProgramError> {
    let own = std::env::var("PATH").ok();
    let path = match def.env.get("PATH") {
        Some(p) => Some(p.as_str()),
        None if def.inherit_env => own.as_deref(),
        None => None,
    };
    resolve_program_in(program, path)
}

/// Strips the Setup's `class//` directive: `class//egse.dummy.DummyProxy` → `egse.dummy.DummyProxy`.
pub fn class_path(device: &str) -> &str {
    device.strip_prefix("class//").unwrap_or(device).trim()
}

/// Characters refused in client-supplied commands: everything a POSIX shell gives a meaning to. No shell is
/// ever run, so this only keeps the legacy CLIs from seeing surprising input.
pub(super) fn is_metacharacter(c: char) -> bool {
    matches!(
        c,
        ';' | '|'
            | '&'
            | '$'
            | '`'
            | '('
            | ')'
            | '<'
            | '>'
            | '\''
            | '"'
            | '\\'
            | '*'
            | '?'
            | '['
            | ']'
            | '{'
            | '}'
            | '~'
            | '#'
            | '!'
            | '='
    ) || (c.is_control() && c != ' ')
}

/// Validates a client-supplied command string such as `cgse puna` and splits it on whitespace.
///
/// Refuses every shell metacharacter (`; | & $ \` ( ) < > ' " \ * ? [ ] { } ~ # ! =` and control characters,
/// which covers `$(…)`, backticks, pipes, `&&` and newlines) and any program that is not on `allowed`.
///
/// # Errors
/// [`ClientCommandError`], naming the allow-list when the program is refused.
pub fn validate_cgse_cmd(cmd: &str, allowed: &[String]) -> Result<Vec<String>, ClientCommandError> {
    if let Some(character) = cmd.chars().find(|c| is_metacharacter(*c) && !matches!(c, '\t')) {
        return Err(ClientCommandError::Metacharacter {
            command: cmd.to_owned(),
            character,
        });
    }
    let words: Vec<String> = cmd.split_whitespace().map(str::to_owned).collect();
    let Some(program) = words.first() else {
        return Err(ClientCommandError::Empty);
    };
    if !allowed.iter().any(|a| a == program) {
        return Err(ClientCommandError::NotAllowed {
            command: cmd.to_owned(),
            program: program.clone(),
            allowed: allowed.to_vec(),
        });
    }
    Ok(words)
}

/// Validates a client's `device_args`: at most [`MAX_CLIENT_ARGS`], each per [`validate_client_arg`].
///
/// # Errors
/// [`ClientCommandError::BadArgument`] or [`ClientCommandError::TooManyArguments`].
pub fn validate_client_args(args: &[String]) -> Result<(), ClientCommandError> {
    if args.len() > MAX_CLIENT_ARGS {
        return Err(ClientCommandError::TooManyArguments {
            count: args.len(),
            max: MAX_CLIENT_ARGS,
        });
    }
    args.iter().try_for_each(|a| validate_client_arg(a))
}

/// Validates a client's `cgse_cmd` as a device launcher: [`validate_cgse_cmd`] (no shell metacharacter, an
/// allowed program), then exactly one more word, a permitted launcher of `launchers`.
///
/// # Errors
/// [`ClientCommandError`], naming the permitted launchers when the sub-command is refused.
pub fn validate_launcher(
    cmd: &str,
    allowed: &[String],
    launchers: &Launchers,
) -> Result<Vec<String>, ClientCommandError> {
    let words = validate_cgse_cmd(cmd, allowed)?;
    let refused = || ClientCommandError::NotALauncher {
        command: cmd.to_owned(),
        permitted: launchers.permitted.iter().cloned().collect(),
        source_: launchers.source.clone(),
    };
    match words.as_slice() {
        [_, sub] if launchers.permitted.contains(sub) && !NEVER_LAUNCHERS.contains(&sub.as_str()) => Ok(words),
        _ => Err(refused()),
    }
}
