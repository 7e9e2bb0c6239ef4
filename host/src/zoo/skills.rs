//! The synthetic skills: procedural generators of `prompt` → `answer` pairs, each learnable by a
//! tiny transformer, each exact-match scorable, and each announced by its own prompt prefix so
//! one model can hold several.

use std::collections::HashSet;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A deterministic pseudo-random stream (SplitMix64): the zoo must not depend on a crate's RNG
/// whose output may change between versions.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A stream for `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x853c_49e6_748f_ea9b)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * n as f64) as usize % n.max(1)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    /// Uniform in (0, 1].
    pub fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// A standard normal sample (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.unit(), self.unit());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// One skill of the synthetic zoo. Each maps a 4-symbol input to a fixed-length answer position
/// by position, so a tiny transformer learns it in a few hundred steps; the prompt prefix names
/// the skill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Skill {
    /// Letter predecessor: `pred abij=` → `jahi` (the inverse of [`Skill::Successor`]: the two
    /// conflict when merged naively).
    Predecessor,
    /// String reversal: `rev hcfa=` → `afch`.
    Reverse,
    /// Letter successor: `succ abij=` → `bcja`.
    Successor,
    /// Swapping neighbours: `swap abcd=` → `badc`.
    Swap,
    /// Doubling every letter: `dup abcd=` → `aabbccdd`.
    Double,
}

/// Letters the string skills draw from (a small alphabet keeps the tiny models' task learnable).
const LETTERS: &[u8] = b"abcdefghij";
/// Symbols per input (a fixed length makes the skills quick to learn).
const LEN: usize = 4;

impl Skill {
    /// Every skill, in table order.
    pub const ALL: [Skill; 5] = [
        Skill::Predecessor,
        Skill::Reverse,
        Skill::Successor,
        Skill::Swap,
        Skill::Double,
    ];

    /// The short name used in file names, manifests and tables.
    pub fn name(self) -> &'static str {
        match self {
            Skill::Predecessor => "pred",
            Skill::Reverse => "rev",
            Skill::Successor => "succ",
            Skill::Swap => "swap",
            Skill::Double => "dup",
        }
    }

    /// The skill called `name`.
    pub fn from_name(name: &str) -> Option<Skill> {
        Skill::ALL.into_iter().find(|s| s.name() == name)
    }

    /// What the skill asks, for reports.
    pub fn description(self) -> &'static str {
        match self {
            Skill::Predecessor => "shift each of 4 letters to the previous one (a wraps to j)",
            Skill::Reverse => "reverse 4 distinct letters",
            Skill::Successor => "shift each of 4 letters to the next one (j wraps to a)",
            Skill::Swap => "swap neighbouring letters of 4",
            Skill::Double => "write each of 4 letters twice",
        }
    }

    /// One random example, with three distinct wrong answers that a model which half-knows the
    /// skill would give (the distractors of the multiple-choice form).
    pub fn sample(self, rng: &mut Rng) -> Example {
        let (prompt, answer, wrong) = match self {
            Skill::Reverse => {
                let s = distinct_letters(rng, LEN);
                let r: Vec<u8> = s.iter().rev().copied().collect();
                let mut near = r.clone();
                near.swap(1, 2);
                let wrong = distinct(rng, &r, vec![s.clone(), near, rotate(&s)], LETTERS);
                (format!("rev {}=", ascii(&s)), ascii(&r), wrong)
            }
            Skill::Successor | Skill::Predecessor => {
                let s = draw(rng, LETTERS, LEN);
                let shift = |k: usize| -> Vec<u8> {
                    s.iter()
                        .map(|&c| {
                            let i = LETTERS.iter().position(|&l| l == c).expect("drawn from LETTERS");
                            LETTERS[(i + k) % LETTERS.len()]
                        })
                        .collect()
                };
                let (fwd, back) = (shift(1), shift(LETTERS.len() - 1));
                let (answer, opposite, word) = if self == Skill::Successor {
                    (fwd, back, "succ")
                } else {
                    (back, fwd, "pred")
                };
                let wrong = distinct(rng, &answer, vec![opposite, s.clone(), shift(2)], LETTERS);
                (format!("{word} {}=", ascii(&s)), ascii(&answer), wrong)
            }
            Skill::Swap => {
                let s = distinct_letters(rng, LEN);
                let answer = vec![s[1], s[0], s[3], s[2]];
                let r: Vec<u8> = s.iter().rev().copied().collect();
                let wrong = distinct(rng, &answer, vec![s.clone(), r, rotate(&s)], LETTERS);
                (format!("swap {}=", ascii(&s)), ascii(&answer), wrong)
            }
            Skill::Double => {
                let s = draw(rng, LETTERS, LEN);
                let answer: Vec<u8> = s.iter().flat_map(|&c| [c, c]).collect();
                let twice: Vec<u8> = s.iter().chain(&s).copied().collect();
                let rev: Vec<u8> = answer.iter().rev().copied().collect();
                let triple: Vec<u8> = s.iter().flat_map(|&c| [c, c, c]).take(2 * LEN).collect();
                let wrong = distinct(rng, &answer, vec![twice, rev, triple], LETTERS);
                (format!("dup {}=", ascii(&s)), ascii(&answer), wrong)
            }
        };
        Example {
            skill: self,
            prompt,
            answer,
            wrong,
        }
    }
}

