//! webster: dictionary entries with markup.

use crate::fmt::*;
use crate::rng::Rng;
use crate::text::*;

// Calibration knobs (tuned against the real Silesia file; see the crate documentation).
/// webster: at most 2 + this many words per definition clause.
const DICT_CLAUSE_WORDS: usize = 8;

/// webster: dictionary entries with markup.
pub(crate) fn gen_dictionary(v: &mut Vec<u8>, rng: &mut Rng, words: &Text, n: usize) {
    const POS: &[&[u8]] = &[
        b"n.", b"v. t.", b"v. i.", b"a.", b"adv.", b"n. pl.", b"prep.",
    ];
    const FLD: &[&[u8]] = &[
        b"(Bot.)", b"(Zool.)", b"(Law)", b"(Med.)", b"(Naut.)", b"(Mus.)",
    ];
    const SRC: &[&[u8]] = &[
        b"Shak.", b"Milton.", b"Dryden.", b"Bacon.", b"Pope.", b"Locke.",
    ];
    while v.len() < n {
        let hw = words.word(rng).to_vec();
        v.extend_from_slice(b"<p><ent>");
        push_capitalized(v, &hw);
        v.extend_from_slice(b"</ent><br/\n<hw>");
        for (k, c) in hw.iter().enumerate() {
            if k > 0 && k % 3 == 0 {
                v.push(b'*');
            }
            v.push(*c);
        }
        v.extend_from_slice(b"</hw> <pr>(");
        for c in hw.iter() {
            if b"aeiou".contains(c) && rng.chance(0.5) {
                v.extend_from_slice(rng.pickb(&[&b"<ecr/"[..], b"<acr/", b"<icr/", b"<ocr/"]));
            } else {
                v.push(*c);
            }
        }
        v.extend_from_slice(b")</pr>, <pos>");
        v.extend_from_slice(rng.pickb(POS));
        v.extend_from_slice(b"</pos>");
        if rng.chance(0.5) {
            v.extend_from_slice(b" <ety>[OE. ");
            v.extend_from_slice(words.word(rng));
            v.extend_from_slice(b", AS. ");
            v.extend_from_slice(words.word(rng));
            v.extend_from_slice(b".]</ety>");
        }
        let senses = 1 + rng.below(3);
        for s in 0..senses {
            if senses > 1 {
                v.extend_from_slice(b"\n\n<p><sn>");
                push_uint(v, s as u64 + 1);
                v.extend_from_slice(b".</sn> ");
            }
            if rng.chance(0.4) {
                v.extend_from_slice(b"<fld>");
                v.extend_from_slice(rng.pickb(FLD));
                v.extend_from_slice(b"</fld> ");
            }
            v.extend_from_slice(b"<def>");
            // Definitions are short: a few clauses of a handful of words.
            for c in 0..1 + rng.below(3) {
                if c > 0 {
                    v.extend_from_slice(b"; ");
                }
                for k in 0..2 + rng.below(DICT_CLAUSE_WORDS) {
                    if k > 0 {
                        v.push(b' ');
                    }
                    let w = words.sample(rng);
                    if c == 0 && k == 0 {
                        push_capitalized(v, w);
                    } else {
                        v.extend_from_slice(w);
                    }
                }
            }
            v.extend_from_slice(b".</def>");
            if rng.chance(0.6) {
                v.extend_from_slice(b"<br/\n[<source>1913 Webster</source>]</p>\n");
            }
            if rng.chance(0.15) {
                v.extend_from_slice(b"\n\n<p><syn><b>Syn.</b> -- ");
                for k in 0..2 + rng.below(4) {
                    if k > 0 {
                        v.extend_from_slice(b"; ");
                    }
                    v.extend_from_slice(words.word(rng));
                }
                v.extend_from_slice(b".</syn><br/\n[<source>1913 Webster</source>]</p>\n");
            }
            if rng.chance(0.35) {
                v.extend_from_slice(b"\n<blockquote><qex>");
                push_sentence(v, rng, words, &mut 0, 0);
                v.extend_from_slice(b"</qex> <a>");
                v.extend_from_slice(rng.pickb(SRC));
                v.extend_from_slice(b"</a></blockquote>");
            }
        }
        v.extend_from_slice(b"</p>\n\n");
    }
}
