//! Pixel normalisation: `x = (pixel * scale - mean[c]) / std[c]`, from the user's flags, the
//! model's ONNX metadata, normalisation found in the graph or the data itself, and where it
//! came from: a normalisation nothing states is never used silently to measure accuracy.

use crate::error::CompileError;
use crate::ir::Model;
use anyhow::Result;
use std::fmt;

/// Model metadata keys (ONNX `metadata_props`) that carry the pixel normalisation the model was
/// trained with, as comma-separated floats.
pub const META_SCALE: &str = "relucompile.scale";
pub const META_MEAN: &str = "relucompile.mean";
pub const META_STD: &str = "relucompile.std";

/// Normalisation when neither the user nor the model says otherwise: raw 8-bit pixels to [0, 1].
pub const DEFAULT_SCALE: f32 = 1.0 / 255.0;

/// `x = (pixel * scale - mean[c]) / std[c]`; `pixel` is the raw value as stored (0..255 for IDX
/// u8). `mean` and `std` hold one value (every channel) or one per channel.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Normalisation {
    pub scale: f32,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    /// What says these are the values the model was trained with.
    pub source: NormalisationSource,
}

/// Where a normalisation comes from, in the order they are consulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NormalisationSource {
    /// `--scale`, `--mean`, `--std` (a field not given comes from the metadata, else the
    /// default).
    Flags,
    /// `--raw-pixels`: the user states the model takes pixels scaled to [0, 1].
    RawPixels,
    /// The model's `relucompile.*` metadata.
    Metadata,
    /// `Sub`/`Div` or `Mul`/`Add` by constants on the input before the first Conv: the model
    /// normalises inside and takes pixels scaled to [0, 1].
    InGraph,
    /// Float `.npy` images, saved already normalised and fed as stored.
    StoredFloats,
    /// Nothing states it: the default is a guess.
    Unknown,
}

impl NormalisationSource {
    /// The user gave the values: float `.npy` images are normalised with them too.
    pub fn explicit(self) -> bool {
        matches!(self, NormalisationSource::Flags | NormalisationSource::RawPixels)
    }

    /// Whether the values are a guess nothing states.
    pub fn is_known(self) -> bool {
        self != NormalisationSource::Unknown
    }

    /// Where the values came from, for reports.
    pub fn describe(self) -> &'static str {
        match self {
            NormalisationSource::Flags => "from --scale/--mean/--std",
            NormalisationSource::RawPixels => "from --raw-pixels (pixels scaled to [0, 1])",
            NormalisationSource::Metadata => "from the model's metadata",
            NormalisationSource::InGraph => {
                "the model normalises in its graph (Sub/Div before the first Conv): pixels \
                 scaled to [0, 1]"
            }
            NormalisationSource::StoredFloats => "float .npy images, fed as stored",
            NormalisationSource::Unknown => "assumed: nothing states the model's normalisation",
        }
    }
}

impl Default for Normalisation {
    /// Raw 8-bit pixels to [0, 1]: scale 1/255, mean 0, std 1, stated by nothing.
    fn default() -> Self {
        Normalisation {
            scale: DEFAULT_SCALE,
            mean: vec![0.0],
            std: vec![1.0],
            source: NormalisationSource::Unknown,
        }
    }
}

impl Normalisation {
    /// Values fed unchanged: float images saved already normalised.
    pub fn identity() -> Self {
        Normalisation {
            scale: 1.0,
            mean: vec![0.0],
            std: vec![1.0],
            source: NormalisationSource::StoredFloats,
        }
    }

    /// The user gave the values (flags): float `.npy` images are normalised with them too.
    pub fn explicit(&self) -> bool {
        self.source.explicit()
    }

    /// The same values, now stated by `source`.
    pub fn stated_by(self, source: NormalisationSource) -> Self {
        Normalisation { source, ..self }
    }

    /// Record these values in `model`'s metadata, so that the next command reads them without
    /// flags. Values that came from the metadata stay as written; images fed as stored and
    /// values nothing states are not recorded.
    pub fn record_in(&self, model: &mut Model) {
        use NormalisationSource::*;
        if matches!(self.source, Metadata | StoredFloats | Unknown) {
            return;
        }
        let list = |v: &[f32]| v.iter().map(|x| format!("{x}")).collect::<Vec<_>>().join(",");
        let entries = [
            (META_SCALE, format!("{}", self.scale)),
            (META_MEAN, list(&self.mean)),
            (META_STD, list(&self.std)),
        ];
        for (key, value) in entries {
            match model.metadata_props.iter_mut().find(|e| e.key == key) {
                Some(entry) => entry.value = value,
                None => model
                    .metadata_props
                    .push(tract_onnx::pb::StringStringEntryProto { key: key.into(), value }),
            }
        }
    }