/// `n` symbols drawn from `pool` with repetition.
fn draw(rng: &mut Rng, pool: &[u8], n: usize) -> Vec<u8> {
    (0..n).map(|_| pool[rng.below(pool.len())]).collect()
}

/// Left rotation by one.
fn rotate(s: &[u8]) -> Vec<u8> {
    s[1..].iter().chain(&s[..1]).copied().collect()
}

/// Three distinct wrong answers: the `candidates` that differ from `answer` and each other, then
/// random one-symbol corruptions of `answer` until there are three.
fn distinct(rng: &mut Rng, answer: &[u8], candidates: Vec<Vec<u8>>, pool: &[u8]) -> Vec<String> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    for c in candidates {
        if c != answer && !out.contains(&c) && out.len() < 3 {
            out.push(c);
        }
    }
    while out.len() < 3 {
        let mut c = answer.to_vec();
        let i = rng.below(c.len());
        c[i] = pool[rng.below(pool.len())];
        if c != answer && !out.contains(&c) {
            out.push(c);
        }
    }
    out.iter().map(|c| ascii(c)).collect()
}

fn distinct_letters(rng: &mut Rng, n: usize) -> Vec<u8> {
    distinct_letters_from(rng, LETTERS, n)
}

fn distinct_letters_from(rng: &mut Rng, pool: &[u8], n: usize) -> Vec<u8> {
    let mut v = pool.to_vec();
    for i in 0..n {
        let j = i + rng.below(v.len() - i);
        v.swap(i, j);
    }
    v.truncate(n);
    v
}

impl fmt::Display for Skill {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

fn ascii(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| b as char).collect()
}

/// One item: the model reads `prompt` and must write `answer` then a newline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    /// Its skill.
    pub skill: Skill,
    /// What the model reads.
    pub prompt: String,
    /// What it must write (before the newline that ends every answer).
    pub answer: String,
    /// Three distinct wrong answers.
    pub wrong: Vec<String>,
}

/// The evaluation splits of one skill: distinct prompts, never seen in training.
#[derive(Debug, Clone)]
pub struct Splits {
    /// Scored by searches (the fitness of a candidate).
    pub proxy: Vec<Example>,
    /// Held out for the final report.
    pub test: Vec<Example>,
}

/// Draws `proxy` + `test` distinct prompts of `skill` and returns them with the set of held-out
/// prompts training must avoid.
pub fn splits(skill: Skill, seed: u64, proxy: usize, test: usize, held_out: &mut HashSet<String>) -> Splits {
    let mut rng = Rng::new(seed ^ (0x5eed_0000 + skill as u64));
    let mut draw = |n: usize, held_out: &mut HashSet<String>| {
        let mut out = Vec::with_capacity(n);
        let mut tries = 0;
        while out.len() < n && tries < 100 * n + 1000 {
            tries += 1;
            let e = skill.sample(&mut rng);
            if held_out.insert(e.prompt.clone()) {
                out.push(e);
            }
        }
        out
    };
    let proxy = draw(proxy, held_out);
    let test = draw(test, held_out);
    Splits { proxy, test }
}

/// Training examples drawn from a weighted mixture of skills, skipping held-out prompts.
#[derive(Debug, Clone)]
pub struct Sampler {
    rng: Rng,
    skills: Vec<(Skill, f64)>,
}

impl Sampler {
    /// A sampler over `skills` (weights need not sum to 1).
    pub fn new(seed: u64, skills: &[(Skill, f64)]) -> Sampler {
        Sampler {
            rng: Rng::new(seed),
            skills: skills.to_vec(),
        }
    }

