//! Sampling: greedy at temperature 0, else temperature and nucleus (top-p), drawn with a generator
//! seeded by the request's seed and the step alone, so that a resumed or pipelined run draws alike.

use usine_engine::{GenerationParams, TokenId};

/// The token to emit from `logits` at `step`.
pub(crate) fn sample(logits: &[f32], params: &GenerationParams, step: u32) -> TokenId {
    let best = || {
        logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0))).map_or(0, |(index, _)| index)
    };
    let id = if params.temperature == 0.0 {
        best()
    } else {
        let most = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut weighted: Vec<(usize, f64)> = logits
            .iter()
            .enumerate()
            .map(|(index, &logit)| (index, f64::from((logit - most) / params.temperature).exp()))
            .collect();
        weighted.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if params.top_k > 0 {
            weighted.truncate(params.top_k as usize);
        }
        let total: f64 = weighted.iter().map(|(_, weight)| weight).sum();
        let mut kept = 0.0;
        let cut = weighted
            .iter()
            .position(|(_, weight)| {
                kept += weight / total;
                kept >= f64::from(params.top_p)
            })
            .map_or(weighted.len(), |index| index + 1);
        let weighted = &weighted[..cut];
        let total: f64 = weighted.iter().map(|(_, weight)| weight).sum();
        let mut draw = unit(params.seed, step) * total;
        weighted
            .iter()
            .find(|(_, weight)| {
                draw -= weight;
                draw < 0.0
            })
            .or(weighted.last())
            .map_or_else(best, |(index, _)| *index)
    };
    TokenId::try_from(id).expect("a vocabulary of 257 tokens")
}

/// A uniform number in [0, 1) from the seed and the step (splitmix64).
fn unit(seed: u64, step: u32) -> f64 {
    let mut z = seed ^ u64::from(step).wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    #[expect(clippy::cast_precision_loss, reason = "53 bits of a random number")]
    let unit = ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64;
    unit
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_largest_and_sampling_follows_the_seed() {
        let logits = [0.1, 2.0, 0.5, 1.9];
        let greedy = GenerationParams { temperature: 0.0, ..Default::default() };
        assert_eq!(sample(&logits, &greedy, 0), 1);
        let warm = GenerationParams { temperature: 1.0, top_p: 1.0, seed: 7, ..Default::default() };
        let draws: Vec<_> = (0..50).map(|step| sample(&logits, &warm, step)).collect();
        assert!(draws.contains(&3) && draws.contains(&1), "{draws:?}");
        let other = GenerationParams { seed: 8, ..warm.clone() };
        assert_ne!(draws, (0..50).map(|step| sample(&logits, &other, step)).collect::<Vec<_>>(), "seeds differ");
        let narrow = GenerationParams { top_p: 0.3, ..warm.clone() };
        assert!((0..50).all(|step| sample(&logits, &narrow, step) == 1), "top-p keeps the most likely only");
        let two = GenerationParams { top_k: 2, ..warm };
        let draws: std::collections::BTreeSet<_> = (0..100).map(|step| sample(&logits, &two, step)).collect();
        assert_eq!(draws, [1, 3].into(), "top-k keeps the two most likely");
    }

    #[test]
    fn the_draws_follow_the_softmax_of_the_logits_over_the_temperature() {
        let logits = [0.1_f32, 2.0, 0.5, 1.9];
        const DRAWS: u32 = 20_000;
        for temperature in [1.0_f32, 0.5] {
            let params = GenerationParams { temperature, top_p: 1.0, seed: 11, ..Default::default() };
            let mut counts = [0_u32; 4];
            for step in 0..DRAWS {
                counts[sample(&logits, &params, step) as usize] += 1;
            }
            // The expected shares, computed here from the definition: exp(l / t) / sum exp(l / t).
            let weights: Vec<f64> = logits.iter().map(|&l| (f64::from(l) / f64::from(temperature)).exp()).collect();
            let total: f64 = weights.iter().sum();
            for (token, (&count, weight)) in counts.iter().zip(&weights).enumerate() {
                let (share, expected) = (f64::from(count) / f64::from(DRAWS), weight / total);
                // Four standard deviations of a share over 20,000 draws: at most 0.014.
                let bound = 4.0 * (expected * (1.0 - expected) / f64::from(DRAWS)).sqrt();
                assert!(
                    (share - expected).abs() <= bound,
                    "t = {temperature}, token {token}: drawn {share:.4}, expected {expected:.4} +- {bound:.4}"
                );
            }
        }
    }

    #[test]
    fn the_uniform_draw_is_splitmix64_of_the_seed_at_step_zero() {
        // SplitMix64 seeded with 0 first outputs 0xE220A8397B1DCDAF (its published reference value).
        assert_eq!(unit(0, 0), (0xE220_A839_7B1D_CDAF_u64 >> 11) as f64 / 2f64.powi(53));
    }
}
