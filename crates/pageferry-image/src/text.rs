//! Vocabularies with Zipf-like frequencies (English, Polish, C identifiers) and sentences
//! made of them, shared by the text-like content models.

use crate::fmt::push_capitalized;
use crate::rng::{hash2, Rng};

/// Zipf exponents of the English, Polish and C-identifier vocabularies.
pub(crate) const EN_ZIPF: f64 = 1.08;
pub(crate) const PL_ZIPF: f64 = 1.05;
pub(crate) const ID_ZIPF: f64 = 1.25;
/// Share of word slots filled with a frequent multi-word phrase.
pub(crate) const EN_PHRASES: f64 = 0.10;
pub(crate) const PL_PHRASES: f64 = 0.15;

pub(crate) struct Words {
    data: Vec<u8>,
    ends: Vec<u32>,
    /// Cumulative probabilities scaled to 2^32.
    cdf: Vec<u32>,
}

impl Words {
    /// `words` in decreasing frequency; weight of rank r is 1 / (r + q)^s.
    pub(crate) fn new(words: Vec<Vec<u8>>, s: f64, q: f64) -> Words {
        let mut data = Vec::new();
        let mut ends = Vec::with_capacity(words.len());
        for w in &words {
            data.extend_from_slice(w);
            ends.push(data.len() as u32);
        }
        let weights: Vec<f64> = (0..words.len())
            .map(|r| 1.0 / (r as f64 + q).powf(s))
            .collect();
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let cdf = weights
            .iter()
            .map(|w| {
                acc += w;
                ((acc / total) * 4_294_967_295.0) as u32
            })
            .collect();
        Words { data, ends, cdf }
    }

    pub(crate) fn len(&self) -> usize {
        self.ends.len()
    }

    pub(crate) fn get(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.data[start..self.ends[i] as usize]
    }

    pub(crate) fn sample(&self, rng: &mut Rng) -> &[u8] {
        let x = rng.next_u32();
        let i = self.cdf.partition_point(|&c| c < x).min(self.len() - 1);
        self.get(i)
    }
}

/// Words plus frequent multi-word phrases (collocations give LZ matches, as in real prose).
pub(crate) struct Text {
    words: Words,
    phrases: Words,
    phrase_p: f64,
}

impl Text {
    pub(crate) fn new(rng: &mut Rng, words: Words, phrase_p: f64) -> Text {
        let list = (0..3000)
            .map(|_| {
                let mut p = Vec::new();
                for k in 0..2 + rng.below(3) {
                    if k > 0 {
                        p.push(b' ');
                    }
                    p.extend_from_slice(words.sample(rng));
                }
                p
            })
            .collect();
        Text {
            phrases: Words::new(list, 1.0, 2.0),
            words,
            phrase_p,
        }
    }

    /// A single word.
    pub(crate) fn word(&self, rng: &mut Rng) -> &[u8] {
        self.words.sample(rng)
    }

    /// A word or a phrase.
    pub(crate) fn sample(&self, rng: &mut Rng) -> &[u8] {
        if rng.chance(self.phrase_p) {
            self.phrases.sample(rng)
        } else {
            self.words.sample(rng)
        }
    }
}

pub(crate) const EN_COMMON: &[&str] = &[
    "the",
    "and",
    "of",
    "to",
    "a",
    "in",
    "that",
    "he",
    "was",
    "it",
    "his",
    "i",
    "you",
    "with",
    "had",
    "as",
    "for",
    "her",
    "said",
    "not",
    "at",
    "be",
    "is",
    "on",
    "him",
    "she",
    "but",
    "my",
    "all",
    "have",
    "they",
    "so",
    "by",
    "me",
    "this",
    "which",
    "from",
    "were",
    "there",
    "what",
    "no",
    "one",
    "would",
    "if",
    "been",
    "an",
    "or",
    "when",
    "out",
    "up",
    "very",
    "we",
    "them",
    "their",
    "do",
    "could",
    "into",
    "more",
    "will",
    "little",
    "upon",
    "now",
    "then",
    "some",
    "who",
    "man",
    "like",
    "know",
    "any",
    "its",
    "your",
    "time",
    "such",
    "see",
    "old",
    "than",
    "made",
    "much",
    "about",
    "should",
    "great",
    "our",
    "down",
    "over",
    "before",
    "come",
    "good",
    "well",
    "never",
    "again",
    "how",
    "way",
    "hand",
    "after",
    "only",
    "own",
    "say",
    "two",
    "long",
    "other",
    "here",
    "head",
    "first",
    "might",
    "must",
    "went",
    "young",
    "think",
    "can",
    "away",
    "may",
    "dear",
    "face",
    "through",
    "shall",
    "where",
    "these",
    "being",
    "eyes",
    "thought",
    "back",
    "night",
    "day",
    "house",
    "door",
    "room",
    "while",
    "without",
    "under",
    "once",
    "every",
    "nothing",
    "something",
    "himself",
    "herself",
    "left",
    "looked",
    "took",
    "came",
    "put",
    "still",
    "mind",
    "life",
    "same",
    "those",
    "too",
    "own",
    "many",
    "quite",
    "even",
];

