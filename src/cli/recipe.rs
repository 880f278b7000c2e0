//! Training recipes: a model shape and the settings to train it with, in one
//! JSON file (`configs/*.json`), found by sweeps (`docs/training/sweeps.md`).
//! The committed recipes are compiled in and named by their file stem; any
//! other file of the same keys is read from disk. A recipe only supplies
//! defaults: every flag given on the command line wins.

use std::path::Path;
use std::time::Duration;

use rosetta_moe::{ModelConfig, MoeError, Result, error::parse_json, memory};
use serde::Deserialize;

/// The recipes that ship with the binary, by name.
const BUILTIN: [(&str, &str); 2] = [
    (
        "shakespeare-90s",
        include_str!("../../configs/shakespeare-90s.json"),
    ),
    (
        "shakespeare-15min",
        include_str!("../../configs/shakespeare-15min.json"),
    ),
];

/// The recipe of the main job: `moe train` with no text, config or model given.
pub const DEFAULT: &str = "shakespeare-90s";

/// One recipe file. Keys are the `moe train` flags' names (with `_` for `-`);
/// only `about`, `model`, `batch`, `seq` and `lr` are required.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// What the recipe is for and where its choices come from.
    pub about: String,
    /// The model's shape (the keys of a `--config` file).
    pub model: ModelConfig,
    /// Steps to train (at most one of `steps` and `time`).
    #[serde(default)]
    pub steps: Option<u64>,
    /// Wall-clock budget, a humantime duration such as "15m".
    #[serde(default)]
    pub time: Option<String>,
    /// Sequences per step.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warm-up steps.
    #[serde(default)]
    pub warmup: Option<u64>,
    /// Cosine floor as a fraction of `lr`.
    #[serde(default)]
    pub min_lr_ratio: Option<f64>,
    /// AdamW weight decay.
    #[serde(default)]
    pub weight_decay: Option<f64>,
    /// Gradient-norm clipping threshold.
    #[serde(default)]
    pub grad_clip: Option<f64>,
    /// AdamW β2.
    #[serde(default)]
    pub beta2: Option<f64>,
    /// Load-balancing loss weight α.
    #[serde(default)]
    pub aux_alpha: Option<f64>,
    /// Residual dropout rate (see `moe train --dropout`).
    #[serde(default)]
    pub dropout: Option<f64>,
}

impl Recipe {
    /// A built-in recipe by name, or else a recipe file.
    pub fn load(spec: &str) -> Result<(String, Recipe)> {
        if let Some((name, text)) = BUILTIN.iter().find(|(name, _)| *name == spec) {
            let recipe = Self::parse(text, Path::new(name))?;
            return Ok((name.to_string(), recipe));
        }
        let path = Path::new(spec);
        if !path.exists() {
            let names: Vec<&str> = BUILTIN.iter().map(|(name, _)| *name).collect();
            return Err(MoeError::InvalidConfig(format!(
                "unknown recipe {spec:?} (expected one of {names:?} or a JSON file)"
            )));
        }
        let recipe = Self::parse(&memory::read_text(path)?, path)?;
        Ok((path.display().to_string(), recipe))
    }

    /// Parses and checks a recipe: its model validates and it names at most
    /// one of `steps` and `time`.
    fn parse(text: &str, path: &Path) -> Result<Recipe> {
        let recipe: Recipe = parse_json(text, path)?;
        recipe.model.validate()?;
        if recipe.steps.is_some() && recipe.time.is_some() {
            return Err(MoeError::InvalidConfig(format!(
                "recipe {}: give steps or time, not both",
                path.display()
            )));
        }
        recipe.budget()?;
        Ok(recipe)
    }

    /// The recipe's `time`, parsed.
    pub fn budget(&self) -> Result<Option<Duration>> {
        self.time
            .as_deref()
            .map(|text| {
                super::train::parse_budget(text)
                    .map_err(|e| MoeError::InvalidConfig(format!("recipe time {text:?}: {e}")))
            })
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_recipe_parses_and_names_steps_or_time() {
        for (name, _) in BUILTIN {
            let (_, recipe) = Recipe::load(name).unwrap();
            assert!(recipe.steps.is_some() != recipe.time.is_some(), "{name}");
            assert!(recipe.seq <= recipe.model.max_seq_len, "{name}");
        }
    }

    #[test]
    fn a_recipe_with_both_steps_and_time_is_refused() {
        let (_, recipe) = Recipe::load(DEFAULT).unwrap();
        let mut value: serde_json::Value = serde_json::from_str(BUILTIN[0].1).expect("valid JSON");
        value["steps"] = 10.into();
        value["time"] = "1m".into();
        let err = Recipe::parse(&value.to_string(), Path::new("x.json")).unwrap_err();
        assert!(err.to_string().contains("not both"), "{err}");
        value["time"] = "soon".into();
        value.as_object_mut().unwrap().remove("steps");
        let err = Recipe::parse(&value.to_string(), Path::new("x.json")).unwrap_err();
        assert!(err.to_string().contains("recipe time"), "{err}");
        assert!(Recipe::load("no-such-recipe").is_err());
        assert!(recipe.lr > 0.0);
    }
}
