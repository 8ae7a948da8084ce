//! Fitting stored images to the model's input: resize (the short side to `--resize` pixels),
//! centre-crop (`--center-crop`), then convert channels (grey to colour by repeating the
//! plane, colour to grey by Rec. 709 luma). This is the usual ImageNet evaluation convention
//! (torchvision's `Resize(s)` + `CenterCrop(c)`): the long side becomes
//! `int(s * long / short)`, the crop's top-left corner is `round((size - crop) / 2)` (ties to
//! even, as Python rounds), and a crop larger than the image is an error (torchvision pads).
//! Resizing uses the image crate's triangle (bilinear) filter on the values as stored, in
//! floating point (not rounded back to 8 bits).

use super::{shape_text, Stored};
use crate::error::CompileError;
use anyhow::Result;
use image::imageops::{self, FilterType};
use image::{ImageBuffer, Luma};
use rayon::prelude::*;
use std::fmt;

/// Rec. 709 luma weights of R, G and B: the image crate's own grey conversion.
const LUMA: [f32; 3] = [0.2126, 0.7152, 0.0722];

/// A crop size: `N` (square) or `HxW`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropSize {
    pub height: usize,
    pub width: usize,
}

impl CropSize {
    /// Parse `224` or `224x192` (height x width), positive integers.
    pub fn parse(text: &str) -> std::result::Result<CropSize, String> {
        let dims: std::result::Result<Vec<usize>, _> =
            text.split(['x', 'X']).map(|d| d.trim().parse::<usize>()).collect();
        match dims.as_deref() {
            Ok(&[n]) if n > 0 => Ok(CropSize { height: n, width: n }),
            Ok(&[h, w]) if h > 0 && w > 0 => Ok(CropSize { height: h, width: w }),
            _ => Err(format!("'{text}' is not a crop size like 32 or 32x40 (height x width)")),
        }
    }
}

impl fmt::Display for CropSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.height, self.width)
    }
}

/// How stored images become the model's inputs, and which labels a CIFAR-100 file gives.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fit {
    /// The model's sample shape `[C, H, W]`: images are converted to its channels and must end
    /// at its size. `None` keeps the data's channels (image folders: RGB); then images must
    /// only agree with each other.
    pub shape: Option<Vec<usize>>,
    /// The model's name in messages (`model.onnx expects 3x32x32`); `None`: "the model".
    pub model: Option<String>,
    /// Resize every image so that its shorter side has this many pixels.
    pub resize: Option<usize>,
    /// Then keep this many pixels from the centre.
    pub center_crop: Option<CropSize>,
    /// CIFAR-100 binaries: the 20 coarse labels instead of the 100 fine ones.
    pub coarse_labels: bool,
}

/// What [`Fit`] does to images of one stored shape.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Plan {
    from: [usize; 3],
    /// Height and width after resizing.
    resized: (usize, usize),
    /// Top, left, height and width of the crop from the resized image.
    crop: (usize, usize, usize, usize),
    /// Channels of the result.
    channels: usize,
}

impl Fit {
    /// The model's `[C, H, W]` when it takes images.
    pub fn target(&self) -> Option<[usize; 3]> {
        match self.shape.as_deref() {
            Some(&[c, h, w]) => Some([c, h, w]),
            _ => None,
        }
    }

    fn model_name(&self) -> &str {
        self.model.as_deref().unwrap_or("the model")
    }

    fn geometry_text(&self) -> String {
        match (self.resize, self.center_crop) {
            (Some(s), Some(c)) => format!("--resize {s} --center-crop {c}"),
            (Some(s), None) => format!("--resize {s}"),
            (None, Some(c)) => format!("--center-crop {c}"),
            (None, None) => String::new(),
        }
    }

