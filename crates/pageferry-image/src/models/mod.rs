//! The content models of the SilesiaLike mix, one file each, named after what they imitate
//! (the Silesia file each stands for is in the file's first line). Each `gen_*` appends at
//! least `n` bytes of its content to `v`.

mod c_source;
mod database;
mod dictionary;
mod english;
mod executables;
mod mri;
mod polish_pdf;
mod sdf;
mod star_catalog;
mod x86;
mod xml;
mod xray;

pub(crate) use c_source::gen_c_tar;
pub(crate) use database::gen_database;
pub(crate) use dictionary::gen_dictionary;
pub(crate) use english::gen_english;
pub(crate) use executables::gen_executables;
pub(crate) use mri::gen_mri;
pub(crate) use polish_pdf::gen_polish_pdf;
pub(crate) use sdf::gen_sdf;
pub(crate) use star_catalog::gen_star_catalog;
pub(crate) use x86::gen_x86;
pub(crate) use xml::gen_xml;
pub(crate) use xray::gen_xray;
