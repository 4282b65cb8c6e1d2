//! Image files turned into model inputs the way torchvision does it with
//! PIL: decode, `convert` to the colour mode, `T.Resize`, `T.CenterCrop`,
//! `T.ToTensor` and `T.Normalize`.
//!
//! Why the care: published comparisons put 0.1 to 1 point of top-1 between
//! resize implementations, so a model must see the pixels it saw in
//! PyTorch. Decoding is libjpeg-turbo's for JPEG (what PIL links) and the
//! image crate's for the rest; resizing is fast_image_resize's
//! convolution resampler, which weighs pixels as PIL's antialiased
//! `Image.resize` does (the filter's support widened by the scale
//! factor). What is PIL's own and so written here: the grey conversion's
//! fixed-point weights (ITU-R 601-2, not the image crate's Rec. 709), the
//! output size of `T.Resize(int)`, and `T.CenterCrop`'s zero padding and
//! half-to-even rounding. EXIF orientation is not applied: torchvision
//! does not apply it either. tests/images.rs holds all of it against
//! Debian's python3-pil on real files.

use std::path::{Path, PathBuf};

use fast_image_resize as fr;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader};
use thiserror::Error;

use crate::spec::{Color, Interpolation, Layout, Preprocess, Size};

#[derive(Debug, Error)]
pub enum ImageError {
    #[error("cannot read image {path}: {message}")]
    Unreadable { path: PathBuf, message: String },
    #[error("{path} is a {bits}-bit image; qsweep reads 8-bit images as PIL does for ImageFolder\n  fix: re-save it as 8-bit (e.g. `convert in.png -depth 8 out.png`)")]
    Depth { path: PathBuf, bits: u16 },
}

/// Decoded 8-bit pixels, interleaved, `channels` per pixel (1 or 3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pixels {
    pub width: u32,
    pub height: u32,
    pub channels: usize,
    pub data: Vec<u8>,
}

impl Pixels {
    fn at(&self, x: u32, y: u32) -> &[u8] {
        let start = (y as usize * self.width as usize + x as usize) * self.channels;
        &self.data[start..start + self.channels]
    }
}

/// The number of channels a colour mode gives.
pub fn channels(color: Color) -> usize {
    match color {
        Color::Grey => 1,
        Color::Rgb | Color::Bgr => 3,
    }
}

/// Decodes `path` and converts it to `color` as PIL's `Image.convert` does.
pub fn load(path: &Path, color: Color) -> Result<Pixels, ImageError> {
    let unreadable = |message: String| ImageError::Unreadable { path: path.to_path_buf(), message };
    let reader = ImageReader::open(path).map_err(|e| unreadable(e.to_string()))?;
    let reader = reader.with_guessed_format().map_err(|e| unreadable(e.to_string()))?;
    if reader.format() == Some(ImageFormat::Jpeg) {
        let bytes = std::fs::read(path).map_err(|e| unreadable(e.to_string()))?;
        return Ok(convert(decode_jpeg(&bytes).map_err(unreadable)?, color));
    }
    let decoder = reader.into_decoder().map_err(|e| unreadable(e.to_string()))?;
    let bits = decoder.color_type().bits_per_pixel() / decoder.color_type().channel_count() as u16;
    if bits != 8 {
        return Err(ImageError::Depth { path: path.to_path_buf(), bits });
    }
    let decoded = DynamicImage::from_decoder(decoder).map_err(|e| unreadable(e.to_string()))?;
    Ok(convert(decoded, color))
}

/// Whether the file holds a grey image (reading its header only; false
/// when it cannot be read, which preparing the image reports).
pub fn is_grey(path: &Path) -> bool {
    let Ok(reader) = ImageReader::open(path).and_then(|r| r.with_guessed_format()) else { return false };
    reader.into_decoder().is_ok_and(|decoder| decoder.color_type().channel_count() <= 2)
}