    /// The plan for images stored as `from`; `subject` starts the error messages
    /// (`images in dir are`, `dir/cat/a.png is`).
    pub(super) fn plan(&self, from: [usize; 3], subject: &str) -> Result<Plan> {
        let [c, h, w] = from;
        let resized = match self.resize {
            Some(s) if h <= w => (s, ((s * w) as f64 / h as f64) as usize),
            Some(s) => (((s * h) as f64 / w as f64) as usize, s),
            None => (h, w),
        };
        let (rh, rw) = resized;
        let crop = match self.center_crop {
            Some(cs) if cs.height > rh || cs.width > rw => {
                return Err(CompileError::invalid_data(format!(
                    "{subject} {}{}, smaller than --center-crop {cs}",
                    shape_text(&from),
                    if self.resize.is_some() {
                        format!(" ({rh}x{rw} after --resize)")
                    } else {
                        String::new()
                    }
                ))
                .into())
            }
            Some(cs) => (
                ((rh - cs.height) as f64 / 2.0).round_ties_even() as usize,
                ((rw - cs.width) as f64 / 2.0).round_ties_even() as usize,
                cs.height,
                cs.width,
            ),
            None => (0, 0, rh, rw),
        };
        let Some([tc, th, tw]) = self.target() else {
            return Ok(Plan { from, resized, crop, channels: c });
        };
        if (crop.2, crop.3) != (th, tw) {
            let geometry = self.geometry_text();
            let (after, hint) = if geometry.is_empty() {
                (String::new(), "; --resize and --center-crop fit images of another size")
            } else {
                (format!(" ({} after {geometry})", shape_text(&[c, crop.2, crop.3])), "")
            };
            return Err(CompileError::invalid_data(format!(
                "{subject} {}{after} but {} expects {}{hint}",
                shape_text(&from),
                self.model_name(),
                shape_text(&[tc, th, tw])
            ))
            .into());
        }
        if c != tc && !matches!((c, tc), (1, 3) | (3, 1)) {
            return Err(CompileError::invalid_data(format!(
                "{subject} {} but {} expects {}: only grey (1 channel) and colour (3) convert \
                 to each other",
                shape_text(&from),
                self.model_name(),
                shape_text(&[tc, th, tw])
            ))
            .into());
        }
        Ok(Plan { from, resized, crop, channels: tc })
    }

    /// Fit every sample of `stored` (all of one shape); returned as is when nothing changes,
    /// with notes saying what changed.
    pub(super) fn samples(&self, stored: Stored) -> Result<(Stored, Vec<String>)> {
        let from: [usize; 3] = stored.sample_shape.as_slice().try_into().map_err(|_| {
            CompileError::invalid_data(format!(
                "images in {} have shape {:?}; expected [C, H, W]",
                stored.source, stored.sample_shape
            ))
        })?;
        let plan = self.plan(from, &format!("images in {} are", stored.source))?;
        if plan.is_identity() {
            return Ok((stored, Vec::new()));
        }
        let per: usize = from.iter().product();
        let fitted: Vec<Vec<f32>> = stored.images.par_chunks(per).map(|s| plan.apply(s)).collect();
        let mut conversions = Conversions::default();
        conversions.count(&plan, stored.labels.len());
        let notes = self.notes(&conversions, &stored.source);
        let stored =
            Stored { images: fitted.concat(), sample_shape: plan.out_shape().to_vec(), ..stored };
        Ok((stored, notes))
    }

    /// Notes for people: what was converted, and the geometry applied.
    pub(super) fn notes(&self, conversions: &Conversions, source: &str) -> Vec<String> {
        let model = self.model_name();
        let geometry = self.geometry_text();
        let filter = if self.resize.is_some() { " (triangle filter)" } else { "" };
        [
            (conversions.to_colour, "grey ", format!("repeated to 3 channels for {model}")),
            (
                conversions.to_grey,
                "colour ",
                format!("converted to grey (Rec. 709 luma) for {model}"),
            ),
            (conversions.reshaped, "", format!("fitted by {geometry}{filter}")),
        ]
        .into_iter()
        .filter(|(n, _, _)| *n > 0)
        .map(|(n, kind, what)| {
            format!("{n} {kind}image{} in {source} {what}", if n == 1 { "" } else { "s" })
        })
        .collect()
    }
}

/// How many images were converted, by kind.
#[derive(Debug, Default)]
pub(super) struct Conversions {
    pub to_colour: usize,
    pub to_grey: usize,
    pub reshaped: usize,
}

impl Conversions {
    /// Count `n` images fitted by `plan`.
    pub(super) fn count(&mut self, plan: &Plan, n: usize) {
        match (plan.from[0], plan.channels) {
            (1, 3) => self.to_colour += n,
            (3, 1) => self.to_grey += n,
            _ => {}
        }
        if plan.out_shape()[1..] != plan.from[1..] || plan.resized != (plan.from[1], plan.from[2]) {
            self.reshaped += n;
        }
    }
}

impl Plan {
    pub(super) fn out_shape(&self) -> [usize; 3] {
        [self.channels, self.crop.2, self.crop.3]
    }

