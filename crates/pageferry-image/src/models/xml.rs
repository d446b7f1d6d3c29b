//! xml: records of a small fixed schema with short values.

use crate::fmt::*;
use crate::rng::Rng;
use crate::text::*;

/// xml: records of a small fixed schema with short values.
pub(crate) fn gen_xml(v: &mut Vec<u8>, rng: &mut Rng, words: &Text, n: usize) {
    const TAGS: &[(&str, &str)] = &[
        ("NAME", ""),
        ("ATOMIC_WEIGHT", ""),
        ("ATOMIC_NUMBER", ""),
        ("OXIDATION_STATES", ""),
        ("BOILING_POINT", " UNITS=\"Kelvin\""),
        ("MELTING_POINT", " UNITS=\"Kelvin\""),
        ("SYMBOL", ""),
        ("DENSITY", " UNITS=\"grams/cubic centimeter\""),
        ("ELECTRON_CONFIGURATION", ""),
        ("COVALENT_RADIUS", " UNITS=\"Angstroms\""),
        ("ELECTRONEGATIVITY", ""),
        ("ATOMIC_RADIUS", " UNITS=\"Angstroms\""),
        ("HEAT_OF_VAPORIZATION", " UNITS=\"kilojoules/mole\""),
        ("ATOMIC_VOLUME", " UNITS=\"cubic centimeters/mole\""),
        (
            "SPECIFIC_HEAT_CAPACITY",
            " UNITS=\"Joules/gram/degree Kelvin\"",
        ),
        (
            "THERMAL_CONDUCTIVITY",
            " UNITS=\"Watts/meter/degree Kelvin\"",
        ),
    ];
    v.extend_from_slice(b"<?xml version=\"1.0\"?>\n<PERIODIC_TABLE>\n");
    while v.len() < n {
        v.extend_from_slice(b"  <ATOM>\n    <ID>");
        push_alnum(v, rng, 10);
        v.extend_from_slice(b"</ID>\n");
        for (tag, attr) in TAGS {
            if rng.chance(0.1) {
                continue;
            }
            v.extend_from_slice(b"    <");
            v.extend_from_slice(tag.as_bytes());
            v.extend_from_slice(attr.as_bytes());
            v.push(b'>');
            match rng.below(6) {
                0 => push_capitalized(v, words.word(rng)),
                1 => push_uint(v, rng.range(1, 120) as u64),
                2 => {
                    v.extend_from_slice(b"<!-- At 300K -->      ");
                    push_fixed(v, rng.range(1, 99999), 2, 0);
                    v.extend_from_slice(b"    ");
                }
                _ => push_fixed(v, rng.range(1, 999999), rng.range(1, 4) as u32, 0),
            }
            v.extend_from_slice(b"</");
            v.extend_from_slice(tag.as_bytes());
            v.extend_from_slice(b">\n");
        }
        v.extend_from_slice(b"  </ATOM>\n");
    }
}
