//! Unix modes of the files kiln keeps secrets in: the state directory
//! next to a profile, the cluster CA set inside it, and the files the user
//! asks for (kubeconfig, an operator's wg-quick file).

/// A directory that holds secrets: its owner only.
pub const STATE_DIR_MODE: u32 = 0o700;
/// A file that holds a secret: its owner reads and writes it, nobody else.
pub const SECRET_FILE_MODE: u32 = 0o600;
