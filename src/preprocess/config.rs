//! The figures of a model's `config.json` that size its KV cache.
//!
//! Invariant: a [`ModelConfig`] exists only when every figure it holds is known and non-zero;
//! parsing never panics on odd input (it returns `None` instead). Immutable plain data.

use serde_json::Value;

/// Architecture figures parsed from `config.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelConfig {
    pub num_hidden_layers: u32,
    pub num_key_value_heads: u32,
    pub head_dim: u32,
    pub dtype_bytes: u32,
    pub max_position_embeddings: Option<u32>,
}

impl ModelConfig {
    /// KV cache bytes one token occupies: K and V, per layer, per KV head, per dimension.
    pub fn kv_bytes_per_token(&self) -> u64 {
        2 * u64::from(self.num_hidden_layers)
            * u64::from(self.num_key_value_heads)
            * u64::from(self.head_dim)
            * u64::from(self.dtype_bytes)
    }

    /// Parses a `config.json` value. Multimodal configs nest the language model under
    /// `text_config`; that is used when the top level lacks `num_hidden_layers`.
    /// `head_dim` falls back to `hidden_size / num_attention_heads`, `num_key_value_heads` to
    /// `num_attention_heads`, the dtype (`torch_dtype` or `dtype`) to 2 bytes.
    pub fn from_json(config: &Value) -> Option<ModelConfig> {
        let cfg = match config.get("num_hidden_layers") {
            Some(_) => config,
            None => config.get("text_config")?,
        };
        let field = |k: &str| cfg.get(k).and_then(Value::as_u64).and_then(|v| u32::try_from(v).ok()).filter(|&v| v > 0);
        let num_hidden_layers = field("num_hidden_layers")?;
        let num_attention_heads = field("num_attention_heads");
        let num_key_value_heads = field("num_key_value_heads").or(num_attention_heads)?;
        let head_dim =
            field("head_dim").or_else(|| Some(field("hidden_size")? / num_attention_heads?)).filter(|&d| d > 0)?;
        let dtype = cfg
            .get("torch_dtype")
            .or_else(|| cfg.get("dtype"))
            .or_else(|| config.get("torch_dtype"))
            .or_else(|| config.get("dtype"))
            .and_then(Value::as_str);
        let max_position_embeddings = field("max_position_embeddings");
        Some(ModelConfig {
            num_hidden_layers,
            num_key_value_heads,
            head_dim,
            dtype_bytes: dtype.map_or(2, dtype_bytes),
            max_position_embeddings,
        })
    }
}

/// Bytes per element of a Hugging Face dtype name; unknown names count as 2 (16-bit).
fn dtype_bytes(name: &str) -> u32 {
    let name = name.trim_start_matches("torch.").to_ascii_lowercase();
    match name.as_str() {
        "float32" | "float" | "fp32" => 4,
        "float64" | "double" => 8,
        n if n.starts_with("float8") || n.starts_with("fp8") || n == "int8" || n == "uint8" => 1,
        _ => 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn qwen3_figures() {
        let c = ModelConfig::from_json(&json!({
            "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
            "head_dim": 128, "hidden_size": 1024, "torch_dtype": "bfloat16", "max_position_embeddings": 40960
        }))
        .unwrap();
        assert_eq!(c.kv_bytes_per_token(), 114_688);
        assert_eq!(c.max_position_embeddings, Some(40960));
    }

    #[test]
    fn fallbacks() {
        let c = ModelConfig::from_json(&json!({
            "text_config": {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 256},
            "dtype": "float32"
        }))
        .unwrap();
        assert_eq!((c.num_key_value_heads, c.head_dim, c.dtype_bytes), (4, 64, 4));
        assert_eq!(dtype_bytes("float8_e4m3fn"), 1);
        assert_eq!(dtype_bytes("float16"), 2);
        assert!(ModelConfig::from_json(&json!({"num_hidden_layers": 2})).is_none());
    }
}
