//! Reading a migration file: regular files only, bounded in size, UTF-8.

use std::path::Path;

use crate::error::SourceError;

/// Largest migration file kiln reads.
pub const MAX_FILE_BYTES: usize = 16 << 20;

/// Read a migration file (at most [`MAX_FILE_BYTES`]) as UTF-8 text. A
/// leading UTF-8 byte-order mark is kept (the checksum covers the file as it
/// is); the parsers skip it.
pub(super) fn read(tree: &dyn super::tree::Tree, path: &Path, rel: &Path) -> Result<String, SourceError> {
    let bytes = tree.read(path, MAX_FILE_BYTES).map_err(|e| SourceError::Read { file: rel.to_path_buf(), source: e })?;
    String::from_utf8(bytes).map_err(|e| SourceError::Parse {
        file: rel.to_path_buf(),
        line: 1 + e.as_bytes()[..e.utf8_error().valid_up_to()].iter().filter(|b| **b == b'\n').count(),
        message: "the file is not valid UTF-8".into(),
    })
}

/// Read at most `max` bytes of the file at `path`: a larger file is an error,
/// not a slow read of gigabytes (`/dev/zero` behind a symlink).
///
/// # Errors
/// The file cannot be opened or read, or it is larger than `max`.
pub fn read_bounded(path: &Path, max: usize) -> std::io::Result<Vec<u8>> {
    // A plain read loop: `fs::read` and `read_to_end` stat the file first to size
    // the buffer, one more system call per file for files that fit in 8 KiB anyway.
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut bytes = vec![0u8; 8192.min(max + 1)];
    let mut len = 0;
    loop {
        if len == bytes.len() {
            if len > max {
                return Err(std::io::Error::other(format!("larger than {}; kiln reads files up to that size", human_size(max))));
            }
            bytes.resize((len * 2).min(max + 1), 0);
        }
        let want = bytes.len() - len;
        match f.read(&mut bytes[len..]) {
            Ok(0) => break,
            // A regular file returns less than asked for only at its end (reads
            // of local files are not cut short by signals), so a short read
            // saves the system call that would return 0.
            Ok(n) if n < want => {
                len += n;
                break;
            }
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    if len > max {
        return Err(std::io::Error::other(format!("larger than {}; kiln reads files up to that size", human_size(max))));
    }
    bytes.truncate(len);
    Ok(bytes)
}

/// Read a YAML/TOML file kiln is configured with (`schema.yaml`, index
/// declarations) as text, at most [`MAX_FILE_BYTES`], without a byte-order mark.
///
/// # Errors
/// As [`read_bounded`]; text that is not UTF-8 is `InvalidData`.
pub fn read_text(path: &Path) -> std::io::Result<String> {
    let bytes = read_bounded(path, MAX_FILE_BYTES)?;
    let text = String::from_utf8(bytes).map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "the file is not valid UTF-8"))?;
    Ok(match text.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_string(),
        None => text,
    })
}

fn human_size(n: usize) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{} MiB", n >> 20)
    } else {
        format!("{n} bytes")
    }
}