/// JPEG through libjpeg-turbo (TurboJPEG), the library PIL decodes with,
/// at its defaults as PIL uses them (accurate integer IDCT, smooth chroma
/// upsampling): other decoders differ from it by up to 3 per channel.
fn decode_jpeg(bytes: &[u8]) -> Result<DynamicImage, String> {
    let mut decompressor = turbojpeg::Decompressor::new().map_err(|e| e.to_string())?;
    let header = decompressor.read_header(bytes).map_err(|e| e.to_string())?;
    let format = match header.colorspace {
        turbojpeg::Colorspace::Gray => turbojpeg::PixelFormat::GRAY,
        turbojpeg::Colorspace::CMYK | turbojpeg::Colorspace::YCCK => {
            return Err("a CMYK JPEG; re-save it as RGB (e.g. `convert in.jpg -colorspace sRGB out.jpg`)".into())
        }
        _ => turbojpeg::PixelFormat::RGB,
    };
    let (width, height) = (header.width, header.height);
    let pitch = width * format.size();
    let mut pixels = vec![0; pitch * height];
    let image = turbojpeg::Image { pixels: pixels.as_mut_slice(), width, pitch, height, format };
    decompressor.decompress(bytes, image).map_err(|e| e.to_string())?;
    let (width, height) = (width as u32, height as u32);
    Ok(match format {
        turbojpeg::PixelFormat::GRAY => {
            DynamicImage::ImageLuma8(image::GrayImage::from_raw(width, height, pixels).expect("sized above"))
        }
        _ => DynamicImage::ImageRgb8(image::RgbImage::from_raw(width, height, pixels).expect("sized above")),
    })
}

/// PIL's `convert("RGB")` drops alpha and repeats grey; `convert("L")`
/// weighs R, G and B by 299/587/114 in 16-bit fixed point, rounding.
fn convert(image: DynamicImage, color: Color) -> Pixels {
    let (width, height) = (image.width(), image.height());
    let grey_source = matches!(image, DynamicImage::ImageLuma8(_) | DynamicImage::ImageLumaA8(_));
    let data = match color {
        Color::Grey if grey_source => image.to_luma8().into_raw(),
        Color::Grey => image
            .to_rgb8()
            .pixels()
            .map(|p| ((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16) as u8)
            .collect(),
        Color::Rgb => image.to_rgb8().into_raw(),
        Color::Bgr => {
            let mut rgb = image.to_rgb8().into_raw();
            rgb.chunks_exact_mut(3).for_each(|p| p.swap(0, 2));
            rgb
        }
    };
    Pixels { width, height, channels: channels(color), data }
}

/// `T.Resize`'s output (width, height): an int resizes the shorter side to
/// it and the longer one in proportion, truncated; `[h, w]` is exact.
pub fn resized_size(width: u32, height: u32, size: Size) -> (u32, u32) {
    match size {
        Size::Single(short) => {
            if width <= height {
                (short, (short as u64 * height as u64 / width as u64) as u32)
            } else {
                ((short as u64 * width as u64 / height as u64) as u32, short)
            }
        }
        Size::Pair([h, w]) => (w, h),
    }
}

/// Resizes as PIL's `Image.resize` with the given filter (antialiased:
/// the filter widens with the downscale factor), or, without antialias,
/// with the filter at its own width, as torchvision's tensor path does.
pub fn resize(pixels: &Pixels, width: u32, height: u32, interpolation: Interpolation, antialias: bool) -> Pixels {
    if (width, height) == (pixels.width, pixels.height) {
        return pixels.clone();
    }
    let pixel_type = if pixels.channels == 1 { fr::PixelType::U8 } else { fr::PixelType::U8x3 };
    let filter = match interpolation {
        Interpolation::Bilinear => Some(fr::FilterType::Bilinear),
        Interpolation::Bicubic => Some(fr::FilterType::CatmullRom),
        Interpolation::Nearest => None,
    };
    let algorithm = match filter {
        None => fr::ResizeAlg::Nearest,
        Some(filter) if antialias => fr::ResizeAlg::Convolution(filter),
        Some(filter) => fr::ResizeAlg::Interpolation(filter),
    };
    let options = fr::ResizeOptions::new().resize_alg(algorithm);
    let mut resizer = fr::Resizer::new();
    let mut pass = |source: &fr::images::Image<'_>, width: u32, height: u32| {
        let mut target = fr::images::Image::new(width, height, pixel_type);
        resizer.resize(source, &mut target, &options).expect("source and target have the same pixel type");
        target
    };
    // PIL resizes rows first, then columns, rounding and clipping to 8
    // bits in between; with bicubic's overshoot at sharp edges the order
    // and the clip change pixels by up to 20, so do the same.
    let mut image = fr::images::Image::from_vec_u8(pixels.width, pixels.height, pixels.data.clone(), pixel_type)
        .expect("the buffer holds width x height pixels");
    if width != pixels.width {
        image = pass(&image, width, pixels.height);
    }
    if height != pixels.height {
        image = pass(&image, width, height);
    }
    Pixels { width, height, channels: pixels.channels, data: image.into_vec() }
}

