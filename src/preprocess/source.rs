//! Where a model's tokenizer and configs come from: built in, a local directory, or the Hugging
//! Face hub (local cache first, then a download unless offline).
//!
//! Invariant: loading reads files once at start-up and never touches the network when the files
//! are already cached or `HF_HUB_OFFLINE` is set; every failure names what was looked for, where,
//! and how to fix it. Functions here are called once per model at start-up on one thread; the
//! environment is read only in [`HubSettings::from_env`] so the rest is testable with explicit
//! paths.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::error::PreprocessError;

/// Files a model directory may hold; only `tokenizer.json` is required.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
const OPTIONAL_FILES: [&str; 4] =
    ["tokenizer_config.json", "chat_template.jinja", "config.json", "generation_config.json"];

/// Where the model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// The byte-level tokenizer built into kvgate; no files, no network.
    Builtin,
    /// A local directory holding `tokenizer.json` and optional configs.
    Dir(PathBuf),
    /// A Hugging Face hub repo id such as `Qwen/Qwen3-0.6B`.
    Hub(String),
}

impl ModelSource {
    /// An existing directory → `Dir`; an `org/name`-shaped id that is not a local path → `Hub`;
    /// `None` or empty → `Builtin`; anything else → `Dir` (loading then reports it missing).
    pub fn parse(model_path: Option<&str>) -> ModelSource {
        let Some(p) = model_path.map(str::trim).filter(|p| !p.is_empty()) else {
            return ModelSource::Builtin;
        };
        let path = Path::new(p);
        if path.exists() || !looks_like_repo_id(p) {
            return ModelSource::Dir(path.to_path_buf());
        }
        ModelSource::Hub(p.to_string())
    }
}

/// `org/name` with HF's allowed characters, not starting like a path.
fn looks_like_repo_id(s: &str) -> bool {
    let valid = |part: &str| {
        !part.is_empty()
            && !part.starts_with(['.', '-'])
            && part.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    match s.split_once('/') {
        Some((org, name)) => valid(org) && valid(name) && !name.contains('/'),
        None => false,
    }
}

/// The contents of a model directory, parsed.
#[derive(Debug, Default)]
pub struct ModelFiles {
    /// The directory the files were read from (a cache snapshot for hub models).
    pub dir: PathBuf,
    pub tokenizer_json: PathBuf,
    pub tokenizer_config: Option<Value>,
    /// `chat_template.jinja`, which takes precedence over `tokenizer_config.json`'s template.
    pub chat_template_file: Option<String>,
    pub config: Option<Value>,
    pub generation_config: Option<Value>,
}

/// Reads a model directory.
pub fn read_dir(dir: &Path) -> Result<ModelFiles, PreprocessError> {
    if !dir.is_dir() {
        return Err(PreprocessError::ModelDirNotFound(dir.to_path_buf()));
    }
    let tokenizer_json = dir.join(TOKENIZER_FILE);
    if !tokenizer_json.is_file() {
        return Err(PreprocessError::MissingTokenizer(dir.to_path_buf()));
    }
    Ok(ModelFiles {
        dir: dir.to_path_buf(),
        tokenizer_json,
        tokenizer_config: read_json(&dir.join("tokenizer_config.json"))?,
        chat_template_file: read_text(&dir.join("chat_template.jinja"))?,
        config: read_json(&dir.join("config.json"))?,
        generation_config: read_json(&dir.join("generation_config.json"))?,
    })
}

fn read_text(path: &Path) -> Result<Option<String>, PreprocessError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(PreprocessError::Io { path: path.to_path_buf(), source }),
    }
}

fn read_json(path: &Path) -> Result<Option<Value>, PreprocessError> {
    let Some(text) = read_text(path)? else {
        return Ok(None);
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| PreprocessError::BadJson { path: path.to_path_buf(), source })
}

/// How to reach the hub: the cache root and whether the network may be used.
#[derive(Debug, Clone)]
pub struct HubSettings {
    /// The hub cache root (holds `models--org--name/`).
    pub cache_dir: PathBuf,
    /// Why downloading is disabled (`Some("HF_HUB_OFFLINE=1")`), if it is.
    pub offline: Option<String>,
    pub endpoint: Option<String>,
    pub token: Option<String>,
}

impl HubSettings {
    /// `HF_HUB_CACHE`, else `HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else
    /// `~/.cache/huggingface/hub`; `HF_HUB_OFFLINE` / `TRANSFORMERS_OFFLINE`, `HF_ENDPOINT`,
    /// `HF_TOKEN`.
    pub fn from_env() -> HubSettings {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let cache_dir = var("HF_HUB_CACHE")
            .map(PathBuf::from)
            .or_else(|| var("HF_HOME").map(|h| Path::new(&h).join("hub")))
            .or_else(|| var("XDG_CACHE_HOME").map(|c| Path::new(&c).join("huggingface").join("hub")))
            .or_else(|| var("HOME").map(|h| Path::new(&h).join(".cache").join("huggingface").join("hub")))
            .unwrap_or_else(|| PathBuf::from(".cache/huggingface/hub"));
        let truthy = |v: &str| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on");
        let offline = ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"]
            .into_iter()
            .find_map(|k| var(k).filter(|v| truthy(v)).map(|v| format!("{k}={v}")));
        HubSettings { cache_dir, offline, endpoint: var("HF_ENDPOINT"), token: var("HF_TOKEN") }
    }
}