    fn is_identity(&self) -> bool {
        self.scale == 1.0
            && self.mean.iter().all(|&m| m == 0.0)
            && self.std.iter().all(|&s| s == 1.0)
    }

    /// Per-channel mean and std for `channels` channels, after checking every value.
    fn per_channel(&self, channels: usize, source: &str) -> Result<(Vec<f32>, Vec<f32>)> {
        let expand = |what: &str, v: &[f32]| -> Result<Vec<f32>> {
            match v.len() {
                1 => Ok(vec![v[0]; channels]),
                n if n == channels => Ok(v.to_vec()),
                n => Err(CompileError::invalid_data(format!(
                    "the normalisation {what} has {n} values but the images in {source} have \
                     {channels} channel{}: give one value, or one per channel",
                    if channels == 1 { "" } else { "s" }
                ))
                .into()),
            }
        };
        let mean = expand("mean", &self.mean)?;
        let std = expand("std", &self.std)?;
        if !self.scale.is_finite() || mean.iter().any(|m| !m.is_finite()) {
            return Err(CompileError::invalid_data(format!(
                "the normalisation scale {} / mean {:?} must be finite numbers",
                self.scale, self.mean
            ))
            .into());
        }
        if std.iter().any(|s| !s.is_finite() || *s == 0.0) {
            return Err(CompileError::invalid_data(format!(
                "the normalisation std {:?} must be finite and non-zero",
                self.std
            ))
            .into());
        }
        Ok((mean, std))
    }

    /// Normalise `values` in place: whole samples of `channels` planes of `plane` values each.
    pub(super) fn apply(
        &self,
        values: &mut [f32],
        channels: usize,
        plane: usize,
        source: &str,
    ) -> Result<()> {
        let (mean, std) = self.per_channel(channels, source)?;
        if self.is_identity() {
            return Ok(());
        }
        for sample in values.chunks_mut(channels * plane) {
            for (c, chan) in sample.chunks_mut(plane).enumerate() {
                // Written as the formula reads (not as one fused multiply-add) so that other
                // runtimes given the same formula in float32 see bit-identical inputs.
                for v in chan {
                    *v = (*v * self.scale - mean[c]) / std[c];
                }
            }
        }
        Ok(())
    }
}

impl fmt::Display for Normalisation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |v: &[f32]| v.iter().map(|x| format!("{x}")).collect::<Vec<_>>().join(",");
        write!(f, "(pixel * {} - {}) / {}", self.scale, list(&self.mean), list(&self.std))
    }
}

/// Normalisation fields that may each be given or not (flags, model metadata).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PartialNormalisation {
    pub scale: Option<f32>,
    pub mean: Option<Vec<f32>>,
    pub std: Option<Vec<f32>>,
}

/// The normalisation a model declares in its metadata (`relucompile.scale`, `relucompile.mean`,
/// `relucompile.std`), field by field; a malformed entry is an error naming the key.
pub fn model_normalisation(model: &Model) -> Result<PartialNormalisation> {
    let get = |key: &str| -> Result<Option<Vec<f32>>> {
        let Some(entry) = model.metadata_props.iter().find(|e| e.key == key) else {
            return Ok(None);
        };
        parse_floats(&entry.value).map(Some).map_err(|e| {
            CompileError::invalid_model(format!(
                "the model's metadata entry {key} = '{}' is not a comma-separated list of \
                 numbers: {e}",
                entry.value
            ))
            .into()
        })
    };
    let scale = match get(META_SCALE)? {
        Some(v) if v.len() == 1 => Some(v[0]),
        Some(v) => {
            return Err(CompileError::invalid_model(format!(
                "the model's metadata entry {META_SCALE} holds {} values; it takes one",
                v.len()
            ))
            .into())
        }
        None => None,
    };
    Ok(PartialNormalisation { scale, mean: get(META_MEAN)?, std: get(META_STD)? })
}

/// Parse `0.5` or `0.485,0.456,0.406` (finite numbers, at least one).
pub fn parse_floats(text: &str) -> std::result::Result<Vec<f32>, String> {
    let values: std::result::Result<Vec<f32>, _> =
        text.split(',').map(|v| v.trim().parse::<f32>()).collect();
    match values {
        Ok(v) if !v.is_empty() && v.iter().all(|x| x.is_finite()) => Ok(v),
        _ => Err(format!("'{text}' is not a number or a comma-separated list of numbers")),
    }
}