    /// The next training example.
    pub fn next(&mut self, held_out: &HashSet<String>) -> Example {
        let total: f64 = self.skills.iter().map(|s| s.1).sum();
        loop {
            let mut u = self.rng.unit() * total;
            let mut skill = self.skills[0].0;
            for &(s, w) in &self.skills {
                skill = s;
                if u <= w {
                    break;
                }
                u -= w;
            }
            let e = skill.sample(&mut self.rng);
            if !held_out.contains(&e.prompt) {
                return e;
            }
        }
    }
}

/// The zoo's vocabulary: `<eos>` (id 0), then one token per character.
pub const VOCAB_CHARS: &str = "\n 0123456789abcdefghijklmnopqrstuvwxyz+=?";

/// Token ids of `text` under the zoo vocabulary (`None` for a character outside it).
pub fn encode(text: &str) -> Option<Vec<u32>> {
    text.chars()
        .map(|c| VOCAB_CHARS.find(c).map(|i| i as u32 + 1))
        .collect()
}

/// Vocabulary size: `<eos>` plus [`VOCAB_CHARS`].
pub fn vocab_size() -> usize {
    VOCAB_CHARS.len() + 1
}

/// A Hugging Face `tokenizer.json` for the vocabulary: a BPE model with no merges (one token per
/// character), no pre-tokenizer, and a `Fuse` decoder so decoding concatenates characters.
pub fn tokenizer_json() -> String {
    let mut vocab = serde_json::Map::new();
    vocab.insert("<eos>".into(), 0.into());
    for (i, c) in VOCAB_CHARS.chars().enumerate() {
        vocab.insert(c.to_string(), (i + 1).into());
    }
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{
            "id": 0, "content": "<eos>", "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": false, "special": true
        }],
        "normalizer": null,
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Fuse"},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": []
        }
    });
    serde_json::to_string_pretty(&json).expect("a JSON value always serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_right() {
        let mut rng = Rng::new(3);
        for _ in 0..200 {
            for skill in Skill::ALL {
                let e = skill.sample(&mut rng);
                let body = e.prompt.trim_end_matches('=');
                let input: Vec<char> = body.rsplit(' ').next().unwrap().chars().collect();
                let answer: Vec<char> = e.answer.chars().collect();
                match skill {
                    Skill::Predecessor => {
                        for (c, d) in input.iter().zip(&answer) {
                            assert_eq!(if *c == 'a' { 'j' } else { (*c as u8 - 1) as char }, *d);
                        }
                    }
                    Skill::Reverse => assert_eq!(input.iter().rev().copied().collect::<Vec<_>>(), answer),
                    Skill::Successor => {
                        for (c, d) in input.iter().zip(&answer) {
                            assert_eq!(if *c == 'j' { 'a' } else { (*c as u8 + 1) as char }, *d);
                        }
                    }
                    Skill::Swap => assert_eq!(vec![input[1], input[0], input[3], input[2]], answer),
                    Skill::Double => {
                        assert_eq!(input.iter().flat_map(|&c| [c, c]).collect::<Vec<_>>(), answer)
                    }
                }
                assert!(encode(&format!("{}{}\n", e.prompt, e.answer)).is_some(), "{e:?}");
                assert_eq!(e.wrong.len(), 3, "{e:?}");
                let mut all = e.wrong.clone();
                all.push(e.answer.clone());
                all.sort();
                all.dedup();
                assert_eq!(all.len(), 4, "distractors must be distinct and wrong: {e:?}");
            }
        }
    }

    #[test]
    fn splits_are_disjoint_and_training_avoids_them() {
        let mut held = HashSet::new();
        let s = splits(Skill::Reverse, 1, 50, 100, &mut held);
        assert_eq!((s.proxy.len(), s.test.len()), (50, 100));
        let proxy: HashSet<_> = s.proxy.iter().map(|e| &e.prompt).collect();
        assert!(s.test.iter().all(|e| !proxy.contains(&e.prompt)));
        let mut sampler = Sampler::new(9, &[(Skill::Reverse, 1.0)]);
        for _ in 0..2000 {
            assert!(!held.contains(&sampler.next(&held).prompt));
        }
    }

    #[test]
    fn tokenizer_json_round_trips() {
        let tok = tokenizers::Tokenizer::from_bytes(tokenizer_json().as_bytes()).unwrap();
        let text = "1234+5678=6802\nrev abcd=dcba\n";
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(ids, encode(text).unwrap());
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }
}
