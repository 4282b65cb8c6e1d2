//! Random transforms of training images, as torchvision defines them
//! (`spec::Augmentation`), applied to one normalised CHW image at a time.
//!
//! They run after normalisation, where torchvision's run before it on PIL
//! images; each is a geometric resampling, so the two orders agree except
//! for what fills uncovered pixels: torchvision's `pad` fills with 0, black,
//! which normalisation maps to its own value in each channel, so here each
//! channel is filled with its darkest value in the image, its black.

use rand::Rng;

use crate::spec::Augmentation;

/// Applies `pipeline` in order to `image` (`shape`: channels, height,
/// width), which keeps its size.
pub fn apply(pipeline: &[Augmentation], image: &mut [f32], shape: [usize; 3], rng: &mut impl Rng) {
    // A pad's border, until the crop that follows it takes it away.
    let mut padding = 0usize;
    for transform in pipeline {
        match transform {
            Augmentation::HorizontalFlip => {
                if rng.random_bool(0.5) {
                    flip(image, shape);
                }
            }
            Augmentation::Pad(n) => padding += *n as usize,
            Augmentation::RandomCrop => {
                let top = rng.random_range(0..=2 * padding);
                let left = rng.random_range(0..=2 * padding);
                shift(image, shape, top as i64 - padding as i64, left as i64 - padding as i64);
                padding = 0;
            }
            Augmentation::RandomResizedCrop { scale, ratio } => {
                let window = crop_window(shape[1], shape[2], *scale, *ratio, rng);
                resize_from(image, shape, window);
            }
        }
    }
}

/// Mirrors every row.
fn flip(image: &mut [f32], [_, _, w]: [usize; 3]) {
    for row in image.chunks_mut(w) {
        row.reverse();
    }
}

/// The window `(top, left)` pixels into the image padded with each
/// channel's darkest value: output (y, x) reads source (y + top, x + left).
fn shift(image: &mut [f32], [c, h, w]: [usize; 3], top: i64, left: i64) {
    if top == 0 && left == 0 {
        return;
    }
    let source = image.to_vec();
    for ch in 0..c {
        let plane = &source[ch * h * w..(ch + 1) * h * w];
        let background = plane.iter().copied().fold(f32::INFINITY, f32::min);
        for y in 0..h {
            for x in 0..w {
                let (sy, sx) = (y as i64 + top, x as i64 + left);
                let inside = (0..h as i64).contains(&sy) && (0..w as i64).contains(&sx);
                image[(ch * h + y) * w + x] =
                    if inside { source[(ch * h + sy as usize) * w + sx as usize] } else { background };
            }
        }
    }
}

/// A crop `(top, left, height, width)` as torchvision's
/// `RandomResizedCrop.get_params` draws it: ten tries at a random area
/// share and log-uniform aspect ratio that fit, then the largest centred
/// crop whose ratio is within bounds.
fn crop_window(h: usize, w: usize, scale: [f64; 2], ratio: [f64; 2], rng: &mut impl Rng) -> [usize; 4] {
    let area = (h * w) as f64;
    let (log_low, log_high) = (ratio[0].ln(), ratio[1].ln());
    for _ in 0..10 {
        let target = area * rng.random_range(scale[0]..=scale[1]);
        let aspect = rng.random_range(log_low..=log_high).exp();
        let crop_w = (target * aspect).sqrt().round() as usize;
        let crop_h = (target / aspect).sqrt().round() as usize;
        if (1..=w).contains(&crop_w) && (1..=h).contains(&crop_h) {
            let top = rng.random_range(0..=h - crop_h);
            let left = rng.random_range(0..=w - crop_w);
            return [top, left, crop_h, crop_w];
        }
    }
    let in_ratio = w as f64 / h as f64;
    let (crop_h, crop_w) = if in_ratio < ratio[0] {
        (((w as f64 / ratio[0]).round() as usize).clamp(1, h), w)
    } else if in_ratio > ratio[1] {
        (h, ((h as f64 * ratio[1]).round() as usize).clamp(1, w))
    } else {
        (h, w)
    };
    [(h - crop_h) / 2, (w - crop_w) / 2, crop_h, crop_w]
}

