//! The flags that say how `--data` becomes the model's inputs, shared by every command that
//! reads data: resizing and cropping, CIFAR-100's label set, and the normalisation. They
//! become a [`DataOptions`], which does the work.

use crate::data::{self, CropSize};
use crate::driver::DataOptions;

#[derive(clap::Args, Debug, Clone, Default, PartialEq)]
#[command(next_help_heading = "Data")]
pub struct DataFlags {
    /// Resize every image so that its shorter side has N pixels (bilinear), before
    /// --center-crop: for models trained on larger images than the data's
    #[arg(long, value_name = "N", value_parser = parse_positive)]
    pub resize: Option<usize>,
    /// Keep the central N (or HxW) pixels of every image, after --resize
    #[arg(long, value_name = "N|HxW", value_parser = CropSize::parse)]
    pub center_crop: Option<CropSize>,
    /// CIFAR-100 binaries: score against the 20 coarse labels instead of the 100 fine ones
    #[arg(long)]
    pub coarse_labels: bool,
    /// Pixel scale (x = (pixel * scale - mean) / std) [default: the model's metadata, else
    /// 1/255]. A model that states no normalisation (no metadata, none in its graph) needs
    /// --mean/--std or --raw-pixels to be measured
    #[arg(long, value_name = "F", value_parser = parse_finite, allow_hyphen_values = true)]
    pub scale: Option<f32>,
    /// Mean subtracted after scaling: one value, or one per channel (a,b,c)
    #[arg(long, value_name = "A[,B,C]", value_parser = data::parse_floats, allow_hyphen_values = true)]
    pub mean: Option<::std::vec::Vec<f32>>,
    /// Standard deviation divided by: one value, or one per channel (a,b,c)
    #[arg(long, value_name = "A[,B,C]", value_parser = data::parse_floats)]
    pub std: Option<::std::vec::Vec<f32>>,
    /// The model takes pixels scaled to [0, 1] (pixel / 255, no mean or std): say so for a
    /// model that states no normalisation of its own
    #[arg(long, conflicts_with_all = ["scale", "mean", "std"])]
    pub raw_pixels: bool,
}

pub(crate) fn parse_positive(text: &str) -> std::result::Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("'{text}' is not a positive integer")),
    }
}

fn parse_finite(text: &str) -> std::result::Result<f32, String> {
    match text.trim().parse::<f32>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(format!("'{text}' is not a number")),
    }
}

impl From<&DataFlags> for DataOptions {
    fn from(f: &DataFlags) -> Self {
        DataOptions {
            resize: f.resize,
            center_crop: f.center_crop,
            coarse_labels: f.coarse_labels,
            scale: f.scale,
            mean: f.mean.clone(),
            std: f.std.clone(),
            raw_pixels: f.raw_pixels,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Wrap {
        #[command(flatten)]
        flags: DataFlags,
    }

    fn parse(args: &[&str]) -> std::result::Result<DataFlags, clap::Error> {
        Wrap::try_parse_from(std::iter::once("x").chain(args.iter().copied())).map(|w| w.flags)
    }

    #[test]
    fn flags_parse_and_describe_themselves() {
        let f =
            parse(&["--resize", "256", "--center-crop", "224", "--mean", "0.5,0.4,0.3"]).unwrap();
        assert_eq!(
            (f.resize, f.center_crop),
            (Some(256), Some(CropSize { height: 224, width: 224 }))
        );
        let f = DataOptions::from(&f);
        assert_eq!(f.describe(), "--resize 256 --center-crop 224x224 --mean 0.5,0.4,0.3");
        let fit = f.fit(&[3, 224, 224], "m.onnx");
        assert_eq!((fit.shape, fit.model.as_deref()), (Some(vec![3, 224, 224]), Some("m.onnx")));
        assert_eq!(parse(&[]).unwrap(), DataFlags::default());
        assert_eq!(DataOptions::from(&parse(&[]).unwrap()).describe(), "");
        assert!(parse(&["--raw-pixels"]).unwrap().raw_pixels);
        for bad in [
            &["--resize", "0"][..],
            &["--center-crop", "3x"],
            &["--std", "a"],
            &["--raw-pixels", "--mean", "0.5"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