/// Resolves a hub repo to a local snapshot directory: the cache first, then a download of the
/// files kvgate reads (unless offline).
pub fn resolve_hub(repo: &str, settings: &HubSettings) -> Result<PathBuf, PreprocessError> {
    if let Some(dir) = cached_snapshot(repo, &settings.cache_dir) {
        tracing::info!(repo, dir = %dir.display(), "model found in the Hugging Face cache");
        return Ok(dir);
    }
    if let Some(reason) = &settings.offline {
        return Err(PreprocessError::ModelNotCached {
            repo: repo.to_string(),
            cache_dir: settings.cache_dir.clone(),
            reason: reason.clone(),
        });
    }
    download(repo, settings)
}

/// The snapshot directory of `repo` in the cache rooted at `cache_dir` (via `refs/main`), if it
/// holds `tokenizer.json`.
pub fn cached_snapshot(repo: &str, cache_dir: &Path) -> Option<PathBuf> {
    let cache = hf_hub::Cache::new(cache_dir.to_path_buf());
    let tokenizer = cache.model(repo.to_string()).get(TOKENIZER_FILE)?;
    tokenizer.parent().map(Path::to_path_buf)
}

fn download(repo: &str, settings: &HubSettings) -> Result<PathBuf, PreprocessError> {
    use hf_hub::api::sync::ApiBuilder;
    let fail = |file: &str, source| PreprocessError::Download {
        repo: repo.to_string(),
        file: file.to_string(),
        cache_dir: settings.cache_dir.clone(),
        source: Box::new(source),
    };
    let mut builder = ApiBuilder::from_cache(hf_hub::Cache::new(settings.cache_dir.clone())).with_progress(false);
    if let Some(endpoint) = &settings.endpoint {
        builder = builder.with_endpoint(endpoint.clone());
    }
    if settings.token.is_some() {
        builder = builder.with_token(settings.token.clone());
    }
    let api = builder.build().map_err(|e| fail(TOKENIZER_FILE, e))?;
    let hub = api.model(repo.to_string());
    tracing::info!(repo, cache = %settings.cache_dir.display(), "downloading the tokenizer and configs from the Hugging Face hub");
    let tokenizer = hub.get(TOKENIZER_FILE).map_err(|e| fail(TOKENIZER_FILE, e))?;
    for file in OPTIONAL_FILES {
        // Optional files are often absent (404); a missing one is not an error.
        if let Err(e) = hub.get(file) {
            tracing::debug!(repo, file, error = %e, "optional model file not downloaded");
        }
    }
    let dir = tokenizer.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_sources() {
        assert_eq!(ModelSource::parse(None), ModelSource::Builtin);
        assert_eq!(ModelSource::parse(Some(" ")), ModelSource::Builtin);
        let here = env!("CARGO_MANIFEST_DIR");
        assert_eq!(ModelSource::parse(Some(here)), ModelSource::Dir(here.into()));
        assert_eq!(ModelSource::parse(Some("Qwen/Qwen3-0.6B")), ModelSource::Hub("Qwen/Qwen3-0.6B".into()));
        assert_eq!(ModelSource::parse(Some("./nope/x")), ModelSource::Dir("./nope/x".into()));
        assert_eq!(ModelSource::parse(Some("/abs/missing")), ModelSource::Dir("/abs/missing".into()));
        assert_eq!(ModelSource::parse(Some("a/b/c")), ModelSource::Dir("a/b/c".into()));
    }

    #[test]
    fn missing_dir_and_tokenizer() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(matches!(read_dir(&tmp.path().join("x")), Err(PreprocessError::ModelDirNotFound(_))));
        assert!(matches!(read_dir(tmp.path()), Err(PreprocessError::MissingTokenizer(_))));
    }

    #[test]
    fn hub_cache_lookup_and_offline_error() {
        let Some(model) = super::super::tests::qwen_dir() else {
            return;
        };
        let cache = tempfile::tempdir().unwrap();
        let settings = HubSettings {
            cache_dir: cache.path().to_path_buf(),
            offline: Some("HF_HUB_OFFLINE=1".into()),
            endpoint: None,
            token: None,
        };

        let err = resolve_hub("Qwen/Qwen3-0.6B", &settings).unwrap_err();
        let msg = err.to_string();
        assert!(!err.is_client_error());
        assert!(msg.contains(&cache.path().display().to_string()) && msg.contains("models--Qwen--Qwen3-0.6B"), "{msg}");
        assert!(msg.contains("HF_HUB_OFFLINE") && msg.contains("--model-path"), "{msg}");

        // Lay out the cache as huggingface_hub does: refs/main → snapshots/<rev>/files.
        let rev = "c1899de289a04d12100db370d81485cdf75e47ca";
        let repo_dir = cache.path().join("models--Qwen--Qwen3-0.6B");
        let snap = repo_dir.join("snapshots").join(rev);
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
        std::fs::write(repo_dir.join("refs").join("main"), rev).unwrap();
        for f in std::iter::once(TOKENIZER_FILE).chain(OPTIONAL_FILES) {
            std::os::unix::fs::symlink(model.join(f), snap.join(f)).unwrap();
        }
        assert_eq!(cached_snapshot("Qwen/Qwen3-0.6B", cache.path()), Some(snap.clone()));
        assert_eq!(cached_snapshot("Qwen/Other", cache.path()), None);
        assert_eq!(resolve_hub("Qwen/Qwen3-0.6B", &settings).unwrap(), snap);
        let files = read_dir(&snap).unwrap();
        assert!(files.chat_template_file.is_some() && files.generation_config.is_some());
    }
}