    fn is_identity(&self) -> bool {
        self.out_shape() == self.from && self.resized == (self.from[1], self.from[2])
    }

    /// One sample (`from` values) fitted.
    pub(super) fn apply(&self, sample: &[f32]) -> Vec<f32> {
        let [c, h, w] = self.from;
        let (rh, rw) = self.resized;
        let (top, left, ch, cw) = self.crop;
        let planes: Vec<Vec<f32>> = sample
            .chunks(h * w)
            .take(c)
            .map(|plane| {
                let resized = if (rh, rw) == (h, w) {
                    plane.to_vec()
                } else {
                    resize_plane(plane, (h, w), (rh, rw))
                };
                if (ch, cw) == (rh, rw) {
                    return resized;
                }
                (top..top + ch)
                    .flat_map(|y| &resized[y * rw + left..y * rw + left + cw])
                    .copied()
                    .collect()
            })
            .collect();
        match (c, self.channels) {
            (1, 3) => planes[0].repeat(3),
            (3, 1) => (0..ch * cw)
                .map(|i| LUMA[0] * planes[0][i] + LUMA[1] * planes[1][i] + LUMA[2] * planes[2][i])
                .collect(),
            _ => planes.concat(),
        }
    }
}

/// Resize one plane with the image crate's triangle filter. The crate clamps float pixels to
/// [0, 1], so values are mapped onto [0, 1] by the plane's own range and back: the filter's
/// weights are non-negative and sum to one, so no value leaves that range.
fn resize_plane(plane: &[f32], (h, w): (usize, usize), (nh, nw): (usize, usize)) -> Vec<f32> {
    let lo = plane.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = plane.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if hi <= lo {
        return vec![lo; nh * nw];
    }
    let span = hi - lo;
    let unit: Vec<f32> = plane.iter().map(|v| (v - lo) / span).collect();
    let buffer: ImageBuffer<Luma<f32>, Vec<f32>> =
        ImageBuffer::from_raw(w as u32, h as u32, unit).expect("a plane of h*w values");
    let out = imageops::resize(&buffer, nw as u32, nh as u32, FilterType::Triangle);
    out.into_raw().into_iter().map(|v| v * span + lo).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{exit_code_of, ExitCode};

    fn fit(shape: Option<[usize; 3]>, resize: Option<usize>, crop: Option<&str>) -> Fit {
        Fit {
            shape: shape.map(|s| s.to_vec()),
            model: Some("m.onnx".into()),
            resize,
            center_crop: crop.map(|c| CropSize::parse(c).unwrap()),
            coarse_labels: false,
        }
    }

    fn err(f: &Fit, from: [usize; 3]) -> String {
        let e = f.plan(from, "images in d are").unwrap_err();
        assert_eq!(exit_code_of(&e), ExitCode::InvalidData);
        e.to_string()
    }

    #[test]
    fn crop_sizes_parse() {
        assert_eq!(CropSize::parse("32"), Ok(CropSize { height: 32, width: 32 }));
        assert_eq!(CropSize::parse("24x40"), Ok(CropSize { height: 24, width: 40 }));
        for bad in ["0", "x", "3x0", "1x2x3", "-4", ""] {
            assert!(CropSize::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(CropSize { height: 2, width: 3 }.to_string(), "2x3");
    }

    #[test]
    fn resize_follows_torchvision() {
        // The short side becomes N, the long side int(N * long / short).
        let p = fit(None, Some(32), None).plan([3, 40, 61], "x").unwrap();
        assert_eq!(p.resized, (32, 48)); // 32 * 61 / 40 = 48.8
        let p = fit(None, Some(4), None).plan([1, 10, 3], "x").unwrap();
        assert_eq!(p.resized, (13, 4));
        // Crop offsets round half to even, as Python's round().
        let p = fit(None, None, Some("32")).plan([1, 33, 35], "x").unwrap();
        assert_eq!(p.crop, (0, 2, 32, 32)); // 0.5 -> 0, 1.5 -> 2
        let p = fit(Some([3, 32, 32]), Some(36), Some("32")).plan([3, 36, 48], "x").unwrap();
        assert_eq!((p.resized, p.crop, p.out_shape()), ((36, 48), (2, 8, 32, 32), [3, 32, 32]));
        assert!(!p.is_identity());
        assert!(fit(Some([1, 8, 8]), None, None).plan([1, 8, 8], "x").unwrap().is_identity());
    }

    #[test]
    fn mismatches_name_both_shapes_and_the_flags() {
        let e = err(&fit(Some([3, 32, 32]), None, None), [1, 28, 28]);
        assert_eq!(
            e,
            "images in d are 1x28x28 but m.onnx expects 3x32x32; --resize and --center-crop \
             fit images of another size"
        );
        let e = err(&fit(Some([3, 32, 32]), Some(40), None), [3, 40, 50]);
        assert!(
            e.contains("3x40x50 (3x40x50 after --resize 40) but m.onnx expects 3x32x32"),
            "{e}"
        );
        let e = err(&fit(None, Some(20), Some("24")), [1, 40, 40]);
        assert!(
            e.contains("1x40x40 (20x20 after --resize), smaller than --center-crop 24x24"),
            "{e}"
        );
        let e = err(&fit(Some([3, 8, 8]), None, None), [4, 8, 8]);
        assert!(e.contains("4x8x8 but m.onnx expects 3x8x8: only grey"), "{e}");
    }

    #[test]
    fn channels_convert() {
        let grey: Vec<f32> = (0..4).map(|v| v as f32).collect();
        let p = fit(Some([3, 2, 2]), None, None).plan([1, 2, 2], "x").unwrap();
        assert_eq!(p.apply(&grey), [grey.clone(), grey.clone(), grey.clone()].concat());
        let rgb = [vec![10.0; 4], vec![20.0; 4], vec![30.0; 4]].concat();
        let p = fit(Some([1, 2, 2]), None, None).plan([3, 2, 2], "x").unwrap();
        let want = 0.2126f32 * 10.0 + 0.7152 * 20.0 + 0.0722 * 30.0;
        assert_eq!(p.apply(&rgb), vec![want; 4]);
    }

    #[test]
    fn resizing_matches_the_image_crate_and_keeps_any_range() {
        // A ramp of 8-bit values: the same as the crate's own 8-bit resize, up to its rounding.
        let (h, w) = (12usize, 20usize);
        let pixels: Vec<u8> = (0..h * w).map(|i| ((i * 37) % 256) as u8).collect();
        let plane: Vec<f32> = pixels.iter().map(|&p| f32::from(p)).collect();
        let ours = resize_plane(&plane, (h, w), (6, 10));
        let theirs = imageops::resize(
            &ImageBuffer::<Luma<u8>, _>::from_raw(w as u32, h as u32, pixels).unwrap(),
            10,
            6,
            FilterType::Triangle,
        );
        for (a, b) in ours.iter().zip(theirs.into_raw()) {
            assert!((a - f32::from(b)).abs() <= 0.5 + 1e-3, "{a} vs {b}");
        }
        // Negative (already normalised) values are not clamped: an affine map commutes.
        let shifted: Vec<f32> = plane.iter().map(|v| v / 100.0 - 2.0).collect();
        let resized = resize_plane(&shifted, (h, w), (6, 10));
        for (a, b) in resized.iter().zip(&ours) {
            assert!((a - (b / 100.0 - 2.0)).abs() < 1e-4, "{a} vs {b}");
        }
        assert_eq!(resize_plane(&[7.5; 6], (2, 3), (4, 6)), vec![7.5; 24]);
    }

    #[test]
    fn samples_fit_every_image_and_say_so() {
        let stored = Stored {
            images: (0..2 * 36).map(|v| v as f32).collect(),
            labels: vec![0, 1],
            sample_shape: vec![1, 6, 6],
            source: "d".into(),
            normalised: false,
        };
        let same = fit(Some([1, 6, 6]), None, None).samples(stored.clone()).unwrap();
        assert_eq!(same, (stored.clone(), vec![]));
        let (out, notes) = fit(Some([3, 4, 4]), None, Some("4")).samples(stored.clone()).unwrap();
        assert_eq!(out.sample_shape, vec![3, 4, 4]);
        assert_eq!(out.images.len(), 2 * 48);
        // Image 1's crop starts at row 1, column 1: value 36 + 7.
        assert_eq!(out.images[48], 43.0);
        assert_eq!(out.images[48 + 16], 43.0);
        assert_eq!(
            notes,
            [
                "2 grey images in d repeated to 3 channels for m.onnx",
                "2 images in d fitted by --center-crop 4x4"
            ]
        );
    }
}