/// The normalisation to use, field by field: the user's values (flags) first, then the model's
/// metadata, then the default for raw 8-bit pixels (scale 1/255, mean 0, std 1). The source is
/// the flags when any was given, else the metadata when it holds any entry, else unknown.
pub fn try_normalisation_for(
    model: &Model,
    scale: Option<f32>,
    mean: Option<&[f32]>,
    std: Option<&[f32]>,
) -> Result<Normalisation> {
    Ok(resolve(scale, mean, std, model_normalisation(model)?))
}

/// As [`try_normalisation_for`], but a malformed metadata entry is ignored (the defaults apply).
pub fn normalisation_for(
    model: &Model,
    scale: Option<f32>,
    mean: Option<&[f32]>,
    std: Option<&[f32]>,
) -> Normalisation {
    resolve(scale, mean, std, model_normalisation(model).unwrap_or_default())
}

fn resolve(
    scale: Option<f32>,
    mean: Option<&[f32]>,
    std: Option<&[f32]>,
    meta: PartialNormalisation,
) -> Normalisation {
    let default = Normalisation::default();
    let source = if scale.is_some() || mean.is_some() || std.is_some() {
        NormalisationSource::Flags
    } else if meta != PartialNormalisation::default() {
        NormalisationSource::Metadata
    } else {
        NormalisationSource::Unknown
    };
    Normalisation {
        scale: scale.or(meta.scale).unwrap_or(default.scale),
        mean: mean.map(<[f32]>::to_vec).or(meta.mean).unwrap_or(default.mean),
        std: std.map(<[f32]>::to_vec).or(meta.std).unwrap_or(default.std),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_precedence() {
        let mut model = crate::frontend::model_from_bytes(
            &std::fs::read(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/fixtures/models/tiny_ts_opset13.onnx"
            ))
            .unwrap(),
            None,
        )
        .unwrap();
        model.metadata_props.retain(|e| !e.key.starts_with("relucompile."));
        let n = try_normalisation_for(&model, None, None, None).unwrap();
        assert_eq!(n, Normalisation::default());
        let entry = |k: &str, v: &str| tract_onnx::pb::StringStringEntryProto {
            key: k.into(),
            value: v.into(),
        };
        model.metadata_props.push(entry(META_SCALE, "0.00392156862745098"));
        model.metadata_props.push(entry(META_MEAN, "0.2860"));
        model.metadata_props.push(entry(META_STD, "0.3530"));
        let n = try_normalisation_for(&model, None, None, None).unwrap();
        assert_eq!(
            (n.scale, n.mean.clone(), n.std.clone(), n.source),
            (1.0 / 255.0, vec![0.286], vec![0.353], NormalisationSource::Metadata)
        );
        let n = try_normalisation_for(&model, None, Some(&[0.5]), None).unwrap();
        assert_eq!(
            (n.scale, n.mean.clone(), n.std.clone(), n.source),
            (1.0 / 255.0, vec![0.5], vec![0.353], NormalisationSource::Flags)
        );
        // Recorded values read back as the metadata's, and overwrite what was there.
        let mut written = model.clone();
        let flags = Normalisation { scale: 0.5, mean: vec![0.1, 0.2], std: vec![3.0], ..n };
        flags.record_in(&mut written);
        let back = try_normalisation_for(&written, None, None, None).unwrap();
        assert_eq!(back, flags.clone().stated_by(NormalisationSource::Metadata));
        assert_eq!(written.metadata_props.len(), model.metadata_props.len());
        let mut unchanged = model.clone();
        Normalisation::default().record_in(&mut unchanged);
        back.record_in(&mut unchanged);
        assert_eq!(unchanged.metadata_props, model.metadata_props);
        model.metadata_props.push(entry(META_STD, "x"));
        model.metadata_props.retain(|e| e.key != META_STD || e.value == "x");
        let e = try_normalisation_for(&model, None, None, None).unwrap_err();
        assert!(format!("{e:#}").contains(META_STD), "{e:#}");
        assert_eq!(normalisation_for(&model, None, None, None), Normalisation::default());
        assert_eq!(parse_floats("0.1, 0.2,0.3").unwrap(), vec![0.1, 0.2, 0.3]);
        assert!(parse_floats("0.1,,0.3").is_err());
        assert!(parse_floats("nan").is_err());
    }
}
