//! The kernel tuner's cache file: timed choices kept across runs, per adapter.
//!
//! A text file, one choice a line after a header line:
//!
//! ```text
//! kiln tune cache 1
//! <adapter key> TAB <family kernel> TAB <class: four numbers> TAB <chosen kernel>
//! ```
//!
//! The adapter key names the adapter, its driver and kiln's version, so a choice is never read
//! on another adapter, driver or release. Lines of other adapters are kept as they are when the
//! file is rewritten. Kernels are named by their WGSL entry points. A remembered choice is
//! used only where it is one of the candidates of its problem (`src/ops/tune.rs`), so a stale or
//! edited file can slow kiln down, and change results only in rounding (candidates sum in
//! different orders), never use a kernel that does not fit. The file is read only in the timed
//! mode: `KILN_AUTOTUNE=0` and `=check` start from the heuristics.

use std::collections::HashMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::kernels::Kernel;

const HEADER: &str = "kiln tune cache 1";
const OP: &str = "tune cache";
/// Larger files are refused unread.
const MAX_BYTES: u64 = 16 << 20;

/// Choices by (family, class).
pub(crate) type Choices = HashMap<(Kernel, [u8; 4]), Kernel>;

/// The key of an adapter's lines: name, backend, driver, ids, the features kiln enabled and
/// kiln's version, with tabs
/// and line breaks blanked.
pub(crate) fn adapter_key(info: &wgpu::AdapterInfo, features: wgpu::Features) -> String {
    format!(
        "{}|{:?}|{}|{}|{:x}|{:x}|{:?}|kiln {}",
        info.name,
        info.backend,
        info.driver,
        info.driver_info,
        info.vendor,
        info.device,
        features,
        env!("CARGO_PKG_VERSION")
    )
    .replace(['\t', '\n', '\r'], " ")
}

fn kernel(name: &str) -> Option<Kernel> {
    Kernel::ALL.iter().copied().find(|k| k.entry() == name)
}

/// The parsed file: this adapter's choices and the other adapters' lines.
pub(crate) struct CacheFile {
    pub choices: Choices,
    pub others: Vec<String>,
}

/// Parses `text` for the adapter `key`; `Err` names the line that is not a cache line.
pub(crate) fn parse(path: &Path, text: &str, key: &str) -> Result<CacheFile> {
    let bad = |line: usize, why: &str| {
        Error::invalid(OP, format!("{} line {line}: {why}", path.display()))
    };
    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        return Err(bad(1, &format!("the first line is not \"{HEADER}\"")));
    }
    let mut out = CacheFile {
        choices: HashMap::new(),
        others: Vec::new(),
    };
    for (i, line) in lines.enumerate() {
        let n = i + 2;
        let fields: Vec<&str> = line.split('\t').collect();
        let [adapter, family, class, choice] = fields[..] else {
            return Err(bad(n, &format!("{} fields, not 4", fields.len())));
        };
        if adapter != key {
            out.others.push(line.to_string());
            continue;
        }
        let parts: Vec<&str> = class.split(' ').collect();
        let class: Option<Vec<u8>> = parts.iter().map(|p| p.parse::<u8>().ok()).collect();
        let Some(Ok(class)) = class.map(<[u8; 4]>::try_from) else {
            return Err(bad(
                n,
                &format!("class {parts:?} is not four numbers of 0..=255"),
            ));
        };
        let (Some(family), Some(choice)) = (kernel(family), kernel(choice)) else {
            return Err(bad(
                n,
                &format!("{family:?} or {choice:?} is no kernel of kiln's"),
            ));
        };
        out.choices.insert((family, class), choice);
    }
    Ok(out)
}

/// Reads the file at `path` for the adapter `key`; a missing file holds nothing.
pub(crate) fn load(path: &Path, key: &str) -> Result<CacheFile> {
    let io = |e: std::io::Error| Error::invalid(OP, format!("{}: {e}", path.display()));
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(CacheFile {
                choices: HashMap::new(),
                others: Vec::new(),
            })
        }
        Err(e) => return Err(io(e)),
        Ok(m) if m.len() > MAX_BYTES => {
            return Err(Error::invalid(
                OP,
                format!("{}: {} bytes, above {MAX_BYTES}", path.display(), m.len()),
            ))
        }
        Ok(_) => {}
    }
    let bytes = std::fs::read(path).map_err(io)?;
    let text = String::from_utf8(bytes)
        .map_err(|_| Error::invalid(OP, format!("{}: not UTF-8 text", path.display())))?;
    parse(path, &text, key)
}