pub(crate) const PL_COMMON: &[&str] = &[
    "i", "w", "się", "na", "nie", "z", "do", "to", "że", "a", "jak", "o", "ale", "po", "co", "tak",
    "za", "od", "jest", "już", "go", "mu", "ją", "tylko", "jeszcze", "by", "był", "była", "było",
    "ten", "ta", "tego", "tej", "ich", "im", "czy", "bo", "gdzie", "kiej", "ino", "teraz", "tam",
    "tu", "pod", "przed", "przy", "nad", "ze", "we", "sobie", "wszystko", "nic", "rzekł", "ludzie",
    "dzień", "wieś", "ziemia", "ręce", "oczy", "głową", "chałupy", "jako", "kto", "się", "aż",
    "jeno", "coś", "wszyscy", "całkiem", "nawet", "potem", "dobrze",
];

pub(crate) fn gen_word(rng: &mut Rng, onsets: &[&str], vowels: &[&str], codas: &[&str]) -> Vec<u8> {
    let syl = match rng.below(10) {
        0..=2 => 1,
        3..=6 => 2,
        7..=8 => 3,
        _ => 4,
    };
    let mut w = Vec::new();
    for k in 0..syl {
        w.extend_from_slice(rng.pick(onsets).as_bytes());
        w.extend_from_slice(rng.pick(vowels).as_bytes());
        if k + 1 == syl || rng.chance(0.3) {
            w.extend_from_slice(rng.pick(codas).as_bytes());
        }
    }
    w
}

pub(crate) fn build_words(
    rng: &mut Rng,
    common: &[&str],
    total: usize,
    onsets: &[&str],
    vowels: &[&str],
    codas: &[&str],
    suffixes: &[&str],
) -> Vec<Vec<u8>> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(total);
    for w in common {
        if seen.insert(w.as_bytes().to_vec()) {
            out.push(w.as_bytes().to_vec());
        }
    }
    while out.len() < total {
        let mut w = gen_word(rng, onsets, vowels, codas);
        if !suffixes.is_empty() && rng.chance(0.35) {
            w.extend_from_slice(rng.pick(suffixes).as_bytes());
        }
        if w.len() < 2 || !seen.insert(w.clone()) {
            continue;
        }
        // Some proper names, capitalized in the vocabulary itself.
        if rng.chance(0.03) {
            w[0] = w[0].to_ascii_uppercase();
        }
        out.push(w);
    }
    out
}