/// Resizes the crop `window` of the image to the whole image, bilinear
/// with pixel centres aligned as torchvision's (`align_corners=False`).
fn resize_from(image: &mut [f32], [c, h, w]: [usize; 3], [top, left, crop_h, crop_w]: [usize; 4]) {
    if (top, left, crop_h, crop_w) == (0, 0, h, w) {
        return;
    }
    let source = image.to_vec();
    // Source coordinate of an output pixel along one axis, and its two
    // neighbours with the weight of the far one.
    let sample = |out: usize, out_len: usize, crop_len: usize| -> (usize, usize, f32) {
        let position = ((out as f64 + 0.5) * crop_len as f64 / out_len as f64 - 0.5).max(0.0);
        let low = (position.floor() as usize).min(crop_len - 1);
        let high = (low + 1).min(crop_len - 1);
        (low, high, (position - low as f64) as f32)
    };
    for y in 0..h {
        let (y0, y1, wy) = sample(y, h, crop_h);
        for x in 0..w {
            let (x0, x1, wx) = sample(x, w, crop_w);
            for ch in 0..c {
                let at = |yy: usize, xx: usize| source[(ch * h + top + yy) * w + left + xx];
                let upper = at(y0, x0) * (1.0 - wx) + at(y0, x1) * wx;
                let lower = at(y1, x0) * (1.0 - wx) + at(y1, x1) * wx;
                image[(ch * h + y) * w + x] = upper * (1.0 - wy) + lower * wy;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    /// A 1x4x4 ramp: pixel (y, x) holds 4y + x + 1.
    fn ramp() -> Vec<f32> {
        (1..=16).map(|v| v as f32).collect()
    }

    #[test]
    fn pad_and_random_crop_shift_within_the_padding_and_fill_with_the_background() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let pipeline = [Augmentation::Pad(1), Augmentation::RandomCrop];
        let mut shifted = 0;
        for _ in 0..50 {
            let mut image = ramp();
            apply(&pipeline, &mut image, [1, 4, 4], &mut rng);
            // The ramp is kept, moved by at most one pixel each way.
            let original = ramp();
            let found = (-1i64..=1).flat_map(|dy| (-1i64..=1).map(move |dx| (dy, dx))).any(|(dy, dx)| {
                (0..4i64).all(|y| {
                    (0..4i64).all(|x| {
                        let (sy, sx) = (y + dy, x + dx);
                        let expected = if (0..4).contains(&sy) && (0..4).contains(&sx) {
                            original[(sy * 4 + sx) as usize]
                        } else {
                            1.0
                        };
                        image[(y * 4 + x) as usize] == expected
                    })
                })
            });
            assert!(found, "{image:?} is not a shift of at most one pixel");
            shifted += usize::from(image != original);
        }
        assert!(shifted > 30, "most draws move the image ({shifted} of 50)");
    }

    #[test]
    fn a_pad_fills_each_channel_with_its_own_black() {
        // Two channels whose black normalised differently, as RGB's do:
        // the border of each is that channel's darkest value.
        let mut image: Vec<f32> = ramp().into_iter().chain(ramp().into_iter().map(|v| v - 10.0)).collect();
        shift(&mut image, [2, 4, 4], 1, 0);
        assert_eq!(&image[12..16], &[1.0; 4], "the first channel's last row");
        assert_eq!(&image[28..32], &[-9.0; 4], "the second channel's last row");
        assert_eq!(image[16], ramp()[4] - 10.0, "the rest moved up a row");
    }

    #[test]
    fn a_horizontal_flip_mirrors_rows_about_half_the_time() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        let mirrored: Vec<f32> =
            ramp().chunks(4).flat_map(|row| row.iter().rev().copied().collect::<Vec<_>>()).collect();
        let mut flips = 0;
        for _ in 0..200 {
            let mut image = ramp();
            apply(&[Augmentation::HorizontalFlip], &mut image, [1, 4, 4], &mut rng);
            assert!(image == ramp() || image == mirrored);
            flips += usize::from(image == mirrored);
        }
        assert!((70..130).contains(&flips), "{flips} flips in 200");
    }

    #[test]
    fn random_resized_crops_stay_within_their_scale_and_ratio() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for _ in 0..500 {
            let [top, left, h, w] = crop_window(28, 28, [0.25, 0.5], [0.5, 2.0], &mut rng);
            assert!(top + h <= 28 && left + w <= 28);
            let share = (h * w) as f64 / 784.0;
            // Rounding each side moves the share a little.
            assert!((0.2..=0.56).contains(&share), "share {share}");
            let aspect = w as f64 / h as f64;
            assert!((0.45..=2.2).contains(&aspect), "aspect {aspect}");
        }
        // The whole image at scale 1 and ratio 1 leaves it as it was.
        let mut image = ramp();
        let pipeline = [Augmentation::RandomResizedCrop { scale: [1.0, 1.0], ratio: [1.0, 1.0] }];
        apply(&pipeline, &mut image, [1, 4, 4], &mut rng);
        assert_eq!(image, ramp());
    }

    #[test]
    fn resizing_a_crop_interpolates_between_its_pixels() {
        // The top-left 2x2 of the ramp (1 2 / 5 6) blown up to 4x4: corners
        // keep the crop's corner values, and the middle is their average.
        let mut image = ramp();
        resize_from(&mut image, [1, 4, 4], [0, 0, 2, 2]);
        assert_eq!((image[0], image[3], image[12], image[15]), (1.0, 2.0, 5.0, 6.0));
        assert!((image[5] - (1.0 * 0.5625 + 2.0 * 0.1875 + 5.0 * 0.1875 + 6.0 * 0.0625)).abs() < 1e-6);
    }
}