/// The file's text: the other adapters' lines as they were, then this adapter's choices
/// (sorted, so that the same choices give the same file).
pub(crate) fn render(key: &str, choices: &Choices, others: &[String]) -> String {
    let mut mine: Vec<String> = choices
        .iter()
        .map(|(&(family, c), &choice)| {
            format!(
                "{key}\t{}\t{} {} {} {}\t{}",
                family.entry(),
                c[0],
                c[1],
                c[2],
                c[3],
                choice.entry()
            )
        })
        .collect();
    mine.sort();
    let mut text = String::from(HEADER);
    for line in others.iter().chain(&mine) {
        text.push('\n');
        text.push_str(line);
    }
    text.push('\n');
    text
}

/// Rewrites the file at `path` with this adapter's `choices`, keeping the other adapters'
/// lines as the file now has them (another process may have added some), through a synced
/// partial file that replaces the old one only once written whole.
pub(crate) fn save(path: &Path, key: &str, choices: &Choices) -> Result<()> {
    // A file that no longer reads as a cache is left as it is.
    let others = load(path, key)?.others;
    crate::checkpoint::write_atomic(OP, path, render(key, choices, &others).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Render, then parse: the same choices; other adapters' lines kept; bad lines an `Err`
    /// naming the line; and a mutation fuzz in which no file panics and every choice read is
    /// a kernel pair from the file's own lines.
    #[test]
    fn round_trip_errors_and_fuzz() {
        let path = Path::new("cache.txt");
        let mut choices = Choices::new();
        choices.insert((Kernel::MatmulFwd, [7, 7, 7, 1]), Kernel::MatmulReg8Fwd);
        choices.insert(
            (Kernel::MatmulVec4NnFwd, [9, 9, 9, 0x81]),
            Kernel::MatmulSg8NnFwd,
        );
        choices.insert((Kernel::Conv2dFwd, [12, 5, 6, 1]), Kernel::Conv2dTiledFwd);
        let other = "another gpu|Vulkan|x|y|1|2|kiln 0.0.0\tmatmul_fwd\t1 2 3 4\tmatmul_fwd";
        let text = render("this|key", &choices, &[other.to_string()]);
        let back = parse(path, &text, "this|key").unwrap();
        assert_eq!(back.choices, choices);
        assert_eq!(back.others, vec![other.to_string()]);
        // Another adapter reads nothing of this one's.
        assert!(parse(path, &text, "other").unwrap().choices.is_empty());

        for (bad, line) in [
            ("kiln tune cache 2\n", 1),
            (
                "kiln tune cache 1\nthis|key\tmatmul_fwd\t1 2 3\tmatmul_fwd\n",
                2,
            ),
            (
                "kiln tune cache 1\nthis|key\tmatmul_fwd\t1 2 3 300\tmatmul_fwd\n",
                2,
            ),
            (
                "kiln tune cache 1\nthis|key\tmatmul_fwd\t1 2 3 4\tno_such_kernel\n",
                2,
            ),
            ("kiln tune cache 1\n\nthis|key\tmatmul_fwd\t1 2 3 4\n", 2),
        ] {
            let e = parse(path, bad, "this|key").err().map(|e| e.to_string());
            assert!(
                e.as_deref()
                    .is_some_and(|e| e.contains(&format!("cache.txt line {line}"))),
                "{bad:?}: {e:?}"
            );
        }

        // Mutations: truncations, flipped bytes, swapped and blanked fields.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut parsed = 0;
        for _ in 0..2000 {
            let mut bytes = text.clone().into_bytes();
            match next() % 3 {
                0 => bytes.truncate(next() as usize % bytes.len()),
                1 => {
                    for _ in 0..1 + next() % 4 {
                        let i = next() as usize % bytes.len();
                        bytes[i] ^= 1 << (next() % 8);
                    }
                }
                _ => {
                    let i = next() as usize % bytes.len();
                    bytes[i] = [b'\t', b'\n', b' ', b'9'][next() as usize % 4];
                }
            }
            let Ok(s) = String::from_utf8(bytes) else {
                continue;
            };
            if let Ok(f) = parse(path, &s, "this|key") {
                parsed += 1;
                for (&(family, _), &choice) in &f.choices {
                    // A flipped byte may rename one kernel into another; the pair is then
                    // still two kernels of kiln's, which the tuner checks against its
                    // candidates before use.
                    assert!(Kernel::ALL.contains(&family) && Kernel::ALL.contains(&choice));
                }
            }
        }
        assert!(parsed > 100, "{parsed} mutated files parsed");
    }
}