impl Vocabs {
    pub(crate) fn new(seed: u64) -> Vocabs {
        let mut rng = Rng::new(hash2(seed, 0x70CA));
        let en = build_words(
            &mut rng,
            EN_COMMON,
            12000,
            &[
                "", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v",
                "w", "y", "b", "c", "d", "h", "l", "m", "n", "p", "r", "s", "t", "w", "bl", "br",
                "ch", "cl", "cr", "dr", "fl", "fr", "gr", "pl", "pr", "sh", "sl", "sp", "st",
                "str", "th", "th", "tr", "wh",
            ],
            &[
                "a", "e", "i", "o", "u", "a", "e", "i", "o", "e", "ea", "ee", "ai", "ou", "oo",
                "ie", "y",
            ],
            &[
                "", "", "", "n", "r", "s", "t", "l", "d", "m", "ng", "nd", "st", "ck", "ll", "ss",
                "th", "rt", "nt", "ve", "se", "ce", "re", "ed", "er", "ing", "ly", "tion",
            ],
            &[],
        );
        let pl = build_words(
            &mut rng,
            PL_COMMON,
            14000,
            &[
                "", "b", "c", "cz", "ch", "d", "dz", "g", "j", "k", "l", "ł", "m", "n", "p", "pr",
                "r", "rz", "s", "sz", "ś", "t", "w", "wi", "z", "ż", "st", "sk", "kr", "tr", "gł",
                "dr", "br", "pi", "mi", "ni", "zi", "ci", "bi", "w", "p", "m", "k",
            ],
            &[
                "a", "e", "i", "o", "u", "y", "a", "e", "o", "ą", "ę", "ó", "ie", "ia", "io",
            ],
            &[
                "", "", "", "", "ł", "ń", "ć", "ś", "ż", "n", "m", "r", "k", "sz", "cz", "j", "ch",
                "st",
            ],
            &[
                "ego", "emu", "ami", "ach", "ie", "ów", "ą", "ę", "ać", "ić", "ała", "ały", "ości",
                "nie", "ski", "ska", "cie", "ował", "iła",
            ],
        );
        let mut ids: Vec<Vec<u8>> = [
            "i",
            "ret",
            "status",
            "ctx",
            "mem_ctx",
            "NULL",
            "p",
            "len",
            "name",
            "n",
            "fsp",
            "conn",
            "state",
            "req",
            "data",
            "buf",
            "result",
            "size",
            "count",
            "flags",
            "tmp",
            "r",
            "s",
            "True",
            "False",
            "talloc_free",
            "strlen",
            "memcpy",
            "DEBUG",
            "NT_STATUS_OK",
            "uint32",
            "int",
            "char",
            "void",
            "struct",
            "const",
            "static",
            "unsigned",
            "BOOL",
            "NTSTATUS",
            "fname",
            "sbuf",
            "pdata",
            "offset",
            "smb_fname",
            "info",
            "entry",
            "level",
            "msg",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
        let mut seen: std::collections::HashSet<Vec<u8>> = ids.iter().cloned().collect();
        while ids.len() < 3000 {
            let parts = 1 + rng.below(3);
            let mut id = Vec::new();
            for k in 0..parts {
                if k > 0 {
                    id.push(b'_');
                }
                let w = &en[60 + rng.below(4000)];
                id.extend_from_slice(&w[..w.len().min(6)]);
            }
            id.make_ascii_lowercase();
            if seen.insert(id.clone()) {
                ids.push(id);
            }
        }
        Vocabs {
            english: Text::new(&mut rng, Words::new(en, EN_ZIPF, 2.0), EN_PHRASES),
            polish: Text::new(&mut rng, Words::new(pl, PL_ZIPF, 2.0), PL_PHRASES),
            idents: Words::new(ids, ID_ZIPF, 1.5),
        }
    }
}

pub(crate) struct Vocabs {
    pub(crate) english: Text,
    pub(crate) polish: Text,
    pub(crate) idents: Words,
}

/// One sentence of prose; `col` tracks the column for wrapping at `width` (0: no wrapping).
pub(crate) fn push_sentence(
    v: &mut Vec<u8>,
    rng: &mut Rng,
    words: &Text,
    col: &mut usize,
    width: usize,
) {
    let n = 3 + rng.below(14) + rng.below(14);
    let quote = rng.chance(0.15);
    for k in 0..n {
        let w = words.sample(rng);
        let mut piece_len = w.len() + 1;
        if k == 0 && quote {
            piece_len += 1;
        }
        if *col > 0 {
            if width > 0 && *col + piece_len > width {
                v.push(b'\n');
                *col = 0;
            } else {
                v.push(b' ');
                *col += 1;
            }
        }
        if k == 0 && quote {
            v.push(b'"');
            *col += 1;
        }
        if k == 0 {
            push_capitalized(v, w);
        } else {
            v.extend_from_slice(w);
        }
        *col += w.len();
        if k + 1 < n && rng.chance(0.09) {
            v.push(if rng.chance(0.85) { b',' } else { b';' });
            *col += 1;
        }
    }
    let end = match rng.below(20) {
        0 => b'?',
        1 => b'!',
        _ => b'.',
    };
    v.push(end);
    *col += 1;
    if quote {
        v.push(b'"');
        *col += 1;
    }
}