/// `T.CenterCrop([h, w])`: pads with zeros where the image is smaller
/// (left and top get the smaller half), then takes the centre, its corner
/// rounded half to even as Python's `round` does.
pub fn center_crop(pixels: &Pixels, crop_width: u32, crop_height: u32) -> Pixels {
    let pad_left = crop_width.saturating_sub(pixels.width) / 2;
    let pad_top = crop_height.saturating_sub(pixels.height) / 2;
    let (padded_width, padded_height) = (pixels.width.max(crop_width), pixels.height.max(crop_height));
    let left = round_half_even((padded_width - crop_width) as f64 / 2.0);
    let top = round_half_even((padded_height - crop_height) as f64 / 2.0);
    let mut data = Vec::with_capacity(crop_width as usize * crop_height as usize * pixels.channels);
    for y in top..top + crop_height {
        for x in left..left + crop_width {
            let inside = x >= pad_left && x - pad_left < pixels.width && y >= pad_top && y - pad_top < pixels.height;
            if inside {
                data.extend_from_slice(pixels.at(x - pad_left, y - pad_top));
            } else {
                data.extend(std::iter::repeat_n(0, pixels.channels));
            }
        }
    }
    Pixels { width: crop_width, height: crop_height, channels: pixels.channels, data }
}

fn round_half_even(value: f64) -> u32 {
    value.round_ties_even() as u32
}

/// Decodes, converts, resizes and crops one file: the 8-bit pixels the
/// model's input is made from.
pub fn prepare(path: &Path, preprocess: &Preprocess, color: Color) -> Result<Pixels, ImageError> {
    let mut pixels = load(path, color)?;
    if let Some(size) = preprocess.resize {
        let (width, height) = resized_size(pixels.width, pixels.height, size);
        pixels = resize(&pixels, width.max(1), height.max(1), preprocess.interpolation, preprocess.antialias);
    }
    if let Some(crop) = preprocess.center_crop {
        let [height, width] = crop.square_or_pair();
        pixels = center_crop(&pixels, width, height);
    }
    Ok(pixels)
}

/// The (height, width) every image has after `preprocess`, if it fixes
/// one (a crop, or an exact resize); a shorter-side resize alone leaves
/// the size to each image.
pub fn fixed_size(preprocess: &Preprocess) -> Option<[u32; 2]> {
    match (preprocess.center_crop, preprocess.resize) {
        (Some(crop), _) => Some(crop.square_or_pair()),
        (None, Some(Size::Pair(pair))) => Some(pair),
        _ => None,
    }
}

/// The pixels in the model's layout (channels first for NCHW), still u8:
/// the form prepared data stores them in; `prepared::Normalize` turns
/// them into model inputs as they are read.
pub fn in_layout(pixels: &Pixels, layout: Layout) -> Vec<u8> {
    match layout {
        Layout::Nhwc => pixels.data.clone(),
        Layout::Nchw => {
            let (plane, channels) = (pixels.width as usize * pixels.height as usize, pixels.channels);
            let mut out = vec![0u8; plane * channels];
            for (i, pixel) in pixels.data.chunks_exact(channels).enumerate() {
                for (c, &value) in pixel.iter().enumerate() {
                    out[c * plane + i] = value;
                }
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grey(width: u32, height: u32) -> Pixels {
        Pixels { width, height, channels: 1, data: (0..width * height).map(|v| v as u8 + 1).collect() }
    }

    #[test]
    fn resize_to_the_shorter_side_truncates_the_longer() {
        assert_eq!(resized_size(500, 375, Size::Single(256)), (341, 256));
        assert_eq!(resized_size(375, 500, Size::Single(256)), (256, 341));
        assert_eq!(resized_size(300, 300, Size::Single(256)), (256, 256));
        assert_eq!(resized_size(300, 200, Size::Pair([10, 20])), (20, 10));
    }

    /// torchvision pads a smaller image with zeros, centred, the smaller
    /// half on the left and top.
    #[test]
    fn a_crop_larger_than_the_image_pads_it() {
        let cropped = center_crop(&grey(2, 1), 5, 4);
        #[rustfmt::skip]
        assert_eq!(cropped.data, [
            0, 0, 0, 0, 0,
            0, 1, 2, 0, 0,
            0, 0, 0, 0, 0,
            0, 0, 0, 0, 0,
        ]);
    }

    /// (5 - 2) / 2 = 1.5 rounds to 2 and (4 - 2) / 2 = 1 stays, as Python does.
    #[test]
    fn the_crop_corner_rounds_half_to_even() {
        let cropped = center_crop(&grey(5, 4), 2, 2);
        assert_eq!(cropped.data, [8, 9, 13, 14]);
        let cropped = center_crop(&grey(4, 4), 1, 1);
        // (4 - 1) / 2 = 1.5 -> 2
        assert_eq!(cropped.data, [11]);
    }

    #[test]
    fn grey_conversion_uses_pil_weights() {
        let rgb = DynamicImage::ImageRgb8(image::RgbImage::from_raw(2, 1, vec![255, 0, 0, 10, 200, 30]).unwrap());
        // PIL: L = (R*19595 + G*38470 + B*7471 + 0x8000) >> 16
        assert_eq!(convert(rgb, Color::Grey).data, [76, 124]);
    }

    #[test]
    fn normalization_follows_the_layout() {
        use crate::data::prepared::Normalize;
        let pixels = Pixels { width: 2, height: 1, channels: 3, data: vec![0, 51, 255, 255, 102, 0] };
        let preprocess =
            Preprocess { scale: 255.0, mean: vec![0.0, 0.2, 0.5], std: vec![1.0, 0.5, 0.5], ..Default::default() };
        let normalized = |layout: Layout, shape: [usize; 3]| {
            let mut values: Vec<f32> = in_layout(&pixels, layout).into_iter().map(f32::from).collect();
            Normalize::new(&preprocess, layout.channel_axis(3)).apply(&shape, &mut values);
            values
        };
        let nchw = normalized(Layout::Nchw, [3, 1, 2]);
        let expected = [0.0, 1.0, 0.0, 0.4, 1.0, -1.0];
        assert!(nchw.iter().zip(expected).all(|(a, b)| (a - b).abs() < 1e-6), "{nchw:?}");
        let nhwc = normalized(Layout::Nhwc, [1, 2, 3]);
        let expected = [0.0, 0.0, 1.0, 1.0, 0.4, -1.0];
        assert!(nhwc.iter().zip(expected).all(|(a, b)| (a - b).abs() < 1e-6), "{nhwc:?}");
    }
}
